//! Issue 10, item 5: bounded work in every call. Each long operation (removing every
//! mapping of a frame, enabling log-dirty mode, tearing the domain down) goes in steps that
//! do at most `DomainConfig::call_work_bound` work, at the largest pool and on every pair,
//! and ends, after finitely many continuations, in the state the whole operation gives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::Gfn;
use shadow2::domain::{DomainConfig, EngineError, TeardownProgress};
use shadow2::p2m::P2mType;
use shadow2::paging::{PagingLevels, bits};
use shadow2::pool::ResizeProgress;
use shadow2_machine::sim::ShadowMachine;

/// The data frame every region maps once.
const SHARED: u64 = 8;
/// Guest frames from here on hold page tables.
const FIRST_TABLE: u64 = 16;
const VALUE: u64 = 0x5eed_0001;

/// The span of one guest L1 table.
fn region(levels: PagingLevels) -> u64 {
    if levels == PagingLevels::Two {
        1 << 22
    } else {
        1 << 21
    }
}

/// A machine whose pool has `pool` pages, running `levels` paging with `tables` L1
/// tables, each mapping SHARED writable once and each shadowed (touched).
fn busy(
    shadow: PagingLevels,
    levels: PagingLevels,
    pool: usize,
    tables: u64,
    budget: usize,
) -> (ShadowMachine, u64) {
    let config = DomainConfig {
        call_work_budget: budget,
        // The scans are what these tests bound (a reverse map needs none).
        reverse_map: false,
        ..hvm(shadow, 1, pool)
    };
    let ram = FIRST_TABLE + tables + tables / 256 + 8;
    let frames = (pool as u64 + ram + 4096).next_power_of_two();
    let mut m = ShadowMachine::new(frames, config).unwrap();
    m.add_ram(Gfn::new(0), ram).unwrap();
    let mut t = Tables::new(levels, FIRST_TABLE, ram);
    let cr3 = t.new_root(0);
    for i in 0..tables {
        t.map(&mut m, cr3, i * region(levels), SHARED, DATA);
    }
    set_mode(&mut m, 0, levels, cr3);
    write_u64(&mut m, 0, 0, VALUE).unwrap();
    for i in 0..tables {
        assert_eq!(read_u64(&mut m, 0, i * region(levels)).unwrap(), VALUE);
    }
    check(&m);
    (m, cr3)
}

/// The work of the last call is within the domain's bound.
#[track_caller]
fn assert_bounded(m: &ShadowMachine) {
    let stats = m.domain().stats();
    let bound = m.domain().config().call_work_bound();
    assert!(
        stats.last_call_work <= bound,
        "a call did {} units of work, more than {bound}",
        stats.last_call_work
    );
}

/// Writable shadow mappings of SHARED.
fn writable_shared(m: &ShadowMachine) -> usize {
    leaf_mappings_of(m, mfn_of(m, SHARED))
        .iter()
        .filter(|(_, e)| e & bits::RW != 0)
        .count()
}

/// Turns log-dirty mode on in steps; returns how many steps it took.
fn enable_log_dirty_in_steps(m: &mut ShadowMachine) -> usize {
    let budget = m.domain().config().call_work_budget;
    let mut steps = 0;
    loop {
        steps += 1;
        let (done, flush) = m.domain_mut().enable_log_dirty_step(budget).unwrap();
        assert_bounded(m);
        m.settle(flush);
        check(m);
        if done {
            return steps;
        }
        assert!(steps < 10_000, "enabling log-dirty makes no progress");
    }
}

/// Remaps SHARED to a fresh frame holding `value`, continuing while the engine says it
/// was preempted; returns how many calls it took.
fn remap_shared_in_steps(m: &mut ShadowMachine, value: u64) -> usize {
    let old = mfn_of(m, SHARED);
    let new = host_frame(m);
    poke_machine(m, new.base().raw(), value);
    let mut calls = 0;
    loop {
        calls += 1;
        match m
            .domain_mut()
            .set_p2m(Gfn::new(SHARED), Some((new, P2mType::Ram)))
        {
            Ok(flush) => {
                assert_bounded(m);
                m.settle(flush);
                break;
            }
            Err(EngineError::Preempted) => {
                assert_bounded(m);
                m.settle_failed_call();
                // Between calls the p2m is unchanged and nothing maps the frame anew.
                assert_eq!(mfn_of(m, SHARED), old);
                check(m);
            }
            Err(e) => panic!("set_p2m failed: {e}"),
        }
        assert!(calls < 10_000, "set_p2m makes no progress");
    }
    assert!(leaf_mappings_of(m, old).is_empty());
    check(m);
    calls
}

