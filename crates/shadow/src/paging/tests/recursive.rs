//! Self-referencing ("recursive") tables: a slot that points at its own table turns the
//! paging structures into data, and A/D updates through it stay consistent.

use super::harness::*;
use crate::addr::Gpa;
use crate::addr::gva_from_indices_4level;
use crate::paging::bits::{self, ADDR_MASK_4, ADDR_MASK_8};
use crate::paging::{PagingLevels, PhysMem};

const SELF_SLOT: u64 = 510;

fn four_level_recursive() -> Guest {
    let mut g = guest_with_page(PagingLevels::Four, URW);
    g.mem.poke(g.root + 8 * SELF_SLOT, g.root | URW);
    g
}

fn idx(va: u64, level: u8) -> u64 {
    (va >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff
}

#[test]
fn four_level_self_slot_maps_the_top_table_as_data() {
    let mut g = four_level_recursive();
    let r = SELF_SLOT;
    let va = gva_from_indices_4level(r, r, r, r, 8 * r).raw();
    let t = g.ok(va, READ_S);
    assert_eq!(t.addr.raw(), g.root + 8 * r);
    assert_eq!(t.path.len(), 4);
    assert!(t.path.iter().all(|e| e.addr.raw() == g.root + 8 * r));
    // The entry read as data is the self entry, now accessed.
    assert_eq!(g.mem.peek(t.addr.raw()), g.root | URW | bits::A);
    assert_eq!(t.leaf, g.root | URW | bits::A);
}

#[test]
fn four_level_self_slot_reaches_every_table_of_a_walk() {
    let mut g = four_level_recursive();
    let r = SELF_SLOT;
    let (i4, i3, i2, i1) = (idx(VA, 4), idx(VA, 3), idx(VA, 2), idx(VA, 1));
    let cases = [
        (gva_from_indices_4level(r, r, r, i4, 0), 3),
        (gva_from_indices_4level(r, r, i4, i3, 0), 2),
        (gva_from_indices_4level(r, i4, i3, i2, 8 * i1), 1),
    ];
    for (va, table_level) in cases {
        let t = g.ok(va.raw(), READ_S);
        let table = g.entry(VA, table_level + 1) & ADDR_MASK_8;
        assert_eq!(t.frame.raw(), table >> 12, "the level-{table_level} table");
    }
    // The last one addresses the PTE of VA itself.
    let pte_va = gva_from_indices_4level(r, i4, i3, i2, 8 * i1).raw();
    assert_eq!(g.ok(pte_va, READ_S).addr.raw(), g.entry_addr(VA, 1));
}

#[test]
fn four_level_writes_through_the_self_slot_keep_a_and_d_consistent() {
    let mut g = four_level_recursive();
    let r = SELF_SLOT;
    let (i4, i3, i2, i1) = (idx(VA, 4), idx(VA, 3), idx(VA, 2), idx(VA, 1));
    let pte_va = gva_from_indices_4level(r, i4, i3, i2, 8 * i1).raw();
    let t = g.ok(pte_va, WRITE_S);
    // The PDE of VA served as the leaf: it is dirty; the entries above it only accessed.
    assert_eq!(g.entry(VA, 2) & (bits::A | bits::D), bits::A | bits::D);
    assert_eq!(g.entry(VA, 3) & (bits::A | bits::D), bits::A);
    assert_eq!(g.entry(VA, 4) & (bits::A | bits::D), bits::A);
    assert_eq!(g.mem.peek(g.root + 8 * r) & (bits::A | bits::D), bits::A);
    assert_eq!(t.leaf, g.entry(VA, 2));
    // VA itself still translates (D in a non-leaf entry is ignored).
    assert_eq!(g.ok(VA, READ_U).addr.raw(), PA | (VA & 0xfff));

    // When the self entry is also the leaf, it ends up accessed and dirty, once.
    let self_va = gva_from_indices_4level(r, r, r, r, 0).raw();
    let t = g.ok(self_va, WRITE_S);
    let self_entry = g.mem.peek(g.root + 8 * r);
    assert_eq!(self_entry, g.root | URW | bits::A | bits::D);
    assert_eq!(t.leaf, self_entry);
    let writes = g.mem.writes;
    g.ok(self_va, WRITE_S);
    assert_eq!(g.mem.writes, writes, "nothing left to set");
}

#[test]
fn two_level_self_slot_maps_the_page_directory_and_tables() {
    let mut g = guest_with_page(PagingLevels::Two, URW);
    let root = g.root;
    g.mem
        .write_entry(Gpa::new(root + 4 * 1023), 4, root | URW)
        .unwrap();
    let pde_index = VA >> 22;
    let pd_va = 0xffff_f000 + 4 * pde_index;
    assert_eq!(g.ok(pd_va, READ_S).addr.raw(), root + 4 * pde_index);
    let pte_va = 0xffc0_0000 + (pde_index << 12) + 4 * ((VA >> 12) & 0x3ff);
    let t = g.ok(pte_va, WRITE_S);
    assert_eq!(t.addr.raw(), g.entry_addr(VA, 1));
    assert_eq!(g.entry(VA, 2) & (bits::A | bits::D), bits::A | bits::D);
    assert_eq!(t.leaf, g.entry(VA, 2));
    let self_entry = g.mem.read_entry(Gpa::new(root + 4 * 1023), 4).unwrap();
    assert_eq!(self_entry, root | URW | bits::A);
    assert_eq!(g.ok(VA, READ_U).frame.raw(), PA >> 12);
    assert_eq!(
        g.entry(VA, 2) & ADDR_MASK_4,
        g.entry_addr(VA, 1) & ADDR_MASK_4
    );
}

#[test]
fn pae_self_slot_in_a_page_directory_maps_its_tables() {
    let mut g = guest_with_page(PagingLevels::Three, URW);
    let pd = g.entry_addr(VA, 2) & !0xfff;
    g.mem.poke(pd + 8 * 511, pd | URW);
    let pd_window = (VA & 0xc000_0000) | (511 << 21);
    let pte_va = pd_window | (idx(VA, 2) << 12) | (8 * idx(VA, 1));
    let t = g.ok(pte_va, WRITE_S);
    assert_eq!(t.addr.raw(), g.entry_addr(VA, 1));
    assert_eq!(g.entry(VA, 2) & (bits::A | bits::D), bits::A | bits::D);
    let pd_self_va = pd_window | (511 << 12) | (8 * 511);
    let t = g.ok(pd_self_va, READ_S);
    assert_eq!(t.addr.raw(), pd + 8 * 511);
    assert_eq!(g.mem.peek(pd + 8 * 511), pd | URW | bits::A);
}
