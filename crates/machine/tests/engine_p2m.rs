//! Issue 3, item 2: the p2m in page-table format. A changed or removed p2m entry removes
//! every shadow mapping of the old frame (the hardware reaches the new frame, never the
//! old); a vcpu with paging disabled runs on the p2m root itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::{Gfn, Mfn};
use shadow2::p2m::P2mType;
use shadow2::paging::PagingLevels;
use shadow2_machine::sim::{GuestError, ShadowMachine};

const SHARED: u64 = 50;

/// Remaps guest frame `gfn` to `mapping` and carries out the flush.
fn set_p2m(m: &mut ShadowMachine, gfn: u64, mapping: Option<(Mfn, P2mType)>) {
    let flush = m.domain_mut().set_p2m(Gfn::new(gfn), mapping).unwrap();
    m.settle(flush);
    check(m);
}

/// vcpu 0 paging in `levels` with two mappings of SHARED (one read-only), vcpu 1 with
/// paging disabled; everything touched once so that shadows and TLBs hold the frame.
fn setup(shadow: PagingLevels, levels: PagingLevels) -> (ShadowMachine, Tables, u64) {
    let mut m = machine(hvm(shadow, 2, 128), 64);
    let mut t = Tables::new(levels, 1, 30);
    let cr3 = t.new_root(0x20);
    t.map(&mut m, cr3, 0x40_0000, SHARED, DATA);
    t.map(
        &mut m,
        cr3,
        0x80_5000,
        SHARED,
        DATA & !shadow2::paging::bits::RW,
    );
    set_mode(&mut m, 0, levels, cr3);
    set_mode(&mut m, 1, PagingLevels::Zero, 0);
    write_u64(&mut m, 0, 0x40_0000, 0x01d).unwrap();
    assert_eq!(read_u64(&mut m, 0, 0x80_5000).unwrap(), 0x01d);
    assert_eq!(read_u64(&mut m, 1, SHARED << 12).unwrap(), 0x01d);
    write_u64(&mut m, 1, (SHARED << 12) + 8, 0x01d).unwrap();
    check(&m);
    (m, t, cr3)
}

const PAIRS: [(PagingLevels, PagingLevels); 6] = [
    (PagingLevels::Four, PagingLevels::Four),
    (PagingLevels::Four, PagingLevels::Three),
    (PagingLevels::Four, PagingLevels::Two),
    (PagingLevels::Three, PagingLevels::Three),
    (PagingLevels::Three, PagingLevels::Two),
    (PagingLevels::Two, PagingLevels::Two),
];

#[test]
fn changed_p2m_entry_removes_every_mapping_of_the_old_frame() {
    for (shadow, levels) in PAIRS {
        let (mut m, _t, _) = setup(shadow, levels);
        let old = mfn_of(&m, SHARED);
        assert!(
            leaf_mappings_of(&m, old).len() >= 2,
            "{levels:?} on {shadow:?}"
        );
        let new = host_frame(&mut m);
        poke_machine(&mut m, new.base().raw(), 0x2e3);
        set_p2m(&mut m, SHARED, Some((new, P2mType::Ram)));

        assert!(
            leaf_mappings_of(&m, old).is_empty(),
            "{levels:?} on {shadow:?}"
        );
        assert_eq!(m.domain().shadows().frame(old).writable, 0);
        // Every path, TLBs included, reaches the new frame.
        assert_eq!(read_u64(&mut m, 0, 0x40_0000).unwrap(), 0x2e3);
        assert_eq!(read_u64(&mut m, 0, 0x80_5000).unwrap(), 0x2e3);
        assert_eq!(read_u64(&mut m, 1, SHARED << 12).unwrap(), 0x2e3);
        write_u64(&mut m, 0, 0x40_0010, 0x2e4).unwrap();
        write_u64(&mut m, 1, (SHARED << 12) + 0x18, 0x2e5).unwrap();
        assert_eq!(machine_u64(&m, new.base().raw() + 0x10), 0x2e4);
        assert_eq!(machine_u64(&m, new.base().raw() + 0x18), 0x2e5);
        // The old frame was never written again.
        assert_eq!(machine_u64(&m, old.base().raw()), 0x01d);
        assert_eq!(machine_u64(&m, old.base().raw() + 0x10), 0);
        assert_eq!(machine_u64(&m, old.base().raw() + 0x18), 0);
        assert!(m.domain().stats().mapping_removals > 0);
        check(&m);
    }
}

#[test]
fn removed_p2m_entry_turns_every_access_into_mmio() {
    for (shadow, levels) in PAIRS {
        let (mut m, _t, _) = setup(shadow, levels);
        let old = mfn_of(&m, SHARED);
        set_p2m(&mut m, SHARED, None);
        assert!(leaf_mappings_of(&m, old).is_empty());
        for (v, va) in [(0, 0x40_0000), (0, 0x80_5000), (1, SHARED << 12)] {
            let r = read_u64(&mut m, v, va);
            assert!(
                matches!(r, Err(GuestError::Mmio { gpa }) if gpa.gfn().raw() == SHARED),
                "{levels:?} on {shadow:?}, vcpu {v}: {r:?}"
            );
        }
        // Mapped again (to another frame), it is RAM again.
        let new = host_frame(&mut m);
        set_p2m(&mut m, SHARED, Some((new, P2mType::Ram)));
        write_u64(&mut m, 0, 0x40_0000, 9).unwrap();
        assert_eq!(read_u64(&mut m, 1, SHARED << 12).unwrap(), 9);
        assert_eq!(machine_u64(&m, new.base().raw()), 9);
        check(&m);
    }
}

#[test]
fn changed_p2m_entry_of_a_page_table_unshadows_it_and_the_new_table_is_used() {
    for (shadow, levels) in PAIRS {
        let (mut m, mut t, cr3) = setup(shadow, levels);
        let l1_gfn = t.table_of(&mut m, cr3, 0x40_0000, 1);
        let old = mfn_of(&m, l1_gfn);
        assert!(!kinds_of(&m, l1_gfn).is_empty(), "the L1 is shadowed");
        // A copy of the L1 whose entry for 0x40_0000 names frame 51 instead.
        let new = host_frame(&mut m);
        // 0x40_0000 is the first page its L1 table maps (entry 0), in every mode.
        poke_machine(&mut m, new.base().raw(), (51 << 12) | DATA);
        write_u64(&mut m, 1, 51 << 12, 0x51).unwrap();
        set_p2m(&mut m, l1_gfn, Some((new, P2mType::Ram)));
        assert_eq!(m.domain().shadows().of_frame(old).count(), 0);
        assert_eq!(read_u64(&mut m, 0, 0x40_0000).unwrap(), 0x51);
        // The other mapping lived in another L1 (or the same one, now without it).
        let r = read_u64(&mut m, 0, 0x80_5000);
        let other_l1 = t.table_of(&mut m, cr3, 0x80_5000, 1);
        if other_l1 == l1_gfn {
            assert!(matches!(r, Err(GuestError::PageFault { .. })), "{r:?}");
        } else {
            assert_eq!(r.unwrap(), 0x01d);
        }
        check(&m);
    }
}

#[test]
fn changed_p2m_entry_of_the_top_level_table_reloads_the_root() {
    for (shadow, levels) in PAIRS {
        let (mut m, _t, cr3) = setup(shadow, levels);
        let top_gfn = cr3 >> 12;
        let old = mfn_of(&m, top_gfn);
        // Move the top-level table to another machine frame with the same contents.
        let new = host_frame(&mut m);
        for i in 0..512 {
            let e = machine_u64(&m, old.base().raw() + 8 * i);
            poke_machine(&mut m, new.base().raw() + 8 * i, e);
        }
        set_p2m(&mut m, top_gfn, Some((new, P2mType::Ram)));
        assert_eq!(m.domain().shadows().of_frame(old).count(), 0);
        assert_eq!(read_u64(&mut m, 0, 0x40_0000).unwrap(), 0x01d);
        // (A PAE PDPT is not shadowed: its entries are registers loaded at CR3 load.)
        if levels != PagingLevels::Three {
            assert!(m.domain().shadows().of_frame(new).count() > 0);
        }
        check(&m);
    }
}

