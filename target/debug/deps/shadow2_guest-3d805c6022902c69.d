/work/main/target/debug/deps/shadow2_guest-3d805c6022902c69.d: crates/guest/src/lib.rs

/work/main/target/debug/deps/libshadow2_guest-3d805c6022902c69.rlib: crates/guest/src/lib.rs

/work/main/target/debug/deps/libshadow2_guest-3d805c6022902c69.rmeta: crates/guest/src/lib.rs

crates/guest/src/lib.rs:
