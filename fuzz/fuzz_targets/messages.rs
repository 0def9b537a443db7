//! `cargo fuzz run messages`: see taskhost::fuzzing::messages for what it reads.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskhost::fuzzing::messages(data));
