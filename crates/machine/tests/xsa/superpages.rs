//! Superpages whose frame bits reach above MAXPHYADDR or beyond the guest's memory, the PS
//! bit where the architecture does not allow it, and not-present entries with frame bits.

use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, bits};
use shadow2_machine::sim::GuestError;

use crate::engine_support::{DATA, PAGING_PAIRS, TABLE};
use crate::harness::{DATA_GFN, Xsa};

/// Where scenarios put their superpage (PDE 256 of the first L2 in PAE and 64-bit guests).
const REGION: u64 = 0x2000_0000;

fn reserved_fault(r: &Result<u64, GuestError>) -> bool {
    matches!(r, Err(GuestError::PageFault { code, .. }) if code.reserved())
}

/// XSA-173 (2016): shadow paging did not check the frame bits of a guest superpage entry
/// against the guest's physical-address width, so bits above it reached the shadow entry and
/// the guest mapped machine memory it did not own. Replayed: a 2 MiB (PAE, 64-bit) or 4 MiB
/// (32-bit PSE-36) page whose frame bits go above MAXPHYADDR. Must hold: the guest sees the
/// reserved-bit fault its own walk gives, and no shadow or TLB entry maps anything for it.
#[test]
fn xsa_173_superpage_frame_bits_above_maxphyaddr() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        let (pde, va) = if pair.guest() == PagingLevels::Two {
            // PSE-36: PDE bits 13..=20 are address bits 32..=39; bit 21 is reserved
            // (PSE-36 addresses stop at 40 bits whatever MAXPHYADDR is).
            (bits::PS | DATA | (1 << 21), 0x2000_0000u64)
        } else {
            (bits::PS | DATA | (1 << 50), REGION)
        };
        let slot = x.slot(cr3, va, 2);
        x.t.write(&mut x.m, slot, pde);
        x.run(0, cr3);
        for off in [0u64, 0x1000, 0x1f_f000] {
            let r = x.read(0, va + off);
            assert!(reserved_fault(&r), "{pair:?}: {r:?}");
            let w = x.write(0, va + off, 1);
            assert!(w.is_err(), "{pair:?}: {w:?}");
        }
    }
}

/// XSA-173, second half: frame bits inside MAXPHYADDR but far beyond the guest's memory
/// (bit 40 and up; PSE-36 bits 32..=39 on 32-bit guests). Must hold: the access is MMIO to
/// the guest (no RAM there), never a mapping of a machine frame, on every pair.
#[test]
fn xsa_173_superpage_beyond_guest_memory() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        let (pde, va) = if pair.guest() == PagingLevels::Two {
            (bits::PS | DATA | (0xff << 13), 0x2000_0000u64)
        } else {
            (bits::PS | DATA | (0xf0 << 40), REGION)
        };
        let slot = x.slot(cr3, va, 2);
        x.t.write(&mut x.m, slot, pde);
        x.run(0, cr3);
        for off in [0u64, 0x1000, 0x1f_f000] {
            let r = x.read(0, va + off);
            assert!(matches!(r, Err(GuestError::Mmio { .. })), "{pair:?}: {r:?}");
            x.write(0, va + off, 1).unwrap();
        }
        // Back to RAM: the same PDE naming frame 0 now maps guest memory.
        x.t.write(&mut x.m, slot, bits::PS | DATA);
        x.cr3(0, cr3).unwrap();
        x.m.write_phys(shadow2::addr::Gpa::new(DATA_GFN << 12), &[0x42])
            .unwrap();
        let r = x.read(0, va + (DATA_GFN << 12));
        assert_eq!(r.unwrap() & 0xff, 0x42, "{pair:?}");
    }
}

/// XSA-176 (2016): Xen's software page walk accepted the PS bit at levels where the
/// architecture reserves it (an L4 entry; an L3 entry without 1 GiB pages), treating an
/// intermediate table as a huge page. Replayed on 64-bit guests (1 GiB pages are hidden
/// from shadowed guests): PS in an L4 and in an L3 entry. Must hold: a reserved-bit fault
/// for the guest, and nothing mapped.
#[test]
fn xsa_176_ps_bit_in_l4_and_l3_entries_is_reserved() {
    let mut x = Xsa::new(Pair::P4on4, 1, 128);
    let cr3 = x.space();
    let l4_va = 0x80_0000_0000u64;
    let l3_va = 0x4000_0000u64;
    let l4_slot = x.slot(cr3, l4_va, 4);
    x.t.write(&mut x.m, l4_slot, bits::PS | DATA);
    let l3_slot = x.slot(cr3, l3_va, 3);
    x.t.write(&mut x.m, l3_slot, bits::PS | DATA);
    x.run(0, cr3);
    for va in [l4_va, l4_va + 0x20_1000, l3_va, l3_va + 0x20_1000] {
        let r = x.read(0, va);
        assert!(reserved_fault(&r), "{va:#x}: {r:?}");
        let _ = x.write(0, va, 1);
    }
    // The guest makes them tables again: ordinary walks.
    let l3 = x.t.alloc();
    x.t.write(&mut x.m, l4_slot, (l3 << 12) | TABLE);
    let l2 = x.t.alloc();
    x.t.write(&mut x.m, l3_slot, (l2 << 12) | TABLE);
    x.cr3(0, cr3).unwrap();
    x.map(cr3, l3_va, DATA_GFN, DATA);
    x.step("mapped");
    assert_eq!(x.read(0, l3_va).unwrap(), 0);
    assert!(x.read(0, l4_va).is_err());
}

