//! STOS and MOVS, with and without REP, executed in chunks of at most one page (see the module
//! docs of `emulate`): rCX, rSI and rDI at the address size, DF honoured.

use iced_x86::{Instruction, Register};

use super::exec::write_range;
use super::flags::DF;
use super::operand::{Gpr, Width, check_range, linear, put_le};
use super::{EmuError, EmuMemory, Form, PAGE_SIZE, Regs, Writes};

/// How many `esz`-byte elements, starting with the one at `va` and stepping up (or down),
/// lie wholly in `va`'s page; at least one (an element that straddles two pages is done
/// alone).
fn elements_in_page(va: u64, esz: u64, down: bool) -> u64 {
    let off = va & (PAGE_SIZE - 1);
    if off + esz > PAGE_SIZE {
        1
    } else if down {
        off / esz + 1
    } else {
        (PAGE_SIZE - off) / esz
    }
}

/// The lowest address of `n` elements of `esz` bytes whose first is at `first`.
fn lowest(regs: &Regs, first: u64, n: u64, esz: u64, down: bool) -> u64 {
    if down {
        first.wrapping_sub((n - 1) * esz) & regs.mode.linear_mask()
    } else {
        first
    }
}

fn overlap(a: u64, b: u64, len: u64) -> bool {
    a < b.wrapping_add(len) && b < a.wrapping_add(len)
}

/// Executes one chunk of STOS or MOVS. Returns whether the instruction completed.
pub(crate) fn execute<M: EmuMemory>(
    ins: &Instruction,
    form: Form,
    asz: Width,
    regs: &mut Regs,
    mem: &mut M,
    writes: &mut Writes,
) -> Result<bool, EmuError> {
    if ins.has_repne_prefix() {
        return Err(EmuError::Unhandled("REPNE on a string store"));
    }
    let w = Width::from_bytes(ins.memory_size().size())
        .ok_or(EmuError::Unhandled("string element size"))?;
    let esz = w.bytes() as u64;
    let rep = ins.has_rep_prefix();
    let (rcx, rsi, rdi) = (
        Gpr::new(Regs::RCX, asz),
        Gpr::new(Regs::RSI, asz),
        Gpr::new(Regs::RDI, asz),
    );
    let count = if rep { rcx.read(regs) } else { 1 };
    if count == 0 {
        // Nothing to do: the CPU retires a REP with rCX = 0 without touching memory.
        return Ok(true);
    }
    let down = regs.rflags & DF != 0;

    // The destination is always ES:rDI (ES cannot be overridden, and its base is zero).
    let di = rdi.read(regs);
    let dst = linear(regs, Register::ES, di);
    let mut n = count.min(elements_in_page(dst, esz, down));
    let source = match form {
        Form::Movs => {
            let si = rsi.read(regs);
            let src = linear(regs, ins.memory_segment(), si);
            n = n.min(elements_in_page(src, esz, down));
            Some((si, src))
        }
        _ => None,
    };
    if let Some((_, src)) = source {
        let (src_lo, dst_lo) = (
            lowest(regs, src, n, esz, down),
            lowest(regs, dst, n, esz, down),
        );
        if n > 1 && overlap(src_lo, dst_lo, n * esz) {
            // Element-by-element semantics differ from a block copy: one element per call.
            n = 1;
        }
    }
    let len = usize::try_from(n * esz).map_err(|_| EmuError::Unhandled("string length"))?;
    let dst_lo = lowest(regs, dst, n, esz, down);

    let mut buf = [0u8; PAGE_SIZE as usize];
    let data = buf
        .get_mut(..len)
        .ok_or(EmuError::Unhandled("string length"))?;
    match source {
        Some((_, src)) => {
            let src_lo = lowest(regs, src, n, esz, down);
            check_range(regs.mode, src_lo, len)?;
            mem.read(src_lo, data)?;
        }
        None => {
            let value = Gpr::new(Regs::RAX, w).read(regs);
            for element in data.chunks_mut(w.bytes()) {
                put_le(element, value);
            }
        }
    }
    write_range(regs, mem, writes, dst_lo, data)?;

    let step = |v: u64| {
        if down {
            v.wrapping_sub(n * esz)
        } else {
            v.wrapping_add(n * esz)
        }
    };
    rdi.write(regs, step(di));
    if let Some((si, _)) = source {
        rsi.write(regs, step(si));
    }
    if rep {
        let left = count - n;
        rcx.write(regs, left);
        return Ok(left == 0);
    }
    Ok(true)
}
