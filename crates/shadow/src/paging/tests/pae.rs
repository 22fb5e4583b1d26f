//! PAE PDPTEs: loaded with CR3, checked for reserved bits then, used from registers (SDM 4.4.1).

use super::harness::*;
use crate::addr::Gpa;
use crate::paging::bits;
use crate::paging::{PagingLevels, PdptLoadError, PhysMem, ThreeLevel, load_pae_pdptes};

fn pae_guest() -> Guest {
    guest_with_page(PagingLevels::Three, URW)
}

fn pdpte_addr(g: &Guest, va: u64) -> u64 {
    g.root + 8 * ((va >> 30) & 3)
}

#[test]
fn load_reads_the_four_pdptes_at_cr3() {
    let mut g = pae_guest();
    g.map_4k(HIGH_VA, PA, SRW);
    let loaded = load_pae_pdptes(&g.mem, g.ctl.cr3, &g.feat).unwrap();
    for (i, value) in loaded.iter().enumerate() {
        assert_eq!(*value, g.mem.peek(g.root + 8 * i as u64), "PDPTE {i}");
    }
    assert!(loaded[1] & bits::P != 0 && loaded[3] & bits::P != 0);
    assert_eq!(loaded[0] | loaded[2], 0);
}

#[test]
fn load_uses_cr3_bits_31_to_5() {
    let mut g = pae_guest();
    let pdpt = g.root + 0x20;
    g.mem.poke(pdpt + 8, 0x9000 | bits::P);
    let loaded = load_pae_pdptes(&g.mem, pdpt | 0x1f, &g.feat).unwrap();
    assert_eq!(loaded[1], 0x9000 | bits::P);
    assert_eq!(ThreeLevel::pdpte_reserved_bits(loaded[1], &g.feat), 0);
}

#[test]
fn load_rejects_reserved_bits_in_present_pdptes() {
    let g = pae_guest();
    let index = ((VA >> 30) & 3) as usize;
    let present = g.mem.peek(pdpte_addr(&g, VA));
    for bad_bit in [
        1u64 << 1,
        1 << 2,
        1 << 5,
        1 << 6,
        1 << 7,
        1 << 8,
        1 << 48,
        1 << 52,
        1 << 63,
    ] {
        let mut bad = g.clone();
        bad.mem.poke(pdpte_addr(&g, VA), present | bad_bit);
        assert_eq!(
            load_pae_pdptes(&bad.mem, bad.ctl.cr3, &bad.feat),
            Err(PdptLoadError::ReservedBits { index }),
            "bit {bad_bit:#x}"
        );
    }
    // PWT, PCD and the software bits are allowed.
    let mut good = g.clone();
    good.mem.poke(
        pdpte_addr(&g, VA),
        present | bits::PWT | bits::PCD | bits::AVAIL_LOW,
    );
    load_pae_pdptes(&good.mem, good.ctl.cr3, &good.feat).unwrap();
}

#[test]
fn load_ignores_reserved_bits_in_not_present_pdptes() {
    let mut g = pae_guest();
    g.mem.poke(g.root + 8 * 3, 0xffff_ffff_ffff_fffe);
    let loaded = load_pae_pdptes(&g.mem, g.ctl.cr3, &g.feat).unwrap();
    assert_eq!(loaded[3], 0xffff_ffff_ffff_fffe);
}

#[test]
fn load_honours_maxphyaddr() {
    let mut g = pae_guest();
    let addr = pdpte_addr(&g, VA);
    let present = g.mem.peek(addr);
    g.mem.poke(addr, present | (1 << 40));
    g.feat.maxphyaddr = 40;
    assert!(matches!(
        load_pae_pdptes(&g.mem, g.ctl.cr3, &g.feat),
        Err(PdptLoadError::ReservedBits { .. })
    ));
    g.feat.maxphyaddr = 41;
    load_pae_pdptes(&g.mem, g.ctl.cr3, &g.feat).unwrap();
}

#[test]
fn load_reports_unbacked_memory() {
    let g = pae_guest();
    assert!(matches!(
        load_pae_pdptes(&g.mem, 0x7000_0000, &g.feat),
        Err(PdptLoadError::Memory(_))
    ));
}

#[test]
fn walk_uses_the_loaded_pdptes_not_memory() {
    let mut g = pae_guest();
    let addr = pdpte_addr(&g, VA);
    let loaded = g.mem.peek(addr);
    // Clearing the PDPTE in memory does not unmap the page until CR3 is reloaded.
    g.mem.poke(addr, 0);
    let t = g.ok(VA, READ_U);
    assert_eq!(t.addr.raw(), PA | (VA & 0xfff));
    let top = t.path.at_level(3).unwrap();
    assert_eq!(top.value, loaded);
    assert_eq!(top.addr, Gpa::new(addr));
    g.reload_pdptes();
    assert_eq!(g.pf(VA, READ_U), U);
    // Nor does pointing it elsewhere: only the register copy counts.
    let mut g = pae_guest();
    let other = g.alloc_table();
    g.mem.poke(addr, other | bits::P);
    g.ok(VA, READ_U);
    // And changing the register alone does change the walk.
    g.ctl.pdptes[((VA >> 30) & 3) as usize] = 0;
    assert_eq!(g.pf(VA, READ_U), U);
}

#[test]
fn walk_never_writes_a_or_d_into_pdptes() {
    let mut g = pae_guest();
    let addr = pdpte_addr(&g, VA);
    let before = g.mem.peek(addr);
    g.ok(VA, WRITE_U);
    assert_eq!(g.mem.peek(addr), before);
    assert_eq!(
        g.mem.read_u64(Gpa::new(addr)).unwrap() & (bits::A | bits::D),
        0
    );
    assert!(g.entry(VA, 2) & bits::A != 0);
}

#[test]
fn pdptes_with_reserved_bits_in_registers_fault_with_rsvd() {
    let mut g = pae_guest();
    g.modify_entry(VA, 3, bits::RW, 0);
    assert_eq!(g.pf(VA, READ_U), P | RSVD | U);
}