/// XSA-176 on PAE guests: PS (bit 7) is reserved in a PDPTE, which the CPU loads at CR3
/// load. Must hold: the CR3 load raises #GP and changes nothing (the vcpu keeps running on
/// its previous address space, whose shadows stay live).
#[test]
fn xsa_176_ps_bit_in_a_pdpte_faults_the_cr3_load() {
    for pair in [Pair::P3on3, Pair::P3on4] {
        let mut x = Xsa::new(pair, 1, 128);
        let good = x.space();
        x.map(good, 0x40_0000, DATA_GFN, DATA);
        let bad = x.space();
        let pdpte = x.slot(bad, 0x4000_0000, 3);
        x.t.write(&mut x.m, pdpte, bits::PS | bits::P | ((DATA_GFN + 1) << 12));
        x.run(0, good);
        x.read(0, 0x40_0000).unwrap();
        let r = x.cr3(0, bad);
        assert_eq!(r, Err(GuestError::GeneralProtection), "{pair:?}");
        assert_eq!(x.m.guest_control(0).cr3, good, "{pair:?}");
        assert_eq!(x.read(0, 0x40_0000).unwrap(), 0, "{pair:?}");
    }
}

/// XSA-273 (2018, L1 Terminal Fault): a not-present or reserved-bit page-table entry still
/// steers speculative loads to the frame its address bits name, so a shadow entry that is
/// not present must not carry guest-chosen address bits naming host memory. Replayed: the
/// guest writes not-present PTEs and PDEs whose frame bits name pool frames, its own
/// frames and the top of memory, and PTEs with reserved bits set; then touches them. Must
/// hold: every not-present shadow entry names no machine frame below MAXPHYADDR.
#[test]
fn xsa_273_not_present_entries_name_no_machine_frame() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        let pool_frame = x
            .domain()
            .pool()
            .allocated_blocks()
            .next()
            .map(|(m, _)| m.raw())
            .unwrap_or(1);
        let base = 0x100_0000u64;
        let eb = x.t.entry_bytes();
        let frames = [pool_frame, DATA_GFN, 0xf_ffff];
        let l1 = x.t.table_of(&mut x.m, cr3, base, 1);
        for (i, f) in frames.iter().enumerate() {
            let e = (f << 12) | bits::RW | bits::US;
            x.t.write(&mut x.m, (l1 << 12) + i as u64 * eb, e);
        }
        let wide = pair.guest() != PagingLevels::Two;
        if wide {
            // Present with a reserved bit (51): a reserved-bit fault, and no mapping.
            let e = (1 << 51) | (DATA_GFN << 12) | DATA;
            x.t.write(&mut x.m, (l1 << 12) + 3 * eb, e);
        }
        // A not-present PDE naming a pool frame.
        let pde_va = 0x200_0000 + if wide { 0 } else { 0x40_0000 };
        let pde = x.slot(cr3, pde_va, 2);
        x.t.write(&mut x.m, pde, (pool_frame << 12) | bits::RW);
        x.run(0, cr3);
        for i in 0..4u64 {
            let r = x.read(0, base + i * 0x1000);
            assert!(
                matches!(r, Err(GuestError::PageFault { .. })),
                "{pair:?}: {r:?}"
            );
        }
        let r = x.read(0, pde_va);
        assert!(
            matches!(r, Err(GuestError::PageFault { .. })),
            "{pair:?}: {r:?}"
        );
    }
}

/// XSA-273, the engine's own markers: the fast path's MMIO marker keeps the guest's frame
/// number in the entry's address bits, with only bit 51 (above this host's MAXPHYADDR of
/// 48, so ignored by a speculative load) to make it fault. Replayed: the guest maps a gfn
/// that is not RAM but whose number is a machine frame of the host, and touches it. Must
/// hold: no marker's address bits below MAXPHYADDR name a machine frame.
#[test]
fn xsa_273_mmio_marker_names_no_machine_frame() {
    for pair in [Pair::P3on3, Pair::P3on4, Pair::P4on4, Pair::P2on4] {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        // gfn 1000 is not RAM; machine frame 1000 exists on this host.
        x.map(cr3, 0x100_0000, 1000, DATA);
        x.run(0, cr3);
        let r = x.read(0, 0x100_0000);
        assert!(matches!(r, Err(GuestError::Mmio { .. })), "{pair:?}: {r:?}");
        let found = crate::invariants::mmio_markers_naming_memory(x.domain());
        assert!(found.is_empty(), "{pair:?}: markers {found:x?}");
    }
}
