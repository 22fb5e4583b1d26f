//! The forms with one memory destination: MOV, MOVNTI, XCHG, CMPXCHG, CMPXCHG8B/16B, the ALU
//! read-modify-writes and BTS/BTR/BTC, in 64-, 32- and 16-bit mode.

use iced_x86::code_asm::*;

use super::*;
use crate::emulate::flags::{AF, ARITH, CF, OF, PF, SF, ZF};
use crate::emulate::{AluOp, BitOp, Form};
use alloc::vec;

const RAX: usize = Regs::RAX;
const RCX: usize = Regs::RCX;
const RDX: usize = Regs::RDX;
const RBX: usize = Regs::RBX;
const RSI: usize = Regs::RSI;
const RDI: usize = Regs::RDI;

/// A MOV-like case: code, register setup, and the expected bytes at `at`.
struct Store {
    name: &'static str,
    code: Vec<u8>,
    regs: Vec<(usize, u64)>,
    at: u64,
    expect: Vec<u8>,
}

/// Runs store cases: memory around each target is pre-filled with 0xAA, and after the
/// instruction exactly `expect` is written at `at`, the registers other than RIP unchanged.
fn check_stores(mode: CodeMode, cases: Vec<Store>, tweak: impl Fn(&mut Regs)) {
    for case in cases {
        let (mut regs, mut mem) = setup(mode, &case.code);
        tweak(&mut regs);
        for &(r, v) in &case.regs {
            regs.gpr[r] = v;
        }
        mem.load(case.at - 16, &[0xAA; 48]);
        let before = regs;
        let done = run(&mut regs, &mut mem);
        assert_eq!(done.instruction_len, case.code.len(), "{}", case.name);
        assert!(done.complete, "{}", case.name);
        assert_eq!(done.writes.as_slice().len(), 1, "{}", case.name);
        let w = done.writes.as_slice()[0];
        assert_eq!((w.va, w.len), (case.at, case.expect.len()), "{}", case.name);
        assert_eq!(
            mem.get(case.at, case.expect.len()),
            case.expect,
            "{}",
            case.name
        );
        assert_eq!(mem.get(case.at - 16, 16), [0xAA; 16], "{}", case.name);
        let after_end = case.at + case.expect.len() as u64;
        assert_eq!(mem.get(after_end, 16), [0xAA; 16], "{}", case.name);
        assert_eq!(regs.gpr, before.gpr, "{}", case.name);
        assert_eq!(regs.rflags, before.rflags, "{}", case.name);
    }
}

fn le(v: u64, n: usize) -> Vec<u8> {
    v.to_le_bytes()[..n].to_vec()
}

const V: u64 = 0x1122_3344_5566_7788;

#[test]
fn mov_forms_64() {
    let ip = CODE;
    let base = vec![(RAX, V), (RDI, DATA)];
    let cases = vec![
        Store {
            name: "mov [rdi], rax",
            code: asm(64, ip, |a| a.mov(qword_ptr(rdi), rax)),
            regs: base.clone(),
            at: DATA,
            expect: le(V, 8),
        },
        Store {
            name: "mov [rdi], eax",
            code: asm(64, ip, |a| a.mov(dword_ptr(rdi), eax)),
            regs: base.clone(),
            at: DATA,
            expect: le(V, 4),
        },
        Store {
            name: "mov [rdi], ax",
            code: asm(64, ip, |a| a.mov(word_ptr(rdi), ax)),
            regs: base.clone(),
            at: DATA,
            expect: le(V, 2),
        },
        Store {
            name: "mov [rdi], al",
            code: asm(64, ip, |a| a.mov(byte_ptr(rdi), al)),
            regs: base.clone(),
            at: DATA,
            expect: vec![0x88],
        },
        Store {
            name: "mov [rdi], ah",
            code: asm(64, ip, |a| a.mov(byte_ptr(rdi), ah)),
            regs: base.clone(),
            at: DATA,
            expect: vec![0x77],
        },
        Store {
            name: "mov [rdi], sil",
            code: asm(64, ip, |a| a.mov(byte_ptr(rdi), sil)),
            regs: vec![(RSI, 0x5A), (RDI, DATA)],
            at: DATA,
            expect: vec![0x5A],
        },
        Store {
            name: "mov [rdi+r8*8+0x10], r9",
            code: asm(64, ip, |a| a.mov(qword_ptr(rdi + r8 * 8 + 0x10), r9)),
            regs: vec![(RDI, DATA), (8, 2), (9, 0xDEAD_BEEF_0000_0067)],
            at: DATA + 0x20,
            expect: le(0xDEAD_BEEF_0000_0067, 8),
        },
        Store {
            name: "mov [rdi-8], rax (negative displacement)",
            code: asm(64, ip, |a| a.mov(qword_ptr(rdi - 8), rax)),
            regs: base.clone(),
            at: DATA - 8,
            expect: le(V, 8),
        },
        Store {
            name: "mov qword [rdi], -1 (imm32 sign-extended)",
            code: asm(64, ip, |a| a.mov(qword_ptr(rdi), -1)),
            regs: base.clone(),
            at: DATA,
            expect: le(u64::MAX, 8),
        },
        Store {
            name: "mov dword [rdi], imm32",
            code: asm(64, ip, |a| a.mov(dword_ptr(rdi), 0x8000_0067u32)),
            regs: base.clone(),
            at: DATA,
            expect: le(0x8000_0067, 4),
        },
        Store {
            name: "mov word [rdi], imm16",
            code: asm(64, ip, |a| a.mov(word_ptr(rdi), 0x1234)),
            regs: base.clone(),
            at: DATA,
            expect: le(0x1234, 2),
        },
        Store {
            name: "mov byte [rdi], imm8",
            code: asm(64, ip, |a| a.mov(byte_ptr(rdi), 0x5A)),
            regs: base.clone(),
            at: DATA,
            expect: vec![0x5A],
        },
        Store {
            name: "mov [moffs64], rax",
            code: [&[0x48, 0xA3][..], &DATA.to_le_bytes()].concat(),
            regs: base.clone(),
            at: DATA,
            expect: le(V, 8),
        },
        Store {
            // 48 89 05 disp32: RIP-relative from the end of the 7-byte instruction.
            name: "mov [rip+disp32], rax",
            code: [
                &[0x48, 0x89, 0x05][..],
                &((DATA + 0x40).wrapping_sub(CODE + 7) as u32).to_le_bytes(),
            ]
            .concat(),
            regs: base.clone(),
            at: DATA + 0x40,
            expect: le(V, 8),
        },
        Store {
            // 48 89 04 25 disp32: SIB without base or index, sign-extended.
            name: "mov [disp32], rax",
            code: vec![0x48, 0x89, 0x04, 0x25, 0x00, 0x10, 0x00, 0x80],
            regs: base.clone(),
            at: 0xFFFF_FFFF_8000_1000,
            expect: le(V, 8),
        },
        Store {
            // 67 48 89 07: mov [edi], rax: the address is EDI, zero-extended.
            name: "addr32 mov [edi], rax",
            code: vec![0x67, 0x48, 0x89, 0x07],
            regs: vec![(RAX, V), (RDI, 0xFFFF_FFFF_0000_0000 | DATA)],
            at: DATA,
            expect: le(V, 8),
        },
        Store {
            // 3E 48 89 07: a DS override means nothing in 64-bit mode.
            name: "ds: mov [rdi], rax",
            code: vec![0x3E, 0x48, 0x89, 0x07],
            regs: base.clone(),
            at: DATA,
            expect: le(V, 8),
        },
    ];
    check_stores(CodeMode::Bits64, cases, |_| {});
}

#[test]
fn mov_with_fs_and_gs_bases_64() {
    let cases = vec![
        Store {
            name: "mov gs:[rdi], rax",
            code: asm(64, CODE, |a| a.mov(qword_ptr(rdi).gs(), rax)),
            regs: vec![(RAX, V), (RDI, 0x18)],
            at: DATA + 0x18,
            expect: le(V, 8),
        },
        Store {
            name: "mov fs:[0x20], eax",
            code: asm(64, CODE, |a| a.mov(dword_ptr(0x20).fs(), eax)),
            regs: vec![(RAX, V)],
            at: 0x7000_0000_0020,
            expect: le(V, 4),
        },
    ];
    check_stores(CodeMode::Bits64, cases, |r| {
        r.gs_base = DATA;
        r.fs_base = 0x7000_0000_0000;
    });
}