#[test]
fn paging_disabled_vcpu_runs_on_the_p2m_root() {
    for shadow in [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four] {
        let mut m = machine(hvm(shadow, 1, 64), 32);
        let p2m_root = m.domain().p2m().unwrap().root();
        assert_eq!(m.domain().p2m().unwrap().levels(), shadow);
        set_mode(&mut m, 0, PagingLevels::Zero, 0);
        assert_eq!(m.domain().vcpu(0).unwrap().root(), Some(p2m_root));
        assert_eq!(
            m.domain().hardware_control(0).unwrap().cr3,
            p2m_root.base().raw()
        );
        assert!(m.domain().vcpu(0).unwrap().tops().next().is_none());
        // The p2m starts read-only: the first write to a page traps once, the next do not.
        let fills = m.traps().shadow_fills;
        write_u64(&mut m, 0, 0x5008, 3).unwrap();
        assert_eq!(m.traps().shadow_fills, fills + 1);
        write_u64(&mut m, 0, 0x5010, 4).unwrap();
        assert_eq!(read_u64(&mut m, 0, 0x5008).unwrap(), 3);
        assert_eq!(m.traps().shadow_fills, fills + 1);
        assert_eq!(
            m.domain().shadows().shadows().count(),
            0,
            "no shadow needed"
        );

        // Paging on, then off again: back on the p2m.
        let levels = if shadow == PagingLevels::Two {
            PagingLevels::Two
        } else {
            PagingLevels::Three
        };
        let mut t = Tables::new(levels, 8, 20);
        let cr3 = t.new_root(0);
        t.map(&mut m, cr3, 0x1000, 5, DATA);
        set_mode(&mut m, 0, levels, cr3);
        assert_ne!(m.domain().vcpu(0).unwrap().root(), Some(p2m_root));
        assert_eq!(read_u64(&mut m, 0, 0x1008).unwrap(), 3);
        set_mode(&mut m, 0, PagingLevels::Zero, 0);
        assert_eq!(m.domain().vcpu(0).unwrap().root(), Some(p2m_root));
        assert_eq!(read_u64(&mut m, 0, 0x5010).unwrap(), 4);
        // A page table is never writable through the p2m: the write is emulated.
        let emulated = m.traps().emulated_writes;
        let table = t.table_of(&mut m, cr3, 0x1000, 1);
        write_u64(&mut m, 0, (table << 12) + 8, (6 << 12) | DATA).unwrap();
        assert_eq!(m.traps().emulated_writes, emulated + 1);
        check(&m);
    }
}

#[test]
fn p2m_lookup_answers_what_set_p2m_stored() {
    let mut m = machine(hvm(PagingLevels::Four, 1, 64), 16);
    let mfn = host_frame(&mut m);
    set_p2m(&mut m, 1000, Some((mfn, P2mType::Ram)));
    set_p2m(&mut m, 1001, Some((Mfn::new(0xfee00), P2mType::Mmio)));
    assert_eq!(
        m.domain().guest_frame(Gfn::new(1000)),
        Some((mfn, P2mType::Ram))
    );
    assert_eq!(
        m.domain().guest_frame(Gfn::new(1001)),
        Some((Mfn::new(0xfee00), P2mType::Mmio))
    );
    assert_eq!(m.domain().guest_frame(Gfn::new(1002)), None);
    // The p2m's own table frames are never guest memory.
    let tables: Vec<_> = m.domain().p2m().unwrap().table_frames().collect();
    assert!(tables.len() > 1);
    for f in tables {
        assert!(
            m.domain_mut()
                .set_p2m(Gfn::new(5), Some((f, P2mType::Ram)))
                .is_err()
        );
    }
    // A gfn beyond what the format covers is an error, not a panic.
    let max = m.domain().p2m().unwrap().max_gfn();
    assert!(m.domain_mut().set_p2m(max, None).is_err());
    assert_eq!(m.domain().failure(), None);
    check(&m);
}
