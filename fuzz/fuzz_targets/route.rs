#![no_main]
//! cargo-fuzz target: see fuzz/README.md and `entries::route`.

#[path = "../entries.rs"]
mod entries;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entries::route(data));
