//! Reserved bits (SDM 4.3, 4.4.2, 4.5.4), page-size bits and canonical addresses.

use super::harness::*;
use crate::addr::Gva;
use crate::paging::bits::{self, cr};
use crate::paging::{PageSize, PagingLevels, PhysMem, WalkFault};

const VA_1G: u64 = 0x0000_0040_0000_0000 + 0x1234_5678;

#[test]
fn ps_in_an_l4_entry_is_reserved() {
    for pdpe1gb in [false, true] {
        let mut g = guest_with_page(PagingLevels::Four, URW);
        g.feat.pdpe1gb = pdpe1gb;
        g.modify_entry(VA, 4, bits::PS, 0);
        assert_eq!(g.pf(VA, READ_U), P | RSVD | U, "pdpe1gb={pdpe1gb}");
    }
}

#[test]
fn ps_in_an_l3_entry_is_reserved_without_1g_pages() {
    let mut g = Guest::new(PagingLevels::Four);
    g.feat.pdpe1gb = false;
    g.map(VA_1G, 3, 0x8000_0000, URW, URW);
    assert_eq!(g.pf(VA_1G, READ_S), P | RSVD);
    assert_eq!(g.pf(VA_1G, WRITE_U), P | RSVD | W | U);
}

#[test]
fn ps_in_an_l3_entry_maps_1g_with_pdpe1gb() {
    let mut g = Guest::new(PagingLevels::Four);
    g.feat.pdpe1gb = true;
    g.map(VA_1G, 3, 0x8000_0000, URW, URW);
    let t = g.ok(VA_1G, WRITE_U);
    assert_eq!(t.size, PageSize::Size1G);
    assert_eq!(t.leaf_level, 3);
    assert_eq!(t.addr.raw(), 0x8000_0000 + (VA_1G & 0x3fff_ffff));
    assert_eq!(t.path.len(), 2);
    assert!(g.entry(VA_1G, 3) & bits::D != 0);
    // Bits 29:13 of a 1 GiB leaf are reserved.
    for bit in [13, 20, 29] {
        let mut bad = g.clone();
        bad.modify_entry(VA_1G, 3, 1 << bit, 0);
        assert_eq!(bad.pf(VA_1G, READ_S), P | RSVD, "bit {bit}");
    }
}

#[test]
fn superpage_low_address_bits_are_reserved() {
    for levels in WIDE_MODES {
        let mut g = Guest::new(levels);
        g.map(VA, 2, 0x4000_0000, URW, URW);
        g.ok(VA, READ_S);
        for bit in [13, 16, 20] {
            let mut bad = g.clone();
            bad.modify_entry(VA, 2, 1 << bit, 0);
            assert_eq!(bad.pf(VA, READ_S), P | RSVD, "{levels:?} bit {bit}");
        }
        // Bit 12 is the PAT bit of a superpage, not an address bit.
        g.modify_entry(VA, 2, bits::PAT_LARGE, 0);
        assert_eq!(
            g.ok(VA, READ_S).addr.raw(),
            0x4000_0000 + (VA & 0x1f_ffff),
            "{levels:?}"
        );
    }
}

#[test]
fn pse_is_ignored_without_cr4_pse_in_two_level_paging() {
    let mut g = Guest::new(PagingLevels::Two);
    g.set_cr4(cr::CR4_PSE, false);
    // A PDE with PS set whose address field names a page table.
    let table = g.alloc_table();
    let pde_index = VA >> 22;
    g.mem
        .write_entry(
            crate::addr::Gpa::new(g.root + pde_index * 4),
            4,
            table | URW | bits::PS,
        )
        .unwrap();
    let pte_index = (VA >> 12) & 0x3ff;
    g.mem
        .write_entry(crate::addr::Gpa::new(table + pte_index * 4), 4, PA | URW)
        .unwrap();
    let t = g.ok(VA, READ_U);
    assert_eq!(t.size, PageSize::Size4K);
    assert_eq!(t.leaf_level, 1);
    assert_eq!(t.addr.raw(), PA | (VA & 0xfff));
    // With CR4.PSE the same PDE maps a 4 MiB page at the table's 4 MiB frame.
    g.set_cr4(cr::CR4_PSE, true);
    let t = g.ok(VA, READ_U);
    assert_eq!(t.size, PageSize::Size4M);
    let pse36_high = ((table >> 13) & 0xff) << 32;
    assert_eq!(
        t.addr.raw(),
        pse36_high | (table & 0xffc0_0000) | (VA & 0x3f_ffff)
    );
}

#[test]
fn pse36_supplies_high_address_bits() {
    for maxphyaddr in [36u8, 40, 46, 52] {
        let mut g = Guest::new(PagingLevels::Two);
        g.feat.maxphyaddr = maxphyaddr;
        let pa = 0xf_0040_0000;
        g.map(VA, 2, pa, URW, URW);
        assert_eq!(g.entry(VA, 2) & 0x1e000, 0xf << 13);
        let t = g.ok(VA, WRITE_U);
        assert_eq!(
            t.addr.raw(),
            pa | (VA & 0x3f_ffff),
            "MAXPHYADDR {maxphyaddr}"
        );
        assert_eq!(t.size, PageSize::Size4M);
        // Bit 21 is always reserved; address bits 39:32 only up to MAXPHYADDR.
        let mut bad = g.clone();
        bad.modify_entry(VA, 2, 1 << 21, 0);
        assert_eq!(
            bad.pf(VA, READ_S),
            P | RSVD,
            "MAXPHYADDR {maxphyaddr} bit 21"
        );
        let top_bit = 1u64 << 20;
        let mut high = g.clone();
        high.modify_entry(VA, 2, top_bit, 0);
        if maxphyaddr < 40 {
            assert_eq!(high.pf(VA, READ_S), P | RSVD, "MAXPHYADDR {maxphyaddr}");
        } else {
            let t = high.ok(VA, READ_S);
            assert_eq!(t.addr.raw() >> 32, 0x8f, "MAXPHYADDR {maxphyaddr}");
        }
    }
}

#[test]
fn two_level_4k_entries_have_no_reserved_bits() {
    let mut g = guest_with_page(PagingLevels::Two, URW);
    g.modify_entry(VA, 1, 0xe00 | bits::PAT_4K | bits::G, 0);
    g.modify_entry(VA, 2, 0xe00 | bits::D, 0);
    g.ok(VA, READ_U);
}

#[test]
fn frames_above_maxphyaddr_are_reserved() {
    for levels in WIDE_MODES {
        for maxphyaddr in [36u8, 40, 46, 48, 52] {
            let top = if levels == PagingLevels::Three { 2 } else { 4 };
            for level in 1..=top {
                let mut g = guest_with_page(levels, URW);
                g.feat.maxphyaddr = maxphyaddr;
                g.reload_pdptes();
                let ctx = alloc::format!("{levels:?} MAXPHYADDR {maxphyaddr} level {level}");
                if maxphyaddr < 52 {
                    let mut bad = g.clone();
                    bad.modify_entry(VA, level, 1 << maxphyaddr, 0);
                    assert_eq!(bad.pf(VA, READ_U), P | RSVD | U, "{ctx}");
                    let mut bad = g.clone();
                    bad.modify_entry(VA, level, 1 << 51, 0);
                    assert_eq!(bad.pf(VA, READ_U), P | RSVD | U, "{ctx}: bit 51");
                }
                if level == 1 {
                    // The highest implemented address bit is an address bit.
                    let top_bit = 1u64 << (maxphyaddr - 1);
                    g.modify_entry(VA, 1, top_bit, 0);
                    let t = g.ok(VA, READ_U);
                    assert_eq!(t.addr.raw(), top_bit | PA | (VA & 0xfff), "{ctx}");
                }
            }
        }
    }
}

#[test]
fn pdptes_above_maxphyaddr_are_reserved() {
    for maxphyaddr in [36u8, 40, 46, 48] {
        let mut g = guest_with_page(PagingLevels::Three, URW);
        g.feat.maxphyaddr = maxphyaddr;
        g.modify_entry(VA, 3, 1 << maxphyaddr, 0);
        assert_eq!(g.pf(VA, READ_U), P | RSVD | U, "MAXPHYADDR {maxphyaddr}");
    }
}

#[test]
fn pae_bits_62_to_52_are_reserved() {
    for level in 1..=2 {
        for bit in [52, 59, 62] {
            let mut g = guest_with_page(PagingLevels::Three, URW);
            g.modify_entry(VA, level, 1 << bit, 0);
            assert_eq!(g.pf(VA, READ_S), P | RSVD, "level {level} bit {bit}");
        }
    }
}

#[test]
fn four_level_bits_62_to_52_are_ignored() {
    let mut g = guest_with_page(PagingLevels::Four, URW);
    for level in 1..=4 {
        g.modify_entry(VA, level, 0x7ff << 52, 0);
    }
    let t = g.ok(VA, READ_U);
    assert_eq!(t.addr.raw(), PA | (VA & 0xfff));
}

#[test]
fn reserved_bits_are_not_checked_in_not_present_entries() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.set_entry(VA, 1, 0xffff_fffe & !bits::P);
        assert_eq!(g.pf(VA, READ_U), U, "{levels:?}");
    }
}

#[test]
fn non_canonical_addresses_raise_gp_in_four_level_paging() {
    let mut g = guest_with_page(PagingLevels::Four, URW);
    for va in [
        0x0000_8000_0000_0000u64,
        0xffff_0000_0000_0000,
        0x8000_0000_0000_0000,
        1 << 50,
    ] {
        let before = g.mem.clone();
        let e = g.walk(va, READ_U).unwrap_err();
        assert_eq!(e.fault, WalkFault::GeneralProtection, "{va:#x}");
        assert!(e.path.is_empty());
        assert_eq!(g.mem, before);
    }
    let high = 0xffff_8000_0000_0000u64 | VA;
    g.map_4k(high, PA, SRW);
    g.ok(high, READ_S);
    assert!(Gva::new(high).is_canonical(48));
}

#[test]
fn thirty_two_bit_modes_translate_the_whole_4g_and_ignore_high_va_bits() {
    for levels in [PagingLevels::Two, PagingLevels::Three] {
        let mut g = Guest::new(levels);
        g.map_4k(HIGH_VA, PA, SRW);
        let t = g.ok(HIGH_VA, READ_S);
        assert_eq!(t.addr.raw(), PA | (HIGH_VA & 0xfff), "{levels:?}");
        let t = g.ok(0xdead_0000_0000_0000 | HIGH_VA, READ_S);
        assert_eq!(t.addr.raw(), PA | (HIGH_VA & 0xfff), "{levels:?}");
        g.map_4k(0xffff_f000, PA, SRW);
        g.ok(0xffff_ffff, READ_S);
    }
}
