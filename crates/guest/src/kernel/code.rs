//! The kernel image's code page: the instructions the kernel writes page-table entries and
//! clears and copies pages with. Their bytes sit in guest memory, so the hypervisor's
//! emulator decodes exactly what a real kernel would have executed.

/// The instructions, for 64-bit and for 32-bit code. Registers: target address in rDI,
/// value in rAX; CMPXCHG compares rAX and stores rDX; CMPXCHG8B compares EDX:EAX and
/// stores ECX:EBX; BTR's bit number in rAX; REP STOS/MOVS count in rCX, source in rSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    /// `mov [rdi], rax`.
    Mov,
    /// `xchg [rdi], rax`.
    Xchg,
    /// `lock cmpxchg [rdi], rdx`.
    Cmpxchg,
    /// `lock cmpxchg8b [edi]` (32-bit code only).
    Cmpxchg8b,
    /// `lock or [rdi], rax`.
    LockOr,
    /// `lock btr [rdi], rax`.
    LockBtr,
    /// `rep stos` (qwords in 64-bit code, dwords in 32-bit code).
    RepStos,
    /// `rep movs` (qwords in 64-bit code, dwords in 32-bit code).
    RepMovs,
}

const INSNS: [Insn; 8] = [
    Insn::Mov,
    Insn::Xchg,
    Insn::Cmpxchg,
    Insn::Cmpxchg8b,
    Insn::LockOr,
    Insn::LockBtr,
    Insn::RepStos,
    Insn::RepMovs,
];

/// Bytes between instructions in the code page.
const STRIDE: u64 = 16;
/// Where the 32-bit forms start in the page.
const OFFSET_32: u64 = 0x400;

impl Insn {
    fn bytes(self, long: bool) -> &'static [u8] {
        match (self, long) {
            (Insn::Mov, true) => &[0x48, 0x89, 0x07],
            (Insn::Xchg, true) => &[0x48, 0x87, 0x07],
            (Insn::Cmpxchg, true) => &[0xf0, 0x48, 0x0f, 0xb1, 0x17],
            (Insn::LockOr, true) => &[0xf0, 0x48, 0x09, 0x07],
            (Insn::LockBtr, true) => &[0xf0, 0x48, 0x0f, 0xb3, 0x07],
            (Insn::RepStos, true) => &[0xf3, 0x48, 0xab],
            (Insn::RepMovs, true) => &[0xf3, 0x48, 0xa5],
            (Insn::Mov, false) => &[0x89, 0x07],
            (Insn::Xchg, false) => &[0x87, 0x07],
            (Insn::Cmpxchg, false) => &[0xf0, 0x0f, 0xb1, 0x17],
            (Insn::Cmpxchg8b, _) => &[0xf0, 0x0f, 0xc7, 0x0f],
            (Insn::LockOr, false) => &[0xf0, 0x09, 0x07],
            (Insn::LockBtr, false) => &[0xf0, 0x0f, 0xb3, 0x07],
            (Insn::RepStos, false) => &[0xf3, 0xab],
            (Insn::RepMovs, false) => &[0xf3, 0xa5],
        }
    }

    /// The instruction's offset in the code page.
    pub fn offset(self, long: bool) -> u64 {
        let i = INSNS.iter().position(|&x| x == self).unwrap_or(0) as u64;
        i * STRIDE + if long { 0 } else { OFFSET_32 }
    }
}

/// The code page's contents.
pub fn code_page() -> Vec<u8> {
    let mut page = vec![0xcc; 4096]; // int3 between instructions
    for long in [true, false] {
        for insn in INSNS {
            if insn == Insn::Cmpxchg8b && long {
                continue;
            }
            let at = insn.offset(long) as usize;
            let b = insn.bytes(long);
            page[at..at + b.len()].copy_from_slice(b);
        }
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_do_not_overlap_and_fit() {
        let page = code_page();
        for long in [true, false] {
            for insn in INSNS {
                if insn == Insn::Cmpxchg8b && long {
                    continue;
                }
                let at = insn.offset(long) as usize;
                let b = insn.bytes(long);
                assert!(b.len() as u64 <= STRIDE);
                assert_eq!(&page[at..at + b.len()], b);
            }
        }
    }
}
