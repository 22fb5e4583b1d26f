//! Shadow superpages (issue 12): a guest superpage over contiguous, aligned RAM with no page
//! table in it is shadowed by one superpage entry, and split when that stops being true. A
//! stale superpage entry maps 512 (or 1024) frames, so each way out is replayed as a hostile
//! guest would use it: a frame inside becomes a page table (its writes must trap), the host
//! moves a frame inside (no mapping of the old frame may remain), log-dirty mode begins (the
//! next write must be logged), the guest clears D in its superpage entry (the next write
//! must fault so that D is set again). And backing that is not contiguous falls back to
//! splinters. On every pair with guest superpages, the isolation invariants after each step.

use shadow2::addr::{Gfn, Gpa};
use shadow2::multi::Pair;
use shadow2::p2m::P2mType;
use shadow2::paging::{PagingLevels, bits};

use crate::engine_support::{DATA, PAGING_PAIRS, TABLE};
use crate::harness::{DATA_GFN, KDATA, Xsa};

/// The aligned RAM area the superpage maps: 4 MiB at guest frame 1024.
const AREA: u64 = 1024;
const AREA_FRAMES: u64 = 1024;
/// Where the guest maps its superpage.
const VA: u64 = 0x2000_0000;
/// Where the guest maps the table holding its superpage entry (to write it with a store).
const L2_WINDOW: u64 = 0x70_0000;

/// A machine on `pair` with the aligned area backed contiguously (`scattered`: frame by
/// frame in descending order), the superpage entry written, paging on: the scenario, its
/// CR3 and the guest-physical address of the superpage entry.
fn setup(pair: Pair, scattered: bool) -> (Xsa, u64, u64) {
    let mut x = Xsa::new(pair, 1, 128);
    if scattered {
        x.m.add_ram_scattered(Gfn::new(AREA), AREA_FRAMES).unwrap();
    } else {
        x.m.add_ram(Gfn::new(AREA), AREA_FRAMES).unwrap();
    }
    let cr3 = x.space();
    let slot = x.slot(cr3, VA, 2);
    x.t.write(&mut x.m, slot, (AREA << 12) | bits::PS | DATA);
    x.run(0, cr3);
    (x, cr3, slot)
}

/// Shadow entries one guest superpage takes (two 2 MiB halves for a 32-bit guest's 4 MiB
/// page on PAE and 64-bit shadows).
fn entries_per_superpage(pair: Pair) -> usize {
    if pair.guest() == PagingLevels::Two && pair.shadow() != PagingLevels::Two {
        2
    } else {
        1
    }
}

/// Whether a shadow superpage entry maps machine frame `mfn`.
fn superpage_maps(x: &Xsa, mfn: shadow2::addr::Mfn) -> bool {
    let shift = if x.pair.shadow() == PagingLevels::Two {
        10
    } else {
        9
    };
    x.domain()
        .superpages()
        .iter()
        .any(|(region, _)| region == mfn.raw() >> shift)
}

/// Frames of the guest's superpage.
fn frames(pair: Pair) -> u64 {
    if pair.guest() == PagingLevels::Two {
        1024
    } else {
        512
    }
}

#[test]
fn issue12_a_guest_superpage_over_contiguous_ram_is_one_shadow_entry() {
    for pair in PAGING_PAIRS {
        let (mut x, _, _) = setup(pair, false);
        x.write(0, VA, 1).unwrap();
        let fills = x.m.traps().shadow_fills;
        for k in [1, 33, 100, frames(pair) - 1] {
            x.write(0, VA + (k << 12), k).unwrap();
            assert_eq!(x.read(0, VA + (k << 12)).unwrap(), k, "{pair:?}");
        }
        assert_eq!(
            x.m.traps().shadow_fills,
            fills,
            "{pair:?}: frames of a shadow superpage took fills"
        );
        assert_eq!(
            x.domain().superpages().entries(),
            entries_per_superpage(pair),
            "{pair:?}"
        );
    }
}

#[test]
fn issue12_non_contiguous_backing_falls_back_to_splinters() {
    for pair in PAGING_PAIRS {
        let (mut x, _, _) = setup(pair, true);
        for k in [0, 1, 200, frames(pair) - 1] {
            x.write(0, VA + (k << 12), k).unwrap();
            assert_eq!(x.read(0, VA + (k << 12)).unwrap(), k, "{pair:?}");
        }
        assert_eq!(x.domain().stats().superpages_mapped, 0, "{pair:?}");
        assert!(x.domain().stats().prefetched > 0, "{pair:?}: no splinter");
    }
}

/// XSA-style: the guest makes a frame inside its shadow superpage one of its page tables.
/// The superpage entry must be split before the frame is shadowed, so that a data write to
/// the table through the superpage traps and is emulated, never reaching it directly.
#[test]
fn issue12_a_frame_inside_a_superpage_that_becomes_a_page_table_splits_it() {
    for pair in PAGING_PAIRS {
        let (mut x, cr3, _) = setup(pair, false);
        x.write(0, VA, 1).unwrap();
        assert_eq!(
            x.domain().stats().superpages_mapped as usize,
            entries_per_superpage(pair)
        );
        // Frame AREA + 5 becomes the L1 for VA2, mapping its first page to a data frame.
        let table = AREA + 5;
        let va2 = 0x3000_0000u64;
        let pde = x.slot(cr3, va2, 2);
        x.t.write(&mut x.m, table << 12, (DATA_GFN << 12) | DATA);
        x.t.write(&mut x.m, pde, (table << 12) | TABLE);
        let r = x.read(0, va2);
        assert!(r.is_ok(), "{pair:?}: {r:?}");
        assert!(x.domain().shadows().is_page_table(x.mfn(table)), "{pair:?}");
        assert!(!superpage_maps(&x, x.mfn(table)), "{pair:?}: not split");
        // A write to the table through the old superpage range: must trap and be seen.
        let emulated = x.m.traps().emulated_writes;
        let entry = ((DATA_GFN + 1) << 12) | DATA;
        x.write(0, VA + (5 << 12), entry).unwrap();
        assert_eq!(
            x.m.traps().emulated_writes,
            emulated + 1,
            "{pair:?}: a write to a shadowed table went straight through"
        );
        // The shadow follows: va2 now reads frame DATA_GFN + 1 (the oracle checks it).
        x.m.write_phys(Gpa::new((DATA_GFN + 1) << 12), &7u64.to_le_bytes())
            .unwrap();
        assert_eq!(x.read(0, va2), Ok(7), "{pair:?}");
        // The rest of the area is mapped again by splinters, or by a superpage once the table
        // goes; whatever maps it, the invariants hold after every step.
        x.write(0, VA + (9 << 12), 9).unwrap();
    }
}

/// XSA-style: the host moves a frame inside a shadow superpage to another machine frame
/// (`set_p2m`). No shadow entry may still map the old frame (the invariants check every
/// frame of every superpage entry, and every TLB entry), and the guest sees the new one.
#[test]
fn issue12_set_p2m_inside_a_superpage_leaves_no_mapping_of_the_old_frame() {
    for pair in PAGING_PAIRS {
        let (mut x, _, _) = setup(pair, false);
        let gfn = AREA + 9;
        x.write(0, VA + (9 << 12), 1).unwrap();
        let old = x.mfn(gfn);
        let new = x.host_frame();
        crate::engine_support::poke_machine(&mut x.m, new.base().raw(), 0x5eed);
        x.set_p2m(gfn, Some((new, P2mType::Ram))).unwrap();
        assert!(!superpage_maps(&x, old), "{pair:?}: not split");
        assert!(
            crate::engine_support::leaf_mappings_of(&x.m, old).is_empty(),
            "{pair:?}"
        );
        assert_eq!(x.read(0, VA + (9 << 12)).unwrap(), 0x5eed, "{pair:?}");
        // The area is not contiguous any more: no new superpage over it.
        let mapped = x.domain().stats().superpages_mapped;
        x.write(0, VA + (10 << 12), 1).unwrap();
        assert_eq!(x.domain().stats().superpages_mapped, mapped, "{pair:?}");
    }
}

/// Log-dirty mode splits every superpage: the first write to each page afterwards must be
/// logged.
#[test]
fn issue12_log_dirty_enable_splits_superpages() {
    for pair in PAGING_PAIRS {
        let (mut x, _, _) = setup(pair, false);
        x.write(0, VA, 1).unwrap();
        assert!(x.domain().superpages().entries() > 0, "{pair:?}");
        x.host("enable log-dirty", |d| {
            d.enable_log_dirty().map(|f| ((), f))
        })
        .unwrap();
        assert_eq!(x.domain().superpages().entries(), 0, "{pair:?}: not split");
        x.write(0, VA + (3 << 12), 3).unwrap();
        let dirty = x.domain().peek_dirty().expect("log-dirty on");
        assert!(
            dirty.contains(Gfn::new(AREA + 3)),
            "{pair:?}: a write through a superpage was not logged"
        );
        assert!(!dirty.contains(Gfn::new(AREA + 4)), "{pair:?}");
    }
}

/// The guest clears D in its superpage entry (a store to its own L2): the shadow superpage
/// entry must lose write access, so the next write faults and the walk sets D again, as
/// hardware would.
#[test]
fn issue12_a_guest_clearing_d_on_its_superpage_entry_makes_it_read_only() {
    for pair in PAGING_PAIRS {
        let (mut x, cr3, slot) = setup(pair, false);
        let l2 = slot >> 12;
        x.map(cr3, L2_WINDOW, l2, KDATA);
        x.write(0, VA, 1).unwrap();
        let value = x.entry(slot);
        assert_ne!(value & bits::D, 0);
        x.store(0, L2_WINDOW + (slot & 0xfff), value & !bits::D)
            .unwrap();
        assert_eq!(x.entry(slot) & bits::D, 0, "{pair:?}");
        x.write(0, VA + 8, 2).unwrap();
        assert_ne!(
            x.entry(slot) & bits::D,
            0,
            "{pair:?}: a write through the superpage did not set the guest's D"
        );
    }
}

#[test]
fn issue12_shadow_superpages_off_splinter_every_guest_superpage() {
    let pair = Pair::P4on4;
    let mut config = crate::engine_support::hvm(pair.shadow(), 1, 128);
    config.superpages = false;
    let mut x = Xsa::with_config(pair, config);
    x.m.add_ram(Gfn::new(AREA), AREA_FRAMES).unwrap();
    let cr3 = x.space();
    let slot = x.slot(cr3, VA, 2);
    x.t.write(&mut x.m, slot, (AREA << 12) | bits::PS | DATA);
    x.run(0, cr3);
    x.write(0, VA, 1).unwrap();
    assert_eq!(x.domain().stats().superpages_mapped, 0);
}

/// A superpage split because a frame inside became a page table is mapped again by a
/// splinter filled whole at its first fault (its backing is known contiguous): the other
/// frames take no more fills, and the page table's entry in it is read-only all the same.
#[test]
fn issue12_a_split_superpage_is_refilled_whole_with_its_page_table_read_only() {
    for pair in PAGING_PAIRS {
        let (mut x, cr3, _) = setup(pair, false);
        x.write(0, VA, 1).unwrap();
        let table = AREA + 5;
        let va2 = 0x3000_0000u64;
        let pde = x.slot(cr3, va2, 2);
        x.t.write(&mut x.m, table << 12, (DATA_GFN << 12) | DATA);
        x.t.write(&mut x.m, pde, (table << 12) | TABLE);
        assert!(x.read(0, va2).is_ok(), "{pair:?}");
        assert!(!superpage_maps(&x, x.mfn(table)), "{pair:?}: not split");
        x.write(0, VA + (20 << 12), 20).unwrap();
        let fills = x.m.traps().shadow_fills;
        for k in [21, 300, frames(pair) - 1] {
            x.write(0, VA + (k << 12), k).unwrap();
        }
        assert_eq!(
            x.m.traps().shadow_fills,
            fills,
            "{pair:?}: not filled whole"
        );
        let emulated = x.m.traps().emulated_writes;
        x.write(0, VA + (5 << 12) + 8, 0).unwrap();
        assert_eq!(
            x.m.traps().emulated_writes,
            emulated + 1,
            "{pair:?}: a write to a shadowed table went straight through"
        );
    }
}
