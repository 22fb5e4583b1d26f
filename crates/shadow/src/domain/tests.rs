//! End-to-end checks of the engine on a small test memory: one fault through each kind of
//! pair, with the auditor after every step. The simulator's randomized checker covers the
//! rest.

use super::*;
use crate::addr::{Gpa, Maddr, PhysAddr};
use crate::audit::audit;
use crate::p2m::P2mType;
use crate::paging::{
    Access, AccessKind, AdUpdate, CpuFeatures, PhysMem, Privilege, WalkEnv, bits, walk,
};
use crate::testmem::TestMemory;

const RAM_FRAMES: u64 = 64;

/// A domain with guest frames 0..RAM_FRAMES mapped to fresh machine frames.
fn domain(shadow: PagingLevels) -> Domain<TestMemory> {
    let config = DomainConfig::hvm(shadow, 2, 64);
    let mut d = Domain::new(TestMemory::new(4096), config).unwrap();
    for g in 0..RAM_FRAMES {
        let m = d.host_mut().alloc_block(0).unwrap();
        let _ = d.set_p2m(Gfn::new(g), Some((m, P2mType::Ram))).unwrap();
    }
    d
}

fn gwrite(d: &mut Domain<TestMemory>, gpa: u64, value: u64, bytes: u64) {
    let (mfn, _) = d.guest_frame(Gpa::new(gpa).gfn()).unwrap();
    let m = Maddr::new(mfn.base().raw() | (gpa & 0xfff));
    d.host_mut().write_entry(m, bytes, value).unwrap();
    let _ = d.validate_guest_pt_write(Gpa::new(gpa), bytes).unwrap();
}

fn gread(d: &Domain<TestMemory>, gpa: u64, bytes: u64) -> u64 {
    let (mfn, _) = d.guest_frame(Gpa::new(gpa).gfn()).unwrap();
    d.host()
        .read_entry(Maddr::new(mfn.base().raw() | (gpa & 0xfff)), bytes)
        .unwrap()
}

/// Translates through the shadows as the hardware would.
fn hw(d: &mut Domain<TestMemory>, v: usize, va: u64, access: Access) -> Result<Mfn, u32> {
    let ctl = d.hardware_control(v).unwrap();
    let mut ctl = ctl;
    if ctl.levels() == PagingLevels::Three {
        ctl.pdptes =
            crate::paging::load_pae_pdptes::<Maddr, _>(d.host(), ctl.cr3, &CpuFeatures::KVM_HOST)
                .unwrap();
    }
    let env = WalkEnv {
        ctl: &ctl,
        feat: &CpuFeatures::KVM_HOST,
        ad: AdUpdate::Set,
    };
    walk(d.host_mut(), env, Gva::new(va), access)
        .map(|t| <Maddr as PhysAddr>::frame(t.addr))
        .map_err(|f| f.error_code().map_or(u32::MAX, |e| e.bits()))
}

fn clean(d: &Domain<TestMemory>) {
    let report = audit(d);
    assert!(report.is_clean(), "{:?}", report.violations);
}

/// Runs an access the way a host does: hardware, then the engine on a fault, until it
/// succeeds or the guest must see a fault.
fn access(d: &mut Domain<TestMemory>, v: usize, va: u64, a: Access) -> Result<Mfn, FaultOutcome> {
    for _ in 0..4 {
        match hw(d, v, va, a) {
            Ok(m) => return Ok(m),
            Err(ec) => {
                let (outcome, _flush) = d.page_fault(v, Gva::new(va), PfErrorCode(ec)).unwrap();
                clean(d);
                match outcome {
                    FaultOutcome::Fixed | FaultOutcome::Spurious => {}
                    other => return Err(other),
                }
            }
        }
    }
    panic!("access at {va:#x} did not settle");
}

const USER_WRITE: Access = Access::new(AccessKind::Write, Privilege::User);
const USER_READ: Access = Access::new(AccessKind::Read, Privilege::User);

fn four_level_guest(d: &mut Domain<TestMemory>) {
    // L4 at gfn 1, L3 at 2, L2 at 3, L1 at 4; va 0x40_0000 -> gfn 10, writable user page.
    let table = bits::P | bits::RW | bits::US;
    gwrite(d, 0x1000, 0x2000 | table, 8);
    gwrite(d, 0x2000, 0x3000 | table, 8);
    gwrite(d, 0x3000 + 2 * 8, 0x4000 | table, 8);
    gwrite(d, 0x4000, 0xa000 | table, 8);
    let ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3: 0x1000,
        cr4: cr::CR4_PAE,
        efer: cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE,
        ..ControlState::default()
    };
    d.set_control(0, ctl).unwrap();
    let _ = d.update_paging_modes(0).unwrap();
}

