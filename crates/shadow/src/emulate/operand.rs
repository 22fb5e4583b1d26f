//! Operands: widths, general-purpose registers at each width, immediates, address sizes,
//! effective and linear addresses, and the little-endian buffers the memory accesses use.

use iced_x86::{Instruction, OpKind, Register};

use super::{CodeMode, EmuError, EmuFault, MAX_INSTRUCTION_LEN, Regs};

/// An operand width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Width {
    Byte,
    Word,
    Dword,
    Qword,
}

impl Width {
    /// The width of `bytes` bytes, if it is 1, 2, 4 or 8.
    pub(crate) fn from_bytes(bytes: usize) -> Option<Width> {
        match bytes {
            1 => Some(Width::Byte),
            2 => Some(Width::Word),
            4 => Some(Width::Dword),
            8 => Some(Width::Qword),
            _ => None,
        }
    }

    pub(crate) const fn bytes(self) -> usize {
        match self {
            Width::Byte => 1,
            Width::Word => 2,
            Width::Dword => 4,
            Width::Qword => 8,
        }
    }

    pub(crate) const fn bits(self) -> u32 {
        self.bytes() as u32 * 8
    }

    pub(crate) const fn mask(self) -> u64 {
        match self {
            Width::Byte => 0xFF,
            Width::Word => 0xFFFF,
            Width::Dword => 0xFFFF_FFFF,
            Width::Qword => u64::MAX,
        }
    }

    pub(crate) const fn sign_bit(self) -> u64 {
        1 << (self.bits() - 1)
    }

    /// `value` at this width, sign-extended to 64 bits.
    pub(crate) const fn sign_extend(self, value: u64) -> i64 {
        let shift = 64 - self.bits();
        ((value << shift) as i64) >> shift
    }
}

/// A general-purpose register operand: which of the 16, at which width, and whether it is one
/// of AH/CH/DH/BH (bits 8..15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gpr {
    pub(crate) index: usize,
    pub(crate) width: Width,
    pub(crate) high8: bool,
}

impl Gpr {
    /// The register `index` at `width` (never a high-byte register).
    pub(crate) const fn new(index: usize, width: Width) -> Gpr {
        Gpr {
            index,
            width,
            high8: false,
        }
    }

    /// The iced register as a GPR operand, or `None` for any other register.
    pub(crate) fn from_iced(reg: Register) -> Option<Gpr> {
        if !reg.is_gpr() {
            return None;
        }
        let width = Width::from_bytes(reg.size())?;
        let index = reg.full_register().number();
        if index >= 16 {
            return None;
        }
        let high8 = matches!(
            reg,
            Register::AH | Register::CH | Register::DH | Register::BH
        );
        Some(Gpr {
            index,
            width,
            high8,
        })
    }

    /// The register's value, zero-extended.
    pub(crate) fn read(self, regs: &Regs) -> u64 {
        let full = regs.gpr.get(self.index).copied().unwrap_or(0);
        if self.high8 {
            (full >> 8) & 0xFF
        } else {
            full & self.width.mask()
        }
    }

    /// Writes the register as the CPU does: 8- and 16-bit writes keep the other bits, 32-bit
    /// writes zero-extend to 64 bits.
    pub(crate) fn write(self, regs: &mut Regs, value: u64) {
        let Some(slot) = regs.gpr.get_mut(self.index) else {
            return;
        };
        *slot = match (self.width, self.high8) {
            (Width::Byte, true) => (*slot & !0xFF00) | ((value & 0xFF) << 8),
            (Width::Byte, false) => (*slot & !0xFF) | (value & 0xFF),
            (Width::Word, _) => (*slot & !0xFFFF) | (value & 0xFFFF),
            (Width::Dword, _) => value & 0xFFFF_FFFF,
            (Width::Qword, _) => value,
        };
    }
}

/// The register operand `op` of `ins` as a GPR.
pub(crate) fn gpr_operand(ins: &Instruction, op: u32) -> Result<Gpr, EmuError> {
    if ins.op_kind(op) != OpKind::Register {
        return Err(EmuError::Unhandled("operand is not a register"));
    }
    Gpr::from_iced(ins.op_register(op)).ok_or(EmuError::Unhandled("not a general-purpose register"))
}

