//! What the fuzz targets check, one module per target. Each `check(data)` takes a fuzzer's
//! input and panics on a finding; the cargo-fuzz project in `fuzz/` calls it, and the test
//! `fuzz_corpus` replays every stored input through the same function, so CI needs no fuzzer.
//!
//! - [`churn_ops`]: engine operation streams on every pair, the randomized checker taking
//!   its choices from the input (auditor after every step, oracle on every access).
//! - [`emulate`]: one instruction (bytes, registers, a small page-table layout) through
//!   the write emulator alone and through the engine: all or nothing, auditor clean.
//! - [`trace`]: untrusted trace bytes through the reader and a replay on the simulator.

pub mod churn_ops;
pub mod emulate;
pub mod trace;