#[test]
fn four_on_four_demand_fill_sets_guest_ad_and_maps_the_p2m_frame() {
    let mut d = domain(PagingLevels::Four);
    four_level_guest(&mut d);
    clean(&d);
    let m = access(&mut d, 0, 0x40_0123, USER_WRITE).unwrap();
    assert_eq!(Some(m), d.guest_frame(Gfn::new(10)).map(|x| x.0));
    let gl1e = gread(&d, 0x4000, 8);
    assert_ne!(gl1e & bits::A, 0);
    assert_ne!(gl1e & bits::D, 0);
    clean(&d);
}

#[test]
fn not_present_guest_entry_propagates_then_takes_the_fast_path() {
    let mut d = domain(PagingLevels::Four);
    four_level_guest(&mut d);
    // A successful access sets A on the upper guest entries, so the shadow path can exist.
    access(&mut d, 0, 0x40_0000, USER_READ).unwrap();
    let va = 0x40_1000; // L1 entry 1: not present
    let first = access(&mut d, 0, va, USER_READ);
    assert_eq!(
        first,
        Err(FaultOutcome::Propagate(PfErrorCode(PfErrorCode::U)))
    );
    let fast_before = d.stats().fast_path;
    let second = access(&mut d, 0, va, USER_READ);
    assert_eq!(second, first);
    assert_eq!(d.stats().fast_path, fast_before + 1);
}

#[test]
fn write_to_a_guest_page_table_asks_for_emulation_and_validate_updates_the_shadow() {
    let mut d = domain(PagingLevels::Four);
    four_level_guest(&mut d);
    // Map the guest's own L1 (gfn 4) at va 0x40_1000, writable.
    access(&mut d, 0, 0x40_0000, USER_READ).unwrap();
    gwrite(&mut d, 0x4008, 0x4000 | bits::P | bits::RW | bits::US, 8);
    clean(&d);
    let out = access(&mut d, 0, 0x40_1000 + 16, USER_WRITE);
    assert_eq!(
        out,
        Err(FaultOutcome::Emulate {
            gpa: Gpa::new(0x4010)
        })
    );
    // The emulated write: a new PTE for va 0x40_2000 -> gfn 11.
    let pte = 0xb000u64 | bits::P | bits::RW | bits::US | bits::A | bits::D;
    let _ = d
        .write_guest_phys(Gpa::new(0x4010), &pte.to_le_bytes())
        .unwrap();
    clean(&d);
    // No third fault: the shadow L1 entry was written with the guest's.
    assert!(hw(&mut d, 0, 0x40_2000, USER_WRITE).is_ok());
}

#[test]
fn every_pair_fills_a_simple_mapping() {
    for shadow in [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four] {
        // Paging disabled: the p2m is the shadow.
        let mut d = domain(shadow);
        let ctl = ControlState {
            cr0: cr::CR0_PE,
            ..ControlState::default()
        };
        d.set_control(0, ctl).unwrap();
        let _ = d.update_paging_modes(0).unwrap();
        let m = access(&mut d, 0, 0x5004, USER_WRITE).unwrap();
        assert_eq!(Some(m), d.guest_frame(Gfn::new(5)).map(|x| x.0));
        clean(&d);

        // 32-bit paging: L2 at gfn 1, L1 at gfn 2; va 0x40_0000 -> gfn 12; a 4 MiB page
        // at 0x80_0000 -> gfn 0x400.. (unbacked beyond RAM: MMIO).
        let mut d = domain(shadow);
        let t = bits::P | bits::RW | bits::US;
        gwrite(&mut d, 0x1000 + 4, 0x2000 | t, 4);
        gwrite(&mut d, 0x2000, 0xc000 | t, 4);
        gwrite(&mut d, 0x1000 + 8, t | bits::PS, 4);
        let ctl = ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
            cr3: 0x1000,
            cr4: cr::CR4_PSE,
            ..ControlState::default()
        };
        d.set_control(0, ctl).unwrap();
        let _ = d.update_paging_modes(0).unwrap();
        let m = access(&mut d, 0, 0x40_0010, USER_WRITE).unwrap();
        assert_eq!(Some(m), d.guest_frame(Gfn::new(12)).map(|x| x.0));
        let m = access(&mut d, 0, 0x80_3000, USER_WRITE).unwrap();
        assert_eq!(Some(m), d.guest_frame(Gfn::new(3)).map(|x| x.0));
        clean(&d);

        if shadow == PagingLevels::Two {
            continue;
        }
        // PAE: PDPT at gpa 0x1020 (not page-aligned), L2 at gfn 2, L1 at gfn 3.
        let mut d = domain(shadow);
        gwrite(&mut d, 0x1020, 0x2000 | bits::P, 8);
        gwrite(&mut d, 0x2000 + 2 * 8, 0x3000 | t, 8);
        gwrite(&mut d, 0x3000, 0xd000 | t, 8);
        let ctl = ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
            cr3: 0x1020,
            cr4: cr::CR4_PAE,
            ..ControlState::default()
        };
        d.set_control(0, ctl).unwrap();
        let _ = d.update_paging_modes(0).unwrap();
        let m = access(&mut d, 0, 0x40_0000, USER_WRITE).unwrap();
        assert_eq!(Some(m), d.guest_frame(Gfn::new(13)).map(|x| x.0));
        clean(&d);
    }
}

