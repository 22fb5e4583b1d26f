//! The `trace` target: untrusted bytes as a trace (`docs/TRACE.md`).
//!
//! 1. The reader walks every record: it never panics, and every error names an offset
//!    within the input and starts its message with it.
//! 2. If the header describes a small machine, the trace is replayed on the simulator (as
//!    `shadow2 replay` does): whatever the operations, the engine does not fail the domain,
//!    the auditor is clean and every access agrees with the guest's own walk.

use shadow2::paging::PagingLevels;
use shadow2_guest::PairName;
use shadow2_guest::trace::{TraceError, TraceReader, replay};

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
    if let Err(e) = replay(data, &mut backend, &mut |_, _| {}) {
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
