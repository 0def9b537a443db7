//! `cargo fuzz run workflow`: see taskhost::fuzzing::workflow for what it reads.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskhost::fuzzing::workflow(data));
