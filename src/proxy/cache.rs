//! The optional node blob cache.
//!
//! Owns `<cache.dir>/sha256/<hex>` (content), `<hex>.type` (the
//! Content-Type it was served with) and `<cache.dir>/tmp/` (in-progress
//! writes). Only content fetched by digest is stored: it is immutable, and a
//! blob is committed (renamed into place) only after its sha256 and length
//! match, so a transfer cut short never lands in the cache. A size cap
//! evicts the least recently used entries (by mtime, touched on every hit).
//!
//! The size (and `slipway_cache_size_bytes`) counts content files only and
//! changes only when an entry is created or removed (#13): it is measured
//! from disk at start, a commit of a digest that is already cached is a
//! no-op, and commits and evictions run under one lock so that the count
//! and the directory never disagree.
//!
//! Temp files count against `cache.max_bytes` too (#18 point 4: 50
//! connections asking for different 32 MiB blobs and reading nothing put
//! 666 MiB of temp files on a node capped at 200 MiB). A writer reserves
//! its blob's whole length (the response's `Content-Length`) when it
//! starts, evicting least recently used entries to make room; when even
//! that cannot make room, or the length is unknown, there is no writer and
//! the blob streams uncached. So content plus reservations never exceed
//! the cap, and the directory holds at most the cap.
//!
//! A blob fetched with the client's credentials is marked
//! (`<hex>.credentialed`): the peer port serves it only once the registry
//! has been seen to serve it without credentials (#18 point 5).

use std::fs;
use std::io::{self, Seek, Write};
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
    size: Mutex<Sizes>,
    metrics: Arc<Metrics>,
}

/// What counts against the cap, under one lock.
#[derive(Debug, Default)]
struct Sizes {
    /// Content files in `sha256/`.
    committed: u64,
    /// The lengths reserved by writers in progress (their temp files).
    reserved: u64,
}

/// A cached entry ready to be served.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub len: u64,
    pub content_type: Option<String>,
    /// Fetched with the client's credentials, and not yet seen served
    /// without them.
    pub credentialed: bool,
}

/// What a writer is told about the blob it writes.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub content_type: Option<String>,
    /// The response's `Content-Length`; `None`: not cached.
    pub len: Option<u64>,
    /// The request carried the client's `Authorization`.
    pub credentialed: bool,
}

