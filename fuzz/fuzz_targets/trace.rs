#![no_main]
//! The `trace` target; its checks are `shadow2_machine::fuzz::trace`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shadow2_machine::fuzz::trace::check(data));
