//! Issue 4, item 4: removing write access without reverse maps, in order: (a) the
//! last-writable pointer, (b) guesses from the guest OS's linear maps (a direct map, a
//! self-map), (c) the brute-force scan of every L1 shadow in bounded steps with a
//! continuation; counters say which method did it, and the writable count proves it done.
//! Item 5: removing every mapping (p2m changes) and unshadowing keep the same structure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

/// These tests exercise the searches used without a reverse map: turn it off even when the
/// engine is built with the `rmap` feature.
fn no_rmap(config: shadow2::domain::DomainConfig) -> shadow2::domain::DomainConfig {
    shadow2::domain::DomainConfig {
        reverse_map: false,
        ..config
    }
}

use std::collections::BTreeMap;

use engine_support::*;
use shadow2::addr::{Gfn, Gva, Mfn};
use shadow2::domain::{DomainConfig, EngineError};
use shadow2::multi::{FaultOutcome, Pair};
use shadow2::p2m::P2mType;
use shadow2::paging::{ControlState, PagingLevels, PfErrorCode, bits};
use shadow2::remove::LinearMapHint;
use shadow2::stats::Stats;
use shadow2_machine::sim::ShadowMachine;

/// A data mapping of the frame that becomes a page table (its pointer mapping).
const A: u64 = 0x40_5000;
/// A second, unrelated mapping in another L1 table.
const B: u64 = 0x80_7000;
/// The region whose L1 table the frame becomes.
const REGION: u64 = 0xc0_0000;
/// The frame that becomes a page table, and the frame its first entry maps.
const F: u64 = 96;
const TARGET: u64 = 98;
/// Where the extra L1 tables (that only make the scan long) map their regions.
const EXTRA_BASE: u64 = 0x1000_0000;
const EXTRA_SPAN: u64 = 0x40_0000;

/// How much each counter moved since `s0`.
fn moved(m: &ShadowMachine, s0: &Stats) -> BTreeMap<&'static str, u64> {
    let before: BTreeMap<_, _> = s0.fields().into_iter().collect();
    m.domain()
        .stats()
        .fields()
        .into_iter()
        .map(|(n, v)| (n, v - before[n]))
        .collect()
}

/// The index of `va`'s entry in its L1 table, and the entry width.
fn l1_offset(levels: PagingLevels, va: u64) -> u64 {
    if levels == PagingLevels::Two {
        ((va >> 12) & 1023) * 4
    } else {
        ((va >> 12) & 511) * 8
    }
}

/// A machine for `pair` with `config`, a guest address space with frame F mapped writable at
/// A; the guest has written F's first entry through A (so A holds the last-writable
/// pointer).
fn setup(pair: Pair, config: DomainConfig) -> (ShadowMachine, Tables, u64) {
    let levels = pair.guest();
    let mut m = machine(config, 128);
    let mut t = Tables::new(levels, 1, 80);
    let cr3 = t.new_root(0x20);
    t.map(&mut m, cr3, A, F, DATA);
    set_mode(&mut m, 0, levels, cr3);
    let n = t.entry_bytes() as usize;
    let pte = (TARGET << 12) | DATA;
    m.write(0, Gva::new(A), SUP, &pte.to_le_bytes()[..n])
        .unwrap();
    assert_eq!(m.domain().shadows().frame(mfn_of(&m, F)).writable, 1);
    check(&m);
    (m, t, cr3)
}

/// The guest makes F the L1 table of REGION (writing the PDE) and touches the region.
fn promote(m: &mut ShadowMachine, t: &mut Tables, cr3: u64) {
    let pde = t.slot(m, cr3, REGION, 2);
    t.write(m, pde, (F << 12) | TABLE);
    m.flush_all_tlbs();
    assert_eq!(read_u64(m, 0, REGION).unwrap(), 0);
    check(m);
}

