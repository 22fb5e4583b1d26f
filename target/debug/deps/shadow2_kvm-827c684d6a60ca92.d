/work/main/target/debug/deps/shadow2_kvm-827c684d6a60ca92.d: crates/kvm/src/lib.rs

/work/main/target/debug/deps/libshadow2_kvm-827c684d6a60ca92.rlib: crates/kvm/src/lib.rs

/work/main/target/debug/deps/libshadow2_kvm-827c684d6a60ca92.rmeta: crates/kvm/src/lib.rs

crates/kvm/src/lib.rs:
