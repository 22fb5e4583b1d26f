//! Fetching and decoding: the bytes at RIP are fetched one page at a time (an instruction that
//! ends before a page boundary never touches the next page) and decoded with iced-x86 in the
//! vcpu's bitness.

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use super::operand::{Width, address_width};
use super::{EmuError, EmuFault, EmuMemory, MAX_INSTRUCTION_LEN, PAGE_SIZE, Regs};

/// A decoded instruction with its address size.
pub(crate) struct Decoded {
    pub(crate) ins: Instruction,
    /// The address size: the mode's default, switched by a 0x67 prefix.
    pub(crate) asz: Width,
}

/// Why the bytes at hand did not decode.
enum DecodeFailure {
    /// The instruction continues past the bytes given.
    NeedMore,
    /// Not a valid instruction.
    Invalid,
}

fn decode(bitness: u32, bytes: &[u8], ip: u64) -> Result<Instruction, DecodeFailure> {
    let mut decoder = Decoder::try_with_ip(bitness, bytes, ip, DecoderOptions::NONE)
        .map_err(|_| DecodeFailure::Invalid)?;
    let ins = decoder.decode();
    match decoder.last_error() {
        DecoderError::None if !ins.is_invalid() => Ok(ins),
        DecoderError::NoMoreBytes => Err(DecodeFailure::NeedMore),
        _ => Err(DecodeFailure::Invalid),
    }
}

/// Fetches and decodes the instruction at `regs.rip`.
pub(crate) fn fetch_and_decode<M: EmuMemory>(
    regs: &Regs,
    mem: &mut M,
) -> Result<Decoded, EmuError> {
    let mode = regs.mode;
    let ip = regs.rip & mode.linear_mask();
    let mut buf = [0u8; MAX_INSTRUCTION_LEN];

    // The bytes the address space holds from `ip` (a 32-bit segment ends at 4 GiB), at most 15.
    let to_top = (mode.linear_mask() - ip).saturating_add(1);
    let limit = usize::try_from(to_top).map_or(MAX_INSTRUCTION_LEN, |n| n.min(MAX_INSTRUCTION_LEN));
    // The part in the first page.
    let to_page_end = PAGE_SIZE - (ip & (PAGE_SIZE - 1));
    let first = usize::try_from(to_page_end).map_or(limit, |n| n.min(limit));

    let head = buf
        .get_mut(..first)
        .ok_or(EmuError::Unhandled("fetch length"))?;
    mem.fetch(ip, head)?;
    let bytes = buf
        .get(..first)
        .ok_or(EmuError::Unhandled("fetch length"))?;
    let ins = match decode(mode.bitness(), bytes, ip) {
        Ok(ins) => ins,
        Err(DecodeFailure::Invalid) => return Err(EmuError::Unhandled("invalid instruction")),
        Err(DecodeFailure::NeedMore) => {
            if first >= limit {
                // Runs off the end of the segment (15 bytes without an instruction end are
                // invalid, and the decoder reports them so).
                return Err(if limit < MAX_INSTRUCTION_LEN {
                    EmuError::Fault(EmuFault::GeneralProtection)
                } else {
                    EmuError::Unhandled("invalid instruction")
                });
            }
            // `first < limit` means the instruction continues on the next page.
            let next_va = ip.wrapping_add(first as u64) & mode.linear_mask();
            let tail = buf
                .get_mut(first..limit)
                .ok_or(EmuError::Unhandled("fetch length"))?;
            mem.fetch(next_va, tail)?;
            let bytes = buf
                .get(..limit)
                .ok_or(EmuError::Unhandled("fetch length"))?;
            decode(mode.bitness(), bytes, ip)
                .map_err(|_| EmuError::Unhandled("invalid instruction"))?
        }
    };
    let asz = address_width(mode, buf.get(..ins.len()).unwrap_or(&buf));
    Ok(Decoded { ins, asz })
}