#[test]
fn mov_forms_32() {
    let ip = CODE;
    let base = vec![(RAX, 0xFFFF_FFFF_8765_4321), (RDI, DATA)];
    let cases = vec![
        Store {
            name: "mov [edi], eax",
            code: asm(32, ip, |a| a.mov(dword_ptr(edi), eax)),
            regs: base.clone(),
            at: DATA,
            expect: le(0x8765_4321, 4),
        },
        Store {
            name: "mov [edi], ax",
            code: asm(32, ip, |a| a.mov(word_ptr(edi), ax)),
            regs: base.clone(),
            at: DATA,
            expect: le(0x4321, 2),
        },
        Store {
            name: "mov [edi], ah",
            code: asm(32, ip, |a| a.mov(byte_ptr(edi), ah)),
            regs: base.clone(),
            at: DATA,
            expect: vec![0x43],
        },
        Store {
            name: "mov [ebx+ecx*4+8], edx",
            code: asm(32, ip, |a| a.mov(dword_ptr(ebx + ecx * 4 + 8), edx)),
            regs: vec![(RBX, DATA), (RCX, 3), (RDX, 0x0000_1067)],
            at: DATA + 20,
            expect: le(0x1067, 4),
        },
        Store {
            name: "mov dword [edi], imm32",
            code: asm(32, ip, |a| a.mov(dword_ptr(edi), 0x0012_3063u32)),
            regs: base.clone(),
            at: DATA,
            expect: le(0x0012_3063, 4),
        },
        Store {
            name: "mov word [edi], imm16",
            code: asm(32, ip, |a| a.mov(word_ptr(edi), 0xBEEF_u32)),
            regs: base.clone(),
            at: DATA,
            expect: le(0xBEEF, 2),
        },
        Store {
            name: "mov byte [edi], imm8",
            code: asm(32, ip, |a| a.mov(byte_ptr(edi), 0x12)),
            regs: base.clone(),
            at: DATA,
            expect: vec![0x12],
        },
        Store {
            name: "mov [moffs32], eax",
            code: [&[0xA3][..], &(DATA as u32).to_le_bytes()].concat(),
            regs: base.clone(),
            at: DATA,
            expect: le(0x8765_4321, 4),
        },
        Store {
            // The sum wraps at 4 GiB.
            name: "mov [edi+ebx], eax (wrapping)",
            code: asm(32, ip, |a| a.mov(dword_ptr(edi + ebx), eax)),
            regs: vec![(RAX, 1), (RDI, 0xFFFF_F000), (RBX, DATA + 0x1000)],
            at: DATA,
            expect: le(1, 4),
        },
        Store {
            // 67 89 04: mov [si], eax with 16-bit addressing.
            name: "addr16 mov [si], eax",
            code: vec![0x67, 0x89, 0x04],
            regs: vec![(RAX, 0x55), (RSI, 0xABCD_2000)],
            at: 0x2000,
            expect: le(0x55, 4),
        },
    ];
    check_stores(CodeMode::Bits32, cases, |_| {});

    // A 32-bit guest's FS segment base applies too.
    let cases = vec![Store {
        name: "mov fs:[edi], eax",
        code: asm(32, ip, |a| a.mov(dword_ptr(edi).fs(), eax)),
        regs: vec![(RAX, 7), (RDI, 0x100)],
        at: DATA + 0x100,
        expect: le(7, 4),
    }];
    check_stores(CodeMode::Bits32, cases, |r| r.fs_base = DATA);
}

#[test]
fn mov_forms_16() {
    let ip = 0x7C00;
    let cases = vec![
        Store {
            name: "mov [bx+si], ax",
            code: asm(16, ip, |a| a.mov(word_ptr(bx + si), ax)),
            regs: vec![(RAX, 0xFFFF_1234), (RBX, 0x1000), (RSI, 0x0234)],
            at: 0x1234,
            expect: le(0x1234, 2),
        },
        Store {
            name: "mov word [di], imm16",
            code: asm(16, ip, |a| a.mov(word_ptr(di), 0x5678)),
            regs: vec![(RDI, 0x3000)],
            at: 0x3000,
            expect: le(0x5678, 2),
        },
        Store {
            name: "mov [di], eax (operand-size prefix)",
            code: asm(16, ip, |a| a.mov(dword_ptr(di), eax)),
            regs: vec![(RAX, 0x0BAD_F00D), (RDI, 0x3000)],
            at: 0x3000,
            expect: le(0x0BAD_F00D, 4),
        },
        Store {
            name: "mov [bx+si+0x10], al (wrapping at 64 KiB)",
            code: asm(16, ip, |a| a.mov(byte_ptr(bx + si + 0x10), al)),
            regs: vec![(RAX, 0x99), (RBX, 0xFFF0), (RSI, 0x1000)],
            at: 0x1000,
            expect: vec![0x99],
        },
    ];
    for case in cases {
        let (mut regs, mut mem) = setup(CodeMode::Bits16, &[]);
        regs.rip = ip;
        mem.load(ip, &case.code);
        for &(r, v) in &case.regs {
            regs.gpr[r] = v;
        }
        let done = run(&mut regs, &mut mem);
        assert_eq!(regs.rip, ip + case.code.len() as u64, "{}", case.name);
        assert_eq!(done.writes.as_slice()[0].va, case.at, "{}", case.name);
        assert_eq!(
            mem.get(case.at, case.expect.len()),
            case.expect,
            "{}",
            case.name
        );
    }
}

#[test]
fn movnti_64_and_32() {
    let cases = vec![Store {
        name: "movnti [rdi], rax",
        code: asm(64, CODE, |a| a.movnti(qword_ptr(rdi), rax)),
        regs: vec![(RAX, V), (RDI, DATA)],
        at: DATA,
        expect: le(V, 8),
    }];
    check_stores(CodeMode::Bits64, cases, |_| {});
    let cases = vec![Store {
        name: "movnti [edi], eax",
        code: asm(32, CODE, |a| a.movnti(dword_ptr(edi), eax)),
        regs: vec![(RAX, 0x0000_3067), (RDI, DATA)],
        at: DATA,
        expect: le(0x3067, 4),
    }];
    check_stores(CodeMode::Bits32, cases, |_| {});
    let (mut regs, mut mem) = setup(
        CodeMode::Bits64,
        &asm(64, CODE, |a| a.movnti(qword_ptr(rdi), rax)),
    );
    regs.gpr[RDI] = DATA;
    assert_eq!(run(&mut regs, &mut mem).form, Form::Movnti);
}

