//! Out-of-sync shadows (issue 12 item 3): a guest L1 the guest keeps writing is written
//! natively and left out of sync until a sync point. What a hostile guest tries with the
//! page it may now write directly: entries naming unpopulated frames, other page tables or
//! the page itself, used without INVLPG; linking the page as an upper table; racing a
//! second vcpu; exceeding the bound; log-dirty and p2m changes under it. Every step is
//! followed by the isolation invariants, the auditor (which checks an out-of-sync shadow
//! against its snapshot) and the oracle (which allows no staleness beyond the TLB's).

use shadow2::addr::{Gfn, Gpa};
use shadow2::domain::DomainConfig;
use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, bits};

use crate::engine_support::{PAGING_PAIRS, TABLE, hvm};
use crate::harness::{DATA_GFN, KDATA, RAM, Xsa};

/// The data the scenarios map (in its own L1), and where the guest maps that L1 writable.
const DATA_VA: u64 = 0x4000_0000;
const WINDOW: u64 = 0x5000_0000;
/// The coverage of a 32-bit L1 (two 64-bit or PAE ones): distinct L1s for every mode.
const L1_SPAN: u64 = 0x40_0000;

struct Oos {
    x: Xsa,
    cr3: u64,
    /// The guest frame of the L1 mapping `DATA_VA`.
    l1: u64,
}

impl Oos {
    /// A guest with out-of-sync shadows (bound `max`) running `cr3` on every vcpu, the L1
    /// of `DATA_VA` shadowed and mapped writable at `WINDOW`.
    fn new(pair: Pair, vcpus: usize, max: usize) -> Oos {
        Oos::with_fast_path(pair, vcpus, max, true)
    }

    fn with_fast_path(pair: Pair, vcpus: usize, max: usize, fast_path: bool) -> Oos {
        let config = DomainConfig {
            out_of_sync: true,
            max_out_of_sync: max,
            fast_path,
            ..hvm(pair.shadow(), vcpus, 128)
        };
        let mut x = Xsa::with_config(pair, config);
        let cr3 = x.space();
        for k in 0..8 {
            x.m.write_phys(Gpa::new((DATA_GFN + k) << 12), &marker(k).to_le_bytes())
                .unwrap();
        }
        x.map(cr3, DATA_VA, DATA_GFN, KDATA);
        let l1 = x.slot(cr3, DATA_VA, 1) >> 12;
        x.map(cr3, WINDOW, l1, KDATA);
        for v in 0..vcpus {
            x.run(v, cr3);
        }
        assert_eq!(x.read(0, DATA_VA).unwrap(), marker(0));
        Oos { x, cr3, l1 }
    }

    /// Where the guest writes the L1 entry of `va` (in the L1 of `DATA_VA`).
    fn pte(&mut self, va: u64) -> u64 {
        assert_eq!(va / L1_SPAN, DATA_VA / L1_SPAN);
        WINDOW + (self.x.slot(self.cr3, va, 1) & 0xfff)
    }

    /// The guest's kernel writes `va`'s L1 entry with a store instruction on vcpu `v`.
    fn set_pte(&mut self, v: usize, va: u64, value: u64) {
        let at = self.pte(va);
        self.x.store(v, at, value).unwrap();
    }

    fn emulated(&self) -> u64 {
        self.x.m.traps().emulated_writes
    }

    fn stats(&self) -> shadow2::domain::OosStats {
        self.x.domain().out_of_sync_stats()
    }

    fn l1_out_of_sync(&self) -> bool {
        self.x.domain().is_out_of_sync(self.x.mfn(self.l1))
    }

    /// Leaf entries of the L1 shadows of `l1` that map machine frame `mfn`.
    fn stale_mappings(&self, mfn: shadow2::addr::Mfn) -> usize {
        let d = self.x.domain();
        let heads: Vec<(u64, u64)> = d
            .shadows()
            .of_frame(self.x.mfn(self.l1))
            .filter_map(|(_, head)| {
                let pages = 1u64 << d.shadows().info(head)?.order;
                Some((head.raw(), head.raw() + pages))
            })
            .collect();
        crate::engine_support::leaf_mappings_of(&self.x.m, mfn)
            .iter()
            .filter(|&&(slot, _)| heads.iter().any(|&(a, b)| (a..b).contains(&(slot >> 12))))
            .count()
    }

    fn invlpg(&mut self, v: usize, va: u64) {
        self.x.m.invlpg(v, shadow2::addr::Gva::new(va)).unwrap();
        self.x.step("invlpg");
    }
}

fn marker(k: u64) -> u64 {
    0x5151_0000_0000 + k
}

