//! Execution of the supported forms with one memory destination: which instruction is which
//! form, and what each does to memory, registers and flags. The string forms are in
//! `string.rs`.

use iced_x86::{Code, Instruction};

use super::decode::Decoded;
use super::flags::{self, CF, ZF};
use super::operand::{
    Gpr, Width, check_range, gpr_operand, immediate_operand, le_value, memory_operand_address,
    put_le, source_value,
};
use super::{AtomicUpdate, EmuError, EmuFault, EmuMemory, Form, Regs, Write, Writes, string};

/// The arithmetic and logic read-modify-write forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AluOp {
    /// ADD.
    Add,
    /// SUB.
    Sub,
    /// AND.
    And,
    /// OR.
    Or,
    /// XOR.
    Xor,
}

/// The bit-test-and-modify forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BitOp {
    /// BTS: set the bit.
    Set,
    /// BTR: clear (reset) the bit.
    Reset,
    /// BTC: complement the bit.
    Complement,
}

/// The supported instruction `code`'s form, or `None`.
fn form_of(code: Code) -> Option<Form> {
    use Code as C;
    Some(match code {
        C::Mov_rm8_r8
        | C::Mov_rm16_r16
        | C::Mov_rm32_r32
        | C::Mov_rm64_r64
        | C::Mov_rm8_imm8
        | C::Mov_rm16_imm16
        | C::Mov_rm32_imm32
        | C::Mov_rm64_imm32
        | C::Mov_moffs8_AL
        | C::Mov_moffs16_AX
        | C::Mov_moffs32_EAX
        | C::Mov_moffs64_RAX => Form::Mov,
        C::Movnti_m32_r32 | C::Movnti_m64_r64 => Form::Movnti,
        C::Xchg_rm8_r8 | C::Xchg_rm16_r16 | C::Xchg_rm32_r32 | C::Xchg_rm64_r64 => Form::Xchg,
        C::Cmpxchg_rm8_r8 | C::Cmpxchg_rm16_r16 | C::Cmpxchg_rm32_r32 | C::Cmpxchg_rm64_r64 => {
            Form::Cmpxchg
        }
        C::Cmpxchg8b_m64 => Form::Cmpxchg8b,
        C::Cmpxchg16b_m128 => Form::Cmpxchg16b,
        C::Add_rm8_r8
        | C::Add_rm16_r16
        | C::Add_rm32_r32
        | C::Add_rm64_r64
        | C::Add_rm8_imm8
        | C::Add_rm8_imm8_82
        | C::Add_rm16_imm16
        | C::Add_rm32_imm32
        | C::Add_rm64_imm32
        | C::Add_rm16_imm8
        | C::Add_rm32_imm8
        | C::Add_rm64_imm8 => Form::Alu(AluOp::Add),
        C::Sub_rm8_r8
        | C::Sub_rm16_r16
        | C::Sub_rm32_r32
        | C::Sub_rm64_r64
        | C::Sub_rm8_imm8
        | C::Sub_rm8_imm8_82
        | C::Sub_rm16_imm16
        | C::Sub_rm32_imm32
        | C::Sub_rm64_imm32
        | C::Sub_rm16_imm8
        | C::Sub_rm32_imm8
        | C::Sub_rm64_imm8 => Form::Alu(AluOp::Sub),
        C::And_rm8_r8
        | C::And_rm16_r16
        | C::And_rm32_r32
        | C::And_rm64_r64
        | C::And_rm8_imm8
        | C::And_rm8_imm8_82
        | C::And_rm16_imm16
        | C::And_rm32_imm32
        | C::And_rm64_imm32
        | C::And_rm16_imm8
        | C::And_rm32_imm8
        | C::And_rm64_imm8 => Form::Alu(AluOp::And),
        C::Or_rm8_r8
        | C::Or_rm16_r16
        | C::Or_rm32_r32
        | C::Or_rm64_r64
        | C::Or_rm8_imm8
        | C::Or_rm8_imm8_82
        | C::Or_rm16_imm16
        | C::Or_rm32_imm32
        | C::Or_rm64_imm32
        | C::Or_rm16_imm8
        | C::Or_rm32_imm8
        | C::Or_rm64_imm8 => Form::Alu(AluOp::Or),
        C::Xor_rm8_r8
        | C::Xor_rm16_r16
        | C::Xor_rm32_r32
        | C::Xor_rm64_r64
        | C::Xor_rm8_imm8
        | C::Xor_rm8_imm8_82
        | C::Xor_rm16_imm16
        | C::Xor_rm32_imm32
        | C::Xor_rm64_imm32
        | C::Xor_rm16_imm8
        | C::Xor_rm32_imm8
        | C::Xor_rm64_imm8 => Form::Alu(AluOp::Xor),
        C::Bts_rm16_r16
        | C::Bts_rm32_r32
        | C::Bts_rm64_r64
        | C::Bts_rm16_imm8
        | C::Bts_rm32_imm8
        | C::Bts_rm64_imm8 => Form::Bit(BitOp::Set),
        C::Btr_rm16_r16
        | C::Btr_rm32_r32
        | C::Btr_rm64_r64
        | C::Btr_rm16_imm8
        | C::Btr_rm32_imm8
        | C::Btr_rm64_imm8 => Form::Bit(BitOp::Reset),
        C::Btc_rm16_r16
        | C::Btc_rm32_r32
        | C::Btc_rm64_r64
        | C::Btc_rm16_imm8
        | C::Btc_rm32_imm8
        | C::Btc_rm64_imm8 => Form::Bit(BitOp::Complement),
        C::Stosb_m8_AL | C::Stosw_m16_AX | C::Stosd_m32_EAX | C::Stosq_m64_RAX => Form::Stos,
        C::Movsb_m8_m8 | C::Movsw_m16_m16 | C::Movsd_m32_m32 | C::Movsq_m64_m64 => Form::Movs,
        _ => return None,
    })
}