#[test]
fn xchg_64_and_32() {
    // xchg [rdi], rax
    let code = asm(64, CODE, |a| a.xchg(qword_ptr(rdi), rax));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RAX] = 0x2222_0067;
    regs.gpr[RDI] = DATA;
    mem.put_u64(DATA, 0x1111_0063);
    let done = run(&mut regs, &mut mem);
    assert_eq!(done.form, Form::Xchg);
    assert_eq!(mem.u64_at(DATA), 0x2222_0067);
    assert_eq!(regs.gpr[RAX], 0x1111_0063);
    assert_eq!(regs.rflags, RFLAGS0);

    // xchg [rdi], ecx: the register write zero-extends.
    let code = asm(64, CODE, |a| a.xchg(dword_ptr(rdi), ecx));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RCX] = 0xFFFF_FFFF_0000_0005;
    regs.gpr[RDI] = DATA;
    mem.put_u64(DATA, 0xAAAA_AAAA_0000_0007);
    run(&mut regs, &mut mem);
    assert_eq!(regs.gpr[RCX], 7);
    assert_eq!(mem.u64_at(DATA), 0xAAAA_AAAA_0000_0005);

    // xchg [rdi], bh: a high-byte register keeps the rest of RBX.
    let code = asm(64, CODE, |a| a.xchg(byte_ptr(rdi), bh));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RBX] = 0x1234_5678;
    regs.gpr[RDI] = DATA;
    mem.load(DATA, &[0x9A]);
    run(&mut regs, &mut mem);
    assert_eq!(regs.gpr[RBX], 0x1234_9A78);
    assert_eq!(mem.get(DATA, 1), [0x56]);

    // 32-bit mode: xchg [edi], eax.
    let code = asm(32, CODE, |a| a.xchg(dword_ptr(edi), eax));
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.gpr[RAX] = 0x0010_0067;
    regs.gpr[RDI] = DATA;
    mem.put_u32(DATA, 0x0020_0067);
    run(&mut regs, &mut mem);
    assert_eq!(regs.gpr[RAX], 0x0020_0067);
    assert_eq!(mem.u32_at(DATA), 0x0010_0067);
    // The read was checked for write (an implicitly locked read-modify-write).
    assert_eq!(mem.reads, [(DATA, 4)]);
}

#[test]
fn cmpxchg_64() {
    let code = asm(64, CODE, |a| a.lock().cmpxchg(qword_ptr(rdi), rcx));
    // Success: memory takes RCX, ZF (and PF: the comparison's result is zero) set.
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.rflags = RFLAGS0 | CF | OF | SF | AF;
    regs.gpr[RAX] = 0x1000_0067;
    regs.gpr[RCX] = 0x2000_0067;
    regs.gpr[RDI] = DATA;
    mem.put_u64(DATA, 0x1000_0067);
    let done = run(&mut regs, &mut mem);
    assert_eq!(done.form, Form::Cmpxchg);
    assert_eq!(mem.u64_at(DATA), 0x2000_0067);
    assert_eq!(regs.gpr[RAX], 0x1000_0067);
    assert_eq!(regs.rflags, RFLAGS0 | ZF | PF);

    // Failure: RAX takes memory, memory is written back unchanged; flags of CMP 5, 7.
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.rflags = RFLAGS0 | ZF;
    regs.gpr[RAX] = 5;
    regs.gpr[RCX] = 0x2000_0067;
    regs.gpr[RDI] = DATA;
    mem.put_u64(DATA, 7);
    let done = run(&mut regs, &mut mem);
    assert_eq!(done.writes.as_slice()[0].len, 8);
    assert_eq!(mem.u64_at(DATA), 7);
    assert_eq!(regs.gpr[RAX], 7);
    assert_eq!(regs.rflags, RFLAGS0 | CF | SF | AF);
}

#[test]
fn cmpxchg_32bit_operand_in_64bit_mode() {
    let code = asm(64, CODE, |a| a.lock().cmpxchg(dword_ptr(rdi), ecx));
    // Success leaves RAX's upper half alone (EAX is not written).
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RAX] = 0xDEAD_BEEF_0000_0010;
    regs.gpr[RCX] = 0x20;
    regs.gpr[RDI] = DATA;
    mem.put_u32(DATA, 0x10);
    run(&mut regs, &mut mem);
    assert_eq!(regs.gpr[RAX], 0xDEAD_BEEF_0000_0010);
    assert_eq!(mem.u32_at(DATA), 0x20);
    assert_eq!(regs.rflags & ARITH, ZF | PF);
    // Failure loads EAX, zero-extended.
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RAX] = 0xDEAD_BEEF_0000_0010;
    regs.gpr[RDI] = DATA;
    mem.put_u32(DATA, 0x8000_0000);
    run(&mut regs, &mut mem);
    assert_eq!(regs.gpr[RAX], 0x8000_0000);
    // 0x10 - 0x80000000: borrow, and a positive minus a negative overflowing to negative.
    assert_eq!(regs.rflags & ARITH, CF | SF | OF);
}

