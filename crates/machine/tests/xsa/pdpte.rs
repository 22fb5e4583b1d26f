//! PAE PDPTEs: the registers the CPU loads at CR3 load (SDM 4.4.1), and a hostile guest
//! that puts reserved bits in its in-memory PDPT after the load. These are not one
//! advisory: they replay the first class of issue 10 (a PDPTE re-read that fails after the
//! tops were released), in the spirit of Xen's PAE shadow-top advisories.

use shadow2::addr::{Gpa, Gva};
use shadow2::domain::EmulateOutcome;
use shadow2::emulate::{CodeMode, Regs};
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{ControlState, PagingLevels};
use shadow2_machine::sim::GuestError;

use crate::engine_support::{DATA, control};
use crate::harness::{CODE_GFN, CODE_VA, DATA_GFN, KDATA, PAE_PAIRS, Xsa};

const X: u64 = 0x40_3000;
/// X's twin in the second gigabyte (PDPTE 1).
const Y: u64 = 0x4040_3000;
/// The kernel's window onto its own PDPT page.
const PDPT_VA: u64 = 0x80_0000;
/// The kernel's window onto the L2 of the first gigabyte (a top-level shadow).
const L2_VA: u64 = 0xa0_0000;
/// A reserved bit of a PAE PDPTE (R/W).
const PDPTE_RESERVED: u64 = bits::RW;

/// A PAE guest running with X and Y mapped (supervisor pages, which the SMAP toggles of
/// `non_reloading_changes` leave readable), windows onto its PDPT page and its first L2.
fn pae_guest(pair: shadow2::multi::Pair) -> (Xsa, u64) {
    let mut x = Xsa::new(pair, 1, 128);
    let cr3 = x.space();
    x.map(cr3, X, DATA_GFN, DATA);
    x.map(cr3, Y, DATA_GFN + 1, KDATA);
    x.map(cr3, PDPT_VA, cr3 >> 12, KDATA);
    let l2 = x.t.table_of(&mut x.m, cr3, X, 2);
    x.map(cr3, L2_VA, l2, KDATA);
    x.run(0, cr3);
    assert_eq!(x.read(0, X).unwrap(), 0);
    assert_eq!(x.read(0, Y).unwrap(), 0);
    (x, cr3)
}

/// The in-memory PDPTE `i` as the guest's kernel sees it through its window.
fn pdpte_va(cr3: u64, i: u64) -> u64 {
    PDPT_VA + (cr3 & 0xfe0) + 8 * i
}

/// The control changes that must not reload the PDPTEs (SDM 4.4.1 lists only CR3 loads
/// and changes of CR0.PG/CD/NW, CR4.PAE/PGE/PSE/SMEP): CR0.WP, CR4.SMAP, EFER.NXE.
fn non_reloading_changes(cr3: u64) -> Vec<ControlState> {
    let base = control(PagingLevels::Three, cr3);
    vec![
        ControlState {
            cr0: base.cr0 & !cr::CR0_WP,
            ..base
        },
        base,
        ControlState {
            cr4: base.cr4 | cr::CR4_SMAP,
            ..base
        },
        base,
        ControlState {
            efer: base.efer & !cr::EFER_NXE,
            ..base
        },
        base,
    ]
}

