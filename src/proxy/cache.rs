//! The optional node blob cache.
//!
//! Owns `<cache.dir>/sha256/<hex>` (content), `<hex>.type` (the
//! Content-Type it was served with) and `<cache.dir>/tmp/` (in-progress
//! writes). Only content fetched by digest is stored: it is immutable, and a
//! blob is committed (renamed into place) only after its sha256 and length
//! match, so a transfer cut short never lands in the cache. A size cap
//! evicts the least recently used entries (by mtime, touched on every hit).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::admin::metrics::Metrics;
use crate::proxy::route::Digest;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache dir {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

pub struct Cache {
    dir: PathBuf,
    /// Reloadable on SIGHUP (#12).
    max_bytes: AtomicU64,
    size: Mutex<u64>,
    metrics: Arc<Metrics>,
}

/// A cached entry ready to be served.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub len: u64,
    pub content_type: Option<String>,
}

impl Cache {
    /// Open (and create) the cache directory, clearing stale temp files
    /// from a crash and measuring what is there.
    pub fn open(dir: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> Result<Cache, CacheError> {
        let io = |op: &'static str| {
            let path = dir.to_path_buf();
            move |source| CacheError::Io { path, op, source }
        };
        fs::create_dir_all(dir.join("sha256")).map_err(io("cannot create"))?;
        let tmp = dir.join("tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io("cannot create tmp"))?;
        let mut size = 0;
        for e in fs::read_dir(dir.join("sha256")).map_err(io("cannot read"))? {
            let e = e.map_err(io("cannot read"))?;
            if let Ok(m) = e.metadata() {
                if m.is_file() {
                    size += m.len();
                }
            }
        }
        metrics.cache_size.set(size as i64);
        Ok(Cache {
            dir: dir.to_path_buf(),
            max_bytes: AtomicU64::new(max_bytes),
            size: Mutex::new(size),
            metrics,
        })
    }

    /// The size cap in force now.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// Change the size cap; the next commit evicts down to it.
    pub fn set_max_bytes(&self, max_bytes: u64) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn path(&self, d: &Digest) -> Option<PathBuf> {
        (d.algorithm == "sha256").then(|| self.dir.join("sha256").join(&d.hex))
    }

    /// Look up a digest; a hit refreshes its LRU time.
    pub fn get(&self, d: &Digest) -> Option<Entry> {
        let path = self.path(d)?;
        let f = fs::File::options().append(true).open(&path).ok()?;
        let len = f.metadata().ok()?.len();
        let _ = f.set_modified(SystemTime::now());
        let content_type = fs::read_to_string(path.with_extension("type")).ok();
        Some(Entry {
            path,
            len,
            content_type,
        })
    }

    /// Start writing a digest's content as it streams to the client.
    pub fn writer(self: &Arc<Self>, d: &Digest, content_type: Option<String>) -> Option<Writer> {
        self.path(d)?;
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(self.dir.join("tmp"))
            .map_err(|e| tracing::warn!(error = %e, "cache: cannot create temp file"))
            .ok()?;
        Some(Writer {
            cache: self.clone(),
            digest: d.clone(),
            content_type,
            file,
            hasher: Sha256::new(),
            written: 0,
            failed: false,
        })
    }

    fn commit(&self, w: Writer) -> io::Result<bool> {
        let Writer {
            digest,
            content_type,
            mut file,
            hasher,
            written,
            failed,
            ..
        } = w;
        if failed {
            return Ok(false);
        }
        let got = hex::encode(hasher.finalize());
        if got != digest.hex {
            tracing::warn!(%digest, actual = %got, "cache: content does not match its digest; not cached");
            return Ok(false);
        }
        file.flush()?;
        file.as_file().sync_all()?;
        let dest = self.path(&digest).expect("sha256");
        if let Some(ct) = content_type {
            crate::node::fs::write_atomic(&dest.with_extension("type"), ct.as_bytes(), 0o644)?;
        }
        file.persist(&dest).map_err(|e| e.error)?;
        crate::node::fs::sync_dir(dest.parent().expect("has parent"))?;
        let mut size = self.size.lock().expect("cache size lock");
        *size += written;
        self.metrics.cache_size.set(*size as i64);
        if *size > self.max_bytes() {
            *size = self.evict(*size);
            self.metrics.cache_size.set(*size as i64);
        }
        Ok(true)
    }

    /// Remove least recently used entries until under 90% of the cap.
    fn evict(&self, mut size: u64) -> u64 {
        let target = self.max_bytes() / 10 * 9;
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = fs::read_dir(self.dir.join("sha256"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_none())
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        entries.sort();
        for (_, len, p) in entries {
            if size <= target {
                break;
            }
            if fs::remove_file(&p).is_ok() {
                let _ = fs::remove_file(p.with_extension("type"));
                size = size.saturating_sub(len);
                self.metrics.cache_evictions.inc();
            }
        }
        size
    }
}

/// A blob being written to the cache while it streams to the client.
pub struct Writer {
    cache: Arc<Cache>,
    digest: Digest,
    content_type: Option<String>,
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    failed: bool,
}

impl Writer {
    pub fn write(&mut self, chunk: &[u8]) {
        if self.failed {
            return;
        }
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        if let Err(e) = self.file.write_all(chunk) {
            // A full disk must not break the pull: stop caching, keep serving.
            tracing::warn!(error = %e, digest = %self.digest, "cache: write failed; not caching");
            self.failed = true;
        }
    }

    /// The body ended normally: verify and commit. Dropping a writer
    /// without finishing discards it (the temp file is removed).
    pub fn finish(self) -> bool {
        let cache = self.cache.clone();
        let digest = self.digest.clone();
        match cache.commit(self) {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(error = %e, %digest, "cache: commit failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(b: &[u8]) -> Digest {
        Digest::parse(&format!("sha256:{}", hex::encode(Sha256::digest(b)))).unwrap()
    }

    #[test]
    fn commits_only_verified_content_and_evicts_lru() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let c = Arc::new(Cache::open(d.path(), 250, m.clone()).unwrap());
        let a = vec![1u8; 100];
        let da = digest_of(&a);
        let mut w = c
            .writer(&da, Some("application/octet-stream".into()))
            .unwrap();
        w.write(&a[..50]);
        drop(w); // cut short: nothing lands
        assert!(c.get(&da).is_none());
        let mut w = c.writer(&da, None).unwrap();
        w.write(&[2u8; 100]); // wrong content for this digest
        assert!(!w.finish());
        assert!(c.get(&da).is_none());
        let mut w = c.writer(&da, Some("x/y".into())).unwrap();
        w.write(&a);
        assert!(w.finish());
        let e = c.get(&da).unwrap();
        assert_eq!((e.len, e.content_type.as_deref()), (100, Some("x/y")));
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        // Make `a` the oldest, then add two more: the cap evicts `a` first.
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        fs::File::options()
            .append(true)
            .open(&e.path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        for fill in [3u8, 4] {
            let b = vec![fill; 100];
            let mut w = c.writer(&digest_of(&b), None).unwrap();
            w.write(&b);
            assert!(w.finish());
        }
        assert!(c.get(&da).is_none(), "LRU entry not evicted");
        assert_eq!(m.cache_evictions.get(), 1);
        assert_eq!(m.cache_size.get(), 200);
    }
}