/// F is a shadowed page table with no writable mapping left, and writes through its old
/// data mappings are emulated.
#[track_caller]
fn assert_promoted(m: &mut ShadowMachine, t: &Tables, via: u64) {
    let f = mfn_of(m, F);
    assert!(m.domain().shadows().is_page_table(f));
    assert_eq!(m.domain().shadows().frame(f).writable, 0);
    assert!(
        leaf_mappings_of(m, f)
            .iter()
            .all(|(_, e)| e & bits::RW == 0),
        "a writable mapping of a page table is left"
    );
    assert!(!m.domain().write_scan_pending(f));
    let emulated = m.traps().emulated_writes;
    let n = t.entry_bytes() as usize;
    let pte = ((TARGET + 1) << 12) | DATA;
    m.write(0, Gva::new(via), SUP, &pte.to_le_bytes()[..n])
        .unwrap();
    assert_eq!(m.traps().emulated_writes, emulated + 1);
    check(m);
}

#[test]
fn a_the_last_writable_pointer_finds_the_only_writable_mapping() {
    for pair in PAGING_PAIRS {
        let (mut m, mut t, cr3) = setup(pair, no_rmap(hvm(pair.shadow(), 1, 128)));
        let s0 = *m.domain().stats();
        promote(&mut m, &mut t, cr3);
        let d = moved(&m, &s0);
        assert_eq!(d["write_access_removals"], 1, "{pair:?}");
        assert_eq!(d["write_access_pointer_tried"], 1, "{pair:?}");
        assert_eq!(d["write_access_by_pointer"], 1, "{pair:?}");
        assert_eq!(d["write_access_hint_tried"], 0, "{pair:?}");
        assert_eq!(d["write_access_scan_tried"], 0, "{pair:?}");
        assert_eq!(d["scanned_entries"], 0, "{pair:?}");
        assert_promoted(&mut m, &t, A);
    }
}

/// The direct-map hint for a guest of `levels`, and where it maps F.
fn direct_map(levels: PagingLevels) -> (LinearMapHint, u64) {
    let hint = if levels == PagingLevels::Four {
        LinearMapHint::linux_x86_64_direct_map(128)
    } else {
        LinearMapHint::linux_x86_32_lowmem(128)
    };
    let LinearMapHint::DirectMap { va_base, .. } = hint else {
        unreachable!()
    };
    (hint, va_base + (F << 12))
}

#[test]
fn b_a_hinted_direct_map_finds_a_mapping_the_pointer_does_not_know() {
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let (hint, d_va) = direct_map(levels);
        let config = no_rmap(hvm(pair.shadow(), 1, 128)).with_linear_map(hint);
        let (mut m, mut t, cr3) = setup(pair, config);
        // The kernel's direct map of F, written through: a second writable mapping.
        t.map(&mut m, cr3, d_va, F, DATA);
        // (A PAE guest reloads CR3 for the new PDPTE.)
        m.set_cr3(0, cr3).unwrap();
        write_u64(&mut m, 0, d_va + 0x800, 0x5a).unwrap();
        assert_eq!(m.domain().shadows().frame(mfn_of(&m, F)).writable, 2);
        // The process mapping (the pointer) goes: F is mapped writable only through the
        // direct map now, which the pointer does not name.
        let a_slot = t.slot(&mut m, cr3, A, 1);
        t.write(&mut m, a_slot, 0);
        m.invlpg(0, Gva::new(A)).unwrap();
        assert_eq!(m.domain().shadows().frame(mfn_of(&m, F)).writable, 1);
        let s0 = *m.domain().stats();
        promote(&mut m, &mut t, cr3);
        let d = moved(&m, &s0);
        assert_eq!(d["write_access_pointer_tried"], 1, "{pair:?}");
        assert_eq!(d["write_access_by_pointer"], 0, "{pair:?}");
        assert_eq!(d["write_access_hint_tried"], 1, "{pair:?}");
        assert_eq!(d["write_access_by_hint"], 1, "{pair:?}");
        assert_eq!(d["write_access_scan_tried"], 0, "{pair:?}");
        assert_eq!(d["scanned_entries"], 0, "{pair:?}");
        assert_promoted(&mut m, &t, d_va);
    }
}

/// The self-map hint for a guest of `levels`, the slot entries that build it, and where it
/// maps the L1 table of REGION.
fn self_map(
    m: &mut ShadowMachine,
    t: &mut Tables,
    cr3: u64,
    levels: PagingLevels,
) -> (LinearMapHint, u64) {
    match levels {
        PagingLevels::Four => {
            // L4 slot 0x1ed points at the L4.
            let top = cr3 & !0xfff;
            t.write(m, top + 0x1ed * 8, top | TABLE);
            let base = 0xffff_f680_0000_0000u64;
            (
                LinearMapHint::windows_x64_self_map(),
                base + (((REGION >> 12) * 8) & !0xfff),
            )
        }
        PagingLevels::Three => {
            // The page directory of the top quarter maps all four directories.
            let pds: Vec<u64> = (0..4).map(|q| t.table_of(m, cr3, q << 30, 2)).collect();
            for (q, pd) in pds.iter().enumerate() {
                t.write(m, (pds[3] << 12) + 8 * q as u64, (pd << 12) | TABLE);
            }
            (
                LinearMapHint::windows_pae_self_map(),
                0xc000_0000 + (((REGION >> 12) * 8) & !0xfff),
            )
        }
        _ => {
            // Page-directory slot 0x300 points at the directory.
            let top = cr3 & !0xfff;
            t.write(m, top + 0x300 * 4, top | TABLE);
            (
                LinearMapHint::self_map_2level(0x300),
                0xc000_0000 + (((REGION >> 12) * 4) & !0xfff),
            )
        }
    }
}

#[test]
fn b_a_hinted_self_map_finds_the_page_table_window() {
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let mut m = machine(no_rmap(hvm(pair.shadow(), 1, 128)), 128);
        let mut t = Tables::new(levels, 1, 80);
        let cr3 = t.new_root(0x20);
        let (hint, window) = self_map(&mut m, &mut t, cr3, levels);
        m.domain_mut()
            .set_linear_maps([Some(hint), None, None, None]);
        t.map(&mut m, cr3, A, F, DATA);
        // F is linked as REGION's table before anything walks through it.
        let pde = t.slot(&mut m, cr3, REGION, 2);
        t.write(&mut m, pde, (F << 12) | TABLE);
        set_mode(&mut m, 0, levels, cr3);
        let n = t.entry_bytes() as usize;
        // The kernel fills F through a temporary mapping (the pointer), then through its
        // self-map window.
        let pte = (TARGET << 12) | DATA;
        m.write(0, Gva::new(A), SUP, &pte.to_le_bytes()[..n])
            .unwrap();
        let pte2 = ((TARGET + 1) << 12) | DATA;
        let off = l1_offset(levels, REGION + 0x1000);
        m.write(0, Gva::new(window + off), SUP, &pte2.to_le_bytes()[..n])
            .unwrap();
        assert_eq!(
            m.domain().shadows().frame(mfn_of(&m, F)).writable,
            2,
            "{pair:?}"
        );
        check(&m);
        let s0 = *m.domain().stats();
        assert_eq!(read_u64(&mut m, 0, REGION).unwrap(), 0, "{pair:?}");
        assert_eq!(read_u64(&mut m, 0, REGION + 0x1000).unwrap(), 0, "{pair:?}");
        check(&m);
        let d = moved(&m, &s0);
        assert_eq!(d["write_access_by_pointer"], 0, "{pair:?}");
        assert_eq!(d["write_access_hint_tried"], 1, "{pair:?}");
        assert_eq!(d["write_access_by_hint"], 1, "{pair:?}");
        assert_eq!(d["write_access_scan_tried"], 0, "{pair:?}");
        // The window now writes through the emulator and the region sees it at once.
        let pte3 = ((TARGET + 2) << 12) | DATA;
        let off = l1_offset(levels, REGION + 0x2000);
        let emulated = m.traps().emulated_writes;
        m.write(0, Gva::new(window + off), SUP, &pte3.to_le_bytes()[..n])
            .unwrap();
        assert_eq!(m.traps().emulated_writes, emulated + 1, "{pair:?}");
        write_u64(&mut m, 0, REGION + 0x2000, 0x77).unwrap();
        assert_eq!(phys_u64(&m, (TARGET + 2) << 12), 0x77);
        assert_promoted(&mut m, &t, A);
    }
}