/// A PAE guest writes a reserved bit into PDPTE 1 of its (already loaded) PDPT with a real
/// store, then toggles CR0.WP, CR4.SMAP and EFER.NXE. Must hold (SDM 4.4.1): none of these
/// reloads the PDPTEs, so none raises #GP; the guest keeps running on the loaded values;
/// the hardware's PDPTE registers keep pointing at live shadows. Only the next CR3 load
/// faults, changing nothing.
#[test]
fn issue10_pdpte_reserved_bit_then_mode_changes_that_do_not_reload() {
    for pair in PAE_PAIRS {
        let (mut x, cr3) = pae_guest(pair);
        let loaded = x.m.guest_control(0).pdptes;
        let old = x.entry(cr3 + 8);
        x.store(0, pdpte_va(cr3, 1), old | PDPTE_RESERVED).unwrap();
        for ctl in non_reloading_changes(cr3) {
            let r = x.set_control(0, ctl);
            assert_eq!(r, Ok(()), "{pair:?}: {ctl:x?}");
            assert_eq!(x.m.guest_control(0).pdptes, loaded, "{pair:?}");
            assert_eq!(x.read(0, Y).unwrap(), 0, "{pair:?}");
        }
        let r = x.cr3(0, cr3);
        assert_eq!(r, Err(GuestError::GeneralProtection), "{pair:?}");
        assert_eq!(x.m.guest_control(0).pdptes, loaded, "{pair:?}");
        assert_eq!(x.read(0, X).unwrap(), 0, "{pair:?}");
    }
}

/// The SDM's rule on its own, without reserved bits: the guest points PDPTE 1 at a new L2
/// in memory (legal) and toggles CR0.WP, CR4.SMAP and EFER.NXE. Must hold: the PDPTE
/// registers, and so what Y translates to, change only at the next CR3 load.
#[test]
fn issue10_pdpte_registers_change_only_at_cr3_load() {
    for pair in PAE_PAIRS {
        let (mut x, cr3) = pae_guest(pair);
        let loaded = x.m.guest_control(0).pdptes;
        let l2 = x.t.alloc();
        let l1 = x.t.alloc();
        x.t.write(
            &mut x.m,
            (l2 << 12) + 8 * ((Y >> 21) & 511),
            (l1 << 12) | DATA,
        );
        x.t.write(
            &mut x.m,
            (l1 << 12) + 8 * ((Y >> 12) & 511),
            ((DATA_GFN + 2) << 12) | KDATA,
        );
        x.m.write_phys(Gpa::new((DATA_GFN + 2) << 12), &[2])
            .unwrap();
        x.store(0, pdpte_va(cr3, 1), (l2 << 12) | bits::P).unwrap();
        for ctl in non_reloading_changes(cr3) {
            x.set_control(0, ctl).unwrap();
            assert_eq!(x.m.guest_control(0).pdptes, loaded, "{pair:?}");
            assert_eq!(x.read(0, Y).unwrap(), 0, "{pair:?}: the old L2 still");
        }
        x.cr3(0, cr3).unwrap();
        assert_eq!(x.read(0, Y).unwrap() & 0xff, 2, "{pair:?}: the new L2");
    }
}

/// After a reserved bit is in the in-memory PDPT, an instruction the emulator refuses
/// (`inc dword [edi]`) on the guest's own top L2 makes the engine unshadow that L2, which
/// it runs on. Must hold: the emulation call either completes or unshadows, every flush
/// and reload it owes is handed out, the hardware PDPTE registers never name a freed
/// shadow, and the guest keeps running.
#[test]
fn issue10_pdpte_reserved_bit_then_unshadow_of_the_running_top() {
    for pair in PAE_PAIRS {
        let (mut x, cr3) = pae_guest(pair);
        let old = x.entry(cr3 + 8);
        x.store(0, pdpte_va(cr3, 1), old | PDPTE_RESERVED).unwrap();
        let l2 = x.t.table_of(&mut x.m, cr3, X, 2);
        // inc dword [edi], on the L2 entry of X.
        x.m.write_phys(Gpa::new(CODE_GFN << 12), &[0xff, 0x07])
            .unwrap();
        x.step("code written");
        let mut regs = Regs::new(CodeMode::Bits32);
        regs.rip = CODE_VA;
        let index = (X >> 21) & 511;
        regs.gpr[Regs::RDI] = L2_VA + 8 * index;
        let gpa = Gpa::new((l2 << 12) + 8 * index);
        let r = x.host("emulate on the running top", |d| {
            d.emulate(0, &mut regs, gpa)
        });
        assert!(
            matches!(r, Ok(EmulateOutcome::Unshadowed | EmulateOutcome::Done(_))),
            "{pair:?}: {r:?}"
        );
        assert_eq!(x.read(0, X).unwrap(), 0, "{pair:?}");
        assert_eq!(x.read(0, Y).unwrap(), 0, "{pair:?}");
        x.m.invlpg(0, Gva::new(X)).unwrap();
        assert_eq!(x.read(0, X).unwrap(), 0, "{pair:?}");
    }
}

