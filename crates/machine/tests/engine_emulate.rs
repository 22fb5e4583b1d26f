//! Guest page-table writes done by real x86 instructions whose bytes sit in guest memory:
//! the simulated CPU executes them through the shadows, the write faults on the read-only
//! shadow of the page table, and the engine's emulator performs it from the instruction
//! bytes. A demand fault then costs exactly two traps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::Gva;
use shadow2::domain::EmulateOutcome;
use shadow2::emulate::{CodeMode, Regs};
use shadow2::paging::{PagingLevels, bits};
use shadow2_machine::sim::GuestError;

const X: u64 = 0x40_5000;
const PT_VA: u64 = 0x80_0000;
const CODE_VA: u64 = 0x60_0000;
const CODE_GFN: u64 = 95;

fn index(levels: PagingLevels, va: u64) -> u64 {
    if levels == PagingLevels::Two {
        (va >> 12) & 1023
    } else {
        (va >> 12) & 511
    }
}

/// The PTE-writing instruction a kernel of this mode uses, and the registers for it.
fn pte_store(levels: PagingLevels, at: u64, pte: u64) -> (Vec<u8>, Regs) {
    let mut regs = Regs::new(if levels == PagingLevels::Four {
        CodeMode::Bits64
    } else {
        CodeMode::Bits32
    });
    regs.rip = CODE_VA;
    regs.gpr[Regs::RDI] = at;
    let code = match levels {
        // mov [rdi], rax
        PagingLevels::Four => {
            regs.gpr[Regs::RAX] = pte;
            vec![0x48, 0x89, 0x07]
        }
        // lock cmpxchg8b [edi]: EDX:EAX = old (0), ECX:EBX = new
        PagingLevels::Three => {
            regs.gpr[Regs::RBX] = pte & 0xffff_ffff;
            regs.gpr[Regs::RCX] = pte >> 32;
            vec![0xf0, 0x0f, 0xc7, 0x0f]
        }
        // mov [edi], eax
        _ => {
            regs.gpr[Regs::RAX] = pte;
            vec![0x89, 0x07]
        }
    };
    (code, regs)
}

#[test]
fn instruction_level_demand_fault_costs_exactly_two_traps() {
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let mut m = machine(hvm(pair.shadow(), 1, 128), 128);
        let mut t = Tables::new(levels, 1, 40);
        let cr3 = t.new_root(0x40);
        let l1 = t.table_of(&mut m, cr3, X, 1);
        t.map(&mut m, cr3, PT_VA, l1, DATA & !bits::US);
        t.map(&mut m, cr3, X - 0x1000, 90, DATA);
        t.map(&mut m, cr3, CODE_VA, CODE_GFN, DATA & !bits::US);
        let pte = (91 << 12) | DATA;
        let at = PT_VA + index(levels, X) * t.entry_bytes();
        let (code, regs) = pte_store(levels, at, pte);
        m.write_phys(shadow2::addr::Gpa::new(CODE_GFN << 12), &code)
            .unwrap();
        set_mode(&mut m, 0, levels, cr3);
        // Warm: the kernel's code, its page-table window and the region are mapped.
        let mut buf = [0u8; 4];
        m.fetch(0, Gva::new(CODE_VA), SUP, &mut buf).unwrap();
        read_u64(&mut m, 0, PT_VA).unwrap();
        read_u64(&mut m, 0, X - 0x1000).unwrap();
        let before = m.traps();
        let emulated = m.domain().stats().emulated_writes;

        // 1: the user access faults for the guest.
        let r = read_u64(&mut m, 0, X);
        assert!(
            matches!(r, Err(GuestError::PageFault { .. })),
            "{pair:?}: {r:?}"
        );
        // 2: the kernel's store instruction writes the PTE: emulated from its bytes.
        let mut regs = regs;
        m.exec(0, &mut regs).unwrap();
        assert_eq!(regs.rip, CODE_VA + code.len() as u64, "{pair:?}");
        assert_eq!(
            t.read(&m, (l1 << 12) + index(levels, X) * t.entry_bytes()),
            pte
        );
        // 3: the retry succeeds without a trap.
        write_u64(&mut m, 0, X, 0x91).unwrap();
        assert_eq!(phys_u64(&m, 91 << 12), 0x91);
        let after = m.traps();
        assert_eq!(after.propagated, before.propagated + 1, "{pair:?}");
        assert_eq!(
            after.emulated_writes,
            before.emulated_writes + 1,
            "{pair:?}"
        );
        assert_eq!(
            after.total(),
            before.total() + 2,
            "{pair:?}: {before:?} -> {after:?}"
        );
        assert_eq!(m.domain().stats().emulated_writes, emulated + 1, "{pair:?}");
        check(&m);
    }
}

#[test]
fn an_instruction_the_emulator_cannot_do_unshadows_the_page_and_the_retry_writes_natively() {
    let mut m = machine(hvm(PagingLevels::Four, 1, 128), 128);
    let mut t = Tables::new(PagingLevels::Four, 1, 40);
    let cr3 = t.new_root(0);
    let l1 = t.table_of(&mut m, cr3, X, 1);
    t.map(&mut m, cr3, PT_VA, l1, DATA & !bits::US);
    t.map(&mut m, cr3, CODE_VA, CODE_GFN, DATA & !bits::US);
    t.map(&mut m, cr3, X - 0x1000, 90, DATA);
    // inc qword [rdi]: a real write the emulator does not handle.
    m.write_phys(shadow2::addr::Gpa::new(CODE_GFN << 12), &[0x48, 0xff, 0x07])
        .unwrap();
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    read_u64(&mut m, 0, PT_VA).unwrap();
    read_u64(&mut m, 0, X - 0x1000).unwrap();
    let l1_mfn = mfn_of(&m, l1);
    assert!(m.domain().shadows().is_page_table(l1_mfn));
    let mut regs = Regs::new(CodeMode::Bits64);
    regs.rip = CODE_VA;
    regs.gpr[Regs::RDI] = PT_VA + 8 * index(PagingLevels::Four, X);
    let gpa = shadow2::addr::Gpa::new((l1 << 12) + 8 * index(PagingLevels::Four, X));
    let before = regs;
    let (outcome, flush) = m.domain_mut().emulate(0, &mut regs, gpa).unwrap();
    m.settle(flush);
    assert_eq!(outcome, EmulateOutcome::Unshadowed);
    assert_eq!(
        regs, before,
        "registers untouched: the guest retries the instruction"
    );
    assert_eq!(m.domain().stats().emulation_failures, 1);
    assert!(!m.domain().shadows().is_page_table(l1_mfn));
    // The retried instruction now writes the page directly: at most one fill (the old
    // read-only shadow entry regains write access lazily), no emulation.
    let traps = m.traps();
    write_u64(&mut m, 0, PT_VA + 8 * index(PagingLevels::Four, X), 7).unwrap();
    assert_eq!(m.traps().emulated_writes, traps.emulated_writes);
    assert!(m.traps().total() <= traps.total() + 1);
    write_u64(&mut m, 0, PT_VA + 8 * index(PagingLevels::Four, X), 8).unwrap();
    assert!(m.traps().total() <= traps.total() + 1);
    check(&m);
}

#[test]
fn a_fault_during_emulation_reaches_the_guest_with_its_address() {
    let mut m = machine(hvm(PagingLevels::Four, 1, 128), 128);
    let mut t = Tables::new(PagingLevels::Four, 1, 40);
    let cr3 = t.new_root(0);
    let l1 = t.table_of(&mut m, cr3, X, 1);
    t.map(&mut m, cr3, PT_VA, l1, DATA & !bits::US);
    t.map(&mut m, cr3, CODE_VA, CODE_GFN, DATA & !bits::US);
    // rep stosq over 2 pages: the page table, then an unmapped page.
    m.write_phys(shadow2::addr::Gpa::new(CODE_GFN << 12), &[0xf3, 0x48, 0xab])
        .unwrap();
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    let mut regs = Regs::new(CodeMode::Bits64);
    regs.rip = CODE_VA;
    regs.gpr[Regs::RDI] = PT_VA;
    regs.gpr[Regs::RCX] = 1024;
    let r = m.exec(0, &mut regs);
    assert!(
        matches!(r, Err(GuestError::PageFault { va, code }) if va == Gva::new(PT_VA + 4096) && code.write()),
        "{r:?}"
    );
    // The first page (the whole L1) was zeroed by one emulated chunk; the registers say how
    // far the REP got, as after an interrupted REP.
    assert_eq!(regs.gpr[Regs::RCX], 512);
    assert_eq!(regs.gpr[Regs::RDI], PT_VA + 4096);
    assert_eq!(regs.rip, CODE_VA);
    check(&m);
}

/// A data write through a page that maps its own page table (the L1 entry for `SELF_VA`
/// points at that L1) rewrites the very entry its translation used. The walk, and the A/D
/// bits it sets, come before the data write (SDM 4.8): the oracle must judge the access by
/// the tables as they were, not by the tables the write produced (found by a 10M-op soak,
/// 2on3, where the written PDE pointed outside RAM).
#[test]
fn an_emulated_write_that_clears_its_own_leaf_is_judged_by_the_tables_before_it() {
    const SELF_VA: u64 = 0x40_4000;
    for pair in PAGING_PAIRS {
        let levels = pair.guest();
        let mut m = machine(hvm(pair.shadow(), 1, 128), 128);
        let mut t = Tables::new(levels, 1, 40);
        let cr3 = t.new_root(0x40);
        let l1 = t.table_of(&mut m, cr3, SELF_VA, 1);
        let own_entry = t.map(&mut m, cr3, SELF_VA, l1, DATA);
        set_mode(&mut m, 0, levels, cr3);
        // The read shadows the L1, so the write below is emulated.
        read_u64(&mut m, 0, SELF_VA).unwrap();
        let own_offset = own_entry & 0xfff & !7;
        write_u64(&mut m, 0, SELF_VA + own_offset, 0).unwrap();
        assert_eq!(t.read(&m, own_entry), 0, "{pair:?}");
        assert!(m.traps().emulated_writes > 0, "{pair:?}: not emulated");
        let r = read_u64(&mut m, 0, SELF_VA);
        assert!(
            matches!(r, Err(GuestError::PageFault { .. })),
            "{pair:?}: the cleared entry still maps: {r:?}"
        );
        check(&m);
    }
}
