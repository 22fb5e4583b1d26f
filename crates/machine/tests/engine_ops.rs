//! Issue 3, items 5 and 6: the operations. A PAE guest's CR3 names a 32-byte PDPT inside a
//! page; a PDPTE with reserved bits makes the CR3 load a #GP that leaves the vcpu as it
//! was; INVLPG makes a changed PTE visible; a write to a guest page table is emulated, and
//! a demand fault costs exactly two traps (no third); mode changes pick the pair.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::Gva;
use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, bits, bits::cr};
use shadow2_machine::sim::{GuestError, ShadowMachine};

const X: u64 = 0x40_5000;

fn index(levels: PagingLevels, va: u64) -> u64 {
    if levels == PagingLevels::Two {
        (va >> 12) & 0x3ff
    } else {
        (va >> 12) & 0x1ff
    }
}

#[test]
fn pae_cr3_names_a_32_byte_pdpt_that_is_not_page_aligned() {
    for shadow in [PagingLevels::Three, PagingLevels::Four] {
        let mut m = machine(hvm(shadow, 1, 128), 128);
        let mut t = Tables::new(PagingLevels::Three, 1, 40);
        let cr3_a = t.new_root(0x60);
        let page = cr3_a & !0xfff;
        let cr3_b = page + 0xa0;
        let cr3_c = page + 0xfe0;
        // Whatever else is in the page is never read as PDPTEs: make it fault if it were.
        for off in [0u64, 0x8, 0x40, 0x58, 0x80, 0xc0] {
            t.write(&mut m, page + off, u64::MAX);
        }
        t.map(&mut m, cr3_a, X, 70, DATA);
        t.map(&mut m, cr3_b, X, 71, DATA);
        t.map(&mut m, cr3_c, X, 72, DATA);
        set_mode(&mut m, 0, PagingLevels::Three, cr3_a);
        let expect: Vec<u64> = (0..4).map(|i| t.read(&m, page + 0x60 + 8 * i)).collect();
        assert_eq!(
            m.domain().vcpu(0).unwrap().control().pdptes.to_vec(),
            expect
        );
        for (cr3, gfn) in [(cr3_a, 70u64), (cr3_b, 71), (cr3_c, 72), (cr3_a, 70)] {
            m.set_cr3(0, cr3).unwrap();
            write_u64(&mut m, 0, X, cr3).unwrap();
            assert_eq!(phys_u64(&m, gfn << 12), cr3, "{shadow:?}: PDPT at {cr3:#x}");
            check(&m);
        }
    }
}

#[test]
fn pdpte_with_reserved_bits_is_a_gp_and_leaves_the_vcpu_as_it_was() {
    for shadow in [PagingLevels::Three, PagingLevels::Four] {
        for bad in [bits::RW, bits::US, 1 << 5, bits::NX, 1 << 51] {
            let mut m = machine(hvm(shadow, 1, 128), 128);
            let mut t = Tables::new(PagingLevels::Three, 1, 40);
            let good = t.new_root(0x20);
            let bad_cr3 = (good & !0xfff) + 0x40;
            t.map(&mut m, good, X, 70, DATA);
            t.map(&mut m, bad_cr3, X, 71, DATA);
            t.map(&mut m, bad_cr3, 0x4000_0000 + X, 72, DATA);
            // PDPTE 1 of the second PDPT gets a reserved bit.
            let pdpte = t.read(&m, bad_cr3 + 8);
            t.write(&mut m, bad_cr3 + 8, pdpte | bad);
            set_mode(&mut m, 0, PagingLevels::Three, good);
            write_u64(&mut m, 0, X, 1).unwrap();
            let vcpu = *m.domain().vcpu(0).unwrap();
            let tops: Vec<_> = vcpu.tops().collect();
            let hw = m.domain().hardware_control(0).unwrap();
            let traps = m.traps();

            let r = m.set_cr3(0, bad_cr3);
            assert_eq!(r, Err(GuestError::GeneralProtection), "{shadow:?} {bad:#x}");
            let now = m.domain().vcpu(0).unwrap();
            assert_eq!(now.control(), vcpu.control());
            assert_eq!(now.root(), vcpu.root());
            assert_eq!(now.pair(), vcpu.pair());
            assert_eq!(now.tops().collect::<Vec<_>>(), tops);
            assert_eq!(m.domain().hardware_control(0), Some(hw));
            // The guest goes on in its old address space without a fault.
            assert_eq!(read_u64(&mut m, 0, X).unwrap(), 1);
            assert_eq!(m.traps().total(), traps.total() + 1);
            assert_eq!(m.traps().cr3_writes, traps.cr3_writes + 1);
            check(&m);

            // The same through set_paging (PAE turned on with the bad PDPT): #GP, and
            // the vcpu keeps its mode.
            let r = m.set_paging(0, control(PagingLevels::Three, bad_cr3));
            assert_eq!(r, Err(GuestError::GeneralProtection));
            assert_eq!(m.domain().vcpu(0).unwrap().control().cr3, good);
            assert_eq!(read_u64(&mut m, 0, X).unwrap(), 1);
            check(&m);
        }
    }
}

