//! `sluice_agent::fuzzing::access_log` on every input libFuzzer makes.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| sluice_agent::fuzzing::access_log(bytes));