/// A PDPTE names a guest frame that is not RAM when CR3 is loaded (the region reads as not
/// present); the host populates that frame later and the guest fills it as an L2. Must
/// hold: the domain never fails, and after the next CR3 load the region works.
#[test]
fn issue10_pdpte_naming_a_frame_the_host_populates_later() {
    for (pair, mmio_first) in PAE_PAIRS.into_iter().flat_map(|p| [(p, false), (p, true)]) {
        let (mut x, cr3) = pae_guest(pair);
        let hole = 450u64;
        if mmio_first {
            let mfn = x.host_frame();
            x.set_p2m(hole, Some((mfn, shadow2::p2m::P2mType::Mmio)))
                .unwrap();
        }
        x.store(0, pdpte_va(cr3, 2), (hole << 12) | bits::P)
            .unwrap();
        x.cr3(0, cr3).unwrap();
        let z = 0x8040_3000u64;
        assert!(x.read(0, z).is_err(), "{pair:?}");
        let mfn = x.host_frame();
        x.set_p2m(hole, Some((mfn, shadow2::p2m::P2mType::Ram)))
            .unwrap();
        let l1 = x.t.alloc();
        x.t.write(
            &mut x.m,
            (hole << 12) + 8 * ((z >> 21) & 511),
            (l1 << 12) | DATA,
        );
        x.t.write(
            &mut x.m,
            (l1 << 12) + 8 * ((z >> 12) & 511),
            ((DATA_GFN + 3) << 12) | DATA,
        );
        x.step("L2 filled");
        x.cr3(0, cr3).unwrap();
        assert_eq!(x.read(0, z).unwrap(), 0, "{pair:?}");
    }
}

/// Issue 10: a PAE guest loads CR3 while PDPTE 1 names an L2 at a gfn that is not RAM (the
/// host has not populated it yet; the CPU loads the register all the same), touches Y in
/// that gigabyte, then the host populates the gfn. The engine failed the domain at the
/// next fault: the guest's walk now succeeded below a top it had never shadowed. Must
/// hold: Y faults while the gfn is empty and is reached once it is RAM, without a CR3
/// load in between.
#[test]
fn issue10_pdpte_naming_a_gfn_the_host_populates_later() {
    use shadow2::addr::Gfn;
    use shadow2::p2m::P2mType;
    for pair in PAE_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        x.map(cr3, Y, DATA_GFN + 1, DATA);
        x.m.write_phys(Gpa::new((DATA_GFN + 1) << 12), &[0x5a])
            .unwrap();
        let l2 = x.t.table_of(&mut x.m, cr3, Y, 2);
        let mfn = x.mfn(l2);
        x.set_p2m(l2, None).unwrap();
        x.run(0, cr3);
        assert_eq!(x.read(0, X).unwrap(), 0, "{pair:?}");
        let r = x.read(0, Y);
        assert!(r.is_err(), "{pair:?}: {r:?}");
        x.host("populate the L2's gfn", |d| {
            d.set_p2m(Gfn::new(l2), Some((mfn, P2mType::Ram)))
                .map(|f| ((), f))
        })
        .unwrap();
        assert_eq!(x.read(0, Y).unwrap() & 0xff, 0x5a, "{pair:?}");
        assert_eq!(x.read(0, X).unwrap(), 0, "{pair:?}");
    }
}
