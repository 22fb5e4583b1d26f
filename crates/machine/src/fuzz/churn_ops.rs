//! The `churn_ops` target: the randomized shadow checker (`crate::churn`) with its choices
//! read from the input instead of a generator, so the fuzzer steers page-table edits at
//! every level (self-maps, superpages, recycled tables), accesses at CPL 0 and 3, CR3
//! loads, mode changes, INVLPG, p2m changes, pool resizes and log-dirty on both vcpus.

use shadow2::multi::Pair;

use crate::churn::{self, ChurnConfig, Rng};

/// The most operations one input runs (inputs end sooner: one byte per small choice).
pub const MAX_OPS: u64 = 2000;

/// The run an input describes: its first byte picks the pair, the pool size and the
/// domain's hypervisor hole; the rest are the checker's choices.
pub fn config(data: &[u8]) -> Option<(ChurnConfig, Rng)> {
    let (&head, rest) = data.split_first()?;
    let pair = *Pair::ALL.get(usize::from(head) % Pair::ALL.len())?;
    let variant = usize::from(head) / Pair::ALL.len();
    let cfg = ChurnConfig {
        pair,
        ops: MAX_OPS,
        // The seed's parity picks the internal (hypervisor-hole) domain on 64-bit shadows.
        seed: (variant % 2) as u64,
        tiny_pool: (variant / 2) % 2 == 1,
    };
    Some((cfg, Rng::from_bytes(rest)))
}

/// Runs the input; panics if the engine fails, the auditor finds a violation, the oracle a
/// mismatch, or log-dirty a lost or invented page.
pub fn check(data: &[u8]) {
    let Some((cfg, rng)) = config(data) else {
        return;
    };
    let report = match churn::run_with(cfg, rng) {
        Ok(r) => r,
        Err(e) => panic!("{}: engine failed: {e}", cfg.pair.name()),
    };
    let pair = &report.pair;
    let why = report.first_problem.as_deref().unwrap_or("");
    assert_eq!(report.audit_violations, 0, "{pair}: {why}");
    assert_eq!(report.oracle_mismatches, 0, "{pair}: {why}");
    assert_eq!(report.lost_dirty_pages, 0, "{pair}: {why}");
    assert!(report.first_problem.is_none(), "{pair}: {why}");
}
