#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Trace record and replay: round trips, damaged input, divergence.

use std::io::{self, Write};

use proptest::prelude::*;
use shadow2::emulate::{CodeMode, Regs};
use shadow2::paging::ControlState;
use shadow2_guest::trace::{
    self, MAX_DATA, Op, Record, Recorder, ReplayOutcome, TraceError, TraceErrorKind, TraceHeader,
    TraceReader,
};
use shadow2_guest::{
    Counters, Counting, Event, Fault, GuestModel, GuestOps, OpError, PairName, RunSpec, Workload,
};

const PAGE: u64 = 4096;
const FRAMES: u64 = 16;
const VCPUS: usize = 2;

/// A deterministic backend: flat memory, linear address + CR3 = physical address; pages
/// whose number is `bad_page` mod 7 fault, as do addresses beyond RAM and user accesses
/// to the first two pages. Indexes its vcpus without checks (a replay must never hand it
/// a bad vcpu).
#[derive(Clone)]
struct Fake {
    mem: Vec<u8>,
    cr3: [u64; VCPUS],
    bad_page: u64,
    /// XORed into every byte loaded (a backend that returns other data, same outcomes).
    read_xor: u8,
}

impl Fake {
    fn new() -> Fake {
        Fake::with_bad_page(3)
    }

    fn with_bad_page(bad_page: u64) -> Fake {
        Fake {
            mem: vec![0; (FRAMES * PAGE) as usize],
            cr3: [0; VCPUS],
            bad_page,
            read_xor: 0,
        }
    }

    fn translate(
        &self,
        vcpu: usize,
        va: u64,
        cpl: u8,
        len: usize,
        write: bool,
    ) -> Result<usize, Fault> {
        let code = u32::from(write) << 1 | u32::from(cpl == 3) << 2;
        let pa = va.wrapping_add(self.cr3[vcpu]);
        let page = pa / PAGE;
        if page % 7 == self.bad_page {
            return Err(Fault::PageFault { va, code });
        }
        if cpl == 3 && page < 2 {
            return Err(Fault::PageFault { va, code: code | 1 });
        }
        match pa.checked_add(len as u64) {
            Some(end) if end <= self.mem.len() as u64 => Ok(pa as usize),
            _ => Err(Fault::PageFault { va, code }),
        }
    }
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Fake {{ cr3: {:x?}, bad_page: {} }}",
            self.cr3, self.bad_page
        )
    }
}

impl GuestOps for Fake {
    fn vcpus(&self) -> usize {
        VCPUS
    }
    fn ram_frames(&self) -> u64 {
        FRAMES
    }
    fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
        match gpa.checked_add(data.len() as u64) {
            Some(end) if end <= self.mem.len() as u64 => {
                self.mem[gpa as usize..end as usize].copy_from_slice(data);
                Ok(())
            }
            _ => Err(OpError::Backend(format!("load at {gpa:#x} beyond RAM"))),
        }
    }
    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        let pa = self.translate(vcpu, va, cpl, buf.len(), false)?;
        buf.copy_from_slice(&self.mem[pa..pa + buf.len()]);
        buf.iter_mut().for_each(|b| *b ^= self.read_xor);
        Ok(())
    }
    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        let pa = self.translate(vcpu, va, cpl, data.len(), true)?;
        self.mem[pa..pa + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.read(vcpu, va, cpl, buf)
    }
    /// XCHG [RDI], RAX.
    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        if regs.mode == CodeMode::Bits16 {
            return Err(Fault::InvalidOpcode.into());
        }
        let pa = self.translate(vcpu, regs.gpr[Regs::RDI], regs.cpl, 8, true)?;
        let old = u64::from_le_bytes(self.mem[pa..pa + 8].try_into().unwrap());
        self.mem[pa..pa + 8].copy_from_slice(&regs.gpr[Regs::RAX].to_le_bytes());
        regs.gpr[Regs::RAX] = old;
        regs.rip += 3;
        Ok(())
    }
    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        if ctl.cr0 & 0x8000_0000 != 0 && ctl.cr0 & 1 == 0 {
            return Err(Fault::GeneralProtection.into());
        }
        self.set_cr3(vcpu, ctl.cr3)
    }
    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        if !cr3.is_multiple_of(PAGE) {
            return Err(Fault::GeneralProtection.into());
        }
        self.cr3[vcpu] = cr3;
        Ok(())
    }
    fn invlpg(&mut self, _vcpu: usize, va: u64) -> Result<(), OpError> {
        let top = va >> 47;
        if top != 0 && top != 0x1_ffff {
            return Err(Fault::GeneralProtection.into());
        }
        Ok(())
    }
}