/// Executes `d` on `regs` (a scratch copy: the caller commits it on success), recording the
/// write in `writes`. Returns the form and whether the instruction completed (RIP to be
/// advanced).
pub(crate) fn execute<M: EmuMemory>(
    d: &Decoded,
    regs: &mut Regs,
    mem: &mut M,
    writes: &mut Writes,
) -> Result<(Form, bool), EmuError> {
    let ins = &d.ins;
    let form = form_of(ins.code()).ok_or(EmuError::Unhandled("unsupported instruction"))?;
    if matches!(form, Form::Stos | Form::Movs) {
        let complete = string::execute(ins, form, d.asz, regs, mem, writes)?;
        return Ok((form, complete));
    }
    match form {
        Form::Mov | Form::Movnti => {
            let w = data_width(ins)?;
            let value = source_value(ins, 1, regs)?;
            let va = memory_operand_address(ins, regs, d.asz, 0)?;
            store(regs, mem, writes, va, w, value)
        }
        Form::Xchg => {
            let w = data_width(ins)?;
            let reg = gpr_operand(ins, 1)?;
            let va = memory_operand_address(ins, regs, d.asz, 0)?;
            let value = reg.read(regs);
            let old = read_modify_write(regs, mem, writes, va, w, true, |_| value)?;
            reg.write(regs, old);
            Ok(())
        }
        Form::Cmpxchg => {
            let w = data_width(ins)?;
            let src = gpr_operand(ins, 1)?.read(regs);
            let acc = Gpr::new(Regs::RAX, w);
            let va = memory_operand_address(ins, regs, d.asz, 0)?;
            let expected = acc.read(regs);
            let equal = |old: u64| flags::sub(w, expected, old).1 & ZF != 0;
            // The CPU always writes the destination: the new value on success, the old one
            // back on failure.
            let old = read_modify_write(regs, mem, writes, va, w, true, |old| {
                if equal(old) { src } else { old }
            })?;
            let (_, f) = flags::sub(w, expected, old);
            if !equal(old) {
                acc.write(regs, old);
            }
            regs.rflags = flags::merge(regs.rflags, f, flags::ARITH);
            Ok(())
        }
        Form::Cmpxchg8b => cmpxchg_double(ins, d.asz, regs, mem, writes, Width::Dword),
        Form::Cmpxchg16b => cmpxchg_double(ins, d.asz, regs, mem, writes, Width::Qword),
        Form::Alu(op) => {
            let w = data_width(ins)?;
            let src = source_value(ins, 1, regs)?;
            let va = memory_operand_address(ins, regs, d.asz, 0)?;
            let locked = ins.has_lock_prefix();
            let old = read_modify_write(regs, mem, writes, va, w, locked, |old| {
                alu(op, w, old, src).0
            })?;
            let (_, f) = alu(op, w, old, src);
            regs.rflags = flags::merge(regs.rflags, f, flags::ARITH);
            Ok(())
        }
        Form::Bit(op) => {
            let w = data_width(ins)?;
            let (byte_offset, bit) = bit_position(ins, regs, w)?;
            let va = memory_operand_address(ins, regs, d.asz, byte_offset)?;
            let mask = 1u64 << bit;
            let locked = ins.has_lock_prefix();
            let old = read_modify_write(regs, mem, writes, va, w, locked, |old| match op {
                BitOp::Set => old | mask,
                BitOp::Reset => old & !mask,
                BitOp::Complement => old ^ mask,
            })?;
            // CF = the old bit; ZF unchanged; OF, SF, AF and PF are undefined and kept.
            let cf = if old & mask != 0 { CF } else { 0 };
            regs.rflags = flags::merge(regs.rflags, cf, CF);
            Ok(())
        }
        Form::Stos | Form::Movs => Err(EmuError::Unhandled("string form")),
    }?;
    Ok((form, true))
}