#[test]
fn c_two_unrelated_mappings_need_the_scan() {
    for pair in PAGING_PAIRS {
        let (mut m, mut t, cr3) = setup(pair, no_rmap(hvm(pair.shadow(), 1, 128)));
        t.map(&mut m, cr3, B, F, DATA);
        write_u64(&mut m, 0, B + 0x800, 0x5e).unwrap();
        assert_eq!(m.domain().shadows().frame(mfn_of(&m, F)).writable, 2);
        let s0 = *m.domain().stats();
        promote(&mut m, &mut t, cr3);
        let d = moved(&m, &s0);
        assert_eq!(d["write_access_pointer_tried"], 1, "{pair:?}");
        assert_eq!(d["write_access_by_pointer"], 0, "{pair:?}");
        assert_eq!(d["write_access_hint_tried"], 0, "{pair:?}");
        assert_eq!(d["write_access_scan_tried"], 1, "{pair:?}");
        assert_eq!(d["write_access_by_scan"], 1, "{pair:?}");
        assert_eq!(d["write_access_deferred"], 0, "{pair:?}");
        assert!(d["scanned_entries"] > 0, "{pair:?}");
        assert_promoted(&mut m, &t, B);
    }
}

#[test]
fn hints_that_guess_wrong_change_nothing_and_the_scan_still_finds_the_mapping() {
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let (hint, _) = direct_map(levels);
        let config = no_rmap(hvm(pair.shadow(), 1, 128)).with_linear_map(hint);
        let (mut m, mut t, cr3) = setup(pair, config);
        t.map(&mut m, cr3, B, F, DATA);
        write_u64(&mut m, 0, B + 0x800, 0x5e).unwrap();
        let s0 = *m.domain().stats();
        promote(&mut m, &mut t, cr3);
        let d = moved(&m, &s0);
        assert_eq!(d["write_access_hint_tried"], 1, "{pair:?}");
        assert_eq!(d["write_access_by_hint"], 0, "{pair:?}");
        assert_eq!(d["write_access_by_scan"], 1, "{pair:?}");
        assert_promoted(&mut m, &t, B);
    }
}

/// `count` more L1 tables, each mapping one page that is touched, so that each has a
/// shadow: the scan has that many more L1 shadows to go through. Returns the region of
/// each (its first address) by the table's machine frame.
fn extra_l1_shadows(
    m: &mut ShadowMachine,
    t: &mut Tables,
    cr3: u64,
    count: u64,
) -> BTreeMap<Mfn, u64> {
    let mut regions = BTreeMap::new();
    for i in 0..count {
        let va = EXTRA_BASE + i * EXTRA_SPAN;
        t.map(m, cr3, va, 90, DATA);
        let table = t.table_of(m, cr3, va, 1);
        regions.insert(mfn_of(m, table), va);
        read_u64(m, 0, va).unwrap();
    }
    check(m);
    regions
}

