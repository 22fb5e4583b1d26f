//! STOS and MOVS, with and without REP: chunking at page boundaries, DF, address sizes,
//! overlapping copies.

use super::*;
use crate::emulate::Form;
use crate::emulate::flags::DF;

const RAX: usize = Regs::RAX;
const RCX: usize = Regs::RCX;
const RSI: usize = Regs::RSI;
const RDI: usize = Regs::RDI;
/// A second data page (the source of copies).
const SRC: u64 = 0x30_0000;

/// Runs the instruction at RIP until it completes; returns the number of calls.
fn run_to_completion(regs: &mut Regs, mem: &mut FakeMem) -> usize {
    for calls in 1..=10_000 {
        if run(regs, mem).complete {
            return calls;
        }
    }
    panic!("REP instruction never completed");
}

fn fill_entries(mem: &mut FakeMem, va: u64, n: u64) {
    for i in 0..n {
        mem.put_u64(va + 8 * i, (i << 12) | 0x67);
    }
}

#[test]
fn rep_stosq_zeroes_a_whole_table_in_one_call() {
    let code = asm(64, CODE, |a| a.rep().stosq());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    fill_entries(&mut mem, DATA, 512);
    regs.gpr[RDI] = DATA;
    regs.gpr[RCX] = 512;
    regs.gpr[RAX] = 0;
    let done = run(&mut regs, &mut mem);
    assert_eq!(done.form, Form::Stos);
    assert!(done.complete);
    assert_eq!(mem.writes, [(DATA, 4096)]);
    assert!(mem.get(DATA, 4096).iter().all(|&b| b == 0));
    assert_eq!(regs.gpr[RCX], 0);
    assert_eq!(regs.gpr[RDI], DATA + 4096);
    assert_eq!(regs.rip, CODE + code.len() as u64);
    assert_eq!(regs.rflags, RFLAGS0);
}

#[test]
fn rep_stosq_downwards() {
    let code = asm(64, CODE, |a| a.rep().stosq());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.rflags |= DF;
    fill_entries(&mut mem, DATA, 512);
    regs.gpr[RDI] = DATA + 4096 - 8;
    regs.gpr[RCX] = 512;
    regs.gpr[RAX] = 0xFFFF_FFFF_FFFF_FFFF;
    let done = run(&mut regs, &mut mem);
    assert!(done.complete);
    assert_eq!(mem.writes, [(DATA, 4096)]);
    assert!(mem.get(DATA, 4096).iter().all(|&b| b == 0xFF));
    assert_eq!(regs.gpr[RDI], DATA - 8);
    assert_eq!(regs.gpr[RCX], 0);
}

#[test]
fn stos_without_rep_steps_once_each_way() {
    for (df, expect_rdi) in [(0, DATA + 8), (DF, DATA - 8)] {
        let code = asm(64, CODE, |a| a.stosq());
        let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
        regs.rflags |= df;
        regs.gpr[RDI] = DATA;
        regs.gpr[RCX] = 77;
        regs.gpr[RAX] = 0x1234_5067;
        run(&mut regs, &mut mem);
        assert_eq!(mem.u64_at(DATA), 0x1234_5067);
        assert_eq!(regs.gpr[RDI], expect_rdi);
        assert_eq!(regs.gpr[RCX], 77);
    }
    // stosb/stosw/stosd write their width.
    for (code, n) in [
        (asm(64, CODE, |a| a.stosb()), 1),
        (asm(64, CODE, |a| a.stosw()), 2),
        (asm(64, CODE, |a| a.stosd()), 4),
    ] {
        let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
        regs.gpr[RDI] = DATA;
        regs.gpr[RAX] = 0x8877_6655_4433_2211;
        let done = run(&mut regs, &mut mem);
        assert_eq!(done.writes.as_slice()[0].len, n);
        assert_eq!(
            mem.get(DATA, 8)[..n],
            0x8877_6655_4433_2211u64.to_le_bytes()[..n]
        );
        assert_eq!(mem.get(DATA + n as u64, 1), [0]);
        assert_eq!(regs.gpr[RDI], DATA + n as u64);
    }
}

#[test]
fn rep_stosb_across_a_page_boundary_is_done_in_chunks() {
    let code = asm(64, CODE, |a| a.rep().stosb());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA + 4096 - 4;
    regs.gpr[RCX] = 10;
    regs.gpr[RAX] = 0x5A;
    // First call: the rest of the first page; RIP stays on the instruction.
    let done = run(&mut regs, &mut mem);
    assert!(!done.complete);
    assert_eq!(regs.rip, CODE);
    assert_eq!(regs.gpr[RCX], 6);
    assert_eq!(regs.gpr[RDI], DATA + 4096);
    assert_eq!(mem.writes, [(DATA + 4092, 4)]);
    // Second call: the rest.
    let done = run(&mut regs, &mut mem);
    assert!(done.complete);
    assert_eq!(regs.rip, CODE + code.len() as u64);
    assert_eq!(regs.gpr[RCX], 0);
    assert_eq!(regs.gpr[RDI], DATA + 4096 + 6);
    assert_eq!(mem.writes, [(DATA + 4092, 4), (DATA + 4096, 6)]);
    assert_eq!(mem.get(DATA + 4092, 10), [0x5A; 10]);
}

#[test]
fn rep_stos_with_zero_count_writes_nothing() {
    let code = asm(64, CODE, |a| a.rep().stosq());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA;
    let done = run(&mut regs, &mut mem);
    assert!(done.complete && done.writes.is_empty());
    assert_eq!(regs.gpr[RDI], DATA);
    assert!(mem.writes.is_empty());
}

#[test]
fn rep_stosd_32() {
    let code = asm(32, CODE, |a| a.rep().stosd());
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    fill_entries(&mut mem, DATA, 512);
    regs.gpr[RDI] = DATA;
    regs.gpr[RCX] = 1024;
    let done = run(&mut regs, &mut mem);
    assert!(done.complete);
    assert_eq!(mem.writes, [(DATA, 4096)]);
    assert!(mem.get(DATA, 4096).iter().all(|&b| b == 0));
    assert_eq!((regs.gpr[RCX], regs.gpr[RDI]), (0, DATA + 4096));
}

#[test]
fn rep_stosq_with_32bit_addresses_in_64bit_mode() {
    // 67 F3 48 AB: rep stosq with ECX and EDI; the updated registers are zero-extended.
    let code = [0x67, 0xF3, 0x48, 0xAB];
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = 0xFFFF_FFFF_0000_0000 | DATA;
    regs.gpr[RCX] = 0xFFFF_FFFF_0000_0002;
    regs.gpr[RAX] = 0x63;
    let done = run(&mut regs, &mut mem);
    assert!(done.complete);
    assert_eq!(mem.writes, [(DATA, 16)]);
    assert_eq!((regs.gpr[RCX], regs.gpr[RDI]), (0, DATA + 16));
}

#[test]
fn rep_stosw_16() {
    let code = asm(16, 0x7C00, |a| a.rep().stosw());
    let (mut regs, mut mem) = setup(CodeMode::Bits16, &[]);
    regs.rip = 0x7C00;
    mem.load(0x7C00, &code);
    regs.gpr[RDI] = 0xAAAA_0000_0000_1000;
    regs.gpr[RCX] = 0xAAAA_0000_0000_0004;
    regs.gpr[RAX] = 0xBEEF;
    run(&mut regs, &mut mem);
    assert_eq!(mem.writes, [(0x1000, 8)]);
    assert_eq!(
        mem.get(0x1000, 8),
        [0xEF, 0xBE, 0xEF, 0xBE, 0xEF, 0xBE, 0xEF, 0xBE]
    );
    // CX and DI change; the rest of RCX and RDI is kept.
    assert_eq!(regs.gpr[RCX], 0xAAAA_0000_0000_0000);
    assert_eq!(regs.gpr[RDI], 0xAAAA_0000_0000_1008);
    assert_eq!(regs.rip, 0x7C00 + code.len() as u64);
}