/// The result and flags of an arithmetic or logic form.
fn alu(op: AluOp, w: Width, old: u64, src: u64) -> (u64, u64) {
    match op {
        AluOp::Add => flags::add(w, old, src),
        AluOp::Sub => flags::sub(w, old, src),
        AluOp::And => {
            let r = old & src & w.mask();
            (r, flags::logic(w, r))
        }
        AluOp::Or => {
            let r = (old | src) & w.mask();
            (r, flags::logic(w, r))
        }
        AluOp::Xor => {
            let r = (old ^ src) & w.mask();
            (r, flags::logic(w, r))
        }
    }
}

/// How many times a locked read-modify-write reads its destination again after another
/// agent wrote it between the read and the compare-exchange.
const MAX_LOCKED_TRIES: usize = 16;

/// Reads the `w`-wide destination at `va`, writes `modify(old)` there and returns `old`.
/// `locked`: as one atomic update ([`EmuMemory::compare_exchange`], read again while another
/// agent wins the race); otherwise a read, then a write.
#[allow(clippy::too_many_arguments)]
fn read_modify_write<M: EmuMemory>(
    regs: &Regs,
    mem: &mut M,
    writes: &mut Writes,
    va: u64,
    w: Width,
    locked: bool,
    modify: impl Fn(u64) -> u64,
) -> Result<u64, EmuError> {
    for _ in 0..MAX_LOCKED_TRIES {
        let old = load_for_write(regs, mem, va, w)?;
        let new = modify(old);
        if !locked {
            store(regs, mem, writes, va, w, new)?;
            return Ok(old);
        }
        let (mut current, mut next) = ([0u8; 8], [0u8; 8]);
        let n = w.bytes();
        let (Some(current), Some(next)) = (current.get_mut(..n), next.get_mut(..n)) else {
            return Err(EmuError::Unhandled("operand size"));
        };
        put_le(current, old);
        put_le(next, new);
        if exchange_range(regs, mem, writes, va, current, next)? {
            return Ok(old);
        }
    }
    Err(EmuError::Unhandled("the locked destination kept changing"))
}

/// Writes `new` at `va` if it still holds `current`, atomically, and records the range:
/// whether it wrote.
fn exchange_range<M: EmuMemory>(
    regs: &Regs,
    mem: &mut M,
    writes: &mut Writes,
    va: u64,
    current: &[u8],
    new: &[u8],
) -> Result<bool, EmuError> {
    check_range(regs.mode, va, new.len())?;
    match mem.compare_exchange(va, current, new)? {
        AtomicUpdate::Written => {
            writes.push(Write { va, len: new.len() })?;
            Ok(true)
        }
        AtomicUpdate::Lost => Ok(false),
        AtomicUpdate::Unsupported => Err(EmuError::Unhandled(
            "a locked access the memory cannot make atomic",
        )),
    }
}

/// The width of the memory operand.
fn data_width(ins: &Instruction) -> Result<Width, EmuError> {
    Width::from_bytes(ins.memory_size().size()).ok_or(EmuError::Unhandled("operand size"))
}