#[test]
fn host_hole_entry_is_in_every_four_level_top_and_survives_guest_writes() {
    let config = DomainConfig {
        external: false,
        ..DomainConfig::hvm(PagingLevels::Four, 2, 64)
    };
    let mut d = Domain::new(TestMemory::new(4096), config).unwrap();
    for g in 0..RAM_FRAMES {
        let m = d.host_mut().alloc_block(0).unwrap();
        let _ = d.set_p2m(Gfn::new(g), Some((m, P2mType::Ram))).unwrap();
    }
    let l3 = d.host_mut().alloc_block(0).unwrap();
    assert!(
        d.set_hypervisor_l3(l3).is_err(),
        "undeclared frame accepted"
    );
    d.add_hypervisor_frame(l3).unwrap();
    d.set_hypervisor_l3(l3).unwrap();
    let hole = d.hypervisor_l4e();
    assert_eq!(hole & bits::ADDR_MASK_8, l3.base().raw());
    // User at L4: the host's own lower entries decide each page's rights.
    assert_eq!(hole & (bits::P | bits::US), bits::P | bits::US);
    let slot_of = |root: u64| Maddr::new(root + 510 * 8);

    // A paging-disabled vcpu runs on the p2m's root: the hole is there, and no guest frame
    // can be put under it (that gfn would alias the host's tables).
    let p2m_root = d.p2m().unwrap().root().base().raw();
    assert_eq!(d.host().read_entry(slot_of(p2m_root), 8).unwrap(), hole);
    let under_hole = Gfn::new(510 << 27);
    let spare = d.host_mut().alloc_block(0).unwrap();
    assert!(d.set_p2m(under_hole, Some((spare, P2mType::Ram))).is_err());
    assert_eq!(d.guest_frame(under_hole), None);
    assert!(d.p2m().unwrap().check(d.host()).is_ok());

    four_level_guest(&mut d);
    let root = d.hardware_control(0).unwrap().cr3;
    assert_eq!(d.host().read_entry(slot_of(root), 8).unwrap(), hole);
    access(&mut d, 0, 0x40_0000, USER_WRITE).unwrap();
    clean(&d);

    // The guest points its own L4 entry 510 at a table: the shadow keeps the host's entry.
    let table = bits::P | bits::RW | bits::US;
    gwrite(&mut d, 0x1000 + 510 * 8, 0x2000 | table, 8);
    assert_eq!(d.host().read_entry(slot_of(root), 8).unwrap(), hole);
    let (outcome, _) = d
        .page_fault(0, Gva::new(0xffff_ff00_0000_0000), PfErrorCode(0))
        .unwrap();
    assert!(matches!(outcome, FaultOutcome::Propagate(_)), "{outcome:?}");
    clean(&d);

    // A new top (CR3 switch) and a vcpu's own top (a 2-level guest on vcpu 1) get it too.
    gwrite(&mut d, 0x5000, 0x2000 | table, 8);
    let mut ctl = d.vcpu(0).unwrap().ctl;
    ctl.cr3 = 0x5000;
    d.set_control(0, ctl).unwrap();
    let _ = d.update_cr3(0).unwrap();
    let root = d.hardware_control(0).unwrap().cr3;
    assert_eq!(d.host().read_entry(slot_of(root), 8).unwrap(), hole);
    let two_level = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3: 0x6000,
        ..ControlState::default()
    };
    d.set_control(1, two_level).unwrap();
    let _ = d.update_paging_modes(1).unwrap();
    let root = d.hardware_control(1).unwrap().cr3;
    assert_eq!(d.host().read_entry(slot_of(root), 8).unwrap(), hole);
    clean(&d);
    assert!(d.set_hypervisor_l3(l3).is_err(), "set after shadows exist");

    // The auditor sees a top that lost the entry.
    d.host_mut().write_entry(slot_of(root), 8, 0).unwrap();
    let report = audit(&d);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.what.contains("hypervisor hole entry")),
        "{:?}",
        report.violations
    );
}