/// Shrinks the pool to `pages` in steps; returns how many steps it took.
fn shrink_pool_in_steps(m: &mut ShadowMachine, pages: usize) -> usize {
    let mut steps = 0;
    loop {
        steps += 1;
        let (progress, flush) = m.domain_mut().set_pool_size_step(pages, 64).unwrap();
        assert_bounded(m);
        m.settle(flush);
        if progress == ResizeProgress::Done {
            check(m);
            return steps;
        }
        assert!(steps < 1_000_000, "the pool resize makes no progress");
    }
}

/// Tears the domain down in steps of `budget`; returns how many steps it took.
fn teardown_in_steps(m: &mut ShadowMachine, budget: usize) -> usize {
    let mut steps = 0;
    loop {
        steps += 1;
        let (progress, _flush) = m.domain_mut().teardown_step(budget).unwrap();
        assert_bounded(m);
        if progress == TeardownProgress::Done {
            return steps;
        }
        assert!(steps < 1_000_000, "teardown makes no progress");
    }
}

/// Every frame the domain took from the host is back: only guest RAM (and the frames the
/// test took itself) is still allocated.
#[track_caller]
fn assert_nothing_left(m: &ShadowMachine, ram_frames: u64) {
    let d = m.domain();
    assert_eq!(d.shadows().shadows().count(), 0);
    assert_eq!(d.pool().total_pages(), 0);
    assert_eq!(d.p2m().map_or(0, |p| p.table_count()), 0);
    assert!((0..d.vcpu_count()).all(|v| d.vcpu(v).unwrap().root().is_none()));
    assert_eq!(d.host().allocated_frames(), ram_frames);
    assert_eq!(d.host().bad_frees(), 0);
}

#[test]
fn every_long_operation_is_bounded_at_the_largest_pool() {
    const TABLES: u64 = 1536;
    let pool = DomainConfig::MAX_POOL_PAGES;
    let (mut m, _) = busy(
        PagingLevels::Four,
        PagingLevels::Four,
        pool,
        TABLES,
        DomainConfig::DEFAULT_CALL_WORK_BUDGET,
    );
    assert_eq!(m.domain().pool().total_pages(), pool);
    assert_eq!(writable_shared(&m), TABLES as usize);

    // Log-dirty: every writable entry loses RW, over several calls.
    let steps = enable_log_dirty_in_steps(&mut m);
    assert!(steps >= 3, "{steps} steps: the pass fit in one call");
    assert_eq!(writable_shared(&m), 0);
    assert_eq!(
        leaf_mappings_of(&m, mfn_of(&m, SHARED)).len(),
        TABLES as usize
    );

    // A p2m change: every mapping of the old frame goes, over several calls.
    let calls = remap_shared_in_steps(&mut m, VALUE + 1);
    assert!(calls >= 3, "{calls} calls: the scan fit in one call");
    for i in [0, TABLES / 2, TABLES - 1] {
        assert_eq!(
            read_u64(&mut m, 0, i * region(PagingLevels::Four)).unwrap(),
            VALUE + 1
        );
    }
    check(&m);

    // Teardown: the pool's 64 Ki chunks, in steps.
    let ram = m.domain().p2m().unwrap().mapped_count() + 1;
    let steps = teardown_in_steps(&mut m, 4096);
    assert!(steps > 16);
    assert_nothing_left(&m, ram);
    let stats = m.domain().stats();
    assert!(stats.max_call_work > 0);
    assert!(stats.max_call_work <= m.domain().config().call_work_bound());
}

