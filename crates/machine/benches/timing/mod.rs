//! What the benchmarks share: a case measured by its own timing loop (so that the closing
//! table runs exactly the code criterion timed), the median-of-rounds measurement, and the
//! command-line flags that decide whether a table is printed.
#![allow(dead_code)]

use std::time::Duration;

/// One benchmarked operation.
pub trait Case {
    /// Runs the operation `iters` times and returns the time spent in the operations alone
    /// (any per-iteration setup is excluded).
    fn measure(&mut self, iters: u64) -> Duration;
}

/// Nanoseconds per operation: the median of `rounds` rounds of about `round` of measured
/// time each (at most `max_iters` operations per round), after a calibration.
pub fn ns_per_op(case: &mut dyn Case, round: Duration, rounds: usize, max_iters: u64) -> f64 {
    let mut iters = 1u64;
    let per_op = loop {
        let t = case.measure(iters);
        if t >= round / 4 || iters >= max_iters {
            break t.as_secs_f64() / iters as f64;
        }
        iters *= 2;
    };
    let iters = ((round.as_secs_f64() / per_op) as u64).clamp(1, max_iters);
    let mut samples: Vec<f64> = (0..rounds)
        .map(|_| case.measure(iters).as_secs_f64() * 1e9 / iters as f64)
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Whether the benchmark binary was given `flag` (alone or as `flag=value`).
pub fn has_flag(flag: &str) -> bool {
    std::env::args().any(|a| a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
}
