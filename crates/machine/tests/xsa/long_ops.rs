//! Long operations: work a guest can make one host call do. Every call must stay within a
//! bound and continue across calls (`EngineError::Preempted`, `ShadowOpResult::More`) instead
//! of doing work proportional to the guest's tables in one go.
//!
//! The work is measured twice: by the engine (`Stats::last_call_work`, held to
//! `DomainConfig::call_work_bound`), and independently here as the number of shadow entries
//! (8-byte words of pool pages) a call changed, by comparing the pool before and after the
//! call; a word whose page the call freed counts too (tearing a shadow down visits each of
//! its entries to drop what it references). The domains here have a small per-call budget,
//! so that the guest's 32 Ki mappings need many calls.

use std::collections::BTreeMap;

use shadow2::addr::{Gfn, Gpa, Gva, Maddr};
use shadow2::domain::{EngineError, ShadowOp, ShadowOpResult};
use shadow2::multi::Pair;
use shadow2::paging::PhysMem;

use shadow2::domain::DomainConfig;

use crate::engine_support::{DATA, PAGING_PAIRS, hvm};
use crate::harness::{DATA_GFN, Xsa};

/// The most shadow entries one call may change: the deepest fill of a fault plus the
/// reaping a call does at its end (8 shadows of at most 4 pages), in 8-byte words.
const CALL_WORK_BOUND: usize = (8 * 4 + 8) * 512;

/// The per-call budget of the domains here: far below the 32 Ki mappings they remove.
const BUDGET: usize = 1024;

/// Every word of every allocated pool page.
fn pool_words(x: &Xsa) -> BTreeMap<u64, u64> {
    let d = x.domain();
    let mut words = BTreeMap::new();
    for (first, order) in d.pool().allocated_blocks() {
        let base = first.base().raw();
        for i in 0..(512u64 << order) {
            let at = base + 8 * i;
            let w = d.host().read_u64(Maddr::new(at)).unwrap_or(0);
            if w != 0 {
                words.insert(at, w);
            }
        }
    }
    words
}

/// How many pool words differ between two snapshots.
fn changed(before: &BTreeMap<u64, u64>, after: &BTreeMap<u64, u64>) -> usize {
    let gone = before
        .iter()
        .filter(|(a, w)| after.get(a) != Some(w))
        .count();
    let new = after.keys().filter(|a| !before.contains_key(a)).count();
    gone + new
}

/// A 64-bit guest with `tables` L1s, each shadowed and filled with 512 writable mappings
/// of one data frame: `tables * 512` shadow entries map that frame.
fn many_mappings(tables: u64) -> Xsa {
    let config = DomainConfig {
        call_work_budget: BUDGET,
        ..hvm(Pair::P4on4.shadow(), 1, 512)
    };
    let mut x = Xsa::with_config(Pair::P4on4, config);
    let cr3 = x.space();
    x.run(0, cr3);
    let base = 0x1_0000_0000u64;
    let page: Vec<u8> = (0..512u64)
        .flat_map(|_| ((DATA_GFN << 12) | DATA).to_le_bytes())
        .collect();
    for k in 0..tables {
        let va = base + k * 0x20_0000;
        let l1 = x.t.table_of(&mut x.m, cr3, va, 1);
        x.m.write_phys(Gpa::new(l1 << 12), &page).unwrap();
        x.read(0, va).unwrap();
    }
    for k in 0..tables {
        for i in 0..512u64 {
            let va = base + k * 0x20_0000 + i * 0x1000;
            if x.m
                .read(0, Gva::new(va), crate::engine_support::SUP, &mut [0u8; 8])
                .is_err()
            {
                panic!("{va:#x} unmapped");
            }
        }
    }
    x.step("filled");
    x
}

