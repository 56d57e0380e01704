//! Replays every file under `fuzz/corpus/<target>/` through the same entry
//! points the cargo-fuzz targets use (#13), so the seeds and every crash
//! the fuzzer saved stay fixed in the normal suite. Fuzzing itself stays
//! out of CI: see fuzz/README.md.

use std::fs;
use std::path::Path;

#[path = "../fuzz/entries.rs"]
mod entries;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, entry) in entries::TARGETS {
        let dir = root.join(name);
        let files: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        for f in &files {
            let data = fs::read(f).unwrap();
            if let Err(p) = std::panic::catch_unwind(|| entry(&data)) {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{name}: {} fails: {msg}", f.display());
            }
        }
        eprintln!("{name}: {} corpus files pass", files.len());
    }
}
