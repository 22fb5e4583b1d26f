//! The `trace` target: untrusted bytes as a trace (`docs/TRACE.md`).
//!
//! 1. The reader walks every record: it never panics, and every error names an offset
//!    within the input and starts its message with it.
//! 2. If the header describes a small machine, the trace is replayed on the simulator (as
//!    `shadow2 replay` does): whatever the operations, the engine does not fail the domain,
//!    the auditor is clean and every access agrees with the guest's own walk. Accesses no
//!    CPU can make are refused before they reach the simulator (see [`Architectural`]).

use shadow2::emulate::{CodeMode, Regs};
use shadow2::paging::{ControlState, PagingLevels, bits::cr};
use shadow2_guest::trace::{TraceError, TraceReader, replay};
use shadow2_guest::{Event, GuestOps, OpError, PairName};

use crate::backend::{SimBackend, SimConfig};

/// Replays only traces of machines at most this large (RAM frames, vcpus).
const MAX_RAM_FRAMES: u64 = 8192;
const MAX_VCPUS: usize = 4;
/// The shadow pool of the replay machine, in pages.
const POOL_PAGES: usize = 256;

/// Runs the input; panics on a finding.
pub fn check(data: &[u8]) {
    let mut reader = match TraceReader::new(data) {
        Ok(r) => r,
        Err(e) => return assert_names_offset(&e, data.len()),
    };
    loop {
        match reader.next_record() {
            Ok(Some((offset, _))) => assert!(offset < data.len() as u64, "record at {offset}"),
            Ok(None) => break,
            Err(e) => {
                assert_names_offset(&e, data.len());
                break;
            }
        }
    }
    let header = reader.header();
    let Some(levels) =
        PairName::parse(&header.pair).and_then(|p| PagingLevels::from_count(p.shadow))
    else {
        return;
    };
    if !(1..=MAX_VCPUS).contains(&header.vcpus)
        || !(1..=MAX_RAM_FRAMES).contains(&header.ram_frames)
    {
        return;
    }
    let mut cfg = SimConfig::new(levels, header.vcpus, header.ram_frames);
    cfg.pool_pages = POOL_PAGES;
    let Ok(mut backend) = SimBackend::new(cfg) else {
        return;
    };
    if let Err(e) = replay(data, Architectural(&mut backend), &mut |_, _| {}) {
        assert_names_offset(&e, data.len());
    }
    let domain = backend.machine().domain();
    if let Some(e) = domain.failure() {
        panic!("the trace failed the domain: {e}");
    }
    let report = backend.report();
    assert_eq!(
        report.audit_violations, 0,
        "{:?}",
        report.first_audit_violations
    );
    assert_eq!(report.oracle_mismatches, 0, "{:?}", report.first_mismatches);
}

fn assert_names_offset(e: &TraceError, len: usize) {
    assert!(e.offset <= len as u64, "{e}: beyond the {len} bytes");
    let prefix = format!("offset {}: ", e.offset);
    assert!(e.to_string().starts_with(&prefix), "{e}");
}

/// The simulator as a CPU would drive it: outside long mode a linear address has 32 bits
/// and there is no 64-bit code, so a trace operation that needs either is refused as a
/// backend error (the simulator would hand the engine an address no CPU produces: see
/// `fuzz_findings::page_fault_above_4_gib_outside_long_mode_is_refused`).
struct Architectural<'a>(&'a mut SimBackend);

impl Architectural<'_> {
    fn long_mode(&self, vcpu: usize) -> bool {
        self.0.machine().guest_control(vcpu).efer & cr::EFER_LMA != 0
    }

    fn check_va(&self, vcpu: usize, va: u64) -> Result<(), OpError> {
        if va > u64::from(u32::MAX) && !self.long_mode(vcpu) {
            return Err(OpError::Backend(format!(
                "linear address {va:#x} outside long mode"
            )));
        }
        Ok(())
    }
}

impl GuestOps for Architectural<'_> {
    fn vcpus(&self) -> usize {
        self.0.vcpus()
    }
    fn ram_frames(&self) -> u64 {
        self.0.ram_frames()
    }
    fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
        self.0.load_image(gpa, data)
    }
    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.check_va(vcpu, va)?;
        self.0.read(vcpu, va, cpl, buf)
    }
    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        self.check_va(vcpu, va)?;
        self.0.write(vcpu, va, cpl, data)
    }
    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.check_va(vcpu, va)?;
        self.0.fetch(vcpu, va, cpl, buf)
    }
    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        if regs.mode == CodeMode::Bits64 && !self.long_mode(vcpu) {
            return Err(OpError::Backend("64-bit code outside long mode".into()));
        }
        self.check_va(vcpu, regs.rip)?;
        self.0.exec(vcpu, regs)
    }
    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        self.0.set_control(vcpu, ctl)
    }
    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        self.0.set_cr3(vcpu, cr3)
    }
    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError> {
        self.0.invlpg(vcpu, va)
    }
    fn event(&mut self, event: Event) {
        self.0.event(event);
    }
}
