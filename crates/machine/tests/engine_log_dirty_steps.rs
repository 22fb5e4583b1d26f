//! The auditor and test mode stay happy between the steps of a log-dirty clean.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::domain::{CleanProgress, ShadowOp};
use shadow2::paging::PagingLevels;

fn dirty_four_pages(test_mode: bool) -> shadow2_machine::sim::ShadowMachine {
    let mut m = machine(hvm(PagingLevels::Four, 1, 128), 128);
    if test_mode {
        let _ = m.domain_mut().shadow_op(ShadowOp::EnableTest).unwrap();
    }
    let mut t = Tables::new(PagingLevels::Four, 1, 40);
    let cr3 = t.new_root(0);
    for i in 0..4 {
        t.map(&mut m, cr3, 0x40_0000 + i * 4096, 64 + i, DATA);
    }
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    let flush = m.domain_mut().enable_log_dirty().unwrap();
    m.settle(flush);
    for i in 0..4 {
        write_u64(&mut m, 0, 0x40_0000 + i * 4096, i).unwrap();
    }
    check(&m);
    m
}

#[test]
fn audit_is_clean_between_the_steps_of_a_clean() {
    let mut m = dirty_four_pages(false);
    loop {
        let (progress, flush) = m.domain_mut().clean_step(1).unwrap();
        m.settle(flush);
        check(&m); // fails after the first step
        if let CleanProgress::Done(_) = progress {
            break;
        }
    }
}

#[test]
fn a_clean_in_steps_does_not_fail_a_domain_in_test_mode() {
    let mut m = dirty_four_pages(true);
    loop {
        // Err(Internal("shadow test mode: the audit failed")) on the first step.
        let (progress, flush) = m.domain_mut().clean_step(1).unwrap();
        m.settle(flush);
        if let CleanProgress::Done(_) = progress {
            break;
        }
    }
    assert_eq!(m.domain().failure(), None);
}