#[test]
fn invlpg_makes_a_changed_pte_visible() {
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let mut m = machine(hvm(pair.shadow(), 1, 128), 128);
        let mut t = Tables::new(levels, 1, 40);
        let cr3 = t.new_root(0x20);
        let slot = t.map(&mut m, cr3, X, 80, DATA);
        set_mode(&mut m, 0, levels, cr3);
        write_u64(&mut m, 0, X, 0x80).unwrap();
        let old = mfn_of(&m, 80);
        let new = mfn_of(&m, 81);
        poke_machine(&mut m, new.base().raw(), 0x81);

        // The guest points its PTE at another frame: the shadow follows at once (and the
        // engine asks for the flush a lost mapping needs), INVLPG or not.
        t.write(&mut m, slot, (81 << 12) | DATA);
        assert!(leaf_mappings_of(&m, old).is_empty(), "{pair:?}");
        assert!(!leaf_mappings_of(&m, new).is_empty(), "{pair:?}");
        let invlpgs = m.traps().invlpg;
        m.invlpg(0, Gva::new(X)).unwrap();
        assert_eq!(m.traps().invlpg, invlpgs + 1);
        assert_eq!(read_u64(&mut m, 0, X).unwrap(), 0x81, "{pair:?}");
        check(&m);

        // The guest makes a read-only PTE writable: no right is lost, so no flush is
        // owed, and the TLB keeps the read-only translation, as hardware would...
        t.write(&mut m, slot, (81 << 12) | (DATA & !bits::RW));
        m.invlpg(0, Gva::new(X)).unwrap();
        assert_eq!(read_u64(&mut m, 0, X).unwrap(), 0x81);
        t.write(&mut m, slot, (81 << 12) | DATA);
        let cached = m.cpu(0).unwrap().tlb().peek(Gva::new(X));
        assert!(
            cached.is_some_and(|e| e.frame == new && !e.perms.write),
            "{pair:?}: {cached:?}"
        );
        // ...until the guest's INVLPG; then the write needs no trap at all.
        m.invlpg(0, Gva::new(X)).unwrap();
        assert!(m.cpu(0).unwrap().tlb().peek(Gva::new(X)).is_none());
        let traps = m.traps().total();
        write_u64(&mut m, 0, X, 0x82).unwrap();
        assert_eq!(m.traps().total(), traps, "{pair:?}");
        assert_eq!(phys_u64(&m, 81 << 12), 0x82);
        assert_eq!(m.domain().stats().invlpg, 3);
        check(&m);
    }
}

