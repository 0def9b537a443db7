//! `cargo fuzz run manifest`: see taskhost::fuzzing::manifest for what it reads.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskhost::fuzzing::manifest(data));