#[test]
fn rep_movsq_copies_a_whole_table_in_one_call() {
    let code = asm(64, CODE, |a| a.rep().movsq());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    fill_entries(&mut mem, SRC, 512);
    regs.gpr[RSI] = SRC;
    regs.gpr[RDI] = DATA;
    regs.gpr[RCX] = 512;
    let done = run(&mut regs, &mut mem);
    assert_eq!(done.form, Form::Movs);
    assert!(done.complete);
    assert_eq!(mem.reads, [(SRC, 4096)]);
    assert_eq!(mem.writes, [(DATA, 4096)]);
    assert_eq!(mem.get(DATA, 4096), mem.get(SRC, 4096));
    assert_eq!(
        (regs.gpr[RSI], regs.gpr[RDI], regs.gpr[RCX]),
        (SRC + 4096, DATA + 4096, 0)
    );
}

#[test]
fn rep_movsq_with_misaligned_pages_takes_several_chunks() {
    let code = asm(64, CODE, |a| a.rep().movsq());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    fill_entries(&mut mem, SRC + 0xF00, 512);
    regs.gpr[RSI] = SRC + 0xF00;
    regs.gpr[RDI] = DATA;
    regs.gpr[RCX] = 512;
    let calls = run_to_completion(&mut regs, &mut mem);
    // 32 entries to the end of the source page, 480 to the end of the destination page, and
    // none left over.
    assert_eq!(calls, 2);
    assert_eq!(mem.writes, [(DATA, 256), (DATA + 256, 3840)]);
    assert_eq!(mem.get(DATA, 4096), mem.get(SRC + 0xF00, 4096));
    assert_eq!(regs.gpr[RCX], 0);
}

#[test]
fn movs_single_and_downwards_32() {
    // movsb, 64-bit.
    let code = asm(64, CODE, |a| a.movsb());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    mem.load(SRC, &[0x42]);
    regs.gpr[RSI] = SRC;
    regs.gpr[RDI] = DATA;
    run(&mut regs, &mut mem);
    assert_eq!(mem.get(DATA, 2), [0x42, 0]);
    assert_eq!((regs.gpr[RSI], regs.gpr[RDI]), (SRC + 1, DATA + 1));

    // rep movsd downwards in 32-bit mode: 4 dwords ending at the pointers.
    let code = asm(32, CODE, |a| a.rep().movsd());
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.rflags |= DF;
    for i in 0..4u32 {
        mem.put_u32(SRC + 4 * u64::from(i), 0x100 + i);
    }
    regs.gpr[RSI] = SRC + 12;
    regs.gpr[RDI] = DATA + 12;
    regs.gpr[RCX] = 4;
    let done = run(&mut regs, &mut mem);
    assert!(done.complete);
    assert_eq!(mem.writes, [(DATA, 16)]);
    assert_eq!(mem.get(DATA, 16), mem.get(SRC, 16));
    assert_eq!((regs.gpr[RSI], regs.gpr[RDI]), (SRC - 4, DATA - 4));
}

#[test]
fn rep_movsq_with_fs_source() {
    // 64 F3 48 A5: rep movsq with the source in FS.
    let code = [0x64, 0xF3, 0x48, 0xA5];
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.fs_base = SRC;
    fill_entries(&mut mem, SRC + 0x100, 4);
    regs.gpr[RSI] = 0x100;
    regs.gpr[RDI] = DATA;
    regs.gpr[RCX] = 4;
    run(&mut regs, &mut mem);
    assert_eq!(mem.reads, [(SRC + 0x100, 32)]);
    assert_eq!(mem.get(DATA, 32), mem.get(SRC + 0x100, 32));
    assert_eq!(regs.gpr[RSI], 0x120);
}

#[test]
fn overlapping_movs_is_element_by_element() {
    // Copying [DATA, +32) to [DATA+8, +32) forwards replicates the first entry, as the CPU
    // does element by element.
    let code = asm(64, CODE, |a| a.rep().movsq());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    for i in 0..5 {
        mem.put_u64(DATA + 8 * i, i + 1);
    }
    regs.gpr[RSI] = DATA;
    regs.gpr[RDI] = DATA + 8;
    regs.gpr[RCX] = 4;
    let calls = run_to_completion(&mut regs, &mut mem);
    assert_eq!(calls, 4);
    for i in 0..5 {
        assert_eq!(mem.u64_at(DATA + 8 * i), 1);
    }
}

#[test]
fn repne_stos_is_unhandled() {
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &[0xF2, 0x48, 0xAB]);
    regs.gpr[RCX] = 2;
    regs.gpr[RDI] = DATA;
    assert!(matches!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Unhandled(_))
    ));
}