fn data(gfn: u64) -> u64 {
    (gfn << 12) | KDATA
}

#[test]
fn issue12_a_written_l1_goes_out_of_sync_and_invlpg_syncs_its_entry() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 1, 8);
        let emulated = o.emulated();
        // The first write unsyncs the page; the next ones are native.
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 1));
        assert!(o.l1_out_of_sync(), "{pair:?}: the written L1 is in sync");
        assert_eq!(o.stats().unsyncs, 1, "{pair:?}");
        o.set_pte(0, DATA_VA + 0x2000, data(DATA_GFN + 2));
        assert_eq!(o.emulated(), emulated, "{pair:?}: a write was emulated");
        // Entries made present are seen without INVLPG (a fault through one syncs it).
        assert_eq!(
            o.x.read(0, DATA_VA + 0x1000).unwrap(),
            marker(1),
            "{pair:?}"
        );
        assert!(o.stats().sync_fault >= 1, "{pair:?}");
        // Retarget a live entry, INVLPG: the new frame, never the old one.
        o.set_pte(0, DATA_VA + 0x3000, data(DATA_GFN + 3));
        o.set_pte(0, DATA_VA, data(DATA_GFN + 4));
        o.invlpg(0, DATA_VA);
        assert!(
            o.stats().sync_invlpg >= 1,
            "{pair:?}: INVLPG synced nothing"
        );
        assert_eq!(o.x.read(0, DATA_VA).unwrap(), marker(4), "{pair:?}");
        // An entry made not present after INVLPG faults.
        o.set_pte(0, DATA_VA + 0x2000, data(DATA_GFN + 2));
        o.x.read(0, DATA_VA + 0x2000).unwrap();
        o.set_pte(0, DATA_VA + 0x2000, 0);
        o.invlpg(0, DATA_VA + 0x2000);
        assert!(o.x.read(0, DATA_VA + 0x2000).is_err(), "{pair:?}");
    }
}

#[test]
fn issue12_nothing_is_prefetched_from_an_out_of_sync_page() {
    // Without the fast path's markers the entries after a fill are empty, so a fill through
    // the page would prefetch them from the guest's page as it is now, not from the
    // snapshot the next resync compares against: an entry the guest then sets back to its
    // snapshot value would never be resynced.
    for pair in PAGING_PAIRS {
        let mut o = Oos::with_fast_path(pair, 1, 8, false);
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 1));
        assert!(o.l1_out_of_sync(), "{pair:?}");
        o.set_pte(0, DATA_VA + 0x2000, data(DATA_GFN + 2));
        assert_eq!(
            o.x.read(0, DATA_VA + 0x1000).unwrap(),
            marker(1),
            "{pair:?}"
        );
        o.set_pte(0, DATA_VA + 0x2000, 0);
        let cr3 = o.cr3;
        o.x.cr3(0, cr3).unwrap();
        assert!(
            o.x.read(0, DATA_VA + 0x2000).is_err(),
            "{pair:?}: a prefetched entry outlived its guest entry"
        );
    }
}

#[test]
fn issue12_a_cr3_load_resyncs_every_out_of_sync_page() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 1, 8);
        o.x.read(0, DATA_VA + 0x1000).unwrap_err();
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 5));
        o.set_pte(0, DATA_VA, 0);
        let cr3 = o.cr3;
        o.x.cr3(0, cr3).unwrap();
        assert!(!o.l1_out_of_sync(), "{pair:?}");
        assert!(o.stats().resync_cr3 >= 1, "{pair:?}");
        assert!(
            o.x.read(0, DATA_VA).is_err(),
            "{pair:?}: a removed entry still maps"
        );
        assert_eq!(
            o.x.read(0, DATA_VA + 0x1000).unwrap(),
            marker(5),
            "{pair:?}"
        );
    }
}

#[test]
fn issue12_an_out_of_sync_entry_naming_what_the_guest_may_not_reach_reaches_nothing() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 1, 8);
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 1));
        assert!(o.l1_out_of_sync(), "{pair:?}");
        // Beyond RAM (MMIO space), and a frame the host took away: used without INVLPG.
        o.set_pte(0, DATA_VA + 0x2000, data(RAM + 10));
        let _ = o.x.read(0, DATA_VA + 0x2000);
        let _ = o.x.write(0, DATA_VA + 0x2000, 1);
        o.x.set_p2m(DATA_GFN + 6, None).unwrap();
        o.set_pte(0, DATA_VA + 0x3000, data(DATA_GFN + 6));
        let _ = o.x.read(0, DATA_VA + 0x3000);
        let _ = o.x.write(0, DATA_VA + 0x3000, 1);
        // Retarget an entry already shadowed at such a frame. Until INVLPG its shadow may
        // still map the old frame (the guest's own, as a TLB may: the oracle, like the
        // architecture's contract, wants the flush before the guest relies on it), and
        // nothing else; after INVLPG it is the guest's entry.
        let old = o.x.mfn(DATA_GFN);
        o.set_pte(0, DATA_VA, data(RAM + 11));
        assert!(o.stale_mappings(old) <= 1, "{pair:?}");
        o.invlpg(0, DATA_VA);
        assert_eq!(
            o.stale_mappings(old),
            0,
            "{pair:?}: INVLPG left the old frame mapped"
        );
        let _ = o.x.read(0, DATA_VA);
    }
}

