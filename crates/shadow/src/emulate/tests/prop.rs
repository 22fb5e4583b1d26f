//! Property tests: arbitrary bytes, registers and memory layouts never panic the emulator, and
//! every outcome keeps the contract (`emulate` in the parent module checks RIP, the reported
//! writes, and that an error changes nothing).

use alloc::vec::Vec;

use proptest::prelude::*;

use super::*;

fn mode() -> impl Strategy<Value = CodeMode> {
    prop_oneof![
        Just(CodeMode::Bits16),
        Just(CodeMode::Bits32),
        Just(CodeMode::Bits64)
    ]
}

/// Bytes that start like the instructions the emulator handles (after some prefixes), so that
/// the interesting paths are reached often.
fn write_like() -> impl Strategy<Value = Vec<u8>> {
    const PREFIXES: [u8; 12] = [
        0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x64, 0x65, 0x2E, 0x48, 0x4C, 0x41, 0x3E,
    ];
    const OPCODES: [&[u8]; 34] = [
        &[0x88],
        &[0x89],
        &[0xC6],
        &[0xC7],
        &[0x86],
        &[0x87],
        &[0x0F, 0xB0],
        &[0x0F, 0xB1],
        &[0x0F, 0xC7],
        &[0x80],
        &[0x81],
        &[0x82],
        &[0x83],
        &[0x00],
        &[0x01],
        &[0x08],
        &[0x09],
        &[0x20],
        &[0x21],
        &[0x28],
        &[0x29],
        &[0x30],
        &[0x31],
        &[0x0F, 0xAB],
        &[0x0F, 0xB3],
        &[0x0F, 0xBB],
        &[0x0F, 0xBA],
        &[0x0F, 0xC3],
        &[0xAA],
        &[0xAB],
        &[0xA4],
        &[0xA5],
        &[0xA3],
        &[0xA2],
    ];
    (
        proptest::collection::vec(proptest::sample::select(&PREFIXES[..]), 0..4),
        proptest::sample::select(&OPCODES[..]),
        proptest::collection::vec(any::<u8>(), 0..14),
    )
        .prop_map(|(prefixes, opcode, tail)| [&prefixes[..], opcode, &tail[..]].concat())
}

fn code() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..20), write_like(),]
}

/// Register values: small, near a data page, near the top, or anything.
fn reg_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..64,
        (DATA - 64)..(DATA + 8192),
        (u64::MAX - 64)..=u64::MAX,
        0xFFFF_FF00u64..0x1_0000_0100,
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_never_panic(
        code in code(),
        mode in mode(),
        gpr in proptest::array::uniform16(reg_value()),
        rflags in any::<u64>(),
        to_page_end in 1u64..=16,
        fs_base in reg_value(),
        gs_base in reg_value(),
        unmap_next in any::<bool>(),
        unmap_data in any::<bool>(),
        protect_data in any::<bool>(),
    ) {
        let (mut regs, mut mem) = setup(mode, &[]);
        regs.rip = CODE + 4096 - to_page_end;
        mem.load(regs.rip, &code);
        regs.gpr = gpr;
        regs.rflags = rflags;
        regs.fs_base = fs_base;
        regs.gs_base = gs_base;
        if unmap_next {
            mem.unmap(CODE + 4096);
        }
        if unmap_data {
            mem.unmap(DATA);
        }
        if protect_data {
            mem.protect(DATA + 4096);
        }
        if let Ok(done) = emulate(&mut regs, &mut mem) {
            prop_assert!(done.instruction_len >= 1 && done.instruction_len <= 15);
            prop_assert!(done.writes.len() <= 1);
            for w in &done.writes {
                prop_assert!(w.len >= 1 && w.len <= 4096);
            }
            // Only a REP form may be incomplete.
            if !done.complete {
                prop_assert!(matches!(done.form, crate::emulate::Form::Stos | crate::emulate::Form::Movs));
            }
        }
    }
}
