//! Locked read-modify-writes against another agent writing the destination between the
//! emulator's read and its write (a vcpu running on another thread).

use iced_x86::code_asm::*;

use super::*;
use crate::emulate::flags::ZF;
use alloc::vec;

const RAX: usize = Regs::RAX;
const RCX: usize = Regs::RCX;
const RDX: usize = Regs::RDX;
const RBX: usize = Regs::RBX;
const RDI: usize = Regs::RDI;

#[test]
fn locked_cmpxchg_compares_what_memory_holds_at_the_write() {
    let code = asm(64, CODE, |a| a.lock().cmpxchg(qword_ptr(rdi), rcx));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA;
    regs.gpr[RAX] = 0x1000_0027;
    regs.gpr[RCX] = 0x2000_0027;
    mem.put_u64(DATA, 0x1000_0027);
    // Another vcpu sets the dirty bit after the emulator read the entry.
    mem.racing_write = Some((DATA, (0x1000_0027u64 | 0x40).to_le_bytes().to_vec()));
    run(&mut regs, &mut mem);
    // The comparison fails against the entry as it now is: nothing stale is written back.
    assert_eq!(mem.u64_at(DATA), 0x1000_0027 | 0x40);
    assert_eq!(regs.gpr[RAX], 0x1000_0027 | 0x40);
    assert_eq!(regs.rflags & ZF, 0);
    assert_eq!(mem.exchanges, 2, "one lost exchange, one retry");
}

#[test]
fn locked_add_and_xchg_build_on_the_racing_value() {
    let code = asm(64, CODE, |a| a.lock().add(dword_ptr(rdi), 5));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA;
    mem.put_u32(DATA, 10);
    mem.racing_write = Some((DATA, 100u32.to_le_bytes().to_vec()));
    run(&mut regs, &mut mem);
    assert_eq!(mem.u32_at(DATA), 105, "the racing increment is not lost");

    let code = asm(64, CODE, |a| a.xchg(qword_ptr(rdi), rbx));
    let (mut regs, mut mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA;
    regs.gpr[RBX] = 7;
    mem.put_u64(DATA, 1);
    mem.racing_write = Some((DATA, 2u64.to_le_bytes().to_vec()));
    run(&mut regs, &mut mem);
    assert_eq!(mem.u64_at(DATA), 7);
    assert_eq!(regs.gpr[RBX], 2, "XCHG returns the value it replaced");
}

#[test]
fn cmpxchg8b_is_one_exchange_of_the_pair() {
    let code = asm(32, CODE, |a| a.lock().cmpxchg8b(qword_ptr(edi)));
    let (mut regs, mut mem) = setup(CodeMode::Bits32, &code);
    regs.gpr[RDI] = DATA;
    regs.gpr[RAX] = 0x0000_1067;
    regs.gpr[RDX] = 0x8000_0000;
    regs.gpr[RBX] = 0x0000_2067;
    regs.gpr[RCX] = 0;
    mem.put_u64(DATA, 0x8000_0000_0000_1067);
    mem.racing_write = Some((DATA + 4, vec![0, 0, 0, 0]));
    run(&mut regs, &mut mem);
    assert_eq!(
        mem.u64_at(DATA),
        0x0000_1067,
        "the racing high half is kept"
    );
    assert_eq!(regs.rflags & ZF, 0);
    assert_eq!((regs.gpr[RDX], regs.gpr[RAX]), (0, 0x0000_1067));
}

/// A memory that refuses every atomic update (a host without it for this size).
struct NoAtomics(FakeMem);

impl EmuMemory for NoAtomics {
    fn fetch(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.0.fetch(va, buf)
    }
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.0.read(va, buf)
    }
    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), EmuFault> {
        self.0.write(va, data)
    }
    fn compare_exchange(&mut self, _: u64, _: &[u8], _: &[u8]) -> Result<AtomicUpdate, EmuFault> {
        Ok(AtomicUpdate::Unsupported)
    }
}

#[test]
fn cmpxchg16b_without_host_atomics_is_refused_not_torn() {
    let code = asm(64, CODE, |a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
    let (mut regs, mem) = setup(CodeMode::Bits64, &code);
    regs.gpr[RDI] = DATA;
    let mut mem = NoAtomics(mem);
    mem.0.put_u64(DATA, 5);
    let before = regs;
    let result = emulate_write(&mut regs, &mut mem);
    assert!(matches!(result, Err(EmuError::Unhandled(_))), "{result:?}");
    assert_eq!(regs, before);
    assert!(mem.0.writes.is_empty());
    assert_eq!(mem.0.u64_at(DATA), 5);
}