#[test]
fn cmpxchg_8_and_16_bit() {
    // cmpxchg [rdi], cl failing: AL takes the byte, the rest of RAX stays.
    let code = asm(64, CODE, |a| a.lock().cmpxchg(byte_ptr(rdi), cl));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RAX] = 0x1234_5601;
    regs.gpr[RCX] = 0x99;
    regs.gpr[RDI] = DATA;
    mem.load(DATA, &[0x81]);
    run(&mut regs, &mut mem);
    assert_eq!(regs.gpr[RAX], 0x1234_5681);
    assert_eq!(mem.get(DATA, 1), [0x81]);
    // 0x01 - 0x81 = 0x80: borrow, overflow (1 - (-127) = 128), negative.
    assert_eq!(regs.rflags & ARITH, CF | OF | SF);

    // 32-bit mode, cmpxchg [edi], cx succeeding.
    let code = asm(32, CODE, |a| a.lock().cmpxchg(word_ptr(edi), cx));
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.gpr[RAX] = 0xFFFF_0063;
    regs.gpr[RCX] = 0x0067;
    regs.gpr[RDI] = DATA;
    mem.load(DATA, &[0x63, 0x00, 0xEE]);
    run(&mut regs, &mut mem);
    assert_eq!(mem.get(DATA, 3), [0x67, 0x00, 0xEE]);
    assert_eq!(regs.rflags & ARITH, ZF | PF);
}

#[test]
fn cmpxchg_32() {
    let code = asm(32, CODE, |a| a.lock().cmpxchg(dword_ptr(edi), ecx));
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.gpr[RAX] = 0x0010_0067;
    regs.gpr[RCX] = 0x0010_0065;
    regs.gpr[RDI] = DATA;
    mem.put_u32(DATA, 0x0010_0067);
    run(&mut regs, &mut mem);
    assert_eq!(mem.u32_at(DATA), 0x0010_0065);
    assert_eq!(regs.rflags & ARITH, ZF | PF);

    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.gpr[RAX] = 0x0010_0067;
    regs.gpr[RCX] = 0x0010_0065;
    regs.gpr[RDI] = DATA;
    mem.put_u32(DATA, 0x0010_0027);
    run(&mut regs, &mut mem);
    assert_eq!(mem.u32_at(DATA), 0x0010_0027);
    assert_eq!(regs.gpr[RAX], 0x0010_0027);
    // 0x67 - 0x27 = 0x40: no borrow, one bit set (odd parity).
    assert_eq!(regs.rflags & ARITH, 0);
}

#[test]
fn cmpxchg8b_32bit_pae_pte() {
    let code = asm(32, CODE, |a| a.lock().cmpxchg8b(qword_ptr(edi)));
    // Success: EDX:EAX matches, ECX:EBX stored, ZF set, other flags untouched.
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.rflags = RFLAGS0 | CF | SF;
    regs.gpr[RDX] = 0x8000_0001;
    regs.gpr[RAX] = 0x0000_0067;
    regs.gpr[RCX] = 0x0000_0002;
    regs.gpr[RBX] = 0x0000_0063;
    regs.gpr[RDI] = DATA + 8;
    mem.put_u64(DATA + 8, 0x8000_0001_0000_0067);
    let done = run(&mut regs, &mut mem);
    assert_eq!(done.form, Form::Cmpxchg8b);
    assert_eq!(done.writes.as_slice()[0].len, 8);
    assert_eq!(mem.u64_at(DATA + 8), 0x0000_0002_0000_0063);
    assert_eq!(regs.rflags, RFLAGS0 | CF | SF | ZF);
    assert_eq!((regs.gpr[RDX], regs.gpr[RAX]), (0x8000_0001, 0x67));

    // Failure: EDX:EAX loaded, ZF cleared, memory unchanged.
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.rflags = RFLAGS0 | ZF | PF;
    regs.gpr[RDX] = 0x8000_0001;
    regs.gpr[RAX] = 0x0000_0067;
    regs.gpr[RCX] = 0x0000_0002;
    regs.gpr[RBX] = 0x0000_0063;
    regs.gpr[RDI] = DATA + 8;
    mem.put_u64(DATA + 8, 0x0000_0003_0000_0001);
    run(&mut regs, &mut mem);
    assert_eq!(mem.u64_at(DATA + 8), 0x0000_0003_0000_0001);
    assert_eq!((regs.gpr[RDX], regs.gpr[RAX]), (3, 1));
    assert_eq!(regs.rflags, RFLAGS0 | PF);
}

#[test]
fn cmpxchg8b_in_64bit_mode_zero_extends_on_failure() {
    let code = asm(64, CODE, |a| a.lock().cmpxchg8b(qword_ptr(rdi)));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDX] = 0xFFFF_FFFF_0000_0000;
    regs.gpr[RAX] = 0xFFFF_FFFF_0000_0000;
    regs.gpr[RDI] = DATA;
    mem.put_u64(DATA, 0x0000_0005_0000_0006);
    run(&mut regs, &mut mem);
    assert_eq!((regs.gpr[RDX], regs.gpr[RAX]), (5, 6));
    assert_eq!(regs.rflags & ZF, 0);
}

