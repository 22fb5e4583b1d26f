/work/main/target/debug/deps/shadow2-b9cff500a68d4a32.d: crates/shadow/src/lib.rs crates/shadow/src/addr.rs crates/shadow/src/paging/mod.rs crates/shadow/src/paging/bits.rs crates/shadow/src/paging/control.rs crates/shadow/src/paging/memory.rs crates/shadow/src/paging/mode.rs crates/shadow/src/paging/walk.rs crates/shadow/src/flush.rs crates/shadow/src/host.rs

/work/main/target/debug/deps/libshadow2-b9cff500a68d4a32.rlib: crates/shadow/src/lib.rs crates/shadow/src/addr.rs crates/shadow/src/paging/mod.rs crates/shadow/src/paging/bits.rs crates/shadow/src/paging/control.rs crates/shadow/src/paging/memory.rs crates/shadow/src/paging/mode.rs crates/shadow/src/paging/walk.rs crates/shadow/src/flush.rs crates/shadow/src/host.rs

/work/main/target/debug/deps/libshadow2-b9cff500a68d4a32.rmeta: crates/shadow/src/lib.rs crates/shadow/src/addr.rs crates/shadow/src/paging/mod.rs crates/shadow/src/paging/bits.rs crates/shadow/src/paging/control.rs crates/shadow/src/paging/memory.rs crates/shadow/src/paging/mode.rs crates/shadow/src/paging/walk.rs crates/shadow/src/flush.rs crates/shadow/src/host.rs

crates/shadow/src/lib.rs:
crates/shadow/src/addr.rs:
crates/shadow/src/paging/mod.rs:
crates/shadow/src/paging/bits.rs:
crates/shadow/src/paging/control.rs:
crates/shadow/src/paging/memory.rs:
crates/shadow/src/paging/mode.rs:
crates/shadow/src/paging/walk.rs:
crates/shadow/src/flush.rs:
crates/shadow/src/host.rs:
