//! Issue 3, item 3: the shadow pool. Eviction under a pool of the minimum size with many
//! address spaces (every access still succeeds); resizing down and up mid-run, in bounded
//! steps; a size below the minimum is an error; size-mismatched shadows get 2- and 4-page
//! contiguous, aligned blocks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::domain::{ShadowOp, ShadowOpResult};
use shadow2::multi::Pair;
use shadow2::paging::PagingLevels;
use shadow2::types::ShadowKind;
use shadow2_machine::sim::ShadowMachine;

const PROCESSES: usize = 50;
const VA: u64 = 0x40_3000;
const RAM: u64 = 360;

/// Address spaces, each mapping VA (and VA + 2 MiB) to its own data frame.
struct World {
    m: ShadowMachine,
    /// (CR3, data frame, the value last written there).
    procs: Vec<(u64, u64, u64)>,
    counter: u64,
}

impl World {
    fn new(pair: Pair, pool: usize) -> World {
        let mut m = machine(hvm(pair.shadow(), 1, pool), RAM);
        let levels = pair.guest();
        let mut t = Tables::new(levels, 1, RAM);
        let mut procs = Vec::new();
        for i in 0..PROCESSES {
            let cr3 = t.new_root(0x20 * (i as u64 % 100));
            let data = t.alloc();
            t.map(&mut m, cr3, VA, data, DATA);
            t.map(&mut m, cr3, VA + 0x20_0000, data, DATA);
            procs.push((cr3, data, 0));
        }
        set_mode(&mut m, 0, levels, procs[0].0);
        assert_eq!(m.domain().vcpu(0).unwrap().pair(), Some(pair));
        World {
            m,
            procs,
            counter: 0,
        }
    }

    /// One visit to process `i`: switch to it, check what the last visit wrote, write.
    fn visit(&mut self, i: usize) {
        let (cr3, data, last) = self.procs[i];
        self.m.set_cr3(0, cr3).unwrap();
        assert_eq!(read_u64(&mut self.m, 0, VA).unwrap(), last, "process {i}");
        self.counter += 1;
        let value = self.counter;
        write_u64(&mut self.m, 0, VA, value).unwrap();
        assert_eq!(read_u64(&mut self.m, 0, VA + 0x20_0000).unwrap(), value);
        assert_eq!(phys_u64(&self.m, data << 12), value);
        self.procs[i].2 = value;
        check(&self.m);
    }

    fn round(&mut self) {
        for i in 0..self.procs.len() {
            self.visit(i);
        }
    }
}

#[test]
fn minimum_pool_with_fifty_address_spaces_evicts_and_never_fails_an_access() {
    for pair in [
        Pair::P4on4,
        Pair::P3on4,
        Pair::P2on4,
        Pair::P3on3,
        Pair::P2on3,
        Pair::P2on2,
    ] {
        let min = hvm(pair.shadow(), 1, 0).min_pool_pages();
        let mut w = World::new(pair, min);
        assert_eq!(w.m.domain().pool().total_pages(), min);
        for _ in 0..3 {
            w.round();
        }
        let d = w.m.domain();
        assert!(d.stats().evictions > 0, "{pair:?}: {:?}", d.stats());
        assert_eq!(d.pool().total_pages(), min);
        assert!(d.pool().peak_used_pages() <= min);
        assert_eq!(w.m.traps().propagated, 0, "{pair:?}");
    }
}

#[test]
fn pool_resizes_down_and_up_mid_run() {
    let pair = Pair::P4on4;
    let min = hvm(pair.shadow(), 1, 0).min_pool_pages();
    let mut w = World::new(pair, 256);
    w.round();
    let used = w.m.domain().pool().used_pages();
    assert!(
        used > min,
        "the run must hold more than the minimum ({used})"
    );
    assert_eq!(w.m.domain().stats().evictions, 0);

    // Down to the minimum: whole rounds keep working, with eviction.
    w.m.host_op(|d| d.set_pool_size(min).map(|f| ((), f)))
        .unwrap();
    check(&w.m);
    assert_eq!(w.m.domain().pool().total_pages(), min);
    assert!(w.m.domain().pool().used_pages() <= min);
    w.round();
    assert!(w.m.domain().stats().evictions > 0);

    // Up again: after one warm-up round everything stays cached.
    w.m.host_op(|d| d.set_pool_size(512).map(|f| ((), f)))
        .unwrap();
    check(&w.m);
    assert_eq!(w.m.domain().pool().total_pages(), 512);
    w.round();
    let before = *w.m.domain().stats();
    w.round();
    let after = *w.m.domain().stats();
    assert_eq!(after.evictions, before.evictions);
    assert_eq!(after.shadows_created, before.shadows_created);
    assert_eq!(after.cr3_cached, before.cr3_cached + PROCESSES as u64);
}

/// Budget per resize step (`engine_pool_shrink.rs` checks the smallest budget, 1).
const STEP_BUDGET: usize = 16;