/// The demand fault of the seed's headline: a not-present access propagates (1 trap), the
/// guest kernel writes the PTE through its own mapping of the page table (emulated, 1
/// trap), and the retried access succeeds (no trap).
fn demand_fault(pair: Pair, region_touched: bool) {
    let levels = pair.guest();
    let mut m = machine(hvm(pair.shadow(), 1, 128), 128);
    let mut t = Tables::new(levels, 1, 40);
    let cr3 = t.new_root(0x20);
    let l1 = t.table_of(&mut m, cr3, X, 1);
    // The kernel maps its page table at PT_VA, and has data next to X.
    let pt_va = 0x80_0000;
    t.map(&mut m, cr3, pt_va, l1, DATA);
    t.map(&mut m, cr3, X - 0x1000, 90, DATA);
    set_mode(&mut m, 0, levels, cr3);
    read_u64(&mut m, 0, pt_va).unwrap();
    if region_touched {
        read_u64(&mut m, 0, X - 0x1000).unwrap();
    }
    let before = m.traps();
    let stats = *m.domain().stats();

    // 1: the access faults for the guest.
    let r = read_u64(&mut m, 0, X);
    assert!(
        matches!(r, Err(GuestError::PageFault { va, code }) if va == Gva::new(X) && !code.present()),
        "{pair:?}: {r:?}"
    );
    assert_eq!(m.traps().propagated, before.propagated + 1, "{pair:?}");
    // 2: the kernel writes the PTE (A and D set, as kernels do) through its mapping.
    let pte = (91 << 12) | DATA;
    let n = t.entry_bytes() as usize;
    let at = pt_va + index(levels, X) * n as u64;
    m.write(0, Gva::new(at), SUP, &pte.to_le_bytes()[..n])
        .unwrap();
    assert_eq!(
        m.traps().emulated_writes,
        before.emulated_writes + 1,
        "{pair:?} (region touched: {region_touched})"
    );
    assert_eq!(t.read(&m, (l1 << 12) + index(levels, X) * n as u64), pte);
    // 3: the retry succeeds without a trap.
    write_u64(&mut m, 0, X, 0x91).unwrap();
    assert_eq!(phys_u64(&m, 91 << 12), 0x91);
    let after = m.traps();
    assert_eq!(
        after.total(),
        before.total() + 2,
        "{pair:?}: {before:?} -> {after:?}"
    );
    let s = m.domain().stats();
    assert_eq!(s.fault_propagated, stats.fault_propagated + 1);
    assert_eq!(s.fault_emulate, stats.fault_emulate + 1);
    assert_eq!(s.faults, stats.faults + 2);
    check(&m);
}

#[test]
fn demand_fault_costs_exactly_two_traps_when_the_page_table_is_shadowed() {
    for pair in PAGING_PAIRS {
        demand_fault(pair, true);
    }
}

#[test]
fn demand_fault_costs_exactly_two_traps_in_a_fresh_region() {
    // With the fast path, the first fault already shadows the L1 (it holds the
    // not-present marker), so the PTE write is emulated too. 32-bit shadows have no
    // reserved bits for a marker: there the L1 is not yet shadowed and the write goes
    // straight through, leaving the fill for the retry.
    for pair in PAGING_PAIRS {
        if pair.shadow() != PagingLevels::Two {
            demand_fault(pair, false);
        }
    }
}

#[test]
fn cr0_wp_clear_kernel_write_to_a_read_only_page_is_emulated() {
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let mut m = machine(hvm(pair.shadow(), 1, 128), 128);
        let mut t = Tables::new(levels, 1, 40);
        let cr3 = t.new_root(0x20);
        t.map(&mut m, cr3, X, 95, DATA & !bits::RW);
        let mut ctl = control(levels, cr3);
        ctl.cr0 &= !cr::CR0_WP;
        m.set_paging(0, ctl).unwrap();
        let emulated = m.traps().emulated_writes;
        write_u64(&mut m, 0, X, 0x95).unwrap();
        assert_eq!(phys_u64(&m, 95 << 12), 0x95);
        assert_eq!(m.traps().emulated_writes, emulated + 1, "{pair:?}");
        // The shadow never maps it writable; a user write still faults.
        assert!(
            leaf_mappings_of(&m, mfn_of(&m, 95))
                .iter()
                .all(|(_, e)| e & bits::RW == 0)
        );
        let r = m.write(0, Gva::new(X), USR, &[1]);
        assert!(
            matches!(r, Err(GuestError::PageFault { code, .. }) if code.present() && code.write()),
            "{pair:?}: {r:?}"
        );
        check(&m);
    }
}

