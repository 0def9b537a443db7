//! `cargo fuzz run schedule`: see taskhost::fuzzing::schedule for what it reads.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskhost::fuzzing::schedule(data));