/// The region of the L1 shadow with the highest head among `regions`, or (`last` false)
/// of the L1 shadow with the lowest head of all, which must be one of `regions`.
fn region_at_end(m: &ShadowMachine, regions: &BTreeMap<Mfn, u64>, last: bool) -> u64 {
    let leaves: Vec<(Mfn, u64)> = m
        .domain()
        .shadows()
        .shadows()
        .filter(|(_, i)| i.key.kind.is_leaf_table())
        .map(|(h, i)| (h, i.key.frame))
        .collect();
    if last {
        leaves
            .iter()
            .rev()
            .find_map(|(_, f)| regions.get(&Mfn::new(*f)).copied())
            .expect("an L1 shadow of the regions")
    } else {
        let (_, first) = leaves.first().expect("an L1 shadow");
        *regions
            .get(&Mfn::new(*first))
            .expect("the first L1 shadow is one of the regions")
    }
}

#[test]
fn a_bounded_scan_over_many_l1_shadows_continues_across_faults_until_done() {
    for pair in PAGING_PAIRS {
        let config = DomainConfig {
            scan_budget: 4096,
            ..no_rmap(hvm(pair.shadow(), 1, 256))
        };
        let (mut m, mut t, cr3) = setup(pair, config);
        let regions = extra_l1_shadows(&mut m, &mut t, cr3, 16);
        // The second writable mapping of F sits in the L1 shadow the scan reaches last.
        let far = region_at_end(&m, &regions, true) + 0x3000;
        t.map(&mut m, cr3, far, F, DATA);
        write_u64(&mut m, 0, far + 0x800, 0x5c).unwrap();
        assert_eq!(m.domain().shadows().frame(mfn_of(&m, F)).writable, 2);
        let s0 = *m.domain().stats();
        promote(&mut m, &mut t, cr3);
        let d = moved(&m, &s0);
        assert!(d["write_access_deferred"] >= 1, "{pair:?}: {d:?}");
        assert_eq!(
            d["write_access_scan_steps"],
            d["write_access_deferred"] + 1,
            "{pair:?}"
        );
        assert_eq!(d["write_access_by_scan"], 1, "{pair:?}");
        assert_eq!(d["write_access_scan_fallbacks"], 0, "{pair:?}");
        // Each retry was a spurious fault for the guest: no step scanned past the budget.
        assert!(
            d["fault_spurious"] >= d["write_access_deferred"],
            "{pair:?}"
        );
        assert!(
            d["scanned_entries"] <= 4096 * d["write_access_scan_steps"],
            "{pair:?}"
        );
        assert_promoted(&mut m, &t, far);
    }
}

/// Runs vcpu 0's fault at `va` (a supervisor read of a not-present entry) directly, as a
/// host would, until it is not answered with a retry; the auditor is clean after every
/// call, and `between` runs after each retry. Returns the retries and the last outcome.
fn fault_until_settled(
    m: &mut ShadowMachine,
    va: u64,
    mut between: impl FnMut(&mut ShadowMachine, u32),
) -> (u32, FaultOutcome) {
    let mut retries = 0;
    loop {
        let (outcome, flush) = m
            .domain_mut()
            .page_fault(0, Gva::new(va), PfErrorCode(0))
            .unwrap();
        m.settle(flush);
        check(m);
        if outcome != FaultOutcome::Spurious {
            return (retries, outcome);
        }
        retries += 1;
        assert!(retries < 10_000, "the scan never finished");
        between(m, retries);
    }
}

