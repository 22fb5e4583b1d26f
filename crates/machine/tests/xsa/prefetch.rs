//! Prefetch of splinter entries (issue 12): a fill through a guest superpage also fills the
//! empty splinter entries after it, from the superpage entry and the p2m alone. A prefetched
//! entry is exactly what a fault on it would install, so it must never give more: a frame
//! that is a shadowed page table, or clean under log-dirty, is mapped read-only, and the
//! guest's rights and D bit stay in the upper entry. Checked on every pair with superpages,
//! with the isolation invariants after every step. The same holds for a fill of an
//! ordinary L1 shadow entry, which prefetches the entries after it from their guest
//! entries (`issue12_..._l1_...`, and the guest's own rights and A/D there).

use shadow2::addr::Gfn;
use shadow2::paging::bits;

use crate::engine_support::{DATA, PAGING_PAIRS};
use crate::harness::{DATA_GFN, Xsa};

/// Where the superpage goes, and the frame it starts at (frame 0: it covers the guest's own
/// page tables, allocated from frame 1 up, and the data frames from `DATA_GFN`).
fn superpage(x: &mut Xsa, cr3: u64) -> u64 {
    let va = 0x2000_0000;
    let slot = x.slot(cr3, va, 2);
    x.t.write(&mut x.m, slot, bits::PS | DATA);
    va
}

#[test]
fn issue12_a_fill_through_a_superpage_prefetches_the_next_splinter_entries() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        let va = superpage(&mut x, cr3);
        x.run(0, cr3);
        x.read(0, va + (DATA_GFN << 12)).unwrap();
        let fills = x.m.traps().shadow_fills;
        for k in 1..8 {
            x.read(0, va + ((DATA_GFN + k) << 12)).unwrap();
        }
        assert_eq!(
            x.m.traps().shadow_fills,
            fills,
            "{pair:?}: the next frames of the superpage took fills"
        );
        assert!(x.domain().stats().prefetched >= 7, "{pair:?}");
    }
}

#[test]
fn issue12_a_prefetched_splinter_of_a_page_table_is_read_only() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        let va = superpage(&mut x, cr3);
        x.run(0, cr3);
        // The L1 that maps the code page is a shadowed page table once the code is read.
        x.read(0, crate::harness::CODE_VA).unwrap();
        let l1 = x.slot(cr3, crate::harness::CODE_VA, 1) >> 12;
        // Frame 0 is filled; frames 1.. (the guest's own tables among them) are prefetched.
        x.read(0, va).unwrap();
        assert!(
            l1 <= 32,
            "{pair:?}: the L1 at frame {l1} is out of the prefetch's reach"
        );
        let emulated = x.m.traps().emulated_writes;
        // A data write into that L1 through the superpage: the engine must see it
        // (emulated), never a writable prefetched entry.
        let at = va + (l1 << 12) + 8 * 300;
        x.write(0, at, 0).unwrap();
        assert_eq!(
            x.m.traps().emulated_writes,
            emulated + 1,
            "{pair:?}: a write to a shadowed table went straight through"
        );
    }
}

#[test]
fn issue12_a_prefetched_splinter_of_a_clean_frame_logs_its_first_write() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        let va = superpage(&mut x, cr3);
        x.run(0, cr3);
        x.host("enable log-dirty", |d| {
            d.enable_log_dirty().map(|f| ((), f))
        })
        .unwrap();
        x.read(0, va + (DATA_GFN << 12)).unwrap();
        let next = DATA_GFN + 1;
        x.write(0, va + (next << 12), 7).unwrap();
        let dirty = x.domain().peek_dirty().expect("log-dirty on");
        assert!(
            dirty.contains(Gfn::new(next)),
            "{pair:?}: a write through a prefetched entry was not logged"
        );
    }
}

/// Where the ordinary 4 KiB mappings of the leaf-prefetch tests start (one L1 covers
/// them all: 2 MiB aligned).
const LEAVES_VA: u64 = 0x3000_0000;

#[test]
fn issue12_a_fill_prefetches_the_next_l1_entries() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        for k in 0..8 {
            x.map(cr3, LEAVES_VA + (k << 12), DATA_GFN + k, DATA);
        }
        x.run(0, cr3);
        let prefetched = x.domain().stats().prefetched;
        x.read(0, LEAVES_VA).unwrap();
        let fills = x.m.traps().shadow_fills;
        for k in 1..8 {
            x.read(0, LEAVES_VA + (k << 12)).unwrap();
        }
        assert_eq!(
            x.m.traps().shadow_fills,
            fills,
            "{pair:?}: the next pages of the L1 took fills"
        );
        assert!(x.domain().stats().prefetched >= prefetched + 7, "{pair:?}");
    }
}

#[test]
fn issue12_a_prefetched_l1_entry_of_a_page_table_is_read_only() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        // The L1 that maps the code page, mapped writable as data next to page 0.
        let l1 = x.slot(cr3, crate::harness::CODE_VA, 1) >> 12;
        x.map(cr3, LEAVES_VA, DATA_GFN, DATA);
        x.map(cr3, LEAVES_VA + 0x1000, l1, DATA);
        x.run(0, cr3);
        // Shadowed once the code is read; then page 0 is filled and page 1 prefetched.
        x.read(0, crate::harness::CODE_VA).unwrap();
        x.read(0, LEAVES_VA).unwrap();
        let emulated = x.m.traps().emulated_writes;
        x.write(0, LEAVES_VA + 0x1000 + 8 * 300, 0).unwrap();
        assert_eq!(
            x.m.traps().emulated_writes,
            emulated + 1,
            "{pair:?}: a write to a shadowed table went straight through"
        );
    }
}

#[test]
fn issue12_a_prefetched_l1_entry_of_a_clean_frame_logs_its_first_write() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, LEAVES_VA, DATA_GFN, DATA);
        x.map(cr3, LEAVES_VA + 0x1000, DATA_GFN + 1, DATA);
        x.run(0, cr3);
        x.host("enable log-dirty", |d| {
            d.enable_log_dirty().map(|f| ((), f))
        })
        .unwrap();
        x.read(0, LEAVES_VA).unwrap();
        x.write(0, LEAVES_VA + 0x1000, 7).unwrap();
        let dirty = x.domain().peek_dirty().expect("log-dirty on");
        assert!(
            dirty.contains(Gfn::new(DATA_GFN + 1)),
            "{pair:?}: a write through a prefetched entry was not logged"
        );
    }
}

#[test]
fn issue12_a_prefetch_gives_no_access_the_guest_entry_does_not() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, LEAVES_VA, DATA_GFN, DATA);
        // A clear: the access must reach the engine, which sets it (the oracle checks).
        let no_a = x.map(
            cr3,
            LEAVES_VA + 0x1000,
            DATA_GFN + 1,
            DATA & !(bits::A | bits::D),
        );
        // Read-only and D clear: a write must fault to the guest, a read must set A only.
        let ro = x.map(
            cr3,
            LEAVES_VA + 0x2000,
            DATA_GFN + 2,
            DATA & !(bits::RW | bits::D),
        );
        // Not present.
        x.map(cr3, LEAVES_VA + 0x3000, DATA_GFN + 3, 0);
        x.run(0, cr3);
        x.read(0, LEAVES_VA).unwrap();
        x.read(0, LEAVES_VA + 0x1000).unwrap();
        assert_ne!(x.entry(no_a) & bits::A, 0, "{pair:?}: A not set");
        assert_eq!(x.entry(no_a) & bits::D, 0, "{pair:?}: D set by a read");
        assert!(x.write(0, LEAVES_VA + 0x2000, 1).is_err(), "{pair:?}");
        x.read(0, LEAVES_VA + 0x2000).unwrap();
        assert_eq!(x.entry(ro) & bits::D, 0, "{pair:?}: D set without a write");
        assert!(x.read(0, LEAVES_VA + 0x3000).is_err(), "{pair:?}");
    }
}
