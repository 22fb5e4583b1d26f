//! The write emulator: an x86 instruction emulator for guest writes to shadowed page tables
//! (seed slides "Emulate all writes to page tables" and "Emulate all writes: the demand fault
//! case").
//!
//! When a guest write faults because its target is a shadowed guest page table, the domain
//! layer calls [`emulate_write`] with the vcpu's registers and an [`EmuMemory`], its view of
//! guest linear memory. The emulator fetches the instruction at RIP (one page at a time: an
//! instruction that ends before a page boundary never touches the next page), decodes it with
//! iced-x86 in the vcpu's bitness, computes the memory operand's linear address, performs the
//! instruction's write through the [`EmuMemory`] (reading the old value first where the
//! instruction needs it), updates the registers exactly as the CPU would and advances RIP. The
//! domain layer checks permissions, sets A/D, writes guest memory and validates every shadow
//! of each page written; this module knows nothing of shadows, frames or domains.
//!
//! # Contract
//!
//! - **All or nothing.** Every form performs at most one [`EmuMemory::write`], as its last
//!   step, and [`EmuMemory::write`] checks every page before it writes a byte. So a fault (or
//!   any error) leaves guest memory and the registers exactly as they were: RIP is not
//!   advanced, and the fault can be delivered to the guest as is.
//! - **Whole ranges.** A write that is misaligned, straddles two entries or crosses into a
//!   second page is passed to [`EmuMemory::write`] as one range; the domain validates each
//!   page it touches.
//! - **Atomicity.** Other vcpus may write the target natively meanwhile (a page whose
//!   writable mappings are still being searched for, a page that is not a page table). Plain
//!   forms read, then write. LOCKed forms, XCHG and CMPXCHG* write with
//!   [`EmuMemory::compare_exchange`] from the value they read, and read again when another
//!   agent wrote the target in between (a bounded number of times, then
//!   [`EmuError::Unhandled`]); a locked target the memory cannot update atomically (one that
//!   crosses an aligned 8-byte word, a CMPXCHG16B on a host without 16-byte atomics) is
//!   [`EmuError::Unhandled`] too, so the guest runs it natively rather than torn.
//! - **Never panics on guest input.** A decode failure, an unsupported instruction, a register
//!   form where memory is expected, or a memory operand that is not written, is
//!   [`EmuError::Unhandled`]: the caller unshadows the page and lets the guest retry natively.
//!
//! # Supported forms
//!
//! With or without LOCK where the instruction allows it, at every operand size the encoding
//! has, in 16-, 32- and 64-bit code, with any addressing form (base, index*scale,
//! displacement, RIP-relative, 0x67 address-size override, moffs) and segment override:
//!
//! - MOV r/m,r; MOV r/m,imm; MOV moffs,rAX; MOVNTI m,r ([`Form::Mov`], [`Form::Movnti`]);
//! - XCHG r/m,r ([`Form::Xchg`]);
//! - CMPXCHG r/m,r, CMPXCHG8B m64, CMPXCHG16B m128 (#GP if not 16-byte aligned)
//!   ([`Form::Cmpxchg`], [`Form::Cmpxchg8b`], [`Form::Cmpxchg16b`]);
//! - ADD/SUB/AND/OR/XOR r/m,r and r/m,imm, including the sign-extended imm8 forms and the
//!   32-bit-only opcode 0x82 ([`Form::Alu`]);
//! - BTS/BTR/BTC m,r and m,imm8 ([`Form::Bit`]): a register bit offset is signed and moves
//!   the access by `offset / operand bits` operands (down for negative offsets); an immediate
//!   is taken modulo the operand size;
//! - STOS (B/W/D/Q) and MOVS (B/W/D/Q), with and without REP ([`Form::Stos`],
//!   [`Form::Movs`]); REPNE forms are unhandled.
//!
//! Flags: CMPXCHG sets the six status flags as CMP does; CMPXCHG8B/16B set only ZF; ADD/SUB
//! set all six per the SDM; AND/OR/XOR clear CF and OF (and AF) and set SF, ZF, PF; BTS/BTR/BTC
//! set CF to the old bit and keep the others. A failing CMPXCHG* writes the old value back, as
//! the CPU does (so it needs write permission and is reported as a write); on success the
//! accumulator is not written (in 64-bit mode a 32-bit CMPXCHG leaves RAX's upper half).
//!
//! # Segmentation
//!
//! The project runs flat guests: the bases of CS, DS, ES and SS are taken as zero (as they
//! are in 64-bit mode by definition). FS and GS overrides add [`Regs::fs_base`] and
//! [`Regs::gs_base`], the segments' hidden bases, in every mode (a 32-bit guest that uses them
//! as flat segments passes zero). Segment limits are not checked, except that in 16- and
//! 32-bit modes an access whose last byte lies above 4 GiB raises #GP (the limit of a flat
//! segment), and in 64-bit mode an access that wraps past 2^64 raises #GP. Canonical-address
//! checks are the [`EmuMemory`]'s (it knows the paging mode, 4 or 5 levels).
//!
//! # REP string instructions
//!
//! A REP STOS/MOVS is executed **in chunks**: one call performs the iterations whose
//! destination (and source) elements lie in the page of the current element, at most one
//! page, as one write. If RCX is not exhausted, the registers (rCX, rSI, rDI) are updated but
//! RIP is not advanced ([`Emulated::complete`] is `false`): exactly the architectural state of
//! an interrupted REP instruction, so the guest resumes it, and the next page traps again
//! only if it too is a shadowed page table. Zeroing or copying a whole page-aligned table is
//! therefore one call. Overlapping MOVS source and destination ranges are copied one element
//! per call, which is exact.
//!
//! # Not modelled
//!
//! Alignment checks (#AC), single-step traps (RFLAGS.TF), segment limits and descriptor
//! checks, and the undefined flags (left unchanged, except AF, which AND/OR/XOR clear as
//! current processors do). RFLAGS.RF is cleared when an instruction completes.

