/work/main/target/debug/deps/shadow2_machine-4f104747b26b2ef9.d: crates/machine/src/lib.rs crates/machine/src/cpu.rs crates/machine/src/matrix/mod.rs crates/machine/src/memory.rs crates/machine/src/tlb.rs

/work/main/target/debug/deps/libshadow2_machine-4f104747b26b2ef9.rlib: crates/machine/src/lib.rs crates/machine/src/cpu.rs crates/machine/src/matrix/mod.rs crates/machine/src/memory.rs crates/machine/src/tlb.rs

/work/main/target/debug/deps/libshadow2_machine-4f104747b26b2ef9.rmeta: crates/machine/src/lib.rs crates/machine/src/cpu.rs crates/machine/src/matrix/mod.rs crates/machine/src/memory.rs crates/machine/src/tlb.rs

crates/machine/src/lib.rs:
crates/machine/src/cpu.rs:
crates/machine/src/matrix/mod.rs:
crates/machine/src/memory.rs:
crates/machine/src/tlb.rs:
