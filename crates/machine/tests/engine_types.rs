//! Issue 3, item 4: shadow types and the hash. One guest page used as L1 and L2 at once
//! (a recursive map) has two shadows of different kinds, both kept up to date; guest
//! superpages are splintered into fl1 shadows; vcpus reading the same tables differently
//! get separate shadows; top-level shadows stay pinned after a CR3 switch away and a switch
//! back reuses them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::Gva;
use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, bits};
use shadow2::types::ShadowKind;
use shadow2_machine::sim::ShadowMachine;

const X: u64 = 0x40_0000;

/// How the guest reads its L1 entry for an address through the self-map, and the frames
/// used at two levels at once with their two kinds.
type SelfMap = (fn(u64) -> u64, Vec<(u64, [ShadowKind; 2])>);

/// Installs the recursive self-map of `levels` in address space `cr3`; returns the
/// linear address through which the guest reads its L1 entry for `va`, and the guest
/// frames that are now used at two levels at once with their two kinds.
fn self_map(m: &mut ShadowMachine, t: &mut Tables, cr3: u64) -> SelfMap {
    match t.levels {
        PagingLevels::Two => {
            let l2 = cr3 >> 12;
            t.write(m, (l2 << 12) + 1023 * 4, (l2 << 12) | TABLE);
            (
                |va| 0xffc0_0000 + ((va & 0xffff_ffff) >> 12) * 4,
                vec![(l2, [ShadowKind::L1x32, ShadowKind::L2x32])],
            )
        }
        PagingLevels::Three => {
            // Windows-style: PDEs 0..3 of the fourth PD map the four PDs.
            let mut pds = [0u64; 4];
            for (i, pd) in pds.iter_mut().enumerate() {
                *pd = t.table_of(m, cr3, (i as u64) << 30, 2);
            }
            for (i, pd) in pds.iter().enumerate() {
                t.write(m, (pds[3] << 12) + 8 * i as u64, (pd << 12) | TABLE);
            }
            (
                |va| 0xc000_0000 + ((va & 0xffff_ffff) >> 12) * 8,
                vec![(pds[0], [ShadowKind::L1Pae, ShadowKind::L2Pae])],
            )
        }
        PagingLevels::Four => {
            let l4 = cr3 >> 12;
            t.write(m, (l4 << 12) + 509 * 8, (l4 << 12) | TABLE);
            let l2 = t.table_of(m, cr3, X, 2);
            let l3 = t.table_of(m, cr3, X, 3);
            (
                |va| 0xffff_fe80_0000_0000 + ((va & 0xffff_ffff_ffff) >> 12) * 8,
                vec![
                    (l2, [ShadowKind::L1x64, ShadowKind::L2x64]),
                    (l3, [ShadowKind::L2x64, ShadowKind::L3x64]),
                    (l4, [ShadowKind::L3x64, ShadowKind::L4x64]),
                ],
            )
        }
        PagingLevels::Zero => unreachable!(),
    }
}

#[test]
fn recursive_map_gives_one_page_two_shadow_kinds_kept_in_step() {
    for pair in [
        Pair::P2on2,
        Pair::P2on3,
        Pair::P2on4,
        Pair::P3on3,
        Pair::P3on4,
        Pair::P4on4,
    ] {
        let levels = pair.guest();
        let mut m = machine(hvm(pair.shadow(), 1, 256), 128);
        let mut t = Tables::new(levels, 1, 60);
        let cr3 = t.new_root(0x40);
        t.map(&mut m, cr3, X, 100, DATA);
        let (pte_va, doubles) = self_map(&mut m, &mut t, cr3);
        set_mode(&mut m, 0, levels, cr3);
        write_u64(&mut m, 0, X, 0xa1).unwrap();

        // The guest reads its own PTE for X through the self-map.
        let mut buf = [0u8; 8];
        let n = t.entry_bytes() as usize;
        m.read(0, Gva::new(pte_va(X)), SUP, &mut buf[..n]).unwrap();
        assert_eq!(u64::from_le_bytes(buf), (100 << 12) | DATA, "{pair:?}");
        // The walk through the self-map uses the upper tables at two levels at once.
        for (gfn, kinds) in &doubles {
            let got = kinds_of(&m, *gfn);
            for k in kinds {
                assert!(got.contains(k), "{pair:?}: frame {gfn} has {got:?}");
            }
            let meta = m.domain().shadows().frame(mfn_of(&m, *gfn));
            assert!(meta.kinds.contains(kinds[0]) && meta.kinds.contains(kinds[1]));
            assert!(meta.shadows >= 2);
            assert_eq!(meta.writable, 0, "a page table mapped writable");
        }
        check(&m);

        // A PTE written through the self-map is emulated, and the new mapping works at
        // once: the L1 shadow was updated in the same step.
        let y = X + 0x3000;
        let emulated = m.traps().emulated_writes;
        let pte = (101 << 12) | DATA;
        m.write(0, Gva::new(pte_va(y)), SUP, &pte.to_le_bytes()[..n])
            .unwrap();
        assert_eq!(m.traps().emulated_writes, emulated + 1, "{pair:?}");
        let traps = m.traps().total();
        write_u64(&mut m, 0, y, 0xb2).unwrap();
        assert_eq!(m.traps().total(), traps, "{pair:?}: a third trap");
        assert_eq!(phys_u64(&m, 101 << 12), 0xb2);
        check(&m);

        // The L1 table for X replaced by another one (its PDE rewritten): both shadows
        // of the page holding the PDE follow, so the self-map and X see the new table.
        let new_l1 = t.alloc();
        let idx = if levels == PagingLevels::Two {
            (X >> 12) & 0x3ff
        } else {
            (X >> 12) & 0x1ff
        };
        t.write(
            &mut m,
            (new_l1 << 12) + idx * t.entry_bytes(),
            (102 << 12) | DATA,
        );
        let pde = t.slot(&mut m, cr3, X, 2);
        t.write(&mut m, pde, (new_l1 << 12) | TABLE);
        m.flush_all_tlbs();
        write_u64(&mut m, 0, X, 0xc3).unwrap();
        assert_eq!(phys_u64(&m, 102 << 12), 0xc3);
        m.read(0, Gva::new(pte_va(X)), SUP, &mut buf[..n]).unwrap();
        assert_eq!(
            u64::from_le_bytes(buf) & !bits::D,
            (102 << 12) | (DATA & !bits::D)
        );
        check(&m);
    }
}