/// The byte displacement and bit number of a BTS/BTR/BTC bit operand. An immediate offset is
/// taken modulo the operand size; a register offset is a signed bit index into the bit string
/// that starts at the memory operand, so the access moves by `offset / size` operands (down
/// for negative offsets).
fn bit_position(ins: &Instruction, regs: &Regs, w: Width) -> Result<(i64, u32), EmuError> {
    let bits = i64::from(w.bits());
    let offset = match immediate_operand(ins, 1) {
        Some(imm) => return Ok((0, (imm % bits as u64) as u32)),
        None => w.sign_extend(gpr_operand(ins, 1)?.read(regs)),
    };
    let word = offset.div_euclid(bits);
    let bit = offset.rem_euclid(bits) as u32;
    Ok((word.wrapping_mul(w.bytes() as i64), bit))
}

/// Reads the `w`-wide destination at `va` of a read-modify-write form.
fn load_for_write<M: EmuMemory>(
    regs: &Regs,
    mem: &mut M,
    va: u64,
    w: Width,
) -> Result<u64, EmuError> {
    check_range(regs.mode, va, w.bytes())?;
    let mut buf = [0u8; 8];
    let dst = buf
        .get_mut(..w.bytes())
        .ok_or(EmuError::Unhandled("operand size"))?;
    mem.read_for_write(va, dst)?;
    Ok(le_value(dst))
}

/// Writes the low `w` bytes of `value` at `va`: the instruction's one write, its last step.
fn store<M: EmuMemory>(
    regs: &Regs,
    mem: &mut M,
    writes: &mut Writes,
    va: u64,
    w: Width,
    value: u64,
) -> Result<(), EmuError> {
    let mut buf = [0u8; 8];
    let data = buf
        .get_mut(..w.bytes())
        .ok_or(EmuError::Unhandled("operand size"))?;
    put_le(data, value);
    write_range(regs, mem, writes, va, data)
}

/// Writes `data` at `va` and records the range.
pub(crate) fn write_range<M: EmuMemory>(
    regs: &Regs,
    mem: &mut M,
    writes: &mut Writes,
    va: u64,
    data: &[u8],
) -> Result<(), EmuError> {
    check_range(regs.mode, va, data.len())?;
    mem.write(va, data)?;
    writes.push(Write {
        va,
        len: data.len(),
    })
}

/// CMPXCHG8B (`half` = Dword) and CMPXCHG16B (`half` = Qword): compare rDX:rAX with the
/// memory operand; if equal, ZF = 1 and rCX:rBX is stored, otherwise ZF = 0 and rDX:rAX is
/// loaded (the old value is written back, as the CPU does). Other flags are unchanged. The
/// write is one atomic compare-exchange of the whole operand.
fn cmpxchg_double<M: EmuMemory>(
    ins: &Instruction,
    asz: Width,
    regs: &mut Regs,
    mem: &mut M,
    writes: &mut Writes,
    half: Width,
) -> Result<(), EmuError> {
    let n = half.bytes();
    let va = memory_operand_address(ins, regs, asz, 0)?;
    if half == Width::Qword && va % 16 != 0 {
        return Err(EmuError::Fault(EmuFault::GeneralProtection));
    }
    check_range(regs.mode, va, 2 * n)?;
    let (rax, rdx) = (Gpr::new(Regs::RAX, half), Gpr::new(Regs::RDX, half));
    let (rbx, rcx) = (Gpr::new(Regs::RBX, half), Gpr::new(Regs::RCX, half));
    for _ in 0..MAX_LOCKED_TRIES {
        let mut old = [0u8; 16];
        let old = old
            .get_mut(..2 * n)
            .ok_or(EmuError::Unhandled("operand size"))?;
        mem.read_for_write(va, old)?;
        let (old_lo, old_hi) = old.split_at(n);
        let (old_lo, old_hi) = (le_value(old_lo), le_value(old_hi));

        let equal = rax.read(regs) == old_lo && rdx.read(regs) == old_hi;
        let mut new = [0u8; 16];
        let new = new
            .get_mut(..2 * n)
            .ok_or(EmuError::Unhandled("operand size"))?;
        let (lo, hi) = if equal {
            (rbx.read(regs), rcx.read(regs))
        } else {
            (old_lo, old_hi)
        };
        let (new_lo, new_hi) = new.split_at_mut(n);
        put_le(new_lo, lo);
        put_le(new_hi, hi);
        if !exchange_range(regs, mem, writes, va, old, new)? {
            continue;
        }
        if equal {
            regs.rflags |= ZF;
        } else {
            regs.rflags &= !ZF;
            rax.write(regs, old_lo);
            rdx.write(regs, old_hi);
        }
        return Ok(());
    }
    Err(EmuError::Unhandled("the locked destination kept changing"))
}
