//! Fetches across pages, writes across pages, faults (registers and memory unchanged) and the
//! instructions the emulator leaves to the caller.

use iced_x86::code_asm::*;

use super::*;

const RAX: usize = Regs::RAX;
const RCX: usize = Regs::RCX;
const RDI: usize = Regs::RDI;

#[test]
fn a_write_across_a_page_boundary_is_one_range() {
    let code = asm(64, CODE, |a| a.mov(qword_ptr(rdi), rax));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA + 4096 - 4;
    regs.gpr[RAX] = 0x8877_6655_4433_2211;
    let done = run(&mut regs, &mut mem);
    assert_eq!(
        done.writes.as_slice(),
        [crate::emulate::Write {
            va: DATA + 4092,
            len: 8
        }]
    );
    assert_eq!(mem.writes, [(DATA + 4092, 8)]);
    assert_eq!(mem.u64_at(DATA + 4092), 0x8877_6655_4433_2211);

    // A misaligned CMPXCHG8B straddling two PAE entries, in 32-bit mode.
    let code = asm(32, CODE, |a| a.lock().cmpxchg8b(qword_ptr(edi)));
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.gpr[RDI] = DATA + 4;
    regs.gpr[Regs::RBX] = 0x67;
    run(&mut regs, &mut mem);
    assert_eq!(mem.writes, [(DATA + 4, 8)]);
    assert_eq!(mem.u64_at(DATA + 4), 0x67);
}

#[test]
fn an_instruction_across_a_page_boundary_is_fetched_in_two_parts() {
    // mov qword [rdi+0x10], 0x12345678: 8 bytes, 3 on the first page.
    let code = asm(64, 0, |a| a.mov(qword_ptr(rdi + 0x10), 0x1234_5678));
    assert_eq!(code.len(), 8);
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &[]);
    regs.rip = CODE + 4096 - 3;
    mem.load(regs.rip, &code);
    regs.gpr[RDI] = DATA;
    let done = run(&mut regs, &mut mem);
    assert_eq!(done.instruction_len, 8);
    assert_eq!(mem.fetches, [(CODE + 4093, 3), (CODE + 4096, 12)]);
    assert_eq!(mem.u64_at(DATA + 0x10), 0x1234_5678);
    assert_eq!(regs.rip, CODE + 4096 + 5);
}

#[test]
fn an_instruction_ending_before_an_unmapped_page_does_not_fault() {
    let code = asm(64, 0, |a| a.mov(qword_ptr(rdi), rax));
    assert_eq!(code.len(), 3);
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &[]);
    regs.rip = CODE + 4096 - 3;
    mem.load(regs.rip, &code);
    mem.unmap(CODE + 4096);
    regs.gpr[RDI] = DATA;
    regs.gpr[RAX] = 5;
    run(&mut regs, &mut mem);
    assert_eq!(mem.fetches, [(CODE + 4093, 3)]);
    assert_eq!(mem.u64_at(DATA), 5);
    assert_eq!(regs.rip, CODE + 4096);
}

#[test]
fn an_instruction_running_into_an_unmapped_page_faults_there() {
    let code = asm(64, 0, |a| a.mov(qword_ptr(rdi + 0x10), 0x1234_5678));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &[]);
    regs.rip = CODE + 4096 - 3;
    mem.load(regs.rip, &code[..3]);
    mem.unmap(CODE + 4096);
    regs.gpr[RDI] = DATA;
    assert_eq!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::PageFault {
            va: CODE + 4096,
            code: PF_I
        }))
    );
    // And a fetch from an unmapped page faults at RIP.
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &[]);
    mem.unmap(CODE);
    assert_eq!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::PageFault {
            va: CODE,
            code: PF_I
        }))
    );
}

