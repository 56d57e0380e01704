#![no_main]
//! cargo-fuzz target: see fuzz/README.md and `entries::hosts_merge`.

#[path = "../entries.rs"]
mod entries;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entries::hosts_merge(data));