#[test]
fn while_a_scan_is_pending_the_frame_is_not_a_page_table_and_every_step_is_bounded() {
    for pair in PAGING_PAIRS {
        let config = DomainConfig {
            scan_budget: 256,
            ..no_rmap(hvm(pair.shadow(), 1, 256))
        };
        let (mut m, mut t, cr3) = setup(pair, config);
        let regions = extra_l1_shadows(&mut m, &mut t, cr3, 24);
        let far = region_at_end(&m, &regions, true) + 0x3000;
        t.map(&mut m, cr3, far, F, DATA);
        write_u64(&mut m, 0, far + 0x800, 0x5c).unwrap();
        let pde = t.slot(&mut m, cr3, REGION, 2);
        t.write(&mut m, pde, (F << 12) | TABLE);
        m.flush_all_tlbs();
        let f = mfn_of(&m, F);
        let s0 = *m.domain().stats();
        let (retries, outcome) = fault_until_settled(&mut m, REGION, |m, _| {
            // Refused so far: no shadow, so the guest may still write F natively.
            assert!(!m.domain().shadows().is_page_table(f));
            assert!(m.domain().write_scan_pending(f));
            assert_eq!(m.domain().write_scans_pending(), 1);
        });
        assert_eq!(outcome, FaultOutcome::Fixed, "{pair:?}");
        let d = moved(&m, &s0);
        assert!(retries >= 10, "{pair:?}: only {retries} retries");
        assert_eq!(d["write_access_deferred"], u64::from(retries), "{pair:?}");
        assert_eq!(d["write_access_removals"], 1, "{pair:?}");
        assert_eq!(d["write_access_scan_tried"], 1, "{pair:?}");
        assert_eq!(d["write_access_by_scan"], 1, "{pair:?}");
        // Every step stopped within its budget (plus the shadows it skipped).
        let steps = d["write_access_scan_steps"];
        assert_eq!(steps, u64::from(retries) + 1, "{pair:?}");
        assert!(d["scanned_entries"] <= 256 * steps, "{pair:?}");
        assert_eq!(read_u64(&mut m, 0, REGION).unwrap(), 0, "{pair:?}");
        assert_promoted(&mut m, &t, far);
    }
}

#[test]
fn a_mapping_made_behind_the_cursor_while_the_scan_waits_is_read_only() {
    for pair in PAGING_PAIRS {
        let config = DomainConfig {
            scan_budget: 256,
            ..no_rmap(hvm(pair.shadow(), 1, 256))
        };
        let (mut m, mut t, cr3) = setup(pair, config);
        let mut regions = extra_l1_shadows(&mut m, &mut t, cr3, 24);
        let a_table = t.table_of(&mut m, cr3, A, 1);
        regions.insert(mfn_of(&m, a_table), A & !0x1f_ffff);
        let far = region_at_end(&m, &regions, true) + 0x3000;
        // The first L1 shadow of all, where the scan starts: its first entries are behind
        // the cursor after one step.
        let near = region_at_end(&m, &regions, false) + 0x6000;
        t.map(&mut m, cr3, far, F, DATA);
        write_u64(&mut m, 0, far + 0x800, 0x5c).unwrap();
        let pde = t.slot(&mut m, cr3, REGION, 2);
        t.write(&mut m, pde, (F << 12) | TABLE);
        m.flush_all_tlbs();
        let f = mfn_of(&m, F);
        let s0 = *m.domain().stats();
        let (_, outcome) = fault_until_settled(&mut m, REGION, |m, retries| {
            if retries == 1 {
                // Between two steps the guest maps F writable again in the L1 shadow the
                // scan has already been through (another vcpu's write, say): the shadow
                // entry is made read-only, so the pass under way stays complete.
                let slot = t.slot(m, cr3, near, 1);
                t.write(m, slot, (F << 12) | DATA);
                assert_eq!(m.domain().shadows().frame(f).writable, 1);
            }
        });
        assert_eq!(outcome, FaultOutcome::Fixed, "{pair:?}");
        let d = moved(&m, &s0);
        assert_eq!(d["write_access_scan_fallbacks"], 0, "{pair:?}: {d:?}");
        assert_eq!(d["write_access_by_scan"], 1, "{pair:?}");
        assert!(
            leaf_mappings_of(&m, f)
                .iter()
                .all(|(_, e)| e & bits::RW == 0)
        );
        assert_promoted(&mut m, &t, near);
    }
}