#[test]
fn cmpxchg16b() {
    let code = asm(64, CODE, |a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
    let setup16 = |lo: u64, hi: u64| {
        let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
        regs.gpr[RAX] = 1;
        regs.gpr[RDX] = 2;
        regs.gpr[RBX] = 3;
        regs.gpr[RCX] = 4;
        regs.gpr[RDI] = DATA + 0x10;
        mem.put_u64(DATA + 0x10, lo);
        mem.put_u64(DATA + 0x18, hi);
        (regs, mem)
    };
    let (mut regs, mut mem) = setup16(1, 2);
    let done = run(&mut regs, &mut mem);
    assert_eq!(done.form, Form::Cmpxchg16b);
    assert_eq!(done.writes.as_slice()[0].len, 16);
    assert_eq!((mem.u64_at(DATA + 0x10), mem.u64_at(DATA + 0x18)), (3, 4));
    assert_eq!(regs.rflags & ZF, ZF);

    let (mut regs, mut mem) = setup16(1, 9);
    run(&mut regs, &mut mem);
    assert_eq!((mem.u64_at(DATA + 0x10), mem.u64_at(DATA + 0x18)), (1, 9));
    assert_eq!((regs.gpr[RAX], regs.gpr[RDX]), (1, 9));
    assert_eq!(regs.rflags & ZF, 0);

    // A misaligned operand raises #GP.
    let (mut regs, mut mem) = setup16(1, 2);
    regs.gpr[RDI] = DATA + 8;
    assert_eq!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::GeneralProtection))
    );
}

/// An ALU case: code, memory before, source register value, memory after and the flags.
struct Alu {
    name: &'static str,
    code: Vec<u8>,
    form: AluOp,
    width: usize,
    before: u64,
    src: u64,
    after: u64,
    flags: u64,
}

fn check_alu(mode: CodeMode, cases: Vec<Alu>) {
    for case in cases {
        for start_flags in [0, ARITH] {
            let (mut regs, mut mem) = setup(mode, &case.code);
            regs.rflags = RFLAGS0 | start_flags;
            regs.gpr[RDI] = DATA;
            regs.gpr[RCX] = case.src;
            mem.put_u64(DATA, 0xAAAA_AAAA_AAAA_AAAA);
            mem.load(DATA, &case.before.to_le_bytes()[..case.width]);
            let done = run(&mut regs, &mut mem);
            assert_eq!(done.form, Form::Alu(case.form), "{}", case.name);
            let mut expect = 0xAAAA_AAAA_AAAA_AAAAu64.to_le_bytes();
            expect[..case.width].copy_from_slice(&case.after.to_le_bytes()[..case.width]);
            assert_eq!(mem.get(DATA, 8), expect, "{}", case.name);
            assert_eq!(regs.rflags, RFLAGS0 | case.flags, "{}", case.name);
            assert_eq!(regs.gpr[RCX], case.src, "{}", case.name);
        }
    }
}

#[test]
fn lock_alu_64() {
    let ip = CODE;
    let cases = vec![
        Alu {
            name: "lock or [rdi], rcx",
            code: asm(64, ip, |a| a.lock().or(qword_ptr(rdi), rcx)),
            form: AluOp::Or,
            width: 8,
            before: 0x1000,
            src: 0x67,
            after: 0x1067,
            flags: 0,
        },
        Alu {
            name: "lock and qword [rdi], -2",
            code: asm(64, ip, |a| a.lock().and(qword_ptr(rdi), -2)),
            form: AluOp::And,
            width: 8,
            before: 0x1067,
            src: 0,
            after: 0x1066,
            flags: PF,
        },
        Alu {
            name: "lock and qword [rdi], imm32 (sign-extended)",
            code: asm(64, ip, |a| a.lock().and(qword_ptr(rdi), 0x7FFF_FFFF)),
            form: AluOp::And,
            width: 8,
            before: 0xFFFF_FFFF_FFFF_FFFF,
            src: 0,
            after: 0x7FFF_FFFF,
            flags: PF,
        },
        Alu {
            name: "lock xor [rdi], rcx",
            code: asm(64, ip, |a| a.lock().xor(qword_ptr(rdi), rcx)),
            form: AluOp::Xor,
            width: 8,
            before: 0x8000_0000_0000_0001,
            src: 1,
            after: 0x8000_0000_0000_0000,
            flags: SF | PF,
        },
        Alu {
            name: "lock add [rdi], rcx (carry out)",
            code: asm(64, ip, |a| a.lock().add(qword_ptr(rdi), rcx)),
            form: AluOp::Add,
            width: 8,
            before: u64::MAX,
            src: 1,
            after: 0,
            flags: CF | ZF | PF | AF,
        },
        Alu {
            name: "lock add dword [rdi], 1 (signed overflow)",
            code: asm(64, ip, |a| a.lock().add(dword_ptr(rdi), 1)),
            form: AluOp::Add,
            width: 4,
            before: 0x7FFF_FFFF,
            src: 0,
            after: 0x8000_0000,
            flags: OF | SF | AF | PF,
        },
        Alu {
            name: "lock add byte [rdi], cl",
            code: asm(64, ip, |a| a.lock().add(byte_ptr(rdi), cl)),
            form: AluOp::Add,
            width: 1,
            before: 0x7F,
            src: 1,
            after: 0x80,
            flags: OF | SF | AF,
        },
        Alu {
            name: "lock sub [rdi], rcx (borrow)",
            code: asm(64, ip, |a| a.lock().sub(qword_ptr(rdi), rcx)),
            form: AluOp::Sub,
            width: 8,
            before: 0,
            src: 1,
            after: u64::MAX,
            flags: CF | SF | AF | PF,
        },
        Alu {
            name: "lock sub word [rdi], 0x10",
            code: asm(64, ip, |a| a.lock().sub(word_ptr(rdi), 0x10)),
            form: AluOp::Sub,
            width: 2,
            before: 0x8005,
            src: 0,
            after: 0x7FF5,
            flags: OF | PF,
        },
        Alu {
            name: "or byte [rdi], 0x80 (no lock)",
            code: asm(64, ip, |a| a.or(byte_ptr(rdi), 0x80)),
            form: AluOp::Or,
            width: 1,
            before: 0x01,
            src: 0,
            after: 0x81,
            flags: SF | PF,
        },
        Alu {
            name: "lock and [rdi], cx",
            code: asm(64, ip, |a| a.lock().and(word_ptr(rdi), cx)),
            form: AluOp::And,
            width: 2,
            before: 0xFF0F,
            src: 0x00F0,
            after: 0,
            flags: ZF | PF,
        },
    ];
    check_alu(CodeMode::Bits64, cases);
}