#[test]
fn shrinking_the_largest_pool_is_bounded() {
    let (mut m, _) = busy(
        PagingLevels::Four,
        PagingLevels::Four,
        DomainConfig::MAX_POOL_PAGES,
        1536,
        DomainConfig::DEFAULT_CALL_WORK_BUDGET,
    );
    // Shrinking the pool to its minimum: shadows are evicted, chunk by chunk.
    let min = m.domain().config().min_pool_pages();
    shrink_pool_in_steps(&mut m, 4096);
    assert_eq!(m.domain().pool().total_pages(), 4096);
    shrink_pool_in_steps(&mut m, min);
    assert_eq!(m.domain().pool().total_pages(), min);
    assert_eq!(read_u64(&mut m, 0, 0).unwrap(), VALUE);
    check(&m);
}

#[test]
fn long_operations_continue_across_calls_on_every_pair() {
    for pair in PAGING_PAIRS {
        let (levels, shadow) = (pair.guest(), pair.shadow());
        let (mut m, _) = busy(shadow, levels, 512, 40, 600);
        let steps = enable_log_dirty_in_steps(&mut m);
        assert!(steps >= 3, "{pair:?}: {steps} steps");
        assert_eq!(writable_shared(&m), 0, "{pair:?}");
        let calls = remap_shared_in_steps(&mut m, VALUE + 2);
        assert!(calls >= 3, "{pair:?}: {calls} calls");
        assert_eq!(
            read_u64(&mut m, 0, 39 * region(levels)).unwrap(),
            VALUE + 2,
            "{pair:?}"
        );
        check(&m);
    }
}

/// A guest that writes a page while log-dirty mode is being enabled, through an entry the
/// pass has not reached yet, finds the page in the first clean's bitmap.
#[test]
fn a_write_between_enabling_steps_is_logged() {
    let (mut m, _) = busy(PagingLevels::Four, PagingLevels::Four, 512, 40, 600);
    let budget = m.domain().config().call_work_budget;
    let (done, flush) = m.domain_mut().enable_log_dirty_step(budget).unwrap();
    m.settle(flush);
    assert!(!done);
    // The last region's L1 shadow is the last the pass reaches.
    write_u64(&mut m, 0, 39 * region(PagingLevels::Four), VALUE + 3).unwrap();
    check(&m);
    loop {
        let (done, flush) = m.domain_mut().enable_log_dirty_step(budget).unwrap();
        m.settle(flush);
        check(&m);
        if done {
            break;
        }
    }
    let (bitmap, flush) = m.domain_mut().clean_dirty().unwrap();
    m.settle(flush);
    assert!(bitmap.contains(Gfn::new(SHARED)));
}

/// While a p2m change waits for its scan, a fault on the frame maps nothing (it is
/// retried), so that the scan's one pass is complete.
#[test]
fn a_frame_whose_mappings_are_being_removed_is_not_mapped_again() {
    let (mut m, _) = busy(PagingLevels::Four, PagingLevels::Four, 512, 40, 600);
    let old = mfn_of(&m, SHARED);
    let new = host_frame(&mut m);
    let first = m
        .domain_mut()
        .set_p2m(Gfn::new(SHARED), Some((new, P2mType::Ram)));
    assert_eq!(first.unwrap_err(), EngineError::Preempted);
    m.settle_failed_call();
    let before = leaf_mappings_of(&m, old).len();
    assert!(before < 40, "the first step removed some mappings");
    // Region 0 was scanned first: its entry is gone and a fault does not bring it back.
    let outcome = m
        .domain_mut()
        .page_fault(
            0,
            shadow2::addr::Gva::new(0),
            shadow2::paging::PfErrorCode(0),
        )
        .unwrap();
    assert_eq!(outcome.0, shadow2::multi::FaultOutcome::Spurious);
    assert_eq!(leaf_mappings_of(&m, old).len(), before);
    check(&m);
}

/// While a frame waits for the write-access scan (a fault that would shadow it was
/// answered with a retry), a write to it through a mapping the scan has not reached is
/// emulated: the guest makes progress and no writable mapping is made behind the cursor.
#[test]
fn a_write_to_a_frame_waiting_for_the_scan_is_emulated() {
    let config = DomainConfig {
        scan_budget: 256,
        reverse_map: false,
        ..hvm(PagingLevels::Four, 1, 512)
    };
    let mut m = ShadowMachine::new(1 << 15, config).unwrap();
    m.add_ram(Gfn::new(0), 128).unwrap();
    let mut t = Tables::new(PagingLevels::Four, FIRST_TABLE, 128);
    let cr3 = t.new_root(0);
    for i in 0..40u64 {
        t.map(&mut m, cr3, i << 21, SHARED, DATA);
    }
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    for i in 0..40u64 {
        read_u64(&mut m, 0, i << 21).unwrap();
    }
    // SHARED becomes the L1 table of a new region.
    const REGION: u64 = 0x40_0000_0000;
    let pde = t.slot(&mut m, cr3, REGION, 2);
    t.write(&mut m, pde, (SHARED << 12) | TABLE);
    let shared = mfn_of(&m, SHARED);
    let (outcome, flush) = m
        .domain_mut()
        .page_fault(
            0,
            shadow2::addr::Gva::new(REGION),
            shadow2::paging::PfErrorCode(0),
        )
        .unwrap();
    m.settle(flush);
    assert_eq!(outcome, shadow2::multi::FaultOutcome::Spurious);
    assert!(m.domain().write_scan_pending(shared));
    let emulated = m.domain().stats().fault_emulate;
    // Region 0's entry was the first the scan made read-only.
    write_u64(&mut m, 0, 0x10, VALUE).unwrap();
    assert_eq!(m.domain().stats().fault_emulate, emulated + 1);
    assert_eq!(read_u64(&mut m, 0, 39 << 21 | 0x10).unwrap(), VALUE);
    assert!(m.domain().write_scan_pending(shared));
    check(&m);
    // The region's retries finish the scan; the frame is then a page table.
    for _ in 0..1000 {
        let (outcome, flush) = m
            .domain_mut()
            .page_fault(
                0,
                shadow2::addr::Gva::new(REGION),
                shadow2::paging::PfErrorCode(0),
            )
            .unwrap();
        m.settle(flush);
        if outcome != shadow2::multi::FaultOutcome::Spurious {
            break;
        }
    }
    assert!(m.domain().shadows().is_page_table(shared));
    check(&m);
}

/// Unshadowing a page table linked from a great many upper shadows (the up pointer finds
/// one link; the others need the scan of every upper shadow) goes in bounded calls, and
/// meanwhile nothing links the shadow again.
#[test]
fn unshadowing_a_widely_linked_table_is_bounded_at_the_largest_pool() {
    const UPPERS: u64 = 1536;
    const X: u64 = 9;
    let config = hvm(PagingLevels::Four, 1, DomainConfig::MAX_POOL_PAGES);
    let ram = FIRST_TABLE + UPPERS + 16;
    let frames = (DomainConfig::MAX_POOL_PAGES as u64 + ram + 4096).next_power_of_two();
    let mut m = ShadowMachine::new(frames, config).unwrap();
    m.add_ram(Gfn::new(0), ram).unwrap();
    let mut t = Tables::new(PagingLevels::Four, FIRST_TABLE, ram);
    let cr3 = t.new_root(0);
    // X is the L1 table of region 0 of every 1 GiB slot, each slot with its own L2.
    let l1 = X << 12;
    t.write(&mut m, l1, (SHARED << 12) | DATA);
    for i in 0..UPPERS {
        let pde = t.slot(&mut m, cr3, i << 30, 2);
        t.write(&mut m, pde, l1 | TABLE);
    }
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    for i in 0..UPPERS {
        read_u64(&mut m, 0, i << 30).unwrap();
    }
    let x = mfn_of(&m, X);
    let refs: u64 = m
        .domain()
        .shadows()
        .of_frame(x)
        .map(|(_, h)| u64::from(m.domain().shadows().info(h).unwrap().refs))
        .sum();
    assert_eq!(refs, UPPERS);
    let mut calls = 0;
    let flush = loop {
        calls += 1;
        match m.domain_mut().unshadow_page(Gfn::new(X)) {
            Ok(flush) => break flush,
            Err(EngineError::Preempted) => {
                assert_bounded(&m);
                m.settle_failed_call();
                check(&m);
                // A fault on a region not yet unhooked does not link the shadow again.
                let linked = |m: &ShadowMachine| {
                    m.domain()
                        .shadows()
                        .of_frame(x)
                        .map(|(_, h)| m.domain().shadows().info(h).unwrap().refs)
                        .sum::<u32>()
                };
                let before = linked(&m);
                let (_, flush) = m
                    .domain_mut()
                    .page_fault(
                        0,
                        shadow2::addr::Gva::new(0),
                        shadow2::paging::PfErrorCode(0),
                    )
                    .unwrap();
                m.settle(flush);
                assert!(linked(&m) <= before);
            }
            Err(e) => panic!("unshadow failed: {e}"),
        }
        assert!(calls < 1000, "unshadow makes no progress");
    };
    assert_bounded(&m);
    m.settle(flush);
    assert!(calls >= 3, "{calls} calls: the scan fit in one call");
    assert!(!m.domain().shadows().is_page_table(x));
    check(&m);
    assert_eq!(
        read_u64(&mut m, 0, (UPPERS - 1) << 30).unwrap(),
        VALUE_AT_SHARED
    );
    check(&m);
}

/// What SHARED holds in the test above (written through guest memory).
const VALUE_AT_SHARED: u64 = 0;

/// A clean re-protects the p2m entries a vcpu with paging disabled made writable within
/// its step budget too; a page written between steps through an entry not re-protected yet
/// is in the next clean's bitmap.
#[test]
fn a_clean_re_protects_p2m_entries_in_bounded_steps() {
    const PAGES: u64 = 64;
    const BUDGET: usize = 8;
    let mut m = machine(hvm(PagingLevels::Four, 1, 64), 128);
    set_mode(&mut m, 0, PagingLevels::Zero, 0);
    let flush = m.domain_mut().enable_log_dirty().unwrap();
    m.settle(flush);
    for gfn in 10..10 + PAGES {
        write_u64(&mut m, 0, gfn << 12, gfn).unwrap();
    }
    check(&m);
    let last = 10 + PAGES - 1;
    let mut steps = 0;
    let first = loop {
        steps += 1;
        let (progress, flush) = m.domain_mut().clean_step(BUDGET).unwrap();
        m.settle(flush);
        check(&m);
        if steps == 1 {
            // The last page's entry is still writable: this write is not seen by a fault.
            let faults = m.domain().stats().faults;
            write_u64(&mut m, 0, last << 12, 1).unwrap();
            assert_eq!(m.domain().stats().faults, faults);
        }
        if let shadow2::domain::CleanProgress::Done(bitmap) = progress {
            break bitmap;
        }
    };
    assert!(steps >= PAGES as usize / BUDGET, "{steps} steps");
    assert_eq!(first.count(), PAGES as usize);
    let (second, flush) = m.domain_mut().clean_dirty().unwrap();
    m.settle(flush);
    assert!(second.contains(Gfn::new(last)));
    check(&m);
}

/// With a reverse map, a frame mapped more often than the budget has its mappings removed
/// over several calls too.
#[test]
fn with_a_reverse_map_removing_many_mappings_is_bounded() {
    if !hvm(PagingLevels::Four, 1, 64).reverse_map {
        // The engine was built without its reverse map: nothing to check here.
        return;
    }
    for pair in PAGING_PAIRS {
        let (levels, shadow) = (pair.guest(), pair.shadow());
        let config = DomainConfig {
            call_work_budget: 8,
            reverse_map: true,
            ..hvm(shadow, 1, 512)
        };
        let mut m = ShadowMachine::new(1 << 15, config).unwrap();
        m.add_ram(Gfn::new(0), 128).unwrap();
        let mut t = Tables::new(levels, FIRST_TABLE, 128);
        let cr3 = t.new_root(0);
        for i in 0..40u64 {
            t.map(&mut m, cr3, i * region(levels), SHARED, DATA);
        }
        set_mode(&mut m, 0, levels, cr3);
        for i in 0..40u64 {
            read_u64(&mut m, 0, i * region(levels)).unwrap();
        }
        let calls = remap_shared_in_steps(&mut m, VALUE + 4);
        assert!(calls >= 5, "{pair:?}: {calls} calls");
        assert_eq!(read_u64(&mut m, 0, 0).unwrap(), VALUE + 4, "{pair:?}");
    }
}
