//! Tests of the write emulator against a fake guest memory: every supported form in 64-, 32-
//! and (where it makes sense) 16-bit mode, the fetch across pages, faults and the unhandled
//! cases, and a property test that arbitrary bytes never panic it.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec;
use alloc::vec::Vec;

use iced_x86::IcedError;
use iced_x86::code_asm::CodeAssembler;

use super::{AtomicUpdate, CodeMode, EmuError, EmuFault, EmuMemory, Emulated, Regs, emulate_write};

mod atomic;
mod faults;
mod forms;
mod prop;
mod strings;

/// Where the test code is placed.
pub(super) const CODE: u64 = 0x40_1000;
/// A data page (a "page table").
pub(super) const DATA: u64 = 0x20_0000;
/// RFLAGS the tests start with: IF and the reserved bit.
pub(super) const RFLAGS0: u64 = 0x202;

/// Page-fault error code bits.
pub(super) const PF_P: u32 = 1;
pub(super) const PF_W: u32 = 2;
pub(super) const PF_I: u32 = 0x10;

/// Sparse guest memory: every page is mapped read/write (unwritten bytes read as zero) unless
/// told to be unmapped or read-only. Logs every access.
#[derive(Default, Debug)]
pub(super) struct FakeMem {
    bytes: BTreeMap<u64, u8>,
    unmapped: BTreeSet<u64>,
    read_only: BTreeSet<u64>,
    pub(super) fetches: Vec<(u64, usize)>,
    pub(super) reads: Vec<(u64, usize)>,
    pub(super) writes: Vec<(u64, usize)>,
    /// Another agent's write, made once just before the next compare-exchange (a race lost
    /// between the emulator's read and its write).
    pub(super) racing_write: Option<(u64, Vec<u8>)>,
    /// How many compare-exchanges were asked for.
    pub(super) exchanges: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fetch,
    Read,
    Write,
}

impl FakeMem {
    pub(super) fn load(&mut self, va: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            self.bytes.insert(va.wrapping_add(i as u64), b);
        }
    }

    pub(super) fn get(&self, va: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| self.bytes.get(&va.wrapping_add(i)).copied().unwrap_or(0))
            .collect()
    }

    pub(super) fn u64_at(&self, va: u64) -> u64 {
        let b = self.get(va, 8);
        u64::from_le_bytes(b.try_into().unwrap())
    }

    pub(super) fn u32_at(&self, va: u64) -> u32 {
        let b = self.get(va, 4);
        u32::from_le_bytes(b.try_into().unwrap())
    }

    pub(super) fn put_u64(&mut self, va: u64, v: u64) {
        self.load(va, &v.to_le_bytes());
    }

    pub(super) fn put_u32(&mut self, va: u64, v: u32) {
        self.load(va, &v.to_le_bytes());
    }

    /// Makes the page of `va` not present.
    pub(super) fn unmap(&mut self, va: u64) {
        self.unmapped.insert(va >> 12);
    }

    /// Makes the page of `va` read-only.
    pub(super) fn protect(&mut self, va: u64) {
        self.read_only.insert(va >> 12);
    }

    /// Checks every page of the access, first page first, as a guest walk would.
    fn check(&self, va: u64, len: usize, kind: Kind) -> Result<(), EmuFault> {
        assert!(len > 0, "empty access at {va:#x}");
        let last = va.checked_add(len as u64 - 1).expect("access wraps");
        let mut page = va >> 12;
        while page <= last >> 12 {
            let at = va.max(page << 12);
            let code = match kind {
                Kind::Fetch => PF_I,
                Kind::Read => 0,
                Kind::Write => PF_W,
            };
            if self.unmapped.contains(&page) {
                return Err(EmuFault::PageFault { va: at, code });
            }
            if kind == Kind::Write && self.read_only.contains(&page) {
                return Err(EmuFault::PageFault {
                    va: at,
                    code: code | PF_P,
                });
            }
            page += 1;
        }
        Ok(())
    }

    fn copy_out(&self, va: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.bytes.get(&(va + i as u64)).copied().unwrap_or(0);
        }
    }
}

impl EmuMemory for FakeMem {
    fn fetch(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.check(va, buf.len(), Kind::Fetch)?;
        self.fetches.push((va, buf.len()));
        self.copy_out(va, buf);
        Ok(())
    }

    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.check(va, buf.len(), Kind::Read)?;
        self.reads.push((va, buf.len()));
        self.copy_out(va, buf);
        Ok(())
    }

    fn read_for_write(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.check(va, buf.len(), Kind::Write)?;
        self.reads.push((va, buf.len()));
        self.copy_out(va, buf);
        Ok(())
    }

    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), EmuFault> {
        self.check(va, data.len(), Kind::Write)?;
        self.writes.push((va, data.len()));
        self.load(va, data);
        Ok(())
    }
    fn compare_exchange(
        &mut self,
        va: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<AtomicUpdate, EmuFault> {
        self.check(va, new.len(), Kind::Write)?;
        self.exchanges += 1;
        if let Some((at, bytes)) = self.racing_write.take() {
            self.load(at, &bytes);
        }
        if self.get(va, current.len()) != current {
            return Ok(AtomicUpdate::Lost);
        }
        self.writes.push((va, new.len()));
        self.load(va, new);
        Ok(AtomicUpdate::Written)
    }
}

/// Assembles with iced's code assembler at `ip`.
pub(super) fn asm(
    bitness: u32,
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// Registers in `mode` at RIP = [`CODE`] and memory holding `code` there.
pub(super) fn setup(mode: CodeMode, code: &[u8]) -> (Regs, FakeMem) {
    let mut regs = Regs::new(mode);
    regs.rip = CODE;
    regs.rflags = RFLAGS0;
    let mut mem = FakeMem::default();
    mem.load(CODE, code);
    (regs, mem)
}

/// Emulates and checks the generic post-conditions: RIP advanced by the instruction length
/// (if complete), the reported writes are the ones the memory saw.
pub(super) fn emulate(regs: &mut Regs, mem: &mut FakeMem) -> Result<Emulated, EmuError> {
    let before = *regs;
    let writes_before = mem.writes.len();
    let result = emulate_write(regs, mem);
    match &result {
        Ok(done) => {
            let expected_rip = if done.complete {
                let next = before.rip + done.instruction_len as u64;
                match before.mode {
                    CodeMode::Bits64 => next,
                    CodeMode::Bits32 => next & 0xFFFF_FFFF,
                    CodeMode::Bits16 => next & 0xFFFF,
                }
            } else {
                before.rip
            };
            assert_eq!(regs.rip, expected_rip);
            let seen: Vec<(u64, usize)> = mem.writes[writes_before..].to_vec();
            let reported: Vec<(u64, usize)> = done.writes.iter().map(|w| (w.va, w.len)).collect();
            assert_eq!(seen, reported);
        }
        Err(_) => {
            assert_eq!(*regs, before, "registers changed on error");
            assert_eq!(mem.writes.len(), writes_before, "memory written on error");
        }
    }
    result
}

/// Emulates `code` once and returns what it did.
pub(super) fn run(regs: &mut Regs, mem: &mut FakeMem) -> Emulated {
    emulate(regs, mem).unwrap_or_else(|e| panic!("emulation failed: {e}"))
}
