//! Accessed and dirty flags (SDM 4.8): set by successful walks only, and only as asked.

use super::harness::*;
use crate::addr::Gpa;
use crate::paging::bits::{self, cr};
use crate::paging::{AdUpdate, PagingLevels, PhysMem};

/// The levels whose entries take A/D updates (not the PAE PDPTEs).
fn ad_levels(levels: PagingLevels, leaf_level: u8) -> core::ops::RangeInclusive<u8> {
    let top = if levels == PagingLevels::Three {
        2
    } else {
        levels.count()
    };
    leaf_level..=top
}

#[test]
fn a_is_set_on_every_entry_of_a_successful_read() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        let before: alloc::vec::Vec<u64> = (1..=levels.count()).map(|l| g.entry(VA, l)).collect();
        let t = g.ok(VA, READ_U);
        for level in ad_levels(levels, 1) {
            let e = g.entry(VA, level);
            assert!(e & bits::A != 0, "{levels:?} level {level}: A");
            assert_eq!(e & bits::D, 0, "{levels:?} level {level}: no D for a read");
            assert_eq!(
                e & !bits::A,
                before[usize::from(level - 1)],
                "{levels:?}: only A changed"
            );
            assert_eq!(
                t.path.at_level(level).unwrap().value,
                before[usize::from(level - 1)]
            );
        }
        assert_eq!(t.leaf, g.entry(VA, 1));
    }
}

#[test]
fn d_is_set_on_the_leaf_of_a_successful_write() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        let t = g.ok(VA, WRITE_U);
        assert_eq!(
            g.entry(VA, 1) & (bits::A | bits::D),
            bits::A | bits::D,
            "{levels:?}"
        );
        for level in ad_levels(levels, 2) {
            assert_eq!(
                g.entry(VA, level) & (bits::A | bits::D),
                bits::A,
                "{levels:?} {level}"
            );
        }
        assert_eq!(t.leaf, g.entry(VA, 1));
    }
}

#[test]
fn d_is_set_on_superpage_leaves() {
    for levels in MODES {
        let mut g = Guest::new(levels);
        g.map(VA, 2, 0x4000_0000, URW, URW);
        let t = g.ok(VA, READ_U);
        assert_eq!(
            g.entry(VA, 2) & (bits::A | bits::D),
            bits::A,
            "{levels:?}: read"
        );
        assert_eq!(t.leaf_level, 2);
        let t = g.ok(VA, WRITE_U);
        assert_eq!(
            g.entry(VA, 2) & (bits::A | bits::D),
            bits::A | bits::D,
            "{levels:?}"
        );
        assert_eq!(t.leaf, g.entry(VA, 2));
        for level in ad_levels(levels, 3) {
            assert_eq!(g.entry(VA, level) & bits::D, 0, "{levels:?} level {level}");
        }
    }
}

#[test]
fn d_is_set_on_1g_leaves() {
    let va = 0x0000_0040_1234_5678;
    let mut g = Guest::new(PagingLevels::Four);
    g.feat.pdpe1gb = true;
    g.map(va, 3, 0x8000_0000, URW, URW);
    g.ok(va, WRITE_S);
    assert_eq!(g.entry(va, 3) & (bits::A | bits::D), bits::A | bits::D);
    assert_eq!(g.entry(va, 4) & (bits::A | bits::D), bits::A);
}

#[test]
fn faulting_walks_write_nothing() {
    for levels in MODES {
        // `pf` asserts that memory, write count included, is unchanged.
        let mut not_present = guest_with_page(levels, URW);
        not_present.modify_entry(VA, 1, 0, bits::P);
        not_present.pf(VA, WRITE_U);

        let mut read_only = guest_with_page(levels, bits::P | bits::US);
        read_only.pf(VA, WRITE_U);

        let mut supervisor = guest_with_page(levels, SRW);
        supervisor.pf(VA, READ_U);

        let mut reserved = Guest::new(levels);
        reserved.map(VA, 2, 0x4000_0000, URW, URW);
        let reserved_bit = if levels == PagingLevels::Two {
            1 << 21
        } else {
            1 << 13
        };
        reserved.modify_entry(VA, 2, reserved_bit, 0);
        reserved.pf(VA, READ_U);

        let mut smap = guest_with_page(levels, URW);
        smap.set_cr4(cr::CR4_SMAP, true);
        smap.pf(VA, WRITE_S);
    }
}

#[test]
fn skip_writes_nothing_on_success() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        let before = g.mem.clone();
        let t = g.walk_ad(VA, WRITE_U, AdUpdate::Skip).unwrap();
        assert_eq!(g.mem, before, "{levels:?}");
        assert_eq!(
            t.leaf & (bits::A | bits::D),
            0,
            "{levels:?}: leaf as in memory"
        );
        assert_eq!(t.addr.raw(), PA | (VA & 0xfff));
    }
}

#[test]
fn entries_with_a_and_d_already_set_are_not_rewritten() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW | bits::A | bits::D);
        g.reload_pdptes();
        let writes = g.mem.writes;
        g.ok(VA, WRITE_U);
        assert_eq!(g.mem.writes, writes, "{levels:?}");
    }
}

#[test]
fn a_and_d_updates_keep_other_bits_and_the_neighbours() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW | bits::G | bits::PCD);
        let neighbour_va = VA + 0x1000;
        g.map_4k(neighbour_va, PA + 0x1000, URW);
        let pte = g.entry(VA, 1);
        let neighbour = g.entry(neighbour_va, 1);
        g.ok(VA, WRITE_U);
        assert_eq!(g.entry(VA, 1), pte | bits::A | bits::D, "{levels:?}");
        assert_eq!(
            g.entry(neighbour_va, 1),
            neighbour,
            "{levels:?}: the other half untouched"
        );
        let raw = g
            .mem
            .read_entry(Gpa::new(g.entry_addr(neighbour_va, 1)), g.entry_bytes());
        assert_eq!(raw.unwrap(), neighbour);
    }
}
