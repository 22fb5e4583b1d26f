//! RFLAGS bits and the arithmetic flags of ADD, SUB (and CMP), AND, OR and XOR at 8, 16, 32 and
//! 64 bits, per the SDM (vol. 1 appendix A, vol. 2 instruction pages).

use super::operand::Width;

/// Carry.
pub(crate) const CF: u64 = 1 << 0;
/// Always-one bit 1.
pub(crate) const RESERVED1: u64 = 1 << 1;
/// Parity of the result's low byte (set when even).
pub(crate) const PF: u64 = 1 << 2;
/// Auxiliary carry (out of bit 3).
pub(crate) const AF: u64 = 1 << 4;
/// Zero.
pub(crate) const ZF: u64 = 1 << 6;
/// Sign.
pub(crate) const SF: u64 = 1 << 7;
/// Direction (string instructions step down when set).
pub(crate) const DF: u64 = 1 << 10;
/// Overflow.
pub(crate) const OF: u64 = 1 << 11;
/// Resume.
pub(crate) const RF: u64 = 1 << 16;

/// The six status flags an arithmetic instruction writes.
pub(crate) const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

/// `rflags` with the bits of `mask` replaced by those of `new`.
pub(crate) fn merge(rflags: u64, new: u64, mask: u64) -> u64 {
    (rflags & !mask) | (new & mask)
}

/// SF, ZF and PF of a result of width `w`.
fn szp(w: Width, result: u64) -> u64 {
    let r = result & w.mask();
    let mut f = 0;
    if r == 0 {
        f |= ZF;
    }
    if r & w.sign_bit() != 0 {
        f |= SF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    f
}

/// `a + b` at width `w`: the result and the six status flags.
pub(crate) fn add(w: Width, a: u64, b: u64) -> (u64, u64) {
    let (a, b) = (a & w.mask(), b & w.mask());
    let r = a.wrapping_add(b) & w.mask();
    let mut f = szp(w, r);
    if u128::from(a) + u128::from(b) > u128::from(w.mask()) {
        f |= CF;
    }
    if (a ^ r) & (b ^ r) & w.sign_bit() != 0 {
        f |= OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    (r, f)
}

/// `a - b` at width `w` (SUB, and CMP, which CMPXCHG uses): the result and the six status
/// flags.
pub(crate) fn sub(w: Width, a: u64, b: u64) -> (u64, u64) {
    let (a, b) = (a & w.mask(), b & w.mask());
    let r = a.wrapping_sub(b) & w.mask();
    let mut f = szp(w, r);
    if a < b {
        f |= CF;
    }
    if (a ^ b) & (a ^ r) & w.sign_bit() != 0 {
        f |= OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    (r, f)
}

/// The flags of AND, OR and XOR with result `r`: CF = OF = 0, SF/ZF/PF from the result; AF is
/// architecturally undefined and cleared, as current processors do.
pub(crate) fn logic(w: Width, r: u64) -> u64 {
    szp(w, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: [Width; 4] = [Width::Byte, Width::Word, Width::Dword, Width::Qword];

    #[test]
    fn add_carry_overflow_at_each_width() {
        for w in W {
            let max = w.mask();
            let min_signed = w.sign_bit();
            // max + 1 = 0 with carry, no overflow, AF (0xF + 1 carries out of bit 3).
            let (r, f) = add(w, max, 1);
            assert_eq!(r, 0);
            assert_eq!(f & ARITH, CF | ZF | PF | AF, "{w:?}");
            // largest positive + 1 overflows into the sign bit.
            let (r, f) = add(w, min_signed - 1, 1);
            assert_eq!(r, min_signed);
            assert_eq!(f & (OF | SF | CF | ZF), OF | SF, "{w:?}");
            // min + min: carry and overflow, zero result.
            let (r, f) = add(w, min_signed, min_signed);
            assert_eq!(r, 0);
            assert_eq!(f & (OF | CF | ZF | SF), OF | CF | ZF, "{w:?}");
        }
    }

    #[test]
    fn sub_borrow_overflow_at_each_width() {
        for w in W {
            let min_signed = w.sign_bit();
            // 0 - 1 borrows: all ones, negative, AF, PF (0xFF has even parity).
            let (r, f) = sub(w, 0, 1);
            assert_eq!(r, w.mask());
            assert_eq!(f & ARITH, CF | SF | AF | PF, "{w:?}");
            // min - 1 overflows to the largest positive.
            let (r, f) = sub(w, min_signed, 1);
            assert_eq!(r, min_signed - 1);
            assert_eq!(f & (OF | SF | CF), OF, "{w:?}");
            // equal operands: ZF and PF only.
            let (r, f) = sub(w, 0x1234_5678_9ABC_DEF0 & w.mask(), 0x1234_5678_9ABC_DEF0);
            assert_eq!(r, 0);
            assert_eq!(f & ARITH, ZF | PF, "{w:?}");
        }
    }

    #[test]
    fn parity_is_of_the_low_byte_only() {
        // 0x0100: low byte zero (even parity) but the result is non-zero.
        assert_eq!(logic(Width::Word, 0x0100), PF);
        assert_eq!(logic(Width::Byte, 0x01), 0);
        assert_eq!(logic(Width::Qword, 0x8000_0000_0000_0003), SF | PF);
        assert_eq!(logic(Width::Dword, 0x8000_0000_0000_0000), ZF | PF);
    }

    #[test]
    fn merge_keeps_other_bits() {
        let rflags = RESERVED1 | DF | CF | (1 << 9);
        assert_eq!(merge(rflags, ZF, ARITH), RESERVED1 | DF | ZF | (1 << 9));
        assert_eq!(merge(rflags, 0, CF), RESERVED1 | DF | (1 << 9));
    }
}
