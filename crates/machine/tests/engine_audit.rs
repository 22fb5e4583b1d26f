//! Issue 3, item 10: the auditor catches corruption. Shadows are filled by real guest
//! accesses, then one shadow entry (or p2m entry) is changed directly in machine memory,
//! behind the engine's back: the auditor must report it, and be clean again once the
//! entry is restored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::{Maddr, Mfn};
use shadow2::audit::audit;
use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, PhysMem, bits};
use shadow2::types::ShadowKind;
use shadow2_machine::sim::ShadowMachine;

const X: u64 = 0x40_0000;
/// Where the guest maps its own L1 table (read-only in the shadows: it is a page table).
const PT_VA: u64 = 0x40_1000;

const PAIRS: [Pair; 4] = [Pair::P2on2, Pair::P2on4, Pair::P3on3, Pair::P4on4];

struct Filled {
    m: ShadowMachine,
    l1: u64,
}

/// X -> frame 40 (written), PT_VA -> the L1 table of X (read), frame 41 mapped nowhere.
fn filled(pair: Pair) -> Filled {
    let mut m = machine(hvm(pair.shadow(), 1, 128), 64);
    let mut t = Tables::new(pair.guest(), 1, 30);
    let cr3 = t.new_root(0x20);
    t.map(&mut m, cr3, X, 40, DATA);
    let l1 = t.table_of(&mut m, cr3, X, 1);
    t.map(&mut m, cr3, PT_VA, l1, DATA);
    set_mode(&mut m, 0, pair.guest(), cr3);
    write_u64(&mut m, 0, X, 1).unwrap();
    read_u64(&mut m, 0, PT_VA).unwrap();
    check(&m);
    Filled { m, l1 }
}

fn read_entry(m: &ShadowMachine, slot: u64) -> u64 {
    m.domain()
        .host()
        .read_entry(Maddr::new(slot), sentry_bytes(m))
        .unwrap()
}

fn write_entry(m: &mut ShadowMachine, slot: u64, value: u64) {
    let width = sentry_bytes(m);
    m.domain_mut()
        .host_mut()
        .write_entry(Maddr::new(slot), width, value)
        .unwrap();
}

/// Writes `bad` at `slot`, expects the auditor to report `what`, restores the entry and
/// expects a clean audit.
#[track_caller]
fn expect_caught(m: &mut ShadowMachine, slot: u64, bad: u64, what: &str) {
    expect_caught_as(m, slot, bad, &[what]);
}

/// The same, with any of `whats` as the report.
#[track_caller]
fn expect_caught_as(m: &mut ShadowMachine, slot: u64, bad: u64, whats: &[&str]) {
    let good = read_entry(m, slot);
    assert_ne!(good, bad);
    write_entry(m, slot, bad);
    let report = audit(m.domain());
    assert!(
        report.violations.iter().any(|v| whats.contains(&v.what)),
        "expected one of {whats:?}, got {:?}",
        report.violations
    );
    write_entry(m, slot, good);
    check(m);
}

fn addr_mask(m: &ShadowMachine) -> u64 {
    if sentry_bytes(m) == 4 {
        bits::ADDR_MASK_4
    } else {
        bits::ADDR_MASK_8
    }
}

#[test]
fn read_only_mapping_of_a_page_table_made_writable_is_caught() {
    for pair in PAIRS {
        let Filled { mut m, l1 } = filled(pair);
        let maps = leaf_mappings_of(&m, mfn_of(&m, l1));
        assert_eq!(maps.len(), 1, "{pair:?}");
        let (slot, e) = maps[0];
        assert_eq!(e & bits::RW, 0, "{pair:?}: a page table mapped writable");
        expect_caught(
            &mut m,
            slot,
            e | bits::RW,
            "writable mapping of a shadowed page table",
        );
        expect_caught(
            &mut m,
            slot,
            e | bits::RW,
            "writable count disagrees with entries",
        );
    }
}