mod decode;
mod exec;
mod flags;
mod operand;
mod string;
#[cfg(test)]
mod tests;

use core::fmt;

pub use exec::{AluOp, BitOp};

/// Page size the emulator assumes when it splits fetches and REP chunks.
pub const PAGE_SIZE: u64 = 4096;

/// The page-sized pieces of `len` bytes of linear memory at `va`, as (address, length):
/// how an [`EmuMemory`] checks and performs an access page by page.
pub fn page_pieces(va: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
    let mut done = 0usize;
    core::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = va.wrapping_add(done as u64);
        let room = (PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize;
        let n = room.min(len - done);
        done += n;
        Some((at, n))
    })
}

/// The longest x86 instruction, in bytes.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// How the vcpu executes (from CS.L / CS.D and the paging mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodeMode {
    /// 16-bit code: real mode, virtual-8086 mode or a 16-bit code segment (CS.D = 0).
    Bits16,
    /// 32-bit code: protected mode or compatibility mode with CS.D = 1.
    Bits32,
    /// 64-bit mode (IA-32e mode with CS.L = 1).
    Bits64,
}

impl CodeMode {
    /// The mode from the control state: `long_mode_active` is EFER.LMA, `cs_l` and `cs_d` the
    /// code segment's L and D bits.
    #[must_use]
    pub const fn from_segment(long_mode_active: bool, cs_l: bool, cs_d: bool) -> Self {
        if long_mode_active && cs_l {
            CodeMode::Bits64
        } else if cs_d {
            CodeMode::Bits32
        } else {
            CodeMode::Bits16
        }
    }

    /// 16, 32 or 64.
    #[must_use]
    pub const fn bitness(self) -> u32 {
        match self {
            CodeMode::Bits16 => 16,
            CodeMode::Bits32 => 32,
            CodeMode::Bits64 => 64,
        }
    }

    /// The mask of a linear address in this mode: 64 bits in 64-bit mode, 32 bits otherwise.
    #[must_use]
    pub const fn linear_mask(self) -> u64 {
        match self {
            CodeMode::Bits64 => u64::MAX,
            CodeMode::Bits16 | CodeMode::Bits32 => 0xFFFF_FFFF,
        }
    }
}

/// The guest registers the emulator reads and updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regs {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15, in x86 encoding order.
    pub gpr: [u64; 16],
    /// The instruction pointer (an offset from CS base zero, see the module docs).
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// FS's hidden base (MSR_FS_BASE in 64-bit mode).
    pub fs_base: u64,
    /// GS's hidden base (MSR_GS_BASE in 64-bit mode).
    pub gs_base: u64,
    /// How the vcpu executes.
    pub mode: CodeMode,
    /// The current privilege level. The emulator does not check privileges itself: the
    /// domain's [`EmuMemory`] is built from the same vcpu state and checks every access at
    /// this level.
    pub cpl: u8,
}