/// A small deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A scripted guest: every kind of operation and event, faults of every kind, a backend
/// failure, an image loaded in pieces. Its operations do not depend on outcomes.
fn script(ops: &mut impl GuestOps, steps: usize) {
    let image: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 1) as u8).collect();
    let _ = ops.load_image(0x800, &image);
    let _ = ops.load_image(FRAMES * PAGE - 16, &[1; 32]);
    let mut rng = Lcg(0x5eed);
    for step in 0..steps {
        let vcpu = rng.below(VCPUS as u64) as usize;
        let va = rng.below(20 * PAGE);
        let room = (PAGE - va % PAGE) as usize;
        let len = (1 + rng.below(16) as usize).min(room);
        let cpl = if rng.below(4) == 0 { 3 } else { 0 };
        match rng.below(12) {
            0..=2 => {
                let mut buf = vec![0; len];
                let _ = ops.read(vcpu, va, cpl, &mut buf);
            }
            3..=5 => {
                let data: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
                let _ = ops.write(vcpu, va, cpl, &data);
            }
            6 => {
                let mut buf = vec![0; len];
                let _ = ops.fetch(vcpu, va, cpl, &mut buf);
            }
            7 => {
                let mode = [CodeMode::Bits16, CodeMode::Bits32, CodeMode::Bits64][step % 3];
                let mut regs = Regs::new(mode);
                regs.gpr[Regs::RAX] = rng.next();
                regs.gpr[Regs::RDI] = va & !7;
                regs.rip = 0x1000 + step as u64;
                regs.cpl = cpl;
                let _ = ops.exec(vcpu, &mut regs);
            }
            8 => {
                let ctl = ControlState {
                    cr0: [0x8000_0001, 0x8000_0000, 0x11][step % 3],
                    cr3: rng.below(3) * PAGE,
                    cr4: 0x20,
                    efer: 0x500,
                    rflags: 2,
                    pkru: 0x55,
                    pdptes: [1, 2, 3, 4],
                };
                let _ = ops.set_control(vcpu, ctl);
            }
            9 => {
                let cr3 = rng.below(3) * PAGE + if rng.below(5) == 0 { 8 } else { 0 };
                let _ = ops.set_cr3(vcpu, cr3);
            }
            10 => {
                let va = if rng.below(4) == 0 {
                    0x8000_0000_0000
                } else {
                    va
                };
                let _ = ops.invlpg(vcpu, va);
            }
            _ => {
                let e = [
                    Event::DemandFault,
                    Event::CowFault,
                    Event::Kill,
                    Event::WorkloadStep,
                    Event::DataError,
                    Event::UserAccess,
                    Event::UserAccessDone,
                ][step % 7];
                ops.event(e);
            }
        }
    }
    let mut page = vec![0; PAGE as usize];
    let _ = ops.read(0, 2 * PAGE, 0, &mut page);
    let _ = ops.write(1, 4 * PAGE, 0, &[]);
}

fn header() -> TraceHeader {
    let spec = RunSpec {
        guest: GuestModel::Linux64,
        workload: Workload::Forkwait,
        size: 3,
        pair: PairName::new(4, 4),
        seed: 42,
    };
    TraceHeader::for_run(&spec, "fake")
}

/// Records the script on `backend`: the trace and the counters of a `Counting` wrapped
/// around the recorder.
fn record_on(backend: Fake, steps: usize) -> (Vec<u8>, Counters) {
    let mut rec = Recorder::new(backend, Vec::new(), header()).unwrap();
    let mut counting = Counting::new(&mut rec);
    script(&mut counting, steps);
    let counters = counting.counters();
    assert_eq!(rec.counters(), counters);
    let (_, bytes) = rec.finish().unwrap();
    (bytes, counters)
}

fn record(steps: usize) -> (Vec<u8>, Counters) {
    record_on(Fake::new(), steps)
}