#[test]
fn entry_pointing_at_another_frame_is_caught() {
    for pair in PAIRS {
        let Filled { mut m, .. } = filled(pair);
        let (slot, e) = leaf_mappings_of(&m, mfn_of(&m, 40))[0];
        let other = mfn_of(&m, 41).base().raw();
        let bad = (e & !addr_mask(&m)) | other;
        expect_caught(
            &mut m,
            slot,
            bad,
            "shadow entry grants more than guest and rules allow",
        );
    }
}

#[test]
fn entry_with_more_rights_than_the_guest_is_caught() {
    for pair in PAIRS {
        let mut m = machine(hvm(pair.shadow(), 1, 128), 64);
        let mut t = Tables::new(pair.guest(), 1, 30);
        let cr3 = t.new_root(0x20);
        // Supervisor-only, read-only data.
        t.map(&mut m, cr3, X, 40, bits::P | bits::A | bits::D);
        set_mode(&mut m, 0, pair.guest(), cr3);
        read_u64(&mut m, 0, X).unwrap();
        check(&m);
        let (slot, e) = leaf_mappings_of(&m, mfn_of(&m, 40))[0];
        let what = "shadow entry grants more than guest and rules allow";
        expect_caught(&mut m, slot, e | bits::US, what);
        expect_caught(&mut m, slot, e | bits::RW, what);
    }
}

#[test]
fn entry_where_the_guest_has_none_and_writable_pool_frames_are_caught() {
    for pair in PAIRS {
        let Filled { mut m, .. } = filled(pair);
        let (slot, e) = leaf_mappings_of(&m, mfn_of(&m, 40))[0];
        // Another slot of the same L1 shadow: the guest has no entry there (the shadow
        // holds nothing, or the not-present marker).
        let width = sentry_bytes(&m);
        let spare = slot + 4 * width;
        expect_caught_as(
            &mut m,
            spare,
            e,
            &[
                "shadow entry grants more than guest and rules allow",
                "magic entry disagrees with guest entry and p2m",
            ],
        );
        // An upper shadow entry where the guest's table has none.
        let top = m.domain().vcpu(0).unwrap().tops().next().unwrap();
        let upper = top.base().raw() + 300 * width;
        let (l1_head, _) = m
            .domain()
            .shadows()
            .containing(shadow2::addr::Maddr::new(slot).mfn())
            .unwrap();
        expect_caught(
            &mut m,
            upper,
            l1_head.base().raw() | bits::P | bits::RW | bits::US | bits::A,
            "shadow entry present where the guest has none",
        );
        // A writable mapping of a shadow pool frame.
        let pool = m.domain().shadows().shadows().next().unwrap().0;
        let bad = (e & !addr_mask(&m)) | pool.base().raw() | bits::RW;
        expect_caught(&mut m, slot, bad, "writable mapping of a shadow pool frame");
    }
}

#[test]
fn cleared_upper_entry_breaks_the_reference_counts_and_is_caught() {
    for pair in PAIRS {
        let Filled { mut m, .. } = filled(pair);
        // The upper shadow entry that points at the L1 shadow of X's table.
        let d = m.domain();
        let l1_kind = ShadowKind::for_guest(pair.guest(), 1).unwrap();
        let (l1_head, _) = d
            .shadows()
            .shadows()
            .find(|(_, i)| i.key.kind == l1_kind)
            .unwrap();
        let up = d.shadows().info(l1_head).unwrap().up.unwrap().raw();
        let e = read_entry(&m, up);
        let pages = 1 << m.domain().shadows().info(l1_head).unwrap().order;
        let points_at = (e & addr_mask(&m)) >> 12;
        assert!(
            (l1_head.raw()..l1_head.raw() + pages).contains(&points_at),
            "{pair:?}"
        );
        expect_caught(
            &mut m,
            up,
            0,
            "shadow reference count disagrees with entries",
        );
        // Pointing it at another L1-sized block breaks both counts.
        let top = m.domain().vcpu(0).unwrap().tops().next().unwrap();
        let bad = (e & !addr_mask(&m)) | top.base().raw();
        expect_caught(
            &mut m,
            up,
            bad,
            "shadow reference count disagrees with entries",
        );
    }
}

