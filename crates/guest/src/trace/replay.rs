//! Reading a trace ([`read_header`], [`TraceReader`]) and re-issuing it on a backend
//! ([`replay`]).

use std::io::{BufReader, Read};

use super::decode::decode_body;
use super::error::{TraceError, TraceErrorKind};
use super::format::{Op, Record, clip_outcome};
use super::header::TraceHeader;
use super::input::Input;
use super::{MAGIC, MAX_DATA, MAX_HEADER, VERSION};
use crate::counting::{Counters, Counting};
use crate::ops::{GuestOps, OpError};

/// Offset of the version field.
const VERSION_OFFSET: u64 = 8;
/// Offset of the header length field.
const LENGTH_OFFSET: u64 = 10;
/// Offset of the JSON header.
const JSON_OFFSET: u64 = 14;
/// The replay reports progress at least every this many bytes.
const PROGRESS_STEP: u64 = 64 * 1024;

/// What a replay that matched the recording found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// The trace's header.
    pub header: TraceHeader,
    /// The replay's counters (equal to the recorded run's).
    pub counters: Counters,
    /// Records replayed (the end record not counted).
    pub records: u64,
}

fn header_from<R: Read>(input: &mut Input<R>) -> Result<TraceHeader, TraceError> {
    input.set_part("magic");
    let mut magic = [0u8; MAGIC.len()];
    let n = input.fill(&mut magic).map_err(|k| TraceError::new(0, k))?;
    if magic[..n] != MAGIC[..n] {
        return Err(TraceError::new(0, TraceErrorKind::BadMagic));
    }
    if n < MAGIC.len() {
        let needed = (MAGIC.len() - n) as u64;
        let what = "magic";
        return Err(TraceError::new(
            0,
            TraceErrorKind::Truncated { what, needed },
        ));
    }
    input.set_part("header");
    let version = input
        .u16()
        .map_err(|k| TraceError::new(VERSION_OFFSET, k))?;
    if version != VERSION {
        return Err(TraceError::new(
            VERSION_OFFSET,
            TraceErrorKind::UnsupportedVersion(version),
        ));
    }
    let len = input.u32().map_err(|k| TraceError::new(LENGTH_OFFSET, k))?;
    let len = match usize::try_from(len) {
        Ok(l) if l <= MAX_HEADER => l,
        _ => {
            let why = format!("length {len} exceeds the limit of {MAX_HEADER} bytes");
            return Err(TraceError::new(
                LENGTH_OFFSET,
                TraceErrorKind::BadHeader(why),
            ));
        }
    };
    let json = input
        .bytes(len)
        .map_err(|k| TraceError::new(JSON_OFFSET, k))?;
    let bad = |why: String| TraceError::new(JSON_OFFSET, TraceErrorKind::BadHeader(why));
    let header: TraceHeader = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    if header.version != version {
        return Err(bad(format!(
            "it says version {}, the file is version {version}",
            header.version
        )));
    }
    Ok(header)
}

/// Reads the magic, the version and the header, and nothing more: `reader` is left at the
/// first record. (To replay, start again from the beginning: [`replay`] reads the header
/// itself.)
pub fn read_header<R: Read>(reader: R) -> Result<TraceHeader, TraceError> {
    header_from(&mut Input::new(reader))
}

/// Reads a trace record by record, checking its structure: every field in range, the end
/// record's count, nothing after the end record. It buffers its reader.
#[derive(Debug)]
pub struct TraceReader<R> {
    input: Input<BufReader<R>>,
    header: TraceHeader,
    records: u64,
    done: bool,
}

impl<R: Read> TraceReader<R> {
    /// Reads the header of the trace `reader` holds from its beginning.
    pub fn new(reader: R) -> Result<TraceReader<R>, TraceError> {
        let mut input = Input::new(BufReader::with_capacity(64 * 1024, reader));
        let header = header_from(&mut input)?;
        Ok(TraceReader {
            input,
            header,
            records: 0,
            done: false,
        })
    }

    /// The header.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.input.pos()
    }

    /// Records read so far, the end record not counted: the index the next record has.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The next record and its offset. The end record is returned like the others (once
    /// its count matched and nothing follows it); after it, and after any error, `None`.
    pub fn next_record(&mut self) -> Result<Option<(u64, Record)>, TraceError> {
        if self.done {
            return Ok(None);
        }
        let r = self.read_record();
        if !matches!(r, Ok(Some((_, Record::Op { .. } | Record::Event(_))))) {
            self.done = true;
        }
        r
    }

    fn read_record(&mut self) -> Result<Option<(u64, Record)>, TraceError> {
        let start = self.input.pos();
        let at = |kind| TraceError::new(start, kind);
        self.input.set_part("record");
        let mut tag = [0u8];
        if self.input.fill(&mut tag).map_err(at)? == 0 {
            return Err(at(TraceErrorKind::MissingEnd));
        }
        let record =
            decode_body(tag[0], &mut self.input, self.records, self.header.vcpus).map_err(at)?;
        match &record {
            Record::End { records, .. } => {
                if *records != self.records {
                    return Err(at(TraceErrorKind::CountMismatch {
                        recorded: *records,
                        found: self.records,
                    }));
                }
                let after = self.input.pos();
                if self.input.fill(&mut [0u8]).map_err(at)? != 0 {
                    return Err(TraceError::new(after, TraceErrorKind::TrailingData));
                }
            }
            Record::Op { .. } | Record::Event(_) => self.records += 1,
        }
        Ok(Some((start, record)))
    }
}