#[test]
fn issue12_an_out_of_sync_entry_naming_a_page_table_never_makes_it_writable() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 1, 8);
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 1));
        // The L2 above: an upper table, which never goes out of sync. Every write through
        // the new mapping is emulated.
        let l2 = o.x.t.table_of(&mut o.x.m, o.cr3, DATA_VA, 2);
        o.set_pte(0, DATA_VA + 0x2000, data(l2));
        let emulated = o.emulated();
        let entry = o.x.slot(o.cr3, DATA_VA, 2) & 0xfff;
        let value = o.x.entry((l2 << 12) | entry);
        o.x.write(0, DATA_VA + 0x2000 + entry, value).unwrap();
        assert_eq!(
            o.emulated(),
            emulated + 1,
            "{pair:?}: an L2 written natively"
        );
        // The page itself, at a second address: its write is native only as a second
        // recorded mapping of the page out of sync (the invariants check each step).
        o.set_pte(0, DATA_VA + 0x3000, data(o.l1));
        let own = o.pte(DATA_VA + 0x4000) - WINDOW;
        o.x.write(0, DATA_VA + 0x3000 + own, data(DATA_GFN + 4))
            .unwrap();
        assert_eq!(
            o.x.read(0, DATA_VA + 0x4000).unwrap(),
            marker(4),
            "{pair:?}"
        );
        // The code page's L1, in sync: it may go out of sync itself, never be written
        // behind the engine's back.
        let code_l1 = o.x.slot(o.cr3, crate::harness::CODE_VA, 1) >> 12;
        o.set_pte(0, DATA_VA + 0x5000, data(code_l1));
        let code = o.x.slot(o.cr3, crate::harness::CODE_VA, 1) & 0xfff;
        let value = o.x.entry((code_l1 << 12) | code);
        o.x.write(0, DATA_VA + 0x5000 + code, value).unwrap();
        o.x.read(0, crate::harness::CODE_VA).unwrap();
    }
}

#[test]
fn issue12_an_out_of_sync_page_linked_as_an_upper_table_is_resynced_first() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 1, 8);
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 1));
        o.set_pte(0, DATA_VA + 0x2000, data(DATA_GFN + 2));
        assert!(o.l1_out_of_sync(), "{pair:?}");
        match o.x.levels() {
            PagingLevels::Four => {
                // An L3 entry naming the page: it is read as an L2 by the next walk.
                let va = 0x8000_0000;
                let slot = o.x.slot(o.cr3, va, 3);
                o.x.t.write(&mut o.x.m, slot, (o.l1 << 12) | TABLE);
                let _ = o.x.read(0, va + ((DATA_VA >> 21) & 511) * 0x20_0000);
                assert!(o.stats().resync_shadowed >= 1, "{pair:?}");
            }
            PagingLevels::Three => {
                // A PDPTE naming the page, loaded by a CR3 load.
                let pdpte = (o.cr3 & !0x1f) + 8 * 3;
                o.x.t.write(&mut o.x.m, pdpte, (o.l1 << 12) | bits::P);
                let cr3 = o.cr3;
                o.x.cr3(0, cr3).unwrap();
                let _ =
                    o.x.read(0, 0xc000_0000 + ((DATA_VA >> 21) & 511) * 0x20_0000);
            }
            _ => {
                // The page as the top-level table itself.
                let l1 = o.l1;
                let _ = o.x.cr3(0, l1 << 12);
                let _ = o.x.read(0, DATA_VA);
            }
        }
        assert!(
            !o.l1_out_of_sync(),
            "{pair:?}: used as an upper table out of sync"
        );
    }
}