#[test]
fn vcpus_reading_tables_differently_get_separate_shadows_of_one_page() {
    // vcpu 0 with EFER.NXE, vcpu 1 without: bit 63 means NX to one and is reserved to the
    // other, so the same L4 has two shadows of the same kind.
    let mut m = machine(hvm(PagingLevels::Four, 2, 128), 64);
    let mut t = Tables::new(PagingLevels::Four, 1, 30);
    let cr3 = t.new_root(0);
    t.map(&mut m, cr3, X, 40, DATA);
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    let mut ctl = control(PagingLevels::Four, cr3);
    ctl.efer &= !shadow2::paging::bits::cr::EFER_NXE;
    m.set_paging(1, ctl).unwrap();
    write_u64(&mut m, 0, X, 1).unwrap();
    assert_eq!(read_u64(&mut m, 1, X).unwrap(), 1);
    let l4 = m.domain().shadows().of_frame(mfn_of(&m, cr3 >> 12));
    let keys: Vec<_> = l4.collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|(k, _)| k.kind == ShadowKind::L4x64));
    assert_ne!(keys[0].0.flavor, keys[1].0.flavor);
    // A guest write to the shared L1 reaches both vcpus' shadows.
    let slot = t.slot(&mut m, cr3, X, 1);
    t.write(&mut m, slot, (41 << 12) | DATA);
    m.flush_all_tlbs();
    write_u64(&mut m, 0, X, 2).unwrap();
    assert_eq!(read_u64(&mut m, 1, X).unwrap(), 2);
    assert_eq!(phys_u64(&m, 41 << 12), 2);
    // NX set in the leaf: an NX page to vcpu 0, a reserved-bit fault to vcpu 1.
    t.write(&mut m, slot, (41 << 12) | DATA | bits::NX);
    m.flush_all_tlbs();
    assert_eq!(read_u64(&mut m, 0, X).unwrap(), 2);
    let r = read_u64(&mut m, 1, X);
    assert!(
        matches!(r, Err(shadow2_machine::sim::GuestError::PageFault { code, .. }) if code.reserved()),
        "{r:?}"
    );
    check(&m);
}

#[test]
fn guest_superpages_are_splintered_into_fl1_shadows() {
    for (pair, kind, order) in [
        (Pair::P4on4, ShadowKind::Fl1x64, 0),
        (Pair::P3on3, ShadowKind::Fl1Pae, 0),
        (Pair::P3on4, ShadowKind::Fl1Pae, 0),
        (Pair::P2on2, ShadowKind::Fl1x32, 0),
        (Pair::P2on3, ShadowKind::Fl1x32, 1),
        (Pair::P2on4, ShadowKind::Fl1x32, 1),
    ] {
        let levels = pair.guest();
        let mut m = machine(hvm(pair.shadow(), 1, 128), 1024);
        let mut t = Tables::new(levels, 1, 20);
        let cr3 = t.new_root(0);
        // A superpage over guest frames 0.. (the guest's own tables among them).
        let va = 0x80_0000;
        let slot = t.slot(&mut m, cr3, va, 2);
        t.write(&mut m, slot, bits::PS | DATA);
        t.map(&mut m, cr3, X, 600, DATA);
        set_mode(&mut m, 0, levels, cr3);
        assert_eq!(read_u64(&mut m, 0, X).unwrap(), 0);
        for k in [30u64, 31, 200, 511] {
            write_u64(&mut m, 0, va + k * 4096 + 8, k).unwrap();
            assert_eq!(phys_u64(&m, (k << 12) + 8), k);
        }
        let fl1: Vec<_> = m.domain().shadows().fl1_of_gfn(0).collect();
        assert_eq!(fl1.len(), 1, "{pair:?}: {fl1:?}");
        assert_eq!(fl1[0].0.kind, kind);
        let info = m.domain().shadows().info(fl1[0].1).unwrap();
        assert_eq!(info.order, order, "{pair:?}");
        // Splinters are not page tables: the frames under them are not typed.
        assert!(!m.domain().shadows().is_page_table(mfn_of(&m, 200)));
        check(&m);

        // A write through the superpage to one of the guest's page tables is emulated,
        // and reflected in its shadow: the guest remaps X through its big page.
        let l1 = t.table_of(&mut m, cr3, X, 1);
        let idx = if levels == PagingLevels::Two {
            (X >> 12) & 0x3ff
        } else {
            (X >> 12) & 0x1ff
        };
        let emulated = m.traps().emulated_writes;
        let pte = (601 << 12) | DATA;
        let n = t.entry_bytes() as usize;
        m.write(
            0,
            Gva::new(va + (l1 << 12) + idx * n as u64),
            SUP,
            &pte.to_le_bytes()[..n],
        )
        .unwrap();
        assert_eq!(m.traps().emulated_writes, emulated + 1, "{pair:?}");
        m.flush_all_tlbs();
        write_u64(&mut m, 0, X, 0x601).unwrap();
        assert_eq!(phys_u64(&m, 601 << 12), 0x601);
        assert!(m.domain().shadows().fl1_of_gfn(0).next().is_some());
        check(&m);
    }
}

#[test]
fn top_level_shadows_stay_pinned_and_a_switch_back_reuses_them() {
    for pair in [
        Pair::P2on2,
        Pair::P2on3,
        Pair::P2on4,
        Pair::P3on3,
        Pair::P3on4,
        Pair::P4on4,
    ] {
        let levels = pair.guest();
        let mut m = machine(hvm(pair.shadow(), 1, 256), 128);
        let mut t = Tables::new(levels, 1, 60);
        let roots: Vec<u64> = (0..3)
            .map(|i| {
                let cr3 = t.new_root(0x20 * i);
                t.map(&mut m, cr3, X, 100 + i, DATA);
                cr3
            })
            .collect();
        set_mode(&mut m, 0, levels, roots[0]);
        let mut tops = Vec::new();
        let mut hw_roots = Vec::new();
        for (i, &cr3) in roots.iter().enumerate() {
            m.set_cr3(0, cr3).unwrap();
            write_u64(&mut m, 0, X, i as u64 + 1).unwrap();
            let vcpu = m.domain().vcpu(0).unwrap();
            tops.push(vcpu.tops().collect::<Vec<_>>());
            hw_roots.push(vcpu.root().unwrap());
            check(&m);
        }
        // Switched away, the earlier tops are still pinned and hashed.
        for top in tops[..2].iter().flatten() {
            let info = m.domain().shadows().info(*top).unwrap();
            assert!(info.pinned, "{pair:?}");
            assert!(m.domain().shadows().pinned_lru().any(|p| p == *top));
            assert_eq!(m.domain().shadows().lookup(&info.key), Some(*top));
        }
        // A switch back finds them: no shadow made, the cached counter moves, the same
        // tops are used, and the data is reached without a fill.
        let before = *m.domain().stats();
        let fills = m.traps().shadow_fills;
        m.set_cr3(0, roots[0]).unwrap();
        let after = *m.domain().stats();
        assert_eq!(after.cr3_cached, before.cr3_cached + 1, "{pair:?}");
        assert_eq!(after.shadows_created, before.shadows_created, "{pair:?}");
        let vcpu = m.domain().vcpu(0).unwrap();
        assert_eq!(vcpu.tops().collect::<Vec<_>>(), tops[0], "{pair:?}");
        if vcpu.vcpu_top().is_none() {
            assert_eq!(vcpu.root(), Some(hw_roots[0]));
        }
        assert_eq!(read_u64(&mut m, 0, X).unwrap(), 1);
        assert_eq!(
            m.traps().shadow_fills,
            fills,
            "{pair:?}: the shadows were lost"
        );
        // The most recently used top is last in LRU order.
        let last = m.domain().shadows().pinned_lru().last().unwrap();
        assert!(
            tops[0].contains(&last) || Some(last) == m.domain().vcpu(0).unwrap().vcpu_top(),
            "{pair:?}"
        );
        check(&m);
    }
}