impl<R: Read> Iterator for TraceReader<R> {
    type Item = Result<(u64, Record), TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// [`replay_with_total`] without a known total size (progress reports 0 as the total).
pub fn replay<B: GuestOps, R: Read>(
    reader: R,
    backend: B,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplayOutcome, TraceError> {
    replay_with_total(reader, 0, backend, progress)
}

/// Re-issues the trace `reader` holds (from its beginning) on `backend` through a
/// [`Counting`] wrapper. The backend must have the trace's vcpus and RAM. Every outcome
/// must equal the recorded one (else [`TraceErrorKind::Divergence`]), and at the end the
/// replay's counters must equal the recorded run's (else
/// [`TraceErrorKind::CountersMismatch`]). `progress(bytes read, total)` is called at the
/// start, every 64 KiB and at the end; `total` is the trace's size if the caller knows it,
/// else 0.
pub fn replay_with_total<B: GuestOps, R: Read>(
    reader: R,
    total: u64,
    backend: B,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplayOutcome, TraceError> {
    let mut trace = TraceReader::new(reader)?;
    let header = trace.header().clone();
    let mismatch = |what, trace: u64, backend: u64| {
        let kind = TraceErrorKind::BackendMismatch {
            what,
            trace,
            backend,
        };
        Err(TraceError::new(JSON_OFFSET, kind))
    };
    if backend.vcpus() != header.vcpus {
        return mismatch("vcpus", header.vcpus as u64, backend.vcpus() as u64);
    }
    if backend.ram_frames() != header.ram_frames {
        return mismatch("RAM frames", header.ram_frames, backend.ram_frames());
    }
    let mut ops = Counting::new(backend);
    let mut scratch = vec![0u8; MAX_DATA];
    progress(trace.offset(), total);
    let mut next_report = trace.offset() + PROGRESS_STEP;
    loop {
        let Some((offset, record)) = trace.next_record()? else {
            return Err(TraceError::new(trace.offset(), TraceErrorKind::MissingEnd));
        };
        match record {
            Record::Op { op, outcome } => {
                let replayed = clip_outcome(issue(&mut ops, &op, &mut scratch));
                if replayed != outcome {
                    let kind = TraceErrorKind::Divergence {
                        record: trace.records() - 1,
                        op: op.name(),
                        recorded: outcome,
                        replayed,
                    };
                    return Err(TraceError::new(offset, kind));
                }
            }
            Record::Event(e) => ops.event(e),
            Record::End { records, counters } => {
                let replayed = ops.counters();
                if replayed != counters {
                    let kind = TraceErrorKind::CountersMismatch {
                        recorded: Box::new(counters),
                        replayed: Box::new(replayed),
                    };
                    return Err(TraceError::new(offset, kind));
                }
                progress(trace.offset(), total);
                return Ok(ReplayOutcome {
                    header,
                    counters: replayed,
                    records,
                });
            }
        }
        if trace.offset() >= next_report {
            progress(trace.offset(), total);
            next_report = trace.offset() + PROGRESS_STEP;
        }
    }
}

/// Issues one recorded operation. `scratch` holds [`MAX_DATA`] bytes, which decoded
/// lengths never exceed.
fn issue<B: GuestOps>(ops: &mut B, op: &Op, scratch: &mut [u8]) -> Result<(), OpError> {
    match *op {
        Op::LoadImage { gpa, ref data } => ops.load_image(gpa, data),
        Op::Read { vcpu, va, cpl, len } => {
            let buf = &mut scratch[..len];
            buf.fill(0);
            ops.read(vcpu, va, cpl, buf)
        }
        Op::Write {
            vcpu,
            va,
            cpl,
            ref data,
        } => ops.write(vcpu, va, cpl, data),
        Op::Fetch { vcpu, va, cpl, len } => {
            let buf = &mut scratch[..len];
            buf.fill(0);
            ops.fetch(vcpu, va, cpl, buf)
        }
        Op::Exec { vcpu, regs } => {
            let mut regs = regs;
            ops.exec(vcpu, &mut regs)
        }
        Op::SetControl { vcpu, ctl } => ops.set_control(vcpu, ctl),
        Op::SetCr3 { vcpu, cr3 } => ops.set_cr3(vcpu, cr3),
        Op::Invlpg { vcpu, va } => ops.invlpg(vcpu, va),
    }
}