/// Runs a host call until it stops asking to be continued, checking the work of each.
fn bounded<T>(
    x: &mut Xsa,
    what: &str,
    mut call: impl FnMut(&mut Xsa) -> Result<Option<T>, EngineError>,
) -> T {
    for _ in 0..10_000 {
        let before = pool_words(x);
        let r = call(x);
        let work = changed(&before, &pool_words(x));
        assert!(
            work <= CALL_WORK_BOUND,
            "{what}: one call changed {work} shadow entries (bound {CALL_WORK_BOUND})"
        );
        let counted = x.domain().stats().last_call_work;
        let bound = x.domain().config().call_work_bound();
        assert!(
            counted <= bound,
            "{what}: one call did {counted} work (bound {bound})"
        );
        match r {
            Ok(Some(done)) => return done,
            Ok(None) | Err(EngineError::Preempted) => {}
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("{what}: never finished");
}

/// XSA-410 family (2022: freeing the paging pool's pages took unbounded time in one
/// call). Replayed: 64 L1 shadows with 512 mappings each of one frame (32 Ki entries), then
/// the host removes the frame from the p2m, which removes every mapping. Must hold: no
/// single call changes more than a bounded number of shadow entries; the removal
/// continues across calls and ends with no mapping of the frame.
#[test]
fn xsa_410_removing_a_frame_mapped_everywhere_is_bounded_per_call() {
    let mut x = many_mappings(64);
    let old = x.mfn(DATA_GFN);
    bounded(&mut x, "set_p2m", |x| x.set_p2m(DATA_GFN, None).map(Some));
    assert!(crate::engine_support::leaf_mappings_of(&x.m, old).is_empty());
}

/// The same fan-in, and log-dirty mode switched on: every writable entry must become
/// read-only. Must hold: bounded work per call, continued across calls.
#[test]
fn xsa_410_enabling_log_dirty_is_bounded_per_call() {
    let mut x = many_mappings(64);
    bounded(&mut x, "enable log-dirty", |x| {
        x.host("enable log-dirty step", |d| d.enable_log_dirty_step(BUDGET))
            .map(|done| done.then_some(()))
    });
    x.write(0, 0x1_0000_0000, 1).unwrap();
    assert!(
        x.domain()
            .peek_dirty()
            .unwrap()
            .contains(Gfn::new(DATA_GFN))
    );
}

/// The same fan-in, and the pool shrunk to its minimum in steps. Must hold: every step is
/// bounded and the shrink ends.
#[test]
fn xsa_410_pool_shrink_of_a_full_pool_is_bounded_per_call() {
    let mut x = many_mappings(64);
    let min = hvm(x.pair.shadow(), 1, 0).min_pool_pages();
    bounded(&mut x, "pool shrink", |x| {
        x.host("pool shrink step", |d| {
            d.shadow_op(ShadowOp::SetPoolSize {
                pages: min,
                budget: 4,
            })
        })
        .map(|r| (r == ShadowOpResult::Done).then_some(()))
    });
    assert_eq!(x.domain().pool().total_pages(), min);
}

/// XSA-168 (2016): a guest's INVLPG of a non-canonical address, intercepted by the
/// hypervisor, crashed the host. Replayed: INVLPG of non-canonical and hole addresses on
/// every pair, with shadows live. Must hold: no failure, nothing more removed than the
/// architecture allows, the guest keeps running.
#[test]
fn xsa_168_invlpg_of_a_non_canonical_address() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, 0x40_3000, DATA_GFN, DATA);
        x.run(0, cr3);
        x.write(0, 0x40_3000, 4).unwrap();
        for va in [
            0x8000_0000_0000_0000u64,
            0x0000_8000_0000_0000,
            u64::MAX,
            0xffff_ffff_0000_0000,
        ] {
            let r = x.m.invlpg(0, Gva::new(va));
            x.step("invlpg");
            assert_eq!(r, Ok(()), "{pair:?} {va:#x}");
        }
        assert_eq!(x.read(0, 0x40_3000).unwrap(), 4, "{pair:?}");
    }
}

/// Issue 10: `validate_guest_pt_write` walked `len / 4096` pages with no cap, so a host
/// passing a wrapping or enormous range spun for as long as it asked. Must hold: a range
/// that wraps the guest-physical space is refused at once, changing nothing.
#[test]
fn issue10_validate_of_a_wrapping_range_is_refused() {
    let mut x = Xsa::new(Pair::P4on4, 1, 128);
    let cr3 = x.space();
    x.run(0, cr3);
    let r = x.host("validate a wrapping range", |d| {
        d.validate_guest_pt_write(Gpa::new(!0xfff), 1 << 34)
            .map(|f| ((), f))
    });
    assert!(matches!(r, Err(EngineError::BadArgument(_))), "{r:?}");
}

/// Issue 10, a long operation that restarted itself: `set_p2m` of a page table's gfn whose
/// unshadow needs a scan of the upper shadows (the L1 is linked from many L2 entries) ran
/// out of budget after its mapping scan had finished; the retry then scanned every L1
/// shadow again before going on with the unshadow, so each call left the unshadow almost
/// nothing. Must hold: the retries go on where the last call stopped (one mapping removal
/// in all) and the operation ends within a few calls.
#[test]
fn issue10_a_preempted_set_p2m_does_not_scan_again() {
    let config = shadow2::domain::DomainConfig {
        call_work_budget: 1024,
        reverse_map: false,
        ..hvm(Pair::P4on4.shadow(), 1, 128)
    };
    let mut x = Xsa::with_config(Pair::P4on4, config);
    let cr3 = x.space();
    let shared = 0x40_0000u64;
    x.map(cr3, shared, DATA_GFN, DATA);
    let l1 = x.t.table_of(&mut x.m, cr3, shared, 1);
    x.run(0, cr3);
    // The same L1 behind the last 8 entries of four L2s (one per gigabyte).
    let mut vas = Vec::new();
    for gb in 0..4u64 {
        for i in 504..512u64 {
            let va = (gb << 30) | (i << 21);
            let slot = x.slot(cr3, va, 2);
            x.t.write(&mut x.m, slot, (l1 << 12) | crate::engine_support::TABLE);
            vas.push(va);
        }
    }
    x.step("L1 linked everywhere");
    for &va in &vas {
        x.read(0, va).unwrap();
    }
    let removals = x.domain().stats().mapping_removals;
    let unhooks = x.domain().stats().unhook_by_scan;
    let mut calls = 0;
    loop {
        calls += 1;
        assert!(calls <= 16, "set_p2m still preempted after {calls} calls");
        match x.set_p2m(l1, None) {
            Ok(()) => break,
            Err(EngineError::Preempted) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(x.domain().stats().unhook_by_scan, unhooks + 1);
    assert_eq!(x.domain().stats().mapping_removals, removals + 1);
    for &va in &vas {
        assert!(x.read(0, va).is_err());
    }
}