/// A writer's share of the cap, given back when it is dropped (the temp
/// file is gone) or moved into the committed size.
struct Reservation {
    cache: Arc<Cache>,
    len: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.len > 0 {
            let mut s = self.cache.size.lock().expect("cache size lock");
            s.reserved = s.reserved.saturating_sub(self.len);
        }
    }
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
            if !is_content_name(&e.file_name()) {
                continue; // `<hex>.type` and strays are not content
            }
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
            size: Mutex::new(Sizes {
                committed: size,
                reserved: 0,
            }),
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
        // Read-only (#13): opening for writing made every hit on a cache
        // the agent may not write a miss and a refetch.
        let f = fs::File::open(&path).ok()?;
        let m = f.metadata().ok()?;
        if !m.is_file() {
            return None;
        }
        let len = m.len();
        // futimens needs ownership, not a writable handle; where it is
        // refused the entry only ages in the LRU order.
        let _ = f.set_modified(SystemTime::now());
        let content_type = fs::read_to_string(path.with_extension("type")).ok();
        let credentialed = fs::symlink_metadata(path.with_extension("credentialed")).is_ok();
        Some(Entry {
            path,
            len,
            content_type,
            credentialed,
        })
    }

    /// Whether `d` is cached, and if so whether it is marked as fetched
    /// with credentials; two `stat`s, without opening the entry or
    /// refreshing its LRU time (the peer port's admission asks before
    /// serving, which does both).
    pub fn credentialed(&self, d: &Digest) -> Option<bool> {
        let path = self.path(d)?;
        fs::metadata(&path).ok().filter(|m| m.is_file())?;
        Some(fs::symlink_metadata(path.with_extension("credentialed")).is_ok())
    }

    /// The registry served this entry without credentials: the peer port
    /// may serve it from now on.
    pub fn clear_credentialed(&self, d: &Digest) {
        if let Some(p) = self.path(d) {
            let _ = fs::remove_file(p.with_extension("credentialed"));
        }
    }

    /// Reserve `len` bytes of the cap, evicting least recently used
    /// entries to make room; `None` if it cannot be made.
    fn reserve(self: &Arc<Self>, len: u64) -> Option<Reservation> {
        let max = self.max_bytes();
        let mut s = self.size.lock().expect("cache size lock");
        if s.committed + s.reserved + len > max {
            let target = max.saturating_sub(s.reserved + len);
            s.committed = self.evict(s.committed, target);
            self.metrics.cache_size.set(s.committed as i64);
        }
        if s.committed + s.reserved + len > max {
            return None;
        }
        s.reserved += len;
        Some(Reservation {
            cache: self.clone(),
            len,
        })
    }

    /// Start writing a digest's content as it streams to the client; `None`
    /// when it is not to be cached (see the module header).
    pub fn writer(self: &Arc<Self>, d: &Digest, meta: Meta) -> Option<Writer> {
        self.path(d)?;
        let Some(reservation) = meta.len.and_then(|len| self.reserve(len)) else {
            tracing::debug!(%d, len = meta.len, "cache: no room within cache.max_bytes (or no length); not cached");
            return None;
        };
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(self.dir.join("tmp"))
            .map_err(|e| tracing::warn!(error = %e, "cache: cannot create temp file"))
            .ok()?;
        Some(Writer {
            file: Some(Backing {
                cache: self.clone(),
                content_type: meta.content_type,
                credentialed: meta.credentialed,
                reservation,
                file,
            }),
            ..Writer::unbacked(d, meta.len)
        })
    }

    fn commit(&self, w: Writer) -> io::Result<Commit> {
        if w.failed {
            return Ok(Commit::Rejected);
        }
        if let Err(e) = w.check() {
            tracing::warn!(error = %e, "cache: not cached");
            return Ok(Commit::Rejected);
        }
        let Writer {
            digest,
            written,
            file: backing,
            ..
        } = w;
        let Some(Backing {
            content_type,
            credentialed,
            mut reservation,
            mut file,
            ..
        }) = backing
        else {
            return Ok(Commit::NotCached);
        };
        file.flush()?;
        file.as_file().sync_all()?;
        let dest = self.path(&digest).expect("sha256");
        {
            // One lock over "is it there, create it, count it, evict": a
            // concurrent commit of the same digest finds the entry and
            // adds nothing (#13), and eviction never races a creation.
            let mut size = self.size.lock().expect("cache size lock");
            // The reservation ends here, under the lock: the content is
            // counted as committed below, or the temp file goes.
            size.reserved = size.reserved.saturating_sub(reservation.len);
            reservation.len = 0;
            if fs::symlink_metadata(&dest).is_ok() {
                return Ok(Commit::AlreadyCached);
            }
            if let Some(ct) = content_type {
                crate::atomic::replace(&dest.with_extension("type"), ct.as_bytes(), 0o644)?;
            }
            if credentialed {
                crate::atomic::replace(&dest.with_extension("credentialed"), b"", 0o644)?;
            }
            match file.persist_noclobber(&dest) {
                Ok(_) => {}
                // Only another process could have created it meanwhile.
                Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                    return Ok(Commit::AlreadyCached)
                }
                Err(e) => return Err(e.error),
            }
            size.committed += written;
            let max = self.max_bytes();
            if size.committed + size.reserved > max {
                let target = (max / 10 * 9).saturating_sub(size.reserved);
                size.committed = self.evict(size.committed, target);
            }
            self.metrics.cache_size.set(size.committed as i64);
        }
        crate::atomic::sync_dir(dest.parent().expect("has parent"))?;
        Ok(Commit::Stored)
    }

    /// Remove least recently used entries until the content is at most
    /// `target`. Called with the size lock held; subtracts only what it
    /// removed.
    fn evict(&self, mut size: u64, target: u64) -> u64 {
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = fs::read_dir(self.dir.join("sha256"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| is_content_name(&e.file_name()))
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
                let _ = fs::remove_file(p.with_extension("credentialed"));
                size = size.saturating_sub(len);
                self.metrics.cache_evictions.inc();
            }
        }
        size
    }
}