impl Regs {
    /// Index of RAX in [`Regs::gpr`].
    pub const RAX: usize = 0;
    /// Index of RCX in [`Regs::gpr`].
    pub const RCX: usize = 1;
    /// Index of RDX in [`Regs::gpr`].
    pub const RDX: usize = 2;
    /// Index of RBX in [`Regs::gpr`].
    pub const RBX: usize = 3;
    /// Index of RSP in [`Regs::gpr`].
    pub const RSP: usize = 4;
    /// Index of RBP in [`Regs::gpr`].
    pub const RBP: usize = 5;
    /// Index of RSI in [`Regs::gpr`].
    pub const RSI: usize = 6;
    /// Index of RDI in [`Regs::gpr`].
    pub const RDI: usize = 7;

    /// Registers all zero, RFLAGS at its reset value (bit 1 set), in `mode` at CPL 0.
    #[must_use]
    pub const fn new(mode: CodeMode) -> Self {
        Regs {
            gpr: [0; 16],
            rip: 0,
            rflags: flags::RESERVED1,
            fs_base: 0,
            gs_base: 0,
            mode,
            cpl: 0,
        }
    }
}

/// What the emulator needs from the domain: linear-address accesses through the guest's own
/// translation at the guest's privilege. The domain layer checks permissions with a guest
/// walk, sets A/D, honours SMAP and SMEP, writes guest memory and validates every shadow it
/// touches. A buffer may cross one page boundary (it never spans more than two pages, and
/// is at most one page long): check every page it touches. In 64-bit mode a non-canonical
/// address is the implementation's to refuse with [`EmuFault::GeneralProtection`].
pub trait EmuMemory {
    /// Fetches instruction bytes at `va` (an execute access). The emulator never asks for
    /// bytes beyond the end of the page of `va` unless the instruction needs them.
    fn fetch(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault>;

    /// Reads data at `va` (a read access).
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault>;

    /// Reads the destination of a read-modify-write instruction (XCHG, CMPXCHG*, LOCK ALU,
    /// BTS/BTR/BTC) before [`EmuMemory::write`] writes it. The CPU checks such an operand for
    /// write at the read, so a fault here should carry the write bit in its error code. The
    /// default is [`EmuMemory::read`].
    fn read_for_write(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.read(va, buf)
    }

    /// Writes `data` at `va` (a write access). Every page touched must be checked before any
    /// byte is written: on error, nothing has been written.
    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), EmuFault>;

    /// Writes `new` at `va` if the bytes there are `current` (as long), atomically against
    /// every other agent writing guest memory (vcpus running on other threads), as
    /// `lock cmpxchg` does: the write of a locked read-modify-write (LOCK forms, XCHG,
    /// CMPXCHG*). Checked like [`EmuMemory::write`]. A memory nothing else writes meanwhile
    /// may use [`serial_compare_exchange`].
    fn compare_exchange(
        &mut self,
        va: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<AtomicUpdate, EmuFault>;
}

/// What [`EmuMemory::compare_exchange`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AtomicUpdate {
    /// The destination held the expected bytes and now holds the new ones.
    Written,
    /// The destination held other bytes (another agent wrote it): nothing was written.
    Lost,
    /// The memory cannot update this destination atomically (it crosses a naturally aligned
    /// 8-byte word, or is 16 bytes on a host without a 16-byte compare-exchange): nothing
    /// was written.
    Unsupported,
}

/// A compare-exchange made of [`EmuMemory::read_for_write`] and [`EmuMemory::write`]: atomic
/// only for a memory nothing else writes meanwhile (a single-threaded simulator).
pub fn serial_compare_exchange<M: EmuMemory + ?Sized>(
    mem: &mut M,
    va: u64,
    current: &[u8],
    new: &[u8],
) -> Result<AtomicUpdate, EmuFault> {
    let mut buf = [0u8; 16];
    let Some(actual) = buf.get_mut(..current.len()) else {
        return Ok(AtomicUpdate::Unsupported);
    };
    mem.read_for_write(va, actual)?;
    if actual != current {
        return Ok(AtomicUpdate::Lost);
    }
    mem.write(va, new)?;
    Ok(AtomicUpdate::Written)
}

/// A fault to deliver to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmuFault {
    /// #PF with CR2 = `va` and the error code `code`.
    PageFault {
        /// The faulting linear address (CR2).
        va: u64,
        /// The page-fault error code.
        code: u32,
    },
    /// #GP(0).
    GeneralProtection,
}