#[test]
fn a_cr3_load_scan_goes_on_across_calls_and_changes_nothing_until_done() {
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let config = DomainConfig {
            scan_budget: 256,
            ..no_rmap(hvm(pair.shadow(), 1, 256))
        };
        let (mut m, mut t, cr3) = setup(pair, config);
        let regions = extra_l1_shadows(&mut m, &mut t, cr3, 24);
        let far = region_at_end(&m, &regions, true) + 0x3000;
        // Frame R, mapped writable at A's neighbour and far away, becomes a new top level.
        const R: u64 = 97;
        t.map(&mut m, cr3, A + 0x1000, R, DATA);
        t.map(&mut m, cr3, far, R, DATA);
        write_u64(&mut m, 0, A + 0x1000 + 0x800, 2).unwrap();
        write_u64(&mut m, 0, far + 0x800, 4).unwrap();
        let r = mfn_of(&m, R);
        assert_eq!(m.domain().shadows().frame(r).writable, 2);
        // PAE: the new directory sits under a new PDPT; otherwise R is the root itself.
        let new_cr3 = if levels == PagingLevels::Three {
            let pdpt = t.alloc();
            t.write(&mut m, pdpt << 12, (R << 12) | bits::P);
            pdpt << 12
        } else {
            R << 12
        };
        let s0 = *m.domain().stats();
        let root = m.domain().vcpu(0).unwrap().root();
        let old_ctl = *m.domain().vcpu(0).unwrap().control();
        m.domain_mut()
            .set_control(
                0,
                ControlState {
                    cr3: new_cr3,
                    ..old_ctl
                },
            )
            .unwrap();
        let mut calls = 0u64;
        let flush = loop {
            calls += 1;
            let before = m.domain().stats().scanned_entries;
            match m.domain_mut().update_cr3(0) {
                Ok(flush) => break flush,
                Err(EngineError::Preempted) => {
                    // The write access removed so far owes a flush, as any failed call.
                    m.settle_failed_call();
                    // Nothing changed but the scan's progress: same root, R no page table.
                    assert_eq!(m.domain().vcpu(0).unwrap().root(), root);
                    assert!(!m.domain().shadows().is_page_table(r));
                    assert!(m.domain().write_scan_pending(r));
                    check(&m);
                }
                Err(e) => panic!("{pair:?}: {e}"),
            }
            // Each call scans within the budget (plus the shadows it skips).
            assert!(m.domain().stats().scanned_entries - before <= 256 + 64);
        };
        m.settle(flush);
        check(&m);
        let d = moved(&m, &s0);
        assert!(calls >= 3, "{pair:?}: {calls} calls");
        assert_eq!(d["write_access_deferred"], calls - 1, "{pair:?}");
        assert_eq!(d["write_access_by_scan"], 1, "{pair:?}");
        assert!(d["scanned_entries"] > 256, "{pair:?}");
        assert!(m.domain().shadows().is_page_table(r));
        assert_eq!(m.domain().shadows().frame(r).writable, 0);
        assert!(!m.domain().write_scan_pending(r));
        m.set_cr3(0, cr3).unwrap();
        check(&m);
    }
}

