#![no_main]
//! The `churn_ops` target; its checks are `shadow2_machine::fuzz::churn_ops`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shadow2_machine::fuzz::churn_ops::check(data));
