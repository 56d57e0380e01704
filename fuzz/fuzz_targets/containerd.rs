#![no_main]
//! cargo-fuzz target: see fuzz/README.md and `entries::containerd`.

#[path = "../entries.rs"]
mod entries;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entries::containerd(data));