#[test]
fn magic_in_an_upper_shadow_is_caught() {
    for pair in [Pair::P2on4, Pair::P3on3, Pair::P4on4] {
        let Filled { mut m, .. } = filled(pair);
        let top = m.domain().vcpu(0).unwrap().tops().next().unwrap();
        // The not-present marker of the fast path, in an empty slot of a top shadow.
        let slot = top.base().raw() + 8 * 300;
        assert_eq!(read_entry(&m, slot), 0);
        let magic = bits::P | (1 << 51) | (1 << 9);
        expect_caught(&mut m, slot, magic, "magic entry in an upper shadow");
    }
}

#[test]
fn writable_mapping_of_a_clean_page_in_log_dirty_mode_is_caught() {
    for pair in PAIRS {
        let Filled { mut m, .. } = filled(pair);
        let flush = m.domain_mut().enable_log_dirty().unwrap();
        m.settle(flush);
        check(&m);
        let (slot, e) = leaf_mappings_of(&m, mfn_of(&m, 40))[0];
        assert_eq!(e & bits::RW, 0, "{pair:?}: log-dirty left it writable");
        expect_caught(
            &mut m,
            slot,
            e | bits::RW,
            "writable mapping of a page not yet dirty in log-dirty mode",
        );
        // Once the guest has written the page, it may be writable.
        write_u64(&mut m, 0, X, 2).unwrap();
        let (_, e) = leaf_mappings_of(&m, mfn_of(&m, 40))[0];
        assert_ne!(e & bits::RW, 0);
        check(&m);
    }
}

#[test]
fn p2m_entry_made_writable_behind_the_engine_is_caught() {
    for shadow in [PagingLevels::Three, PagingLevels::Four] {
        let mut m = machine(hvm(shadow, 1, 64), 32);
        set_mode(&mut m, 0, PagingLevels::Zero, 0);
        read_u64(&mut m, 0, 20 << 12).unwrap();
        // Find the p2m leaf entry of guest frame 20 among the p2m's tables.
        let target = mfn_of(&m, 20);
        let d = m.domain();
        let tables: Vec<Mfn> = d.p2m().unwrap().table_frames().collect();
        let slot = tables
            .iter()
            .flat_map(|t| (0..512).map(move |i| t.base().raw() + 8 * i))
            .find(|&a| {
                let e = d.host().read_u64(Maddr::new(a)).unwrap();
                e & bits::P != 0 && (e & bits::ADDR_MASK_8) == target.base().raw()
            })
            .unwrap();
        let e = machine_u64(&m, slot);
        assert_eq!(e & bits::RW, 0, "read-only until the first write");
        poke_machine(&mut m, slot, e | bits::RW);
        let report = audit(m.domain());
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.what == "writable p2m entry not recorded" && v.at == 20),
            "{:?}",
            report.violations
        );
        poke_machine(&mut m, slot, e);
        check(&m);
    }
}

/// A protection key is a right: a 4-level guest's leaf shadow carries its key, and a
/// shadow leaf with another key (which PKRU may allow where the guest's forbids) is a
/// violation.
#[test]
fn entry_with_another_protection_key_is_caught() {
    let mut m = machine(hvm(PagingLevels::Four, 1, 128), 64);
    let mut t = Tables::new(PagingLevels::Four, 1, 30);
    let cr3 = t.new_root(0);
    t.map(&mut m, cr3, X, 40, DATA | (3 << bits::PKEY_SHIFT));
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    read_u64(&mut m, 0, X).unwrap();
    check(&m);
    let (slot, e) = leaf_mappings_of(&m, mfn_of(&m, 40))[0];
    assert_eq!(e & bits::PKEY_MASK, 3 << bits::PKEY_SHIFT);
    let bad = (e & !bits::PKEY_MASK) | (4 << bits::PKEY_SHIFT);
    expect_caught(
        &mut m,
        slot,
        bad,
        "shadow entry's protection key is not the guest's",
    );
}
