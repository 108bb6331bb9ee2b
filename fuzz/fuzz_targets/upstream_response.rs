//! `sluice_agent::fuzzing::upstream_response` on every input libFuzzer makes.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| sluice_agent::fuzzing::upstream_response(bytes));