/// Why an instruction was not emulated. Either way the registers and guest memory are
/// unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmuError {
    /// The instruction cannot be emulated (undecodable, unsupported, or not a write to
    /// memory): the caller unshadows the page and lets the guest retry natively.
    Unhandled(&'static str),
    /// A fault to deliver to the guest.
    Fault(EmuFault),
}

impl From<EmuFault> for EmuError {
    fn from(fault: EmuFault) -> Self {
        EmuError::Fault(fault)
    }
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmuError::Unhandled(why) => write!(f, "unhandled instruction: {why}"),
            EmuError::Fault(EmuFault::PageFault { va, code }) => {
                write!(f, "page fault at {va:#x}, error code {code:#x}")
            }
            EmuError::Fault(EmuFault::GeneralProtection) => f.write_str("general protection"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for EmuError {}

/// One range of guest linear memory written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Write {
    /// The first byte's linear address.
    pub va: u64,
    /// The number of bytes.
    pub len: usize,
}

/// The ranges an emulated instruction wrote, in order (a small fixed-capacity list; every form
/// supported today writes at most one range).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Writes {
    ranges: [Write; Writes::CAPACITY],
    len: usize,
}

impl Writes {
    /// The most ranges one instruction can write.
    pub const CAPACITY: usize = 2;

    /// The ranges written.
    #[must_use]
    pub fn as_slice(&self) -> &[Write] {
        self.ranges.get(..self.len).unwrap_or(&[])
    }

    /// How many ranges were written.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written (a REP with a zero count).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ranges written.
    pub fn iter(&self) -> core::slice::Iter<'_, Write> {
        self.as_slice().iter()
    }

    fn push(&mut self, write: Write) -> Result<(), EmuError> {
        let slot = self
            .ranges
            .get_mut(self.len)
            .ok_or(EmuError::Unhandled("too many writes"))?;
        *slot = write;
        self.len += 1;
        Ok(())
    }
}

impl<'a> IntoIterator for &'a Writes {
    type Item = &'a Write;
    type IntoIter = core::slice::Iter<'a, Write>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Which instruction form was emulated (for counters and tracing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// MOV r/m, r / MOV r/m, imm / MOV moffs, rAX.
    Mov,
    /// MOVNTI m, r.
    Movnti,
    /// XCHG r/m, r.
    Xchg,
    /// CMPXCHG r/m, r.
    Cmpxchg,
    /// CMPXCHG8B m64.
    Cmpxchg8b,
    /// CMPXCHG16B m128.
    Cmpxchg16b,
    /// ADD/SUB/AND/OR/XOR r/m, r or imm (with or without LOCK).
    Alu(AluOp),
    /// BTS/BTR/BTC m, r or imm (with or without LOCK).
    Bit(BitOp),
    /// STOS (B/W/D/Q), with or without REP.
    Stos,
    /// MOVS (B/W/D/Q), with or without REP.
    Movs,
}

/// What an emulated instruction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emulated {
    /// The ranges written (whole ranges, see the module docs).
    pub writes: Writes,
    /// The instruction's length in bytes.
    pub instruction_len: usize,
    /// Whether the instruction retired (RIP advanced). `false` only for a REP string
    /// instruction executed in part: rCX/rSI/rDI were updated, RIP still points at it.
    pub complete: bool,
    /// Which form was emulated.
    pub form: Form,
}

/// Emulates the write instruction at `regs.rip`. On success the registers are updated (RIP
/// advanced unless a REP instruction is incomplete) and the written ranges reported; on error
/// neither the registers nor guest memory have changed.
pub fn emulate_write<M: EmuMemory>(regs: &mut Regs, mem: &mut M) -> Result<Emulated, EmuError> {
    let decoded = decode::fetch_and_decode(regs, mem)?;
    let len = decoded.ins.len();
    let mut next = *regs;
    let mut writes = Writes::default();
    let (form, complete) = exec::execute(&decoded, &mut next, mem, &mut writes)?;
    if complete {
        next.rip = next_rip(regs.mode, regs.rip, len);
        next.rflags &= !flags::RF;
    }
    *regs = next;
    Ok(Emulated {
        writes,
        instruction_len: len,
        complete,
        form,
    })
}

/// RIP after an instruction of `len` bytes: EIP wraps at 4 GiB, IP at 64 KiB.
fn next_rip(mode: CodeMode, rip: u64, len: usize) -> u64 {
    let next = rip.wrapping_add(len as u64);
    match mode {
        CodeMode::Bits64 => next,
        CodeMode::Bits32 => next & 0xFFFF_FFFF,
        CodeMode::Bits16 => next & 0xFFFF,
    }
}
