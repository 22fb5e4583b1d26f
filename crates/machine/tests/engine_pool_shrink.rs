//! A pool shrink in small bounded steps finishes while the guest keeps running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::domain::{ShadowOp, ShadowOpResult};
use shadow2::paging::PagingLevels;

#[test]
fn pool_shrink_in_small_steps_finishes_while_the_guest_runs() {
    let config = hvm(PagingLevels::Four, 1, 256);
    let min = config.min_pool_pages();
    let mut m = machine(config, 360);
    let mut t = Tables::new(PagingLevels::Four, 1, 360);
    let procs: Vec<u64> = (0..50)
        .map(|_| {
            let cr3 = t.new_root(0);
            let data = t.alloc();
            t.map(&mut m, cr3, 0x40_3000, data, DATA);
            cr3
        })
        .collect();
    set_mode(&mut m, 0, PagingLevels::Four, procs[0]);
    for &cr3 in &procs {
        m.set_cr3(0, cr3).unwrap();
        read_u64(&mut m, 0, 0x40_3000).unwrap();
    }
    let mut steps = 0;
    loop {
        let (r, flush) = m
            .domain_mut()
            .shadow_op(ShadowOp::SetPoolSize {
                pages: min,
                budget: 1,
            })
            .unwrap();
        m.settle(flush);
        check(&m);
        if r == ShadowOpResult::Done {
            break;
        }
        steps += 1;
        let p = m.domain().pool();
        assert!(
            steps < 1000,
            "no progress after {steps} steps: total {} used {} evictions {}",
            p.total_pages(),
            p.used_pages(),
            m.domain().stats().evictions
        );
        // The guest runs between steps: one address space each time, round-robin.
        m.set_cr3(0, procs[steps % procs.len()]).unwrap();
        read_u64(&mut m, 0, 0x40_3000).unwrap();
    }
    assert_eq!(m.domain().pool().total_pages(), min);
}
