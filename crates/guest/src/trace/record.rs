//! The recorder: a backend wrapper that writes every guest operation, with its outcome,
//! to a trace.

use std::io::{self, Write};

use shadow2::emulate::Regs;
use shadow2::paging::ControlState;

use super::format::{Op, Record};
use super::header::TraceHeader;
use super::{MAGIC, MAX_DATA, MAX_HEADER, VERSION};
use crate::counting::{Counters, Counting};
use crate::ops::{Event, GuestOps, OpError};

/// Bytes gathered before they go to the writer.
const FLUSH_AT: usize = 64 * 1024;

/// Forwards every guest operation to the backend `B` and appends it, with its outcome, to
/// a trace written to `W`.
///
/// It counts what it forwards with its own [`Counting`] wrapper, so the end record carries
/// the recorded run's [`Counters`] (the same as those of any `Counting` wrapped around the
/// recorder). Output is buffered internally; the first write error (or an operation too
/// big for the format) stops the recording and is returned by [`Recorder::finish`], which
/// must be called: without it the trace has no end record. To keep the recorder while a
/// function consumes a backend, pass `&mut recorder` (`GuestOps` is implemented for
/// `&mut T`).
///
/// `load_image` is split at 4 KiB page boundaries, each piece a call of its own on the
/// backend and a record of its own; the first piece that fails ends the call.
#[derive(Debug)]
pub struct Recorder<B, W> {
    inner: Counting<B>,
    writer: W,
    header: TraceHeader,
    buf: Vec<u8>,
    records: u64,
    error: Option<io::Error>,
}

impl<B: GuestOps, W: Write> Recorder<B, W> {
    /// Starts a trace on `writer`: writes the magic, the version and `header`, whose
    /// `version`, `vcpus` and `ram_frames` are first set from this build and from `inner`.
    pub fn new(inner: B, mut writer: W, mut header: TraceHeader) -> io::Result<Self> {
        header.version = VERSION;
        header.vcpus = inner.vcpus();
        header.ram_frames = inner.ram_frames();
        let json = serde_json::to_vec(&header)?;
        if json.len() > MAX_HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "trace header of {} bytes exceeds the limit of {MAX_HEADER} bytes",
                    json.len()
                ),
            ));
        }
        let mut start = Vec::with_capacity(MAGIC.len() + 6 + json.len());
        start.extend_from_slice(&MAGIC);
        start.extend_from_slice(&VERSION.to_le_bytes());
        start.extend_from_slice(&(json.len() as u32).to_le_bytes());
        start.extend_from_slice(&json);
        writer.write_all(&start)?;
        Ok(Recorder {
            inner: Counting::new(inner),
            writer,
            header,
            buf: Vec::with_capacity(FLUSH_AT + 2 * MAX_DATA),
            records: 0,
            error: None,
        })
    }

    /// The header as written.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// The counters of the run so far.
    pub fn counters(&self) -> Counters {
        self.inner.counters()
    }

    /// Records written so far (the end record not included).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The backend.
    pub fn inner(&self) -> &B {
        self.inner.inner()
    }

    /// Writes the end record (the record count and the run's counters), flushes, and
    /// returns the backend and the writer; or the first error met while recording.
    pub fn finish(mut self) -> io::Result<(B, W)> {
        let end = Record::End {
            records: self.records,
            counters: self.inner.counters(),
        };
        self.push(&end);
        self.drain();
        if let Some(e) = self.error {
            return Err(e);
        }
        self.writer.flush()?;
        Ok((self.inner.into_inner(), self.writer))
    }

    fn push(&mut self, record: &Record) {
        if self.error.is_some() {
            return;
        }
        match record.encode(&mut self.buf) {
            Ok(()) => {
                if !matches!(record, Record::End { .. }) {
                    self.records += 1;
                }
                if self.buf.len() >= FLUSH_AT {
                    self.drain();
                }
            }
            Err(e) => self.error = Some(e),
        }
    }

    fn drain(&mut self) {
        if self.error.is_none()
            && let Err(e) = self.writer.write_all(&self.buf)
        {
            self.error = Some(e);
        }
        self.buf.clear();
    }

    fn push_op(&mut self, op: Op, outcome: &Result<(), OpError>) {
        self.push(&Record::Op {
            op,
            outcome: outcome.clone(),
        });
    }
}

impl<B: GuestOps, W: Write> GuestOps for Recorder<B, W> {
    fn vcpus(&self) -> usize {
        self.inner.vcpus()
    }

    fn ram_frames(&self) -> u64 {
        self.inner.ram_frames()
    }

    fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
        let page = MAX_DATA as u64;
        let mut done = 0usize;
        loop {
            let at = gpa.wrapping_add(done as u64);
            let room = (page - (at % page)) as usize;
            let piece = &data[done..data.len().min(done + room)];
            let r = self.inner.load_image(at, piece);
            self.push_op(
                Op::LoadImage {
                    gpa: at,
                    data: piece.to_vec(),
                },
                &r,
            );
            r?;
            done += piece.len();
            if done >= data.len() {
                return Ok(());
            }
        }
    }

    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        let r = self.inner.read(vcpu, va, cpl, buf);
        let len = buf.len();
        self.push_op(Op::Read { vcpu, va, cpl, len }, &r);
        r
    }

    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        let r = self.inner.write(vcpu, va, cpl, data);
        let data = data.to_vec();
        self.push_op(
            Op::Write {
                vcpu,
                va,
                cpl,
                data,
            },
            &r,
        );
        r
    }

    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        let r = self.inner.fetch(vcpu, va, cpl, buf);
        let len = buf.len();
        self.push_op(Op::Fetch { vcpu, va, cpl, len }, &r);
        r
    }

    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        let before = *regs;
        let r = self.inner.exec(vcpu, regs);
        self.push_op(Op::Exec { vcpu, regs: before }, &r);
        r
    }

    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        let r = self.inner.set_control(vcpu, ctl);
        self.push_op(Op::SetControl { vcpu, ctl }, &r);
        r
    }

    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        let r = self.inner.set_cr3(vcpu, cr3);
        self.push_op(Op::SetCr3 { vcpu, cr3 }, &r);
        r
    }

    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError> {
        let r = self.inner.invlpg(vcpu, va);
        self.push_op(Op::Invlpg { vcpu, va }, &r);
        r
    }

    fn event(&mut self, event: Event) {
        self.inner.event(event);
        self.push(&Record::Event(event));
    }
}
