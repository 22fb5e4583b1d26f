//! The randomized shadow checker on every pair, small: audit after every step, oracle on
//! every access, log-dirty exactness, eviction under the smallest pool.
#![allow(clippy::expect_used)]

use shadow2::multi::Pair;
use shadow2_machine::churn::{ChurnConfig, run};

fn check(pair: Pair, ops: u64, seed: u64, tiny_pool: bool) {
    let report = run(ChurnConfig {
        pair,
        ops,
        seed,
        tiny_pool,
    })
    .expect("engine failed");
    assert_eq!(report.ops, ops);
    assert!(report.accesses > ops / 4, "{report:?}");
    assert_eq!(report.audit_violations, 0, "{:?}", report.first_problem);
    assert_eq!(report.oracle_mismatches, 0, "{:?}", report.first_problem);
    assert_eq!(report.lost_dirty_pages, 0, "{:?}", report.first_problem);
    assert!(report.first_problem.is_none(), "{:?}", report.first_problem);
}

#[test]
fn every_pair_survives_churn() {
    let ops = std::env::var("CHURN_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let only = std::env::var("CHURN_PAIR").ok();
    let seed = std::env::var("CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    for pair in Pair::ALL {
        if only.as_deref().is_some_and(|p| p != pair.name()) {
            continue;
        }
        check(pair, ops, seed, false);
        check(pair, ops, seed + 1, true);
    }
}