#[test]
fn pool_resize_goes_in_bounded_steps_while_the_guest_runs() {
    let pair = Pair::P4on4;
    let min = hvm(pair.shadow(), 1, 0).min_pool_pages();
    let mut w = World::new(pair, 256);
    w.round();
    let mut i = 0;
    for target in [min, 400, min + 8] {
        let mut steps = 0;
        loop {
            let (r, flush) =
                w.m.domain_mut()
                    .shadow_op(ShadowOp::SetPoolSize {
                        pages: target,
                        budget: STEP_BUDGET,
                    })
                    .unwrap();
            w.m.settle(flush);
            check(&w.m);
            steps += 1;
            if r == ShadowOpResult::Done {
                break;
            }
            assert_eq!(r, ShadowOpResult::More);
            assert!(steps < 500, "the resize makes no progress");
            // The guest runs between steps.
            w.visit(i % PROCESSES);
            i += 1;
        }
        assert!(steps > 1, "a large resize takes several bounded steps");
        let (r, _) = w.m.domain_mut().shadow_op(ShadowOp::GetPoolSize).unwrap();
        let ShadowOpResult::PoolSize { total, used } = r else {
            panic!("{r:?}")
        };
        assert_eq!(total, target);
        assert!(used <= total);
        w.round();
    }
}

#[test]
fn pool_below_the_minimum_is_an_error_not_a_panic() {
    for shadow in [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four] {
        let config = hvm(shadow, 3, 128);
        let min = config.min_pool_pages();
        let mut m = machine(config, 32);
        let mut t = Tables::new(PagingLevels::Two, 1, 32);
        let cr3 = t.new_root(0);
        t.map(&mut m, cr3, VA, 20, DATA);
        set_mode(&mut m, 0, PagingLevels::Two, cr3);
        read_u64(&mut m, 0, VA).unwrap();
        let total = m.domain().pool().total_pages();
        assert!(m.domain_mut().set_pool_size(min - 1).is_err());
        assert!(m.domain_mut().set_pool_size(0).is_err());
        for pages in [0, 1, min - 1] {
            let r = m
                .domain_mut()
                .shadow_op(ShadowOp::SetPoolSize { pages, budget: 8 });
            assert!(r.is_err(), "{pages}: {r:?}");
        }
        assert_eq!(m.domain().pool().total_pages(), total);
        assert_eq!(m.domain().failure(), None);
        // Exactly the minimum is fine.
        m.host_op(|d| d.set_pool_size(min).map(|f| ((), f)))
            .unwrap();
        assert_eq!(m.domain().pool().total_pages(), min);
        assert_eq!(read_u64(&mut m, 0, VA).unwrap(), 0);
        check(&m);
    }
}

/// Every shadow is an allocated, aligned pool block of its kind's size: 2 pages for a
/// 32-bit L1 (and splinter) and 4 for a 32-bit L2 on PAE/64-bit shadows.
fn check_blocks(m: &ShadowMachine, seen: &mut [bool; 3]) {
    let d = m.domain();
    let shadow = d.config().shadow_levels;
    for (head, info) in d.shadows().shadows() {
        let want = match info.key.kind {
            ShadowKind::L1x32 | ShadowKind::Fl1x32 => 1,
            ShadowKind::L2x32 => 2,
            ShadowKind::VcpuTop if shadow == PagingLevels::Four => 1,
            _ => 0,
        };
        assert_eq!(info.order, want, "{:?}", info.key);
        assert_eq!(
            head.raw() % (1 << want),
            0,
            "{:?} at {head} unaligned",
            info.key
        );
        assert_eq!(d.pool().block_containing(head), Some((head, want)));
        for k in 0..1u64 << want {
            assert!(
                d.pool()
                    .is_allocated(shadow2::addr::Mfn::new(head.raw() + k))
            );
        }
        match info.key.kind {
            ShadowKind::L1x32 => seen[0] = true,
            ShadowKind::L2x32 => seen[1] = true,
            ShadowKind::Fl1x32 => seen[2] = true,
            _ => {}
        }
    }
}

#[test]
fn size_mismatched_shadows_get_contiguous_aligned_blocks_even_in_a_tiny_pool() {
    for pair in [Pair::P2on3, Pair::P2on4] {
        let min = hvm(pair.shadow(), 1, 0).min_pool_pages();
        let mut w = World::new(pair, min);
        // A 4 MiB page in every other process (splintered into a 2-page fl1 shadow), and
        // more L1s: fragmentation pressure on the pool.
        let t = Tables::new(PagingLevels::Two, 0, 0);
        for (i, &(cr3, _, _)) in w.procs.clone().iter().enumerate() {
            if i % 2 == 0 {
                let pde = cr3 + 4 * (0x8000_0000u64 >> 22);
                t.write(&mut w.m, pde, shadow2::paging::bits::PS | DATA);
            }
        }
        let mut seen = [false; 3];
        for _ in 0..3 {
            for i in 0..PROCESSES {
                w.visit(i);
                if i % 2 == 0 {
                    let va = 0x8000_0000 + ((i as u64 * 7) % 300) * 4096;
                    read_u64(&mut w.m, 0, va).unwrap();
                }
                check_blocks(&w.m, &mut seen);
            }
        }
        assert_eq!(seen, [true; 3], "{pair:?}");
        assert!(w.m.domain().stats().evictions > 0);
        check(&w.m);
    }
}
