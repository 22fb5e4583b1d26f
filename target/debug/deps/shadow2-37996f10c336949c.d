/work/main/target/debug/deps/shadow2-37996f10c336949c.d: crates/cli/src/main.rs

/work/main/target/debug/deps/shadow2-37996f10c336949c: crates/cli/src/main.rs

crates/cli/src/main.rs:
