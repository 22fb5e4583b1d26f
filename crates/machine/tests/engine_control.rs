//! Issue 3, item 9: control operations (Xen's shadow_op). Every `ShadowOp` variant works;
//! bad arguments give an error, never a panic, and leave the domain running; the
//! statistics counters move with what happens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::{Gfn, Gpa, Gva, Mfn};
use shadow2::domain::{Domain, DomainConfig, EngineError, ShadowOp, ShadowOpResult};
use shadow2::multi::FaultOutcome;
use shadow2::p2m::P2mType;
use shadow2::paging::{PagingLevels, PfErrorCode, bits};
use shadow2_machine::SparseMemory;
use shadow2_machine::sim::ShadowMachine;

const X: u64 = 0x40_0000;

/// A 4-on-4 guest with X mapped to frame 40 and vcpu 1 with paging disabled.
fn setup() -> (ShadowMachine, Tables, u64) {
    let mut m = machine(hvm(PagingLevels::Four, 2, 128), 64);
    let mut t = Tables::new(PagingLevels::Four, 1, 30);
    let cr3 = t.new_root(0);
    t.map(&mut m, cr3, X, 40, DATA);
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    set_mode(&mut m, 1, PagingLevels::Zero, 0);
    write_u64(&mut m, 0, X, 1).unwrap();
    (m, t, cr3)
}

fn op(m: &mut ShadowMachine, o: ShadowOp) -> ShadowOpResult {
    let (r, flush) = m.domain_mut().shadow_op(o).unwrap();
    m.settle(flush);
    check(m);
    r
}

