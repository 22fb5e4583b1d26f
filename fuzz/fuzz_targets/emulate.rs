#![no_main]
//! The `emulate` target; its checks are `shadow2_machine::fuzz::emulate`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shadow2_machine::fuzz::emulate::check(data));