#[test]
fn issue12_a_second_vcpu_faulting_through_an_out_of_sync_page_sees_the_new_entries() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 2, 8);
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 1));
        assert!(o.l1_out_of_sync(), "{pair:?}");
        o.set_pte(0, DATA_VA + 0x2000, data(DATA_GFN + 2));
        // Vcpu 1 never saw these entries: its first access must not fault.
        assert_eq!(
            o.x.read(1, DATA_VA + 0x2000).unwrap(),
            marker(2),
            "{pair:?}"
        );
        // Vcpu 1 writes the page too, then retargets an entry vcpu 0 uses; the guest's
        // shootdown (INVLPG on each vcpu) is the sync point for both.
        o.set_pte(1, DATA_VA + 0x3000, data(DATA_GFN + 3));
        assert_eq!(
            o.x.read(0, DATA_VA + 0x3000).unwrap(),
            marker(3),
            "{pair:?}"
        );
        o.set_pte(1, DATA_VA + 0x1000, data(DATA_GFN + 5));
        o.invlpg(1, DATA_VA + 0x1000);
        o.invlpg(0, DATA_VA + 0x1000);
        assert_eq!(
            o.x.read(0, DATA_VA + 0x1000).unwrap(),
            marker(5),
            "{pair:?}"
        );
        assert_eq!(
            o.x.read(1, DATA_VA + 0x1000).unwrap(),
            marker(5),
            "{pair:?}"
        );
    }
}

#[test]
fn issue12_the_bound_on_out_of_sync_pages_holds() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 1, 2);
        let cr3 = o.cr3;
        let mut windows = Vec::new();
        for k in 1..=3u64 {
            let va = DATA_VA + k * L1_SPAN;
            o.x.map(cr3, va, DATA_GFN + k, KDATA);
            o.x.read(0, va).unwrap();
            let l1 = o.x.slot(cr3, va, 1);
            let window = WINDOW + k * L1_SPAN;
            o.x.map(cr3, window, l1 >> 12, KDATA);
            windows.push((va, window + (l1 & 0xfff)));
        }
        for &(va, pte) in &windows {
            o.x.store(0, pte, data(DATA_GFN + 7)).unwrap();
            assert!(o.x.domain().out_of_sync_pages() <= 2, "{pair:?}");
            let _ = va;
        }
        assert!(o.stats().unsyncs >= 3, "{pair:?}");
        assert!(o.stats().resync_evicted >= 1, "{pair:?}");
        for &(va, _) in &windows {
            o.invlpg(0, va);
            assert_eq!(o.x.read(0, va).unwrap(), marker(7), "{pair:?}");
        }
    }
}

#[test]
fn issue12_log_dirty_resyncs_and_logs_out_of_sync_pages() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 1, 8);
        o.x.host("enable log-dirty", |d| {
            d.enable_log_dirty().map(|f| ((), f))
        })
        .unwrap();
        let clean = |o: &mut Oos| {
            o.x.host("clean", |d| d.clean_dirty())
                .unwrap()
                .contains(Gfn::new(o.l1))
        };
        clean(&mut o);
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 1));
        assert!(o.l1_out_of_sync(), "{pair:?}");
        assert!(
            clean(&mut o),
            "{pair:?}: the out-of-sync page was not logged"
        );
        assert!(o.stats().resync_log_dirty >= 1, "{pair:?}");
        assert!(!o.l1_out_of_sync(), "{pair:?}");
        // After the clean the page is read-only again: its next write is seen and logged.
        o.set_pte(0, DATA_VA + 0x2000, data(DATA_GFN + 2));
        assert!(clean(&mut o), "{pair:?}: a write after the clean was lost");
        assert!(!clean(&mut o), "{pair:?}: logged without a write");
    }
}

#[test]
fn issue12_the_host_taking_an_out_of_sync_frame_resyncs_it_first() {
    for pair in PAGING_PAIRS {
        let mut o = Oos::new(pair, 1, 8);
        o.set_pte(0, DATA_VA + 0x1000, data(DATA_GFN + 1));
        assert!(o.l1_out_of_sync(), "{pair:?}");
        let l1 = o.l1;
        let mut tries = 0;
        while let Err(e) = o.x.set_p2m(l1, None) {
            assert_eq!(e, shadow2::domain::EngineError::Preempted, "{pair:?}");
            tries += 1;
            assert!(tries < 100, "{pair:?}");
        }
        assert!(o.stats().resync_p2m >= 1, "{pair:?}");
        assert!(
            o.x.read(0, DATA_VA).is_err(),
            "{pair:?}: the table's frame is gone"
        );
        // Given back (another machine frame, zeroed): the guest's entries are all gone.
        let mfn = o.x.host_frame();
        o.x.set_p2m(l1, Some((mfn, shadow2::p2m::P2mType::Ram)))
            .unwrap();
        assert!(o.x.read(0, DATA_VA).is_err(), "{pair:?}");
    }
}