/// A content file's name: the 64 hex digits of its sha256, nothing else.
fn is_content_name(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| {
        n.len() == 64
            && n.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// What [`Writer::finish`] did with a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Verified and renamed into place; the size grew by its length.
    Stored,
    /// Verified, but the digest was already cached: nothing changed.
    AlreadyCached,
    /// A failed write, or content that does not match its digest.
    Rejected,
    /// Verified only: the blob was not being cached.
    NotCached,
}

/// The one stream-verify-commit path (#18 point 12): a response for a
/// digest is hashed once as it streams, its length counted, and, when the
/// cache has room, teed into a temp file that is committed only if all of
/// it matches. The plain relay ([`super::relay`]) and the coalesced
/// download ([`super::coalesce`]) both use it; before, the relay hashed
/// every byte twice (its own check beside the cache writer's).
pub struct Writer {
    digest: Digest,
    /// The response's `Content-Length`, checked at the end.
    want_len: Option<u64>,
    hasher: Hasher,
    written: u64,
    /// Length and hash state before the last write, for [`Writer::undo_last`].
    before_last: Option<(u64, Hasher)>,
    /// The temp file, when the blob is being cached.
    file: Option<Backing>,
    /// A write to the temp file failed: nothing is committed.
    failed: bool,
}

/// Where a cached blob's bytes go before the commit.
struct Backing {
    cache: Arc<Cache>,
    content_type: Option<String>,
    credentialed: bool,
    reservation: Reservation,
    file: tempfile::NamedTempFile,
}

/// The hash of the digest's algorithm.
#[derive(Clone)]
enum Hasher {
    Sha256(Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algorithm: &str) -> Hasher {
        match algorithm {
            "sha512" => Hasher::Sha512(sha2::Sha512::new()),
            _ => Hasher::Sha256(Sha256::new()),
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }
    fn hex(&self) -> String {
        match self.clone() {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Why a response for a digest was refused at its end.
#[derive(Debug, thiserror::Error)]
pub enum Mismatch {
    #[error("upstream sent {got} bytes for {digest} with Content-Length {want}")]
    Length { digest: Digest, got: u64, want: u64 },
    #[error("upstream sent content with digest {algorithm}:{got} for {digest}")]
    Digest {
        digest: Digest,
        algorithm: &'static str,
        got: String,
    },
}

impl Writer {
    /// Verifies a response for `digest` as it streams, without caching it.
    pub fn unbacked(digest: &Digest, want_len: Option<u64>) -> Writer {
        Writer {
            digest: digest.clone(),
            want_len,
            hasher: Hasher::new(digest.algorithm),
            written: 0,
            before_last: None,
            file: None,
            failed: false,
        }
    }

    /// The length the whole body must have, when a new source says (a peer
    /// replaced by upstream, #11).
    pub fn expect_len(&mut self, len: Option<u64>) {
        self.want_len = len;
    }

    /// Take in a chunk: hash it, count it, and write it to the temp file.
    pub fn write(&mut self, chunk: &[u8]) {
        self.before_last = Some((self.written, self.hasher.clone()));
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        if self.failed {
            return;
        }
        if let Some(b) = self.file.as_mut() {
            if let Err(e) = b.file.write_all(chunk) {
                // A full disk must not break the pull: stop caching, keep
                // serving (and verifying).
                tracing::warn!(error = %e, digest = %self.digest, "cache: write failed; not caching");
                self.failed = true;
            }
        }
    }

    /// Bytes taken in so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing was taken in yet.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// A write to the temp file failed; it holds only part of the bytes.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether what was taken in so far is the digest's content.
    pub fn matches(&self) -> bool {
        self.hasher.hex() == self.digest.hex
    }

    /// The body ended: whether its length and digest are right.
    pub fn check(&self) -> Result<(), Mismatch> {
        if let Some(want) = self.want_len {
            if want != self.written {
                return Err(Mismatch::Length {
                    digest: self.digest.clone(),
                    got: self.written,
                    want,
                });
            }
        }
        let got = self.hasher.hex();
        if got != self.digest.hex {
            return Err(Mismatch::Digest {
                digest: self.digest.clone(),
                algorithm: self.digest.algorithm,
                got,
            });
        }
        Ok(())
    }

    /// A second handle on the temp file, for readers that follow the write
    /// (#11: coalesced requests). It stays valid after the file is renamed
    /// into the cache or removed.
    pub fn reader(&self) -> io::Result<fs::File> {
        match &self.file {
            Some(b) => b.file.reopen(),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "not cached")),
        }
    }

    /// Take back the last write (length and hash): a source whose body
    /// failed verification at its end is replaced from that chunk on,
    /// which no client has been sent yet (#11). Only one step back.
    pub fn undo_last(&mut self) -> io::Result<u64> {
        if let Some((len, hasher)) = self.before_last.take() {
            if let Some(b) = self.file.as_mut() {
                b.file.as_file().set_len(len)?;
                b.file.as_file_mut().seek(io::SeekFrom::Start(len))?;
            }
            self.written = len;
            self.hasher = hasher;
        }
        Ok(self.written)
    }

    /// Take back everything written: a source none of whose bytes were
    /// released (#11, `peers.hold_until_verified`) is replaced from the
    /// start.
    pub fn reset(&mut self) -> io::Result<()> {
        if let Some(b) = self.file.as_mut() {
            b.file.as_file().set_len(0)?;
            b.file.as_file_mut().seek(io::SeekFrom::Start(0))?;
        }
        self.written = 0;
        self.hasher = Hasher::new(self.digest.algorithm);
        self.before_last = None;
        self.failed = false;
        Ok(())
    }

    /// The body ended normally: verify, and commit what was cached. Dropping
    /// a writer without finishing discards it (the temp file is removed).
    pub fn finish(self) -> Commit {
        let digest = self.digest.clone();
        let Some(cache) = self.file.as_ref().map(|b| b.cache.clone()) else {
            return Commit::NotCached;
        };
        match cache.commit(self) {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(error = %e, %digest, "cache: commit failed");
                Commit::Rejected
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(content_type: Option<&str>, len: usize) -> Meta {
        Meta {
            content_type: content_type.map(str::to_string),
            len: Some(len as u64),
            credentialed: false,
        }
    }

    /// #18 point 4: writers in progress hold their length of the cap, so
    /// content plus temp files never exceed it; one that cannot get room
    /// gets no writer, and an unknown length is not cached.
    #[test]
    fn writers_in_progress_count_against_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let c = Arc::new(Cache::open(d.path(), 1000, m.clone()).unwrap());
        let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 300]).collect();
        let held: Vec<Writer> = blobs[..3]
            .iter()
            .map(|b| c.writer(&digest_of(b), meta(None, b.len())).unwrap())
            .collect();
        assert!(
            c.writer(&digest_of(&blobs[3]), meta(None, 300)).is_none(),
            "900 reserved of 1000: no room for 300 more"
        );
        assert!(c.writer(&digest_of(&blobs[3]), Meta::default()).is_none());
        // Committing one moves its share from reserved to committed; a new
        // writer then evicts it (least recently used) to make room.
        let mut held = held.into_iter();
        let mut w = held.next().unwrap();
        w.write(&blobs[0]);
        assert_eq!(w.finish(), Commit::Stored);
        assert!(c.get(&digest_of(&blobs[0])).is_some());
        let mut w = c.writer(&digest_of(&blobs[3]), meta(None, 300)).unwrap();
        assert!(c.get(&digest_of(&blobs[0])).is_none(), "evicted for room");
        // 900 reserved again: nothing left to evict, no room.
        assert!(c.writer(&digest_of(&blobs[0]), meta(None, 300)).is_none());
        // Dropped writers give their share back.
        drop(held);
        let big = vec![9u8; 800];
        assert!(
            c.writer(&digest_of(&big), meta(None, big.len())).is_none(),
            "300 reserved: 800 more does not fit"
        );
        w.write(&blobs[3]);
        assert_eq!(w.finish(), Commit::Stored);
        let w = c.writer(&digest_of(&big), meta(None, big.len())).unwrap();
        assert!(c.get(&digest_of(&blobs[3])).is_none(), "evicted for room");
        assert_eq!(bytes_on_disk(d.path()), 0);
        drop(w);
        assert_eq!(m.cache_size.get(), 0);
    }

    #[test]
    fn a_credentialed_entry_is_marked_until_cleared() {
        let d = tempfile::tempdir().unwrap();
        let c = Arc::new(Cache::open(d.path(), 1 << 20, Arc::new(Metrics::new())).unwrap());
        let b = vec![5u8; 10];
        let dg = digest_of(&b);
        let mut w = c
            .writer(
                &dg,
                Meta {
                    credentialed: true,
                    ..meta(None, 10)
                },
            )
            .unwrap();
        w.write(&b);
        assert_eq!(w.finish(), Commit::Stored);
        assert!(c.get(&dg).unwrap().credentialed);
        assert_eq!(c.credentialed(&dg), Some(true));
        c.clear_credentialed(&dg);
        assert!(!c.get(&dg).unwrap().credentialed);
        assert_eq!(c.credentialed(&dg), Some(false));
        assert_eq!(c.credentialed(&digest_of(b"other")), None);
    }

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
            .writer(&da, meta(Some("application/octet-stream"), a.len()))
            .unwrap();
        w.write(&a[..50]);
        drop(w); // cut short: nothing lands
        assert!(c.get(&da).is_none());
        let mut w = c.writer(&da, meta(None, a.len())).unwrap();
        w.write(&[2u8; 100]); // wrong content for this digest
        assert_eq!(w.finish(), Commit::Rejected);
        assert!(c.get(&da).is_none());
        let mut w = c.writer(&da, meta(Some("x/y"), a.len())).unwrap();
        w.write(&a);
        assert_eq!(w.finish(), Commit::Stored);
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
            let mut w = c.writer(&digest_of(&b), meta(None, b.len())).unwrap();
            w.write(&b);
            assert_eq!(w.finish(), Commit::Stored);
        }
        assert!(c.get(&da).is_none(), "LRU entry not evicted");
        assert_eq!(m.cache_evictions.get(), 1);
        assert_eq!(m.cache_size.get(), 200);
    }

    /// Bytes of content entries on disk (what the gauge must say).
    fn bytes_on_disk(dir: &Path) -> u64 {
        fs::read_dir(dir.join("sha256"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_none())
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    /// #13: a second commit of a digest that is already cached must not add
    /// its length again (the gauge said 64 MiB with 32 MiB on disk).
    #[test]
    fn concurrent_commits_of_one_digest_count_once() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let c = Arc::new(Cache::open(d.path(), 1 << 30, m.clone()).unwrap());
        let b = vec![7u8; 4096];
        let dg = digest_of(&b);
        let writers: Vec<Writer> = (0..4)
            .map(|_| {
                let mut w = c.writer(&dg, meta(Some("x/y"), b.len())).unwrap();
                w.write(&b);
                w
            })
            .collect();
        std::thread::scope(|s| {
            for w in writers {
                s.spawn(move || w.finish());
            }
        });
        assert_eq!(m.cache_size.get(), 4096);
        assert_eq!(bytes_on_disk(d.path()), 4096);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        // Rebuilt from disk at start: content only, not the `.type` files.
        let m2 = Arc::new(Metrics::new());
        let _c2 = Cache::open(d.path(), 1 << 30, m2.clone()).unwrap();
        assert_eq!(m2.cache_size.get(), 4096);
    }

    /// #13 property: after any interleaving of concurrent puts (right and
    /// wrong content, repeated digests), hits and evictions, the gauge
    /// equals the bytes on disk. A fixed-seed xorshift keeps it
    /// reproducible; every loop is bounded.
    #[test]
    fn gauge_equals_bytes_on_disk_after_random_concurrent_sequences() {
        for seed in 1..=20u64 {
            let d = tempfile::tempdir().unwrap();
            let m = Arc::new(Metrics::new());
            // A small cap so that evictions happen in most sequences.
            let c = Arc::new(Cache::open(d.path(), 3000, m.clone()).unwrap());
            let blobs: Vec<Vec<u8>> = (0..6u8)
                .map(|i| vec![i; 200 + 300 * usize::from(i)])
                .collect();
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let (c, blobs) = (c.clone(), &blobs);
                    s.spawn(move || {
                        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (t + 1);
                        let mut next = move || {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x
                        };
                        for _ in 0..40 {
                            let b = &blobs[(next() % blobs.len() as u64) as usize];
                            let dg = digest_of(b);
                            match next() % 4 {
                                0 | 1 => {
                                    // No room while the others' reservations
                                    // fill the cap: not cached, as in use.
                                    if let Some(mut w) = c.writer(&dg, meta(None, b.len())) {
                                        let half = b.len() / 2;
                                        w.write(&b[..half]);
                                        std::thread::yield_now();
                                        w.write(&b[half..]);
                                        w.finish();
                                    }
                                }
                                2 => {
                                    if let Some(mut w) = c.writer(&dg, meta(None, b.len())) {
                                        w.write(&b[1..]); // wrong content
                                        w.finish();
                                    }
                                }
                                _ => {
                                    if let Some(e) = c.get(&dg) {
                                        assert_eq!(e.len, b.len() as u64);
                                    }
                                }
                            }
                        }
                    });
                }
            });
            let disk = bytes_on_disk(d.path());
            assert_eq!(m.cache_size.get() as u64, disk, "seed {seed}");
            assert!(disk <= 3000, "seed {seed}: {disk} bytes over the cap");
            let m2 = Arc::new(Metrics::new());
            let _c2 = Cache::open(d.path(), 3000, m2.clone()).unwrap();
            assert_eq!(m2.cache_size.get() as u64, disk, "seed {seed}: rebuilt");
        }
    }

    /// #13: a hit opens the entry read-only, so a cache the agent may not
    /// write (here: files owned by root, mode 0444, read with another
    /// filesystem uid) still serves hits instead of refetching.
    #[test]
    fn hits_open_read_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let c = Arc::new(Cache::open(d.path(), 1 << 20, m).unwrap());
        let b = vec![9u8; 100];
        let dg = digest_of(&b);
        let mut w = c.writer(&dg, meta(None, b.len())).unwrap();
        w.write(&b);
        w.finish();
        let entry = c.get(&dg).expect("cached");
        fs::set_permissions(&entry.path, fs::Permissions::from_mode(0o444)).unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let got = std::thread::spawn(move || {
            // setfsuid is per thread on Linux; dropping to an unprivileged
            // fsuid also drops CAP_DAC_OVERRIDE, so root sees what an
            // unprivileged agent would.
            if nix::unistd::Uid::effective().is_root() {
                nix::unistd::setfsuid(nix::unistd::Uid::from_raw(65534));
            }
            c.get(&dg).map(|e| e.len)
        })
        .join()
        .unwrap();
        assert_eq!(got, Some(100), "a read-only entry was not served");
    }
}
