//! Issue 10, item 6: domain teardown in bounded steps. Every shadow, pool chunk, p2m table
//! and log-dirty structure goes back to the host, a budget's worth per call; afterwards
//! nothing of the domain is mapped and the host has every frame it gave; a torn-down or
//! failed domain accepts no operation but teardown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::{Gfn, Gva};
use shadow2::domain::{EngineError, ShadowOp, TeardownProgress};
use shadow2::paging::{PagingLevels, PfErrorCode};
use shadow2_machine::sim::ShadowMachine;

const RAM: u64 = 200;

/// Two vcpus on two address spaces over many L1 tables, a dying shadow or two, log-dirty
/// mode on with a clean in progress: as busy as a small domain gets.
fn busy(shadow: PagingLevels, levels: PagingLevels) -> ShadowMachine {
    let mut m = machine(hvm(shadow, 2, 256), RAM);
    let mut t = Tables::new(levels, 20, RAM);
    let spaces = [t.new_root(0), t.new_root(0x40)];
    let span = if levels == PagingLevels::Two {
        1 << 22
    } else {
        1 << 21
    };
    for (s, &cr3) in spaces.iter().enumerate() {
        for i in 0..30u64 {
            t.map(&mut m, cr3, i * span, 1 + (i + s as u64) % 16, DATA);
        }
    }
    for (v, &cr3) in spaces.iter().enumerate() {
        set_mode(&mut m, v, levels, cr3);
        for i in 0..30u64 {
            write_u64(&mut m, v, i * span, i).unwrap();
        }
    }
    // An address space dropped: its shadows wait to be torn down.
    let third = t.new_root(0x80);
    t.map(&mut m, third, 0, 2, DATA);
    set_mode(&mut m, 1, levels, third);
    read_u64(&mut m, 1, 0).unwrap();
    let flush = m.domain_mut().enable_log_dirty().unwrap();
    m.settle(flush);
    write_u64(&mut m, 0, 0, 7).unwrap();
    write_u64(&mut m, 0, span, 7).unwrap();
    let (progress, flush) = m.domain_mut().clean_step(1).unwrap();
    m.settle(flush);
    assert_eq!(progress, shadow2::domain::CleanProgress::More);
    check(&m);
    assert!(m.domain().shadows().shadows().count() > 60);
    m
}

/// Tears `m`'s domain down with `budget` per step, checking each step's work.
fn tear_down(m: &mut ShadowMachine, budget: usize) -> usize {
    let bound = m.domain().config().call_work_bound();
    let mut steps = 0;
    loop {
        steps += 1;
        let first = !m.domain().is_torn_down();
        let (progress, flush) = m.domain_mut().teardown_step(budget).unwrap();
        if first {
            let vcpus = flush.into_vcpus();
            assert!((0..m.domain().vcpu_count()).all(|v| vcpus.contains(v)));
        }
        let work = m.domain().stats().last_call_work;
        assert!(work <= bound.min(budget as u64), "step {steps} did {work}");
        if progress == TeardownProgress::Done {
            return steps;
        }
        assert!(steps < 100_000, "teardown makes no progress");
    }
}

/// Nothing of the domain is left: no shadow, no pool, no p2m table, no root, and the host
/// has every frame back but the guest's RAM.
#[track_caller]
fn assert_nothing_left(m: &ShadowMachine, ram_frames: u64) {
    let d = m.domain();
    assert_eq!(d.shadows().shadows().count(), 0);
    assert_eq!(d.shadows().hashed().count(), 0);
    assert_eq!(d.pool().total_pages(), 0);
    assert_eq!(d.p2m().map_or(0, |p| p.table_count()), 0);
    assert!(!d.log_dirty_enabled());
    for v in 0..d.vcpu_count() {
        let vcpu = d.vcpu(v).unwrap();
        assert!(vcpu.root().is_none() && vcpu.tops().next().is_none());
        assert!(vcpu.vcpu_top().is_none());
        assert!(d.hardware_control(v).is_none());
    }
    assert_eq!(d.host().allocated_frames(), ram_frames);
    assert_eq!(d.host().bad_frees(), 0);
}

#[test]
fn a_busy_domain_is_torn_down_in_bounded_steps_on_every_pair() {
    for pair in PAGING_PAIRS {
        let mut m = busy(pair.shadow(), pair.guest());
        let tables = m.domain().p2m().unwrap().table_count();
        let shadows = m.domain().shadows().shadows().count();
        let chunks = m.domain().pool().total_pages() / 4;
        let steps = tear_down(&mut m, 3);
        assert!(
            steps >= (shadows + chunks + tables) / 3,
            "{pair:?}: {steps} steps"
        );
        assert_nothing_left(&m, RAM);
    }
}

#[test]
fn a_torn_down_domain_accepts_nothing_but_teardown() {
    let mut m = busy(PagingLevels::Four, PagingLevels::Four);
    let (progress, _) = m.domain_mut().teardown_step(2).unwrap();
    assert_eq!(progress, TeardownProgress::More);
    assert!(m.domain().is_torn_down());
    let d = m.domain_mut();
    let fault = d.page_fault(0, Gva::new(0), PfErrorCode(0));
    assert_eq!(fault.unwrap_err(), EngineError::DomainFailed);
    assert_eq!(d.update_cr3(0).unwrap_err(), EngineError::DomainFailed);
    assert_eq!(
        d.update_paging_modes(1).unwrap_err(),
        EngineError::DomainFailed
    );
    assert_eq!(
        d.set_p2m(Gfn::new(3), None).unwrap_err(),
        EngineError::DomainFailed
    );
    assert_eq!(
        d.write_guest_phys(shadow2::addr::Gpa::new(0x1000), &[1])
            .unwrap_err(),
        EngineError::DomainFailed
    );
    assert_eq!(
        d.unshadow_page(Gfn::new(20)).unwrap_err(),
        EngineError::DomainFailed
    );
    assert!(d.enable_log_dirty().is_err());
    assert!(d.clean_step(8).is_err());
    assert!(
        d.shadow_op(ShadowOp::SetPoolSize {
            pages: 512,
            budget: 8
        })
        .is_err()
    );
    tear_down(&mut m, 64);
    assert_nothing_left(&m, RAM);
    // Done stays done.
    let (progress, _) = m.domain_mut().teardown_step(1).unwrap();
    assert_eq!(progress, TeardownProgress::Done);
}

#[test]
fn a_failed_domain_is_torn_down_too() {
    let mut m = busy(PagingLevels::Four, PagingLevels::Three);
    // Corrupt a shadow entry behind the engine's back; in test mode the next operation's
    // audit fails the domain.
    let (slot, entry) = leaf_mappings_of(&m, mfn_of(&m, 1))[0];
    let other = mfn_of(&m, RAM - 1).base().raw();
    poke_machine(&mut m, slot, (entry & !0x000f_ffff_ffff_f000) | other);
    let (_, flush) = m.domain_mut().shadow_op(ShadowOp::EnableTest).unwrap();
    m.settle(flush);
    assert!(m.domain_mut().update_cr3(0).is_err());
    assert!(m.domain().failure().is_some());
    assert_eq!(
        m.domain_mut().update_cr3(0).unwrap_err(),
        EngineError::DomainFailed
    );
    tear_down(&mut m, 5);
    assert_nothing_left(&m, RAM);
}