#[test]
fn every_shadow_op_variant_works() {
    let (mut m, _t, _) = setup();

    assert_eq!(op(&mut m, ShadowOp::EnableTest), ShadowOpResult::Done);
    assert!(m.domain().test_mode());
    write_u64(&mut m, 0, X + 8, 2).unwrap();
    assert_eq!(op(&mut m, ShadowOp::DisableTest), ShadowOpResult::Done);
    assert!(!m.domain().test_mode());

    assert_eq!(op(&mut m, ShadowOp::EnableLogDirty), ShadowOpResult::Done);
    write_u64(&mut m, 0, X, 3).unwrap();
    write_u64(&mut m, 1, 41 << 12, 3).unwrap();
    let ShadowOpResult::Bitmap(peeked) = op(&mut m, ShadowOp::Peek) else {
        panic!("peek")
    };
    assert_eq!(peeked.to_vec(), [Gfn::new(40), Gfn::new(41)]);
    let cleaned = loop {
        match op(&mut m, ShadowOp::Clean { budget: 1 }) {
            ShadowOpResult::More => {}
            ShadowOpResult::Bitmap(b) => break b,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(cleaned, peeked);
    let ShadowOpResult::Bitmap(empty) = op(&mut m, ShadowOp::Peek) else {
        panic!("peek")
    };
    assert!(empty.is_empty());
    assert_eq!(op(&mut m, ShadowOp::DisableLogDirty), ShadowOpResult::Done);
    assert!(!m.domain().log_dirty_enabled());

    let ShadowOpResult::PoolSize { total, used } = op(&mut m, ShadowOp::GetPoolSize) else {
        panic!("pool size")
    };
    assert_eq!(total, m.domain().pool().total_pages());
    assert_eq!(used, m.domain().pool().used_pages());
    assert!(used > 0 && used <= total);
    let target = total + 64;
    let mut steps = 0;
    while op(
        &mut m,
        ShadowOp::SetPoolSize {
            pages: target,
            budget: 4,
        },
    ) == ShadowOpResult::More
    {
        steps += 1;
        assert!(steps < 100);
    }
    assert!(
        steps > 0,
        "64 pages in steps of 4 chunks take more than one call"
    );
    assert_eq!(m.domain().pool().total_pages(), target);

    let ShadowOpResult::Stats(stats) = op(&mut m, ShadowOp::Stats) else {
        panic!("stats")
    };
    assert_eq!(*stats, *m.domain().stats());
    assert!(stats.faults > 0 && stats.dirty_marked >= 2);
    assert_eq!(read_u64(&mut m, 0, X).unwrap(), 3);
    check(&m);
}

#[test]
fn bad_arguments_are_errors_never_panics() {
    let (mut m, _t, _) = setup();
    let bad = |r: Result<_, EngineError>| -> bool { matches!(r, Err(EngineError::BadArgument(_))) };
    let d = m.domain_mut();
    // No such vcpu.
    assert!(bad(d
        .page_fault(2, Gva::new(X), PfErrorCode(0))
        .map(|_| ())));
    assert!(bad(d
        .page_fault(usize::MAX, Gva::new(X), PfErrorCode(0))
        .map(|_| ())));
    assert!(bad(d.update_cr3(2).map(|_| ())));
    assert!(bad(d.update_paging_modes(7).map(|_| ())));
    assert!(bad(d.set_control(2, Default::default())));
    assert!(bad(d.invlpg(64, Gva::new(X)).map(|_| ())));
    // Pool too small.
    let min = d.config().min_pool_pages();
    assert!(bad(d.set_pool_size(min - 1).map(|_| ())));
    assert!(bad(d
        .shadow_op(ShadowOp::SetPoolSize {
            pages: 0,
            budget: 1
        })
        .map(|_| ())));
    // Log-dirty operations with log-dirty off, and enabling it twice.
    assert!(bad(d.shadow_op(ShadowOp::Clean { budget: 8 }).map(|_| ())));
    assert!(bad(d.shadow_op(ShadowOp::Peek).map(|_| ())));
    assert!(bad(d.clean_dirty().map(|_| ())));
    assert!(d.peek_dirty().is_none());
    let flush = d.enable_log_dirty().unwrap();
    assert!(bad(d.enable_log_dirty().map(|_| ())));
    d.disable_log_dirty();
    let _ = flush;
    // p2m and memory arguments.
    let max = d.p2m().unwrap().max_gfn();
    assert!(bad(d.set_p2m(max, None).map(|_| ())));
    let pool_frame = d.pool().chunks().next().unwrap().0;
    assert_eq!(
        d.set_p2m(Gfn::new(3), Some((pool_frame, P2mType::Ram)))
            .map(|_| ()),
        Err(EngineError::ForbiddenFrame(pool_frame))
    );
    let guest_mfn = d.guest_frame(Gfn::new(40)).unwrap().0;
    assert!(d.add_hypervisor_frame(guest_mfn).is_err());
    assert!(bad(d
        .write_guest_phys(Gpa::new(1000 << 12), &[1])
        .map(|_| ())));
    assert!(bad(d.read_guest_phys(Gpa::new(1000 << 12), &mut [0])));
    assert!(bad(d.add_frame(Mfn::new(5000))));
    let _ = d.unshadow_page(Gfn::new(1000)).unwrap();
    // A fault nothing explains, with every error-code bit set, or at a non-canonical
    // address: answered, not a panic.
    let _ = d.page_fault(0, Gva::new(X), PfErrorCode(u32::MAX));
    let r = d.page_fault(0, Gva::new(0x8000_0000_0000), PfErrorCode(0));
    assert!(bad(r.map(|_| ())), "hardware never reports #PF there");
    let r = d
        .page_fault(0, Gva::new(X), PfErrorCode(PfErrorCode::P))
        .unwrap();
    assert!(
        matches!(r.0, FaultOutcome::Spurious | FaultOutcome::Fixed),
        "{r:?}"
    );

    assert_eq!(m.domain().failure(), None);
    m.flush_all_tlbs();
    assert_eq!(read_u64(&mut m, 0, X).unwrap(), 1);
    write_u64(&mut m, 1, 41 << 12, 5).unwrap();
    check(&m);
}

#[test]
fn operations_before_a_mode_is_chosen_are_errors() {
    let mut m = machine(hvm(PagingLevels::Three, 1, 64), 16);
    let d = m.domain_mut();
    assert!(d.update_cr3(0).is_err());
    assert!(d.page_fault(0, Gva::new(X), PfErrorCode(0)).is_err());
    assert!(d.invlpg(0, Gva::new(X)).is_err());
    assert_eq!(m.domain().failure(), None);
    set_mode(&mut m, 0, PagingLevels::Zero, 0);
    write_u64(&mut m, 0, 0x3000, 1).unwrap();
    check(&m);
}

#[test]
fn bad_domain_configurations_are_errors() {
    for config in [
        hvm(PagingLevels::Four, 0, 64),
        hvm(PagingLevels::Four, 65, 64),
        hvm(PagingLevels::Zero, 1, 64),
    ] {
        assert!(Domain::new(SparseMemory::new(4096), config).is_err());
    }
    // A pool asked smaller than the minimum gets the minimum.
    let config = hvm(PagingLevels::Two, 2, 1);
    let d = Domain::new(SparseMemory::new(4096), config).unwrap();
    assert!(d.pool().total_pages() >= config.min_pool_pages());
    // A machine too small for the pool.
    let config: DomainConfig = hvm(PagingLevels::Four, 1, 4096);
    assert!(Domain::new(SparseMemory::new(64), config).is_err());
}

#[test]
fn stats_counters_move_with_what_happens() {
    let (mut m, mut t, cr3) = setup();
    let s0 = *m.domain().stats();
    // Demand fills, one in a region with no shadow yet.
    t.map(&mut m, cr3, X + 0x1000, 41, DATA);
    write_u64(&mut m, 0, X + 0x1000, 1).unwrap();
    t.map(&mut m, cr3, X + 0x20_0000, 44, DATA);
    write_u64(&mut m, 0, X + 0x20_0000, 1).unwrap();
    // A propagated fault, then the fast path.
    let _ = read_u64(&mut m, 0, X + 0x5000).unwrap_err();
    let _ = read_u64(&mut m, 0, X + 0x5000).unwrap_err();
    // An A-bit fault.
    t.map(&mut m, cr3, X + 0x2000, 42, bits::P | bits::RW);
    read_u64(&mut m, 0, X + 0x2000).unwrap();
    // MMIO.
    t.map(&mut m, cr3, X + 0x3000, 500, DATA);
    let _ = read_u64(&mut m, 0, X + 0x3000).unwrap_err();
    // An emulated page-table write through a mapping of the L1.
    let l1 = t.table_of(&mut m, cr3, X, 1);
    t.map(&mut m, cr3, X + 0x4000, l1, DATA);
    write_u64(&mut m, 0, X + 0x4000 + 8 * 6, (43 << 12) | DATA).unwrap();
    // A data page, mapped writable, becomes a page table (the L1 of another region).
    t.map(&mut m, cr3, X + 0x6000, 45, DATA);
    write_u64(&mut m, 0, X + 0x6000 + 8, 1).unwrap();
    let pde = t.slot(&mut m, cr3, X + 0x60_0000, 2);
    t.write(&mut m, pde, (45 << 12) | TABLE);
    let _ = read_u64(&mut m, 0, X + 0x60_0000).unwrap_err();
    // CR3 loads (one cached), INVLPG, a mode update, log-dirty, a p2m change.
    m.set_cr3(0, cr3).unwrap();
    m.invlpg(0, Gva::new(X)).unwrap();
    set_mode(&mut m, 1, PagingLevels::Four, cr3);
    let flush = m.domain_mut().enable_log_dirty().unwrap();
    m.settle(flush);
    write_u64(&mut m, 0, X, 9).unwrap();
    let new = host_frame(&mut m);
    let flush = m
        .domain_mut()
        .set_p2m(Gfn::new(41), Some((new, P2mType::Ram)))
        .unwrap();
    m.settle(flush);
    check(&m);

    let s = *m.domain().stats();
    let moved = |name: &str, before: u64, after: u64| {
        assert!(after > before, "{name} did not move: {before} -> {after}");
    };
    moved("faults", s0.faults, s.faults);
    moved("fault_fixed", s0.fault_fixed, s.fault_fixed);
    moved("fault_propagated", s0.fault_propagated, s.fault_propagated);
    moved("fault_emulate", s0.fault_emulate, s.fault_emulate);
    moved("fault_mmio", s0.fault_mmio, s.fault_mmio);
    moved("fast_path", s0.fast_path, s.fast_path);
    moved(
        "fast_path_not_present",
        s0.fast_path_not_present,
        s.fast_path_not_present,
    );
    moved(
        "fault_accessed_bit",
        s0.fault_accessed_bit,
        s.fault_accessed_bit,
    );
    moved("fault_log_dirty", s0.fault_log_dirty, s.fault_log_dirty);
    moved("cr3_loads", s0.cr3_loads, s.cr3_loads);
    moved("cr3_cached", s0.cr3_cached, s.cr3_cached);
    moved("mode_updates", s0.mode_updates, s.mode_updates);
    moved("invlpg", s0.invlpg, s.invlpg);
    moved(
        "validated_entries",
        s0.validated_entries,
        s.validated_entries,
    );
    moved("emulated_writes", s0.emulated_writes, s.emulated_writes);
    moved("shadows_created", s0.shadows_created, s.shadows_created);
    moved(
        "write_access_removals",
        s0.write_access_removals,
        s.write_access_removals,
    );
    moved(
        "write_access_by_pointer + write_access_by_scan + write_access_by_rmap",
        s0.write_access_by_pointer + s0.write_access_by_scan + s0.write_access_by_rmap,
        s.write_access_by_pointer + s.write_access_by_scan + s.write_access_by_rmap,
    );
    moved("mapping_removals", s0.mapping_removals, s.mapping_removals);
    moved("flushes", s0.flushes, s.flushes);
    moved("dirty_marked", s0.dirty_marked, s.dirty_marked);
    // Every fault is counted under exactly one outcome.
    assert_eq!(
        s.faults,
        s.fault_fixed + s.fault_propagated + s.fault_emulate + s.fault_mmio + s.fault_spurious
    );
    assert_eq!(s.fast_path, s.fast_path_not_present + s.fast_path_mmio);
    // The named fields are the counters.
    let fields = s.fields();
    assert_eq!(fields[0], ("faults", s.faults));
    assert!(
        fields
            .iter()
            .any(|&(n, v)| n == "cr3_cached" && v == s.cr3_cached)
    );
    let names: std::collections::BTreeSet<_> = fields.iter().map(|f| f.0).collect();
    assert_eq!(names.len(), fields.len());
}