#[test]
fn lock_alu_32() {
    let ip = CODE;
    let cases = vec![
        Alu {
            name: "lock or dword [edi], 0x20",
            code: asm(32, ip, |a| a.lock().or(dword_ptr(edi), 0x20)),
            form: AluOp::Or,
            width: 4,
            before: 0x1003,
            src: 0,
            after: 0x1023,
            flags: 0,
        },
        Alu {
            name: "lock and [edi], ecx",
            code: asm(32, ip, |a| a.lock().and(dword_ptr(edi), ecx)),
            form: AluOp::And,
            width: 4,
            before: 0x8000_0067,
            src: 0xFFFF_FFFD,
            after: 0x8000_0065,
            flags: SF | PF,
        },
        Alu {
            name: "lock xor dword [edi], imm32",
            code: asm(32, ip, |a| a.lock().xor(dword_ptr(edi), 0x0100_0000)),
            form: AluOp::Xor,
            width: 4,
            before: 0x0100_0000,
            src: 0,
            after: 0,
            flags: ZF | PF,
        },
        Alu {
            name: "lock add [edi], ecx",
            code: asm(32, ip, |a| a.lock().add(dword_ptr(edi), ecx)),
            form: AluOp::Add,
            width: 4,
            before: 0x8000_0000,
            src: 0x8000_0000,
            after: 0,
            flags: CF | OF | ZF | PF,
        },
        Alu {
            name: "lock sub dword [edi], 1",
            code: asm(32, ip, |a| a.lock().sub(dword_ptr(edi), 1)),
            form: AluOp::Sub,
            width: 4,
            before: 0x10,
            src: 0,
            after: 0xF,
            flags: AF | PF,
        },
        Alu {
            // 82 /1 ib: the 32-bit-only alias of 80 /1 ib, with LOCK.
            name: "lock or byte [edi], 1 (opcode 82)",
            code: vec![0xF0, 0x82, 0x0F, 0x01],
            form: AluOp::Or,
            width: 1,
            before: 0x02,
            src: 0,
            after: 0x03,
            flags: PF,
        },
    ];
    check_alu(CodeMode::Bits32, cases);
}

/// A bit-test case: code, source (bit offset) register, address of the operand actually
/// accessed, memory before and after, and the old bit.
struct Bit {
    name: &'static str,
    code: Vec<u8>,
    op: BitOp,
    offset: u64,
    at: u64,
    width: usize,
    before: u64,
    after: u64,
    cf: bool,
}

fn check_bits(mode: CodeMode, cases: Vec<Bit>) {
    for case in cases {
        let (mut regs, mut mem) = setup(mode, &case.code);
        regs.rflags = RFLAGS0 | ZF | SF | if case.cf { 0 } else { CF };
        regs.gpr[RDI] = DATA;
        regs.gpr[RCX] = case.offset;
        mem.load(case.at - 8, &[0xEE; 24]);
        mem.load(case.at, &case.before.to_le_bytes()[..case.width]);
        let done = run(&mut regs, &mut mem);
        assert_eq!(done.form, Form::Bit(case.op), "{}", case.name);
        let w = done.writes.as_slice()[0];
        assert_eq!((w.va, w.len), (case.at, case.width), "{}", case.name);
        assert_eq!(
            mem.get(case.at, case.width),
            case.after.to_le_bytes()[..case.width],
            "{}",
            case.name
        );
        assert_eq!(mem.get(case.at - 8, 8), [0xEE; 8], "{}", case.name);
        let cf = if case.cf { CF } else { 0 };
        // CF is the old bit; ZF and the undefined flags are kept.
        assert_eq!(regs.rflags, RFLAGS0 | ZF | SF | cf, "{}", case.name);
    }
}