fn replay_on(bytes: &[u8], backend: Fake) -> Result<ReplayOutcome, TraceError> {
    trace::replay(bytes, backend, &mut |_, _| {})
}

fn records(bytes: &[u8]) -> Vec<(u64, Record)> {
    TraceReader::new(bytes)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Offset of the first record.
fn first_record(bytes: &[u8]) -> usize {
    14 + u32::from_le_bytes(bytes[10..14].try_into().unwrap()) as usize
}

#[test]
fn record_then_replay_gives_identical_counters() {
    let (bytes, counters) = record(400);
    assert!(counters.reads > 0 && counters.writes > 0 && counters.fetches > 0);
    assert!(counters.execs > 0 && counters.control_writes > 0 && counters.cr3_writes > 0);
    assert!(counters.invlpgs > 0 && counters.faults_delivered > 0);
    assert!(counters.demand_faults > 0 && counters.data_errors > 0);

    let mut calls = Vec::new();
    let len = bytes.len() as u64;
    let out =
        trace::replay_with_total(&bytes[..], len, Fake::new(), &mut |b, t| calls.push((b, t)))
            .unwrap();
    assert_eq!(out.counters, counters);
    assert_eq!(out.header, trace::read_header(&bytes[..]).unwrap());
    assert_eq!(out.records as usize, records(&bytes).len() - 1);
    assert_eq!(
        calls.first().copied(),
        Some((first_record(&bytes) as u64, len))
    );
    assert_eq!(calls.last().copied(), Some((len, len)));

    // A Counting wrapper around the replayed backend sees the same.
    let mut fresh = Counting::new(Fake::new());
    trace::replay(&bytes[..], &mut fresh, &mut |_, _| {}).unwrap();
    assert_eq!(fresh.counters(), counters);
}

#[test]
fn trace_holds_every_kind_of_record_and_outcome() {
    let (bytes, counters) = record(400);
    let all = records(&bytes);
    let ops: Vec<&Op> = all
        .iter()
        .filter_map(|(_, r)| match r {
            Record::Op { op, .. } => Some(op),
            _ => None,
        })
        .collect();
    for name in [
        "load_image",
        "read",
        "write",
        "fetch",
        "exec",
        "set_control",
        "set_cr3",
        "invlpg",
    ] {
        assert!(ops.iter().any(|o| o.name() == name), "no {name} record");
    }
    let outcomes: Vec<&Result<(), OpError>> = all
        .iter()
        .filter_map(|(_, r)| match r {
            Record::Op { outcome, .. } => Some(outcome),
            _ => None,
        })
        .collect();
    assert!(outcomes.iter().any(|o| o.is_ok()));
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Err(OpError::Fault(Fault::PageFault { .. }))))
    );
    assert!(
        outcomes
            .iter()
            .any(|o| **o == Err(Fault::GeneralProtection.into()))
    );
    assert!(
        outcomes
            .iter()
            .any(|o| **o == Err(Fault::InvalidOpcode.into()))
    );
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Err(OpError::Backend(_))))
    );
    let Some((
        _,
        Record::End {
            records,
            counters: c,
        },
    )) = all.last()
    else {
        panic!("no end record");
    };
    assert_eq!(*records as usize, all.len() - 1);
    assert_eq!(*c, counters);

    // The 5000-byte image at 0x800 is split at page boundaries.
    let pieces: Vec<(u64, usize)> = ops
        .iter()
        .filter_map(|o| match o {
            Op::LoadImage { gpa, data } => Some((*gpa, data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(&pieces[..2], &[(0x800, 0x800), (0x1000, 5000 - 0x800)]);

    // The header: vcpus and RAM come from the backend.
    let h = trace::read_header(&bytes[..]).unwrap();
    assert_eq!(
        (h.version, h.vcpus, h.ram_frames),
        (trace::VERSION, VCPUS, FRAMES)
    );
    assert_eq!(h.backend, "fake");
    assert_eq!(h.run_spec().unwrap().pair, PairName::new(4, 4));
}

#[test]
fn read_header_stops_at_the_first_record() {
    let (bytes, _) = record(10);
    let mut rest = &bytes[..];
    trace::read_header(&mut rest).unwrap();
    assert_eq!(bytes.len() - rest.len(), first_record(&bytes));
}

#[test]
fn every_truncation_is_an_error_within_the_file() {
    let (bytes, _) = record(150);
    let boundaries: Vec<u64> = records(&bytes).iter().map(|(o, _)| *o).collect();
    for cut in 0..bytes.len() {
        let e = replay_on(&bytes[..cut], Fake::new()).unwrap_err();
        assert!(e.offset <= cut as u64, "cut {cut}: {e}");
        assert!(!e.to_string().contains('\n'));
        match e.kind {
            TraceErrorKind::Truncated { .. } => {}
            TraceErrorKind::MissingEnd => {
                assert!(boundaries.contains(&(cut as u64)), "cut {cut}: {e}");
                assert_eq!(e.offset, cut as u64);
            }
            other => panic!("cut {cut}: unexpected {other:?}"),
        }
        if cut < first_record(&bytes) {
            assert!(trace::read_header(&bytes[..cut]).is_err());
        }
    }
    assert_eq!(
        replay_on(&bytes[..3], Fake::new()).unwrap_err().to_string(),
        "offset 0: truncated magic (needed 5 more bytes)"
    );
    let cut = boundaries[1] as usize + 5;
    assert_eq!(
        replay_on(&bytes[..cut], Fake::new()).unwrap_err(),
        TraceError::new(
            boundaries[1],
            TraceErrorKind::Truncated {
                what: "record",
                needed: 4,
            }
        )
    );
}

#[test]
fn bad_magic_and_bad_version() {
    let (mut bytes, _) = record(10);
    let mut other = bytes.clone();
    other[0] = b'X';
    let e = replay_on(&other, Fake::new()).unwrap_err();
    assert_eq!(e.to_string(), "offset 0: not a shadow2 trace (bad magic)");
    assert_eq!(
        trace::read_header(&b"hello"[..]).unwrap_err().kind,
        TraceErrorKind::BadMagic
    );

    bytes[8..10].copy_from_slice(&7u16.to_le_bytes());
    let e = trace::read_header(&bytes[..]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "offset 8: unsupported trace version 7 (this build reads 1)"
    );
    assert_eq!(replay_on(&bytes, Fake::new()).unwrap_err(), e);
}

#[test]
fn header_errors() {
    let (bytes, _) = record(10);
    // A huge header length is refused before anything is allocated.
    let mut huge = bytes.clone();
    huge[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = trace::read_header(&huge[..]).unwrap_err();
    assert_eq!(e.offset, 10);
    assert!(matches!(e.kind, TraceErrorKind::BadHeader(_)), "{e}");
    // Not JSON.
    let mut junk = bytes.clone();
    junk[14] = b'!';
    let e = trace::read_header(&junk[..]).unwrap_err();
    assert_eq!(e.offset, 14);
    assert!(e.to_string().starts_with("offset 14: bad header: "), "{e}");
    // The backend is not the shape of the recorded one.
    struct OneVcpu(Fake);
    impl GuestOps for OneVcpu {
        fn vcpus(&self) -> usize {
            1
        }
        fn ram_frames(&self) -> u64 {
            self.0.ram_frames()
        }
        fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
            self.0.load_image(gpa, data)
        }
        fn read(&mut self, v: usize, va: u64, cpl: u8, b: &mut [u8]) -> Result<(), OpError> {
            self.0.read(v, va, cpl, b)
        }
        fn write(&mut self, v: usize, va: u64, cpl: u8, d: &[u8]) -> Result<(), OpError> {
            self.0.write(v, va, cpl, d)
        }
        fn fetch(&mut self, v: usize, va: u64, cpl: u8, b: &mut [u8]) -> Result<(), OpError> {
            self.0.fetch(v, va, cpl, b)
        }
        fn exec(&mut self, v: usize, regs: &mut Regs) -> Result<(), OpError> {
            self.0.exec(v, regs)
        }
        fn set_control(&mut self, v: usize, ctl: ControlState) -> Result<(), OpError> {
            self.0.set_control(v, ctl)
        }
        fn set_cr3(&mut self, v: usize, cr3: u64) -> Result<(), OpError> {
            self.0.set_cr3(v, cr3)
        }
        fn invlpg(&mut self, v: usize, va: u64) -> Result<(), OpError> {
            self.0.invlpg(v, va)
        }
    }
    let e = trace::replay(&bytes[..], OneVcpu(Fake::new()), &mut |_, _| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        "offset 14: the backend has 1 vcpus, the trace was recorded with 2"
    );
}

#[test]
fn record_errors() {
    let (bytes, _) = record(30);
    let all = records(&bytes);
    let first = first_record(&bytes);

    let mut unknown = bytes.clone();
    unknown[first] = 0x3f;
    assert_eq!(
        replay_on(&unknown, Fake::new()).unwrap_err().to_string(),
        format!("offset {first}: unknown record tag 0x3f")
    );

    // A vcpu out of range never reaches the backend (which would panic).
    let (at, _) = all
        .iter()
        .find(|(_, r)| matches!(r, Record::Op { op, .. } if op.vcpu().is_some()))
        .unwrap();
    let mut vcpu = bytes.clone();
    vcpu[*at as usize + 1..*at as usize + 5].copy_from_slice(&9u32.to_le_bytes());
    let e = replay_on(&vcpu, Fake::new()).unwrap_err();
    assert_eq!(e.offset, *at);
    assert!(e.to_string().contains("vcpu 9 out of range"), "{e}");

    // An over-long length is refused.
    let mut long = bytes.clone();
    long[first + 9..first + 13].copy_from_slice(&(MAX_DATA as u32 + 1).to_le_bytes());
    let e = replay_on(&long, Fake::new()).unwrap_err();
    assert_eq!(e.offset, first as u64);
    assert!(e.to_string().contains("exceeds the limit of 4096"), "{e}");

    // The end record's count, and data after it.
    let (end, _) = all.last().unwrap();
    let end = *end as usize;
    let mut count = bytes.clone();
    count[end + 1] ^= 1;
    let e = replay_on(&count, Fake::new()).unwrap_err();
    assert_eq!(e.offset, end as u64);
    assert!(
        matches!(e.kind, TraceErrorKind::CountMismatch { .. }),
        "{e}"
    );
    let mut trailing = bytes.clone();
    trailing.push(0);
    let e = replay_on(&trailing, Fake::new()).unwrap_err();
    assert_eq!(
        e,
        TraceError::new(bytes.len() as u64, TraceErrorKind::TrailingData)
    );

    // The recorded counters disagree with the replay.
    let mut digest = bytes.clone();
    let at = digest.len() - 1;
    digest[at] ^= 0x80;
    let e = replay_on(&digest, Fake::new()).unwrap_err();
    assert_eq!(e.offset, end as u64);
    assert!(
        e.to_string()
            .contains(": replayed counters differ from the recorded run: digest "),
        "{e}"
    );
}

#[test]
fn divergence_names_the_first_differing_record() {
    let (bytes, _) = record(300);
    let (other, _) = record_on(Fake::with_bad_page(5), 300);
    let (a, b) = (records(&bytes), records(&other));
    let (index, (offset, record)) = a
        .iter()
        .zip(&b)
        .enumerate()
        .find(|(_, (x, y))| x.1 != y.1)
        .map(|(i, (x, _))| (i, x))
        .unwrap();
    let Record::Op { op, outcome } = record else {
        panic!("first difference is not an operation");
    };
    let Record::Op {
        outcome: theirs,
        op: their_op,
    } = &b[index].1
    else {
        panic!("first difference is not an operation");
    };
    assert_eq!(op, their_op);
    let e = replay_on(&bytes, Fake::with_bad_page(5)).unwrap_err();
    assert_eq!(
        e,
        TraceError::new(
            *offset,
            TraceErrorKind::Divergence {
                record: index as u64,
                op: op.name(),
                recorded: outcome.clone(),
                replayed: theirs.clone(),
            }
        )
    );
}

#[test]
fn divergence_message() {
    let mut rec = Recorder::new(Fake::new(), Vec::new(), header()).unwrap();
    rec.event(Event::WorkloadStep);
    rec.set_cr3(0, 0).unwrap();
    // Page 3 faults on the recording backend, not on the replay's.
    assert!(rec.write(1, 3 * PAGE + 8, 0, &[1, 2]).is_err());
    let (_, bytes) = rec.finish().unwrap();
    let offset = records(&bytes)[2].0;
    let e = replay_on(&bytes, Fake::with_bad_page(6)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "offset {offset}: record 2 (write) diverged: recorded #PF at 0x3008 (error code 0x2), replay gave Ok"
        )
    );
}

/// The example in docs/TRACE.md, byte for byte.
#[test]
fn bytes_match_the_documented_example() {
    let mut rec = Recorder::new(Fake::new(), Vec::new(), header()).unwrap();
    assert!(rec.set_cr3(0, 0x1008).is_err());
    rec.event(Event::WorkloadStep);
    assert!(rec.write(1, 0x3008, 0, &[0xaa, 0xbb]).is_err());
    let counters = rec.counters();
    let (_, bytes) = rec.finish().unwrap();

    let json = serde_json::to_vec(&trace::read_header(&bytes[..]).unwrap()).unwrap();
    let mut want = b"SHADOW2T".to_vec();
    want.extend_from_slice(&[1, 0]);
    want.extend_from_slice(&(json.len() as u32).to_le_bytes());
    want.extend_from_slice(&json);
    #[rustfmt::skip]
    want.extend_from_slice(&[
        0x07, 0, 0, 0, 0, 0x08, 0x10, 0, 0, 0, 0, 0, 0, 0x02,
        0x10, 0x03,
        0x03, 1, 0, 0, 0, 0x08, 0x30, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0xaa, 0xbb,
        0x01, 0x08, 0x30, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0,
        0xff, 3, 0, 0, 0, 0, 0, 0, 0,
    ]);
    let c = counters;
    for v in [
        c.guest_ops,
        c.reads,
        c.writes,
        c.fetches,
        c.execs,
        c.control_writes,
        c.cr3_writes,
        c.invlpgs,
        c.faults_delivered,
        c.demand_faults,
        c.cow_faults,
        c.kills,
        c.workload_steps,
        c.data_errors,
        c.digest,
    ] {
        want.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(bytes, want);
    assert_eq!(
        records(&bytes).last().unwrap().0 as usize,
        bytes.len() - 129
    );
}

#[test]
fn other_data_same_outcomes_is_a_counters_mismatch() {
    let (bytes, counters) = record(200);
    let mut other = Fake::new();
    other.read_xor = 0x5a;
    let e = replay_on(&bytes, other).unwrap_err();
    let TraceErrorKind::CountersMismatch { recorded, replayed } = &e.kind else {
        panic!("{e}");
    };
    assert_eq!(**recorded, counters);
    assert_ne!(replayed.digest, counters.digest);
    assert_eq!(e.offset, records(&bytes).last().unwrap().0);
}

#[test]
fn long_backend_failures_are_clipped_alike() {
    struct Failing(Fake);
    impl GuestOps for Failing {
        fn vcpus(&self) -> usize {
            self.0.vcpus()
        }
        fn ram_frames(&self) -> u64 {
            self.0.ram_frames()
        }
        fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
            self.0.load_image(gpa, data)
        }
        fn read(&mut self, v: usize, va: u64, cpl: u8, b: &mut [u8]) -> Result<(), OpError> {
            self.0.read(v, va, cpl, b)
        }
        fn write(&mut self, v: usize, va: u64, cpl: u8, d: &[u8]) -> Result<(), OpError> {
            self.0.write(v, va, cpl, d)
        }
        fn fetch(&mut self, v: usize, va: u64, cpl: u8, b: &mut [u8]) -> Result<(), OpError> {
            self.0.fetch(v, va, cpl, b)
        }
        fn exec(&mut self, v: usize, regs: &mut Regs) -> Result<(), OpError> {
            self.0.exec(v, regs)
        }
        fn set_control(&mut self, v: usize, ctl: ControlState) -> Result<(), OpError> {
            self.0.set_control(v, ctl)
        }
        fn set_cr3(&mut self, v: usize, cr3: u64) -> Result<(), OpError> {
            self.0.set_cr3(v, cr3)
        }
        fn invlpg(&mut self, _: usize, _: u64) -> Result<(), OpError> {
            Err(OpError::Backend(format!("x{}", "é".repeat(3000))))
        }
    }
    let mut rec = Recorder::new(Failing(Fake::new()), Vec::new(), header()).unwrap();
    assert!(rec.invlpg(0, 0).is_err());
    let (_, bytes) = rec.finish().unwrap();
    let Record::Op {
        outcome: Err(OpError::Backend(m)),
        ..
    } = &records(&bytes)[0].1
    else {
        panic!("no backend failure");
    };
    assert_eq!(m.len(), 4095);
    trace::replay(&bytes[..], Failing(Fake::new()), &mut |_, _| {}).unwrap();
    let e = replay_on(&bytes, Fake::new()).unwrap_err();
    assert!(
        e.to_string()
            .contains("record 0 (invlpg) diverged: recorded backend failure (xéé"),
        "{e}"
    );
    assert!(e.to_string().ends_with("), replay gave Ok"));
}

/// A writer that fails once it has taken `room` bytes.
#[derive(Debug)]
struct Full {
    room: usize,
}

impl Write for Full {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::Error::other("disk full"));
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn write_errors_are_not_lost() {
    assert!(Recorder::new(Fake::new(), Full { room: 5 }, header()).is_err());
    let mut rec = Recorder::new(Fake::new(), Full { room: 70_000 }, header()).unwrap();
    script(&mut rec, 5000);
    let e = rec.finish().unwrap_err();
    assert_eq!(e.to_string(), "disk full");
    // Failing only at the end record still fails.
    let (_, start) = Recorder::new(Fake::new(), Vec::new(), header())
        .unwrap()
        .finish()
        .unwrap();
    let room = first_record(&start) + 2;
    let mut rec = Recorder::new(Fake::new(), Full { room }, header()).unwrap();
    rec.event(Event::Kill);
    assert_eq!(rec.finish().unwrap_err().to_string(), "disk full");
}

#[test]
fn operations_too_big_for_the_format_fail_the_recording() {
    let mut rec = Recorder::new(Fake::new(), Vec::new(), header()).unwrap();
    let _ = rec.write(0, 0, 0, &[0; MAX_DATA + 1]);
    let e = rec.finish().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("store of 4097 bytes"), "{e}");
    // A large image is fine: it is split.
    let mut rec = Recorder::new(Fake::new(), Vec::new(), header()).unwrap();
    rec.load_image(0, &[7; 3 * MAX_DATA]).unwrap();
    assert_eq!(rec.records(), 3);
    let (_, bytes) = rec.finish().unwrap();
    assert_eq!(replay_on(&bytes, Fake::new()).unwrap().records, 3);
}

#[test]
fn header_names_the_run() {
    let spec = RunSpec {
        guest: GuestModel::WindowsPae,
        workload: Workload::Kbuild,
        size: 7,
        pair: PairName::new(3, 4),
        seed: 9,
    };
    let h = TraceHeader::for_run(&spec, "sim");
    assert_eq!(h.run_spec(), Ok(spec));
    assert_eq!((h.vcpus, h.ram_frames), (1, spec.ram_frames()));
    let bad = TraceHeader {
        guest: "dos".into(),
        ..h
    };
    assert!(bad.run_spec().is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn flipped_bytes_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..8)
    ) {
        let (mut bytes, _) = record(120);
        for (at, x) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        let len = bytes.len() as u64;
        if let Err(e) = replay_on(&bytes, Fake::new()) {
            prop_assert!(e.offset <= len, "{}", e);
            prop_assert!(!e.to_string().contains('\n'));
        }
        if let Err(e) = trace::read_header(&bytes[..]) {
            prop_assert!(e.offset <= len, "{}", e);
        }
        for r in TraceReader::new(&bytes[..]).into_iter().flatten() {
            if let Err(e) = r {
                prop_assert!(e.offset <= len, "{}", e);
            }
        }
    }

    #[test]
    fn garbage_after_the_header_never_panics(
        tail in proptest::collection::vec(any::<u8>(), 0..600)
    ) {
        let (bytes, _) = record(0);
        let mut bytes = bytes[..first_record(&bytes)].to_vec();
        bytes.extend_from_slice(&tail);
        let len = bytes.len() as u64;
        if let Err(e) = replay_on(&bytes, Fake::new()) {
            prop_assert!(e.offset <= len, "{}", e);
        }
    }
}