#[test]
fn a_fault_in_the_write_leaves_registers_and_memory_unchanged() {
    // XCHG into a read-only page: the read-for-write already faults with W set.
    let code = asm(64, CODE, |a| a.xchg(qword_ptr(rdi), rax));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA;
    regs.gpr[RAX] = 1;
    mem.put_u64(DATA, 2);
    mem.protect(DATA);
    assert_eq!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::PageFault {
            va: DATA,
            code: PF_W | PF_P
        }))
    );
    assert_eq!(mem.u64_at(DATA), 2);

    // A MOV straddling into an unmapped page: CR2 is the first byte of that page, and the
    // first page is not written either.
    let code = asm(64, CODE, |a| a.mov(qword_ptr(rdi), rax));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA + 4096 - 2;
    regs.gpr[RAX] = u64::MAX;
    mem.unmap(DATA + 4096);
    assert_eq!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::PageFault {
            va: DATA + 4096,
            code: PF_W
        }))
    );
    assert_eq!(mem.get(DATA + 4094, 2), [0, 0]);

    // CMPXCHG8B in 32-bit mode, failing the comparison, to a read-only page: still a write
    // fault, and EDX:EAX are not loaded.
    let code = asm(32, CODE, |a| a.lock().cmpxchg8b(qword_ptr(edi)));
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.gpr[RDI] = DATA;
    regs.gpr[RAX] = 9;
    mem.put_u64(DATA, 3);
    mem.protect(DATA);
    assert!(matches!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::PageFault { .. }))
    ));
    assert_eq!(regs.gpr[RAX], 9);

    // A REP STOSQ whose destination faults: RCX/RDI unchanged, RIP not advanced.
    let code = asm(64, CODE, |a| a.rep().stosq());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA;
    regs.gpr[RCX] = 512;
    mem.unmap(DATA);
    assert!(emulate(&mut regs, &mut mem).is_err());
    assert_eq!((regs.gpr[RCX], regs.gpr[RDI], regs.rip), (512, DATA, CODE));

    // A MOVS whose source faults: a read fault, nothing written.
    let code = asm(64, CODE, |a| a.movsq());
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[Regs::RSI] = 0x30_0000;
    regs.gpr[RDI] = DATA;
    mem.unmap(0x30_0000);
    assert_eq!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::PageFault {
            va: 0x30_0000,
            code: 0
        }))
    );
}

#[test]
fn accesses_past_the_top_of_the_address_space_raise_gp() {
    // 32-bit: a dword at 0xFFFFFFFE runs past the 4 GiB limit of a flat segment.
    let code = asm(32, CODE, |a| a.mov(dword_ptr(edi), eax));
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.gpr[RDI] = 0xFFFF_FFFE;
    assert_eq!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::GeneralProtection))
    );
    // 64-bit: a qword at 2^64 - 4 wraps.
    let code = asm(64, CODE, |a| a.mov(qword_ptr(rdi), rax));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = u64::MAX - 3;
    assert_eq!(
        emulate(&mut regs, &mut mem),
        Err(EmuError::Fault(EmuFault::GeneralProtection))
    );
}

#[test]
fn unsupported_instructions_are_unhandled() {
    let cases: [(&str, CodeMode, Vec<u8>); 15] = [
        (
            "xchg rax, rbx (registers only)",
            CodeMode::Bits64,
            vec![0x48, 0x87, 0xD8],
        ),
        (
            "mov rax, rbx (89 form)",
            CodeMode::Bits64,
            vec![0x48, 0x89, 0xD8],
        ),
        ("add rax, rbx", CodeMode::Bits64, vec![0x48, 0x01, 0xD8]),
        (
            "add rax, rbx (03 form)",
            CodeMode::Bits64,
            vec![0x48, 0x03, 0xC3],
        ),
        ("ud2", CodeMode::Bits64, vec![0x0F, 0x0B]),
        ("mov rax, [rbx]", CodeMode::Bits64, vec![0x48, 0x8B, 0x03]),
        ("mov eax, [ebx]", CodeMode::Bits32, vec![0x8B, 0x03]),
        (
            "bt [rdi], rax (reads only)",
            CodeMode::Bits64,
            asm(64, CODE, |a| a.bt(qword_ptr(rdi), rax)),
        ),
        (
            "cmp [rdi], rax",
            CodeMode::Bits64,
            asm(64, CODE, |a| a.cmp(qword_ptr(rdi), rax)),
        ),
        (
            "inc qword [rdi]",
            CodeMode::Bits64,
            asm(64, CODE, |a| a.inc(qword_ptr(rdi))),
        ),
        (
            "lock xadd [rdi], rax",
            CodeMode::Bits64,
            asm(64, CODE, |a| a.lock().xadd(qword_ptr(rdi), rax)),
        ),
        (
            "movdqa [rdi], xmm0",
            CodeMode::Bits64,
            asm(64, CODE, |a| a.movdqa(xmmword_ptr(rdi), xmm0)),
        ),
        (
            "lock mov [rdi], rax (#UD)",
            CodeMode::Bits64,
            vec![0xF0, 0x48, 0x89, 0x07],
        ),
        ("nop", CodeMode::Bits64, vec![0x90]),
        ("16 prefixes (too long)", CodeMode::Bits64, vec![0x66; 16]),
    ];
    for (name, mode, code) in cases {
        let (mut regs, mut mem) = setup(mode, &code);
        regs.gpr[RDI] = DATA;
        regs.gpr[RCX] = 1;
        let result = emulate(&mut regs, &mut mem);
        assert!(
            matches!(result, Err(EmuError::Unhandled(_))),
            "{name}: {result:?}"
        );
        assert!(mem.writes.is_empty(), "{name}");
        assert_eq!(regs.gpr[RAX], 0, "{name}");
    }
}