/// The immediate operand `op` of `ins` (sign-extended as the encoding says), if it is one.
pub(crate) fn immediate_operand(ins: &Instruction, op: u32) -> Option<u64> {
    match ins.op_kind(op) {
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Some(ins.immediate(op)),
        _ => None,
    }
}

/// The value of the source operand `op`: a GPR or an immediate.
pub(crate) fn source_value(ins: &Instruction, op: u32, regs: &Regs) -> Result<u64, EmuError> {
    if let Some(imm) = immediate_operand(ins, op) {
        return Ok(imm);
    }
    Ok(gpr_operand(ins, op)?.read(regs))
}

/// The instruction's address size (2, 4 or 8 bytes, as a width): the mode's default, switched
/// by an address-size prefix (0x67) among the legacy prefixes.
pub(crate) fn address_width(mode: CodeMode, bytes: &[u8]) -> Width {
    let mut override_seen = false;
    for &b in bytes.iter().take(MAX_INSTRUCTION_LEN) {
        match b {
            0x67 => override_seen = true,
            0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0x66 | 0xF0 | 0xF2 | 0xF3 => {}
            0x40..=0x4F if mode == CodeMode::Bits64 => {}
            _ => break,
        }
    }
    match (mode, override_seen) {
        (CodeMode::Bits64, false) => Width::Qword,
        (CodeMode::Bits64, true) | (CodeMode::Bits32, false) | (CodeMode::Bits16, true) => {
            Width::Dword
        }
        (CodeMode::Bits32, true) | (CodeMode::Bits16, false) => Width::Word,
    }
}

/// The base of segment `seg` in the flat model: FS and GS from `regs`, every other segment zero.
pub(crate) fn segment_base(regs: &Regs, seg: Register) -> u64 {
    match seg {
        Register::FS => regs.fs_base,
        Register::GS => regs.gs_base,
        _ => 0,
    }
}

/// The effective address (offset within the segment) of a `Memory` operand, wrapped to the
/// address size.
pub(crate) fn effective_address(
    ins: &Instruction,
    regs: &Regs,
    asz: Width,
) -> Result<u64, EmuError> {
    let mut ea = ins.memory_displacement64();
    match ins.memory_base() {
        // RIP/EIP-relative: iced has already added the next instruction's address.
        Register::None | Register::RIP | Register::EIP => {}
        base => {
            let base = Gpr::from_iced(base).ok_or(EmuError::Unhandled("memory base"))?;
            ea = ea.wrapping_add(base.read(regs));
        }
    }
    match ins.memory_index() {
        Register::None => {}
        index => {
            let index = Gpr::from_iced(index).ok_or(EmuError::Unhandled("memory index"))?;
            let scale = ins.memory_index_scale();
            if !matches!(scale, 1 | 2 | 4 | 8) {
                return Err(EmuError::Unhandled("memory index scale"));
            }
            ea = ea.wrapping_add(index.read(regs).wrapping_mul(u64::from(scale)));
        }
    }
    Ok(ea & asz.mask())
}

/// The linear address of offset `ea` in segment `seg`.
pub(crate) fn linear(regs: &Regs, seg: Register, ea: u64) -> u64 {
    segment_base(regs, seg).wrapping_add(ea) & regs.mode.linear_mask()
}

/// The linear address of the `Memory` operand of `ins`, adjusted by `extra` bytes (the bit
/// string offset of BTS/BTR/BTC) in the address size.
pub(crate) fn memory_operand_address(
    ins: &Instruction,
    regs: &Regs,
    asz: Width,
    extra: i64,
) -> Result<u64, EmuError> {
    if ins.op_kind(0) != OpKind::Memory {
        return Err(EmuError::Unhandled("destination is not memory"));
    }
    let ea = effective_address(ins, regs, asz)?.wrapping_add(extra as u64) & asz.mask();
    Ok(linear(regs, ins.memory_segment(), ea))
}

