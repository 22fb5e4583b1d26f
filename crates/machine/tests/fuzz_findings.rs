//! Engine bugs the fuzz targets found, each reduced to the calls that show it.
#![allow(clippy::expect_used)]

use shadow2::addr::{Gfn, Gpa, Gva};
use shadow2::domain::{DomainConfig, EngineError};
use shadow2::emulate::{CodeMode, Regs};
use shadow2::paging::{ControlState, PagingLevels, PfErrorCode, bits, bits::cr};
use shadow2_machine::churn::{Guest, Rng};
use shadow2_machine::sim::ShadowMachine;

/// Found by the `emulate` target (an access at 0xffff_8000_0000_0000 by a vcpu with paging
/// off). Outside long mode a linear address has 32 bits, so a host can only pass such an
/// address by mistake; the engine answered `Spurious` every time, and the host retried for
/// ever. A bad argument must be refused, not retried.
#[test]
fn page_fault_above_4_gib_outside_long_mode_is_refused() {
    let config = DomainConfig::hvm(PagingLevels::Four, 1, 256);
    let mut m = ShadowMachine::new(1 << 14, config).expect("machine");
    m.add_ram(Gfn::new(0), 64).expect("RAM");
    let unpaged = ControlState {
        cr0: cr::CR0_PE,
        ..ControlState::default()
    };
    m.set_paging(0, unpaged).expect("paging off");
    let result = m
        .domain_mut()
        .page_fault(0, Gva::new(0xffff_8000_0000_0000), PfErrorCode(0))
        .map(|(outcome, _flush)| outcome);
    assert!(
        matches!(result, Err(EngineError::BadArgument(_))),
        "answered {result:?}"
    );
}

/// The `emulate` target's all-or-nothing check, on the layout it builds for it (a page
/// table mapped writable, a frame beyond RAM on the next page), reduced by hand: an 8-byte
/// store across the two is emulated, the first four bytes land in the L4 (on the entry
/// that maps the kernel's code), the second page is refused, and the guest gets a fault
/// with a page table half written.
#[test]
fn emulated_write_across_a_page_table_and_non_ram_changes_nothing() {
    let config = DomainConfig::hvm(PagingLevels::Four, 1, 256);
    let mut m = ShadowMachine::new(1 << 14, config).expect("machine");
    m.add_ram(Gfn::new(0), 64).expect("RAM");
    let mut rng = Rng::new(1);
    let mut guest = Guest::new(PagingLevels::Four, 64, true);
    guest.install_code(&mut m).expect("code");
    let p = guest.new_process(&mut m, &mut rng).expect("process");
    let l4 = p.cr3 >> 12;
    let va = 0x40_0000u64;
    let flags = bits::P | bits::RW | bits::A | bits::D;
    for (page, frame) in [l4, 64 + 1].into_iter().enumerate() {
        let at = va + 4096 * page as u64;
        let (slot, _) = guest
            .ensure_path(&mut m, &mut rng, &p, at, 1)
            .expect("path");
        guest
            .write_entry_phys(&mut m, slot, frame << 12 | flags)
            .expect("leaf");
    }
    let long_mode = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3: p.cr3,
        cr4: cr::CR4_PAE,
        efer: cr::EFER_LME | cr::EFER_LMA,
        ..ControlState::default()
    };
    m.set_paging(0, long_mode).expect("long mode");
    let last_entry = Gpa::new((l4 << 12) + 0xff8);
    let mut before = [0u8; 8];
    m.read_phys(last_entry, &mut before).expect("read");
    let mut regs = Regs::new(CodeMode::Bits64);
    regs.rip = guest.code_va(); // mov [rdi], rax
    regs.gpr[Regs::RDI] = va + 0xffc;
    regs.gpr[Regs::RAX] = 0xdead_beef_cafe_f00d;
    let result = m.exec(0, &mut regs);
    let mut after = [0u8; 8];
    m.read_phys(last_entry, &mut after).expect("read");
    assert!(result.is_err(), "the store's second page is not RAM");
    let ad = (bits::A | bits::D) as u8;
    assert_eq!(after[0] & !ad, before[0] & !ad, "{result:?}");
    assert_eq!(after[1..], before[1..], "{result:?}: a failed store wrote");
}