#[test]
fn bit_ops_64() {
    let ip = CODE;
    let cases = vec![
        Bit {
            name: "lock bts [rdi], rcx = 70: the next qword, bit 6",
            code: asm(64, ip, |a| a.lock().bts(qword_ptr(rdi), rcx)),
            op: BitOp::Set,
            offset: 70,
            at: DATA + 8,
            width: 8,
            before: 0x1,
            after: 0x41,
            cf: false,
        },
        Bit {
            name: "lock bts [rdi], rcx: bit already set",
            code: asm(64, ip, |a| a.lock().bts(qword_ptr(rdi), rcx)),
            op: BitOp::Set,
            offset: 0,
            at: DATA,
            width: 8,
            before: 0x1,
            after: 0x1,
            cf: true,
        },
        Bit {
            name: "lock btr [rdi], rcx = -1: the previous qword, bit 63",
            code: asm(64, ip, |a| a.lock().btr(qword_ptr(rdi), rcx)),
            op: BitOp::Reset,
            offset: u64::MAX,
            at: DATA - 8,
            width: 8,
            before: 0x8000_0000_0000_0001,
            after: 0x1,
            cf: true,
        },
        Bit {
            name: "lock btr [rdi], rcx = -65: two qwords down, bit 63",
            code: asm(64, ip, |a| a.lock().btr(qword_ptr(rdi), rcx)),
            op: BitOp::Reset,
            offset: (-65i64) as u64,
            at: DATA - 16,
            width: 8,
            before: 0x7FFF_FFFF_FFFF_FFFF,
            after: 0x7FFF_FFFF_FFFF_FFFF,
            cf: false,
        },
        Bit {
            name: "lock btc [rdi], rcx = 4096*8+3: next page",
            code: asm(64, ip, |a| a.lock().btc(qword_ptr(rdi), rcx)),
            op: BitOp::Complement,
            offset: 4096 * 8 + 3,
            at: DATA + 4096,
            width: 8,
            before: 0xF,
            after: 0x7,
            cf: true,
        },
        Bit {
            name: "lock bts [rdi], ecx = -33: 32-bit operand, 8 bytes down, bit 31",
            code: asm(64, ip, |a| a.lock().bts(dword_ptr(rdi), ecx)),
            op: BitOp::Set,
            // The upper half of RCX is ignored: the offset is ECX, signed.
            offset: 0x1234_5678_FFFF_FFDF,
            at: DATA - 8,
            width: 4,
            before: 0,
            after: 0x8000_0000,
            cf: false,
        },
        Bit {
            name: "bts [rdi], cx = -1: 16-bit operand, 2 bytes down, bit 15",
            code: asm(64, ip, |a| a.bts(word_ptr(rdi), cx)),
            op: BitOp::Set,
            offset: 0xFFFF,
            at: DATA - 2,
            width: 2,
            before: 0x0001,
            after: 0x8001,
            cf: false,
        },
        Bit {
            name: "lock bts qword [rdi], 65: an immediate is taken modulo 64",
            code: asm(64, ip, |a| a.lock().bts(qword_ptr(rdi), 65)),
            op: BitOp::Set,
            offset: 0,
            at: DATA,
            width: 8,
            before: 0,
            after: 2,
            cf: false,
        },
        Bit {
            name: "lock btr dword [rdi], 2",
            code: asm(64, ip, |a| a.lock().btr(dword_ptr(rdi), 2)),
            op: BitOp::Reset,
            offset: 0,
            at: DATA,
            width: 4,
            before: 0x67,
            after: 0x63,
            cf: true,
        },
        Bit {
            name: "lock btc word [rdi], 15",
            code: asm(64, ip, |a| a.lock().btc(word_ptr(rdi), 15)),
            op: BitOp::Complement,
            offset: 0,
            at: DATA,
            width: 2,
            before: 0,
            after: 0x8000,
            cf: false,
        },
    ];
    check_bits(CodeMode::Bits64, cases);
}

#[test]
fn bit_ops_32() {
    let ip = CODE;
    let cases = vec![
        Bit {
            name: "lock btc [edi], ecx = -33",
            code: asm(32, ip, |a| a.lock().btc(dword_ptr(edi), ecx)),
            op: BitOp::Complement,
            offset: 0xFFFF_FFDF,
            at: DATA - 8,
            width: 4,
            before: 0x8000_0001,
            after: 0x0000_0001,
            cf: true,
        },
        Bit {
            name: "lock bts [edi], ecx = 40",
            code: asm(32, ip, |a| a.lock().bts(dword_ptr(edi), ecx)),
            op: BitOp::Set,
            offset: 40,
            at: DATA + 4,
            width: 4,
            before: 0,
            after: 0x100,
            cf: false,
        },
        Bit {
            name: "lock btr dword [edi], 1 (the PTE's R/W bit)",
            code: asm(32, ip, |a| a.lock().btr(dword_ptr(edi), 1)),
            op: BitOp::Reset,
            offset: 0,
            at: DATA,
            width: 4,
            before: 0x0012_3067,
            after: 0x0012_3065,
            cf: true,
        },
    ];
    check_bits(CodeMode::Bits32, cases);
}
