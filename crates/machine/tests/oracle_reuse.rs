//! The simulator reuses the oracle's walk of an access for the checks after it (A/D, the
//! frame written) only while nothing can have changed what the walk read: no engine call
//! and no change to memory. Each test here fails if one of those invalidations is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::{Gva, Mfn};
use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, Perms, bits};
use shadow2_machine::PscEntry;
use shadow2_machine::sim::ShadowMachine;

const X: u64 = 0x40_0000;
const Y: u64 = 0x40_1000;
const X_GFN: u64 = 40;
const Y_GFN: u64 = 41;
/// A leaf the guest wrote without A and D: whoever sets them writes guest memory.
const FRESH: u64 = bits::P | bits::RW | bits::US;

struct Guest {
    m: ShadowMachine,
    t: Tables,
    cr3: u64,
}

fn guest() -> Guest {
    let mut m = machine(hvm(PagingLevels::Four, 1, 128), 64);
    let mut t = Tables::new(Pair::P4on4.guest(), 1, 32);
    let cr3 = t.new_root(0);
    t.map(&mut m, cr3, X, X_GFN, FRESH);
    t.map(&mut m, cr3, Y, Y_GFN, FRESH);
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    Guest { m, t, cr3 }
}

/// The first write to X faults; the engine's fill sets A and D in the guest's leaf. The
/// check after the access must judge the leaf as it is then, not as the walk before the
/// fault saw it (A and D clear).
#[test]
fn an_access_the_engine_fixed_is_judged_on_the_entries_after_the_fix() {
    let mut g = guest();
    write_u64(&mut g.m, 0, X, 7).unwrap();
    let leaf = g.t.slot(&mut g.m, g.cr3, X, 1);
    let value = g.t.read(&g.m, leaf);
    assert_eq!(value & (bits::A | bits::D), bits::A | bits::D, "{value:#x}");
    assert!(g.m.traps().shadow_fills > 0, "the write must have faulted");
    check(&g.m);
}

/// A broken translation path: the hardware's paging-structure cache names the guest's own
/// L1 table, so the hardware walk of Y sets A in the guest's entry (a write to guest
/// memory, with no engine call). The A/D check after the access must see that write.
#[test]
fn guest_memory_the_hardware_writes_during_an_access_is_seen_by_the_check_after_it() {
    let mut g = guest();
    read_u64(&mut g.m, 0, X).unwrap();
    let leaf_y = g.t.slot(&mut g.m, g.cr3, Y, 1);
    assert_eq!(g.t.read(&g.m, leaf_y) & bits::A, 0);
    let guest_l1 = mfn_of(&g.m, leaf_y >> 12);
    let cpu = g.m.cpu_mut(0).unwrap();
    cpu.tlb_mut().flush_all();
    cpu.psc_mut().insert(PscEntry {
        level: 2,
        va: Gva::new(Y),
        shift: 21,
        table: Mfn::new(guest_l1.raw()),
        perms: Perms::ALL,
    });

    let _ = read_u64(&mut g.m, 0, Y);

    assert_ne!(
        g.t.read(&g.m, leaf_y) & bits::A,
        0,
        "the hardware walk must have set A in the guest's entry"
    );
    let (_, mismatches) = g.m.mismatches();
    assert!(
        !mismatches.iter().any(|m| m.what.contains("A clear")),
        "{mismatches:?}"
    );
    // The broken path itself is caught: the hardware reached the wrong frame.
    assert!(
        mismatches
            .iter()
            .any(|m| m.what.contains("hardware reached")),
        "{mismatches:?}"
    );
}