#[test]
fn a_p2m_change_removes_every_mapping_and_forgets_a_pending_scan() {
    for pair in PAGING_PAIRS {
        let config = DomainConfig {
            scan_budget: 256,
            ..no_rmap(hvm(pair.shadow(), 1, 256))
        };
        let (mut m, mut t, cr3) = setup(pair, config);
        let regions = extra_l1_shadows(&mut m, &mut t, cr3, 24);
        let far = region_at_end(&m, &regions, true) + 0x3000;
        t.map(&mut m, cr3, far, F, DATA);
        t.map(&mut m, cr3, B, F, DATA & !bits::RW);
        assert_eq!(read_u64(&mut m, 0, B).unwrap(), (TARGET << 12) | DATA);
        write_u64(&mut m, 0, far + 0x800, 0x5c).unwrap();
        let pde = t.slot(&mut m, cr3, REGION, 2);
        t.write(&mut m, pde, (F << 12) | TABLE);
        m.flush_all_tlbs();
        let old = mfn_of(&m, F);
        // One step of the scan, then the frame is taken away.
        let (outcome, flush) = m
            .domain_mut()
            .page_fault(0, Gva::new(REGION), PfErrorCode(0))
            .unwrap();
        m.settle(flush);
        check(&m);
        assert_eq!(outcome, FaultOutcome::Spurious, "{pair:?}");
        assert!(m.domain().write_scan_pending(old), "{pair:?}");
        let s0 = *m.domain().stats();
        let new = host_frame(&mut m);
        poke_machine(&mut m, new.base().raw(), (TARGET << 12) | DATA);
        let flush = m
            .domain_mut()
            .set_p2m(Gfn::new(F), Some((new, P2mType::Ram)))
            .unwrap();
        m.settle(flush);
        check(&m);
        let d = moved(&m, &s0);
        assert_eq!(d["mapping_removals"], 1, "{pair:?}");
        assert!(leaf_mappings_of(&m, old).is_empty(), "{pair:?}");
        assert!(!m.domain().write_scan_pending(old), "{pair:?}");
        assert_eq!(m.domain().shadows().frame(old).writable, 0);
        // Every mapping reaches the new frame; the region uses it as its table.
        assert_eq!(read_u64(&mut m, 0, B).unwrap(), (TARGET << 12) | DATA);
        assert_eq!(read_u64(&mut m, 0, far).unwrap(), (TARGET << 12) | DATA);
        assert_eq!(read_u64(&mut m, 0, REGION).unwrap(), 0, "{pair:?}");
        assert!(m.domain().shadows().is_page_table(new));
        check(&m);
    }
}

#[test]
fn unshadowing_a_multi_page_shadow_needs_only_its_up_pointer() {
    for pair in PAGING_PAIRS {
        let (mut m, mut t, cr3) = setup(pair, no_rmap(hvm(pair.shadow(), 1, 128)));
        promote(&mut m, &mut t, cr3);
        let s0 = *m.domain().stats();
        let flush = m.domain_mut().unshadow_page(Gfn::new(F)).unwrap();
        m.settle(flush);
        check(&m);
        let d = moved(&m, &s0);
        assert_eq!(d["unshadows"], 1, "{pair:?}");
        assert_eq!(d["unhook_by_pointer"], 1, "{pair:?}: {d:?}");
        assert_eq!(d["unhook_by_scan"], 0, "{pair:?}");
        assert!(!m.domain().shadows().is_page_table(mfn_of(&m, F)));
        // The guest's next use shadows it again.
        assert_eq!(read_u64(&mut m, 0, REGION).unwrap(), 0);
        assert!(m.domain().shadows().is_page_table(mfn_of(&m, F)));
        check(&m);
    }
}

#[test]
fn the_new_counters_are_named() {
    let m = machine(no_rmap(hvm(PagingLevels::Four, 1, 64)), 8);
    let names: Vec<&str> = m.domain().stats().fields().iter().map(|f| f.0).collect();
    for name in [
        "write_access_pointer_tried",
        "write_access_by_pointer",
        "write_access_hint_tried",
        "write_access_by_hint",
        "write_access_scan_tried",
        "write_access_by_scan",
        "write_access_scan_steps",
        "write_access_deferred",
        "write_access_scan_fallbacks",
        "unhook_by_pointer",
        "unhook_by_scan",
        "early_unshadows",
        "teardown_zeroed",
        "teardown_data",
    ] {
        assert!(names.contains(&name), "{name}");
    }
    let set: std::collections::BTreeSet<_> = names.iter().collect();
    assert_eq!(set.len(), names.len());
    let config = no_rmap(DomainConfig::hvm(PagingLevels::Four, 1, 64));
    assert_eq!(config.linear_maps, [None; 4]);
    assert_eq!(config.early_unshadow_writes, 4);
    assert!(config.scan_budget > 0);
    let full = (0..5).fold(config, |c, i| {
        c.with_linear_map(LinearMapHint::self_map_4level(i))
    });
    assert_eq!(full.linear_maps[3], Some(LinearMapHint::self_map_4level(4)));
}