#[test]
fn mode_changes_pick_the_pair_and_keep_memory() {
    let mut m = machine(hvm(PagingLevels::Four, 1, 128), 128);
    let mut t2 = Tables::new(PagingLevels::Two, 1, 10);
    let mut t3 = Tables::new(PagingLevels::Three, 10, 20);
    let mut t4 = Tables::new(PagingLevels::Four, 20, 30);
    let cr3_2 = t2.new_root(0);
    let cr3_3 = t3.new_root(0x20);
    let cr3_4 = t4.new_root(0);
    t2.map(&mut m, cr3_2, X, 99, DATA);
    t3.map(&mut m, cr3_3, X, 99, DATA);
    t4.map(&mut m, cr3_4, X, 99, DATA);
    let steps: [(PagingLevels, u64, Pair, u64); 5] = [
        (PagingLevels::Zero, 0, Pair::P0on4, 99 << 12),
        (PagingLevels::Two, cr3_2, Pair::P2on4, X),
        (PagingLevels::Three, cr3_3, Pair::P3on4, X),
        (PagingLevels::Four, cr3_4, Pair::P4on4, X),
        (PagingLevels::Zero, 0, Pair::P0on4, 99 << 12),
    ];
    for (i, (levels, cr3, pair, va)) in steps.into_iter().enumerate() {
        set_mode(&mut m, 0, levels, cr3);
        assert_eq!(m.domain().vcpu(0).unwrap().pair(), Some(pair));
        let previous = if i == 0 { 0 } else { i as u64 };
        assert_eq!(read_u64(&mut m, 0, va).unwrap(), previous, "{pair:?}");
        write_u64(&mut m, 0, va, i as u64 + 1).unwrap();
        check(&m);
    }
    assert_eq!(m.domain().stats().mode_updates, 5);
}

#[test]
fn unsupported_pairs_are_refused() {
    for (shadow, levels) in [
        (PagingLevels::Two, PagingLevels::Three),
        (PagingLevels::Two, PagingLevels::Four),
        (PagingLevels::Three, PagingLevels::Four),
    ] {
        let mut m: ShadowMachine = machine(hvm(shadow, 1, 64), 32);
        let mut t = Tables::new(levels, 1, 10);
        let cr3 = t.new_root(0);
        t.map(&mut m, cr3, X, 20, DATA);
        let r = m.set_paging(0, control(levels, cr3));
        assert!(
            matches!(
                r,
                Err(GuestError::Engine(
                    shadow2::domain::EngineError::UnsupportedPair { .. }
                ))
            ),
            "{levels:?} on {shadow:?}: {r:?}"
        );
        assert_eq!(m.domain().failure(), None);
        check(&m);
    }
}

#[test]
fn page_becoming_a_page_table_loses_every_writable_mapping() {
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let mut m = machine(hvm(pair.shadow(), 1, 128), 128);
        let mut t = Tables::new(levels, 1, 40);
        let cr3 = t.new_root(0x20);
        // Frame 96 mapped writable at two addresses in different L1 tables.
        let (a, b) = (X, 0x80_0000 + 0x7000);
        t.map(&mut m, cr3, a, 96, DATA);
        t.map(&mut m, cr3, b, 96, DATA);
        set_mode(&mut m, 0, levels, cr3);
        // As data, it receives what will be its first PTE (mapping frame 98).
        write_u64(&mut m, 0, a, (98 << 12) | DATA).unwrap();
        write_u64(&mut m, 0, b + 8, 0).unwrap();
        let mfn = mfn_of(&m, 96);
        assert_eq!(m.domain().shadows().frame(mfn).writable, 2, "{pair:?}");
        let s0 = *m.domain().stats();

        // The guest makes frame 96 the L1 table of a new region and touches it.
        let region = 0xc0_0000;
        let pde = t.slot(&mut m, cr3, region, 2);
        t.write(&mut m, pde, (96 << 12) | TABLE);
        read_u64(&mut m, 0, region).unwrap();
        assert!(m.domain().shadows().is_page_table(mfn), "{pair:?}");
        assert_eq!(m.domain().shadows().frame(mfn).writable, 0);
        assert!(
            leaf_mappings_of(&m, mfn)
                .iter()
                .all(|(_, e)| e & bits::RW == 0),
            "{pair:?}"
        );
        let s = m.domain().stats();
        assert_eq!(s.write_access_removals, s0.write_access_removals + 1);
        assert!(
            s.write_access_by_scan + s.write_access_by_pointer + s.write_access_by_rmap
                > s0.write_access_by_scan + s0.write_access_by_pointer + s0.write_access_by_rmap
        );
        // Writes through the old data mappings are now page-table writes: emulated, and
        // seen by the new region at once.
        let emulated = m.traps().emulated_writes;
        let n = t.entry_bytes() as usize;
        let pte = (97u64 << 12) | DATA;
        m.write(0, Gva::new(a), SUP, &pte.to_le_bytes()[..n])
            .unwrap();
        assert_eq!(m.traps().emulated_writes, emulated + 1, "{pair:?}");
        write_u64(&mut m, 0, region, 0x97).unwrap();
        assert_eq!(phys_u64(&m, 97 << 12), 0x97);
        check(&m);
    }
}