/// #GP if the `len`-byte access at `va` runs past the top of the address space (2^64 in
/// 64-bit mode, the 4 GiB limit of a flat segment otherwise).
pub(crate) fn check_range(mode: CodeMode, va: u64, len: usize) -> Result<(), EmuError> {
    let last = (len as u64).saturating_sub(1);
    match va.checked_add(last) {
        Some(end) if end <= mode.linear_mask() => Ok(()),
        _ => Err(EmuError::Fault(EmuFault::GeneralProtection)),
    }
}

/// The little-endian value in `bytes` (at most 8).
pub(crate) fn le_value(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, &b)| v | (u64::from(b) << (8 * i)))
}

/// Stores `value` little-endian in `dst` (its low `dst.len()` bytes, at most 8; any further
/// bytes are zero).
pub(crate) fn put_le(dst: &mut [u8], value: u64) {
    for (i, b) in dst.iter_mut().enumerate() {
        *b = if i < 8 { (value >> (8 * i)) as u8 } else { 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpr_writes_follow_the_cpu() {
        let mut regs = Regs::new(CodeMode::Bits64);
        regs.gpr[0] = 0x1122_3344_5566_7788;
        let ah = Gpr::from_iced(Register::AH).unwrap();
        assert_eq!(ah.read(&regs), 0x77);
        ah.write(&mut regs, 0xAB);
        assert_eq!(regs.gpr[0], 0x1122_3344_5566_AB88);
        Gpr::from_iced(Register::AX)
            .unwrap()
            .write(&mut regs, 0xCDEF);
        assert_eq!(regs.gpr[0], 0x1122_3344_5566_CDEF);
        Gpr::from_iced(Register::EAX)
            .unwrap()
            .write(&mut regs, 0xFFFF_FFFF_0000_0001);
        assert_eq!(regs.gpr[0], 1);
        let r13b = Gpr::from_iced(Register::R13L).unwrap();
        assert_eq!(
            (r13b.index, r13b.width, r13b.high8),
            (13, Width::Byte, false)
        );
        assert_eq!(Gpr::from_iced(Register::XMM0), None);
        assert_eq!(Gpr::from_iced(Register::FS), None);
    }

    #[test]
    fn address_size_prefix() {
        assert_eq!(
            address_width(CodeMode::Bits64, &[0x48, 0x89, 0x07]),
            Width::Qword
        );
        assert_eq!(
            address_width(CodeMode::Bits64, &[0x67, 0x48, 0x89, 0x07]),
            Width::Dword
        );
        assert_eq!(
            address_width(CodeMode::Bits64, &[0xF3, 0x67, 0x48, 0xAB]),
            Width::Dword
        );
        assert_eq!(address_width(CodeMode::Bits32, &[0x89, 0x07]), Width::Dword);
        assert_eq!(
            address_width(CodeMode::Bits32, &[0x67, 0x89, 0x07]),
            Width::Word
        );
        assert_eq!(
            address_width(CodeMode::Bits16, &[0x67, 0x89, 0x07]),
            Width::Dword
        );
        // 0x67 after the opcode is not a prefix.
        assert_eq!(
            address_width(CodeMode::Bits64, &[0xC6, 0x07, 0x67]),
            Width::Qword
        );
    }

    #[test]
    fn ranges_past_the_top_fault() {
        assert!(check_range(CodeMode::Bits64, u64::MAX - 7, 8).is_ok());
        assert!(check_range(CodeMode::Bits64, u64::MAX - 6, 8).is_err());
        assert!(check_range(CodeMode::Bits32, 0xFFFF_FFFC, 4).is_ok());
        assert!(check_range(CodeMode::Bits32, 0xFFFF_FFFD, 4).is_err());
        assert_eq!(Width::Word.sign_extend(0x8000), -32768);
        assert_eq!(Width::Qword.sign_extend(u64::MAX), -1);
        assert_eq!(le_value(&[0x88, 0x77, 0x66]), 0x667788);
    }
}
