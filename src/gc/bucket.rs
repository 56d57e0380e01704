//! distribution's storage tree in an S3 bucket, as a [`RegistryFs`] (#22),
//! so that the collector's walk and deletions ([`super::store`]) are the
//! same code for a volume and for a bucket.
//!
//! Paths map to keys: `/docker/registry/v2/...` is the key
//! `<rootdirectory>/docker/registry/v2/...` (distribution's s3 driver
//! strips the leading `/` the same way). A bucket has no directories: a
//! "directory" is a key prefix ending in `/`.
//!
//! The first `list` of a directory lists every key under it at once (a few
//! requests per thousand keys, against one request per directory and one
//! `HEAD` per blob) and answers later `list`s and `stat`s under it from
//! that snapshot. The collector reads the tree once, after writes are
//! fenced, so the snapshot is what the bucket holds. `remove_tree` lists
//! the prefix afresh and deletes key by key, asking the `guard` before
//! each delete: the shared fence's lease ([`crate::gateway::shared`]) must
//! still be held, or the sweep stops with an error and deletes nothing
//! more.
//!
//! Blocking: every call waits on the async [`Bucket`] through a runtime
//! `Handle`, so it must run on a blocking thread (`spawn_blocking`), as the
//! collector does.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;

use super::store::RegistryFs;
use crate::s3::bucket::Bucket;

/// Keys read into the snapshot, at most (about 150 bytes each in memory).
pub const MAX_KEYS: usize = 1_000_000;

/// May the sweep still delete? An error stops it.
pub type Guard = Arc<dyn Fn() -> io::Result<()> + Send + Sync>;

#[derive(Default)]
struct Snapshot {
    /// Prefixes (ending in `/`) listed in full.
    covered: Vec<String>,
    /// Key → (size, Last-Modified).
    objects: BTreeMap<String, (u64, u64)>,
}

pub struct BucketRegistryFs {
    bucket: Arc<Bucket>,
    rt: Handle,
    guard: Option<Guard>,
    snap: Mutex<Snapshot>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl BucketRegistryFs {
    pub fn new(bucket: Arc<Bucket>, rt: Handle, guard: Option<Guard>) -> BucketRegistryFs {
        BucketRegistryFs {
            bucket,
            rt,
            guard,
            snap: Mutex::new(Snapshot::default()),
        }
    }

    fn key(&self, p: &Path) -> io::Result<String> {
        let s = p
            .to_str()
            .ok_or_else(|| other(format!("{} is not UTF-8", p.display())))?;
        Ok(self
            .bucket
            .key(s.trim_end_matches('/'))
            .trim_end_matches('/')
            .to_string())
    }

    /// The prefix of the keys under directory `dir`.
    fn prefix(&self, dir: &Path) -> io::Result<String> {
        let k = self.key(dir)?;
        Ok(if k.is_empty() { k } else { format!("{k}/") })
    }

    fn covered(&self, key: &str) -> bool {
        let s = self.snap.lock().expect("snapshot lock");
        s.covered.iter().any(|c| key.starts_with(c.as_str()))
    }
}

impl RegistryFs for BucketRegistryFs {
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let prefix = self.prefix(dir)?;
        if !self.covered(&prefix) {
            let l = self
                .rt
                .block_on(self.bucket.list(&prefix, false, MAX_KEYS))
                .map_err(other)?;
            let mut s = self.snap.lock().expect("snapshot lock");
            if s.objects.len() + l.objects.len() > MAX_KEYS {
                return Err(other(format!(
                    "bucket {}: more than {MAX_KEYS} keys to read",
                    self.bucket.name()
                )));
            }
            for o in l.objects {
                s.objects.insert(o.key, (o.size, o.modified));
            }
            s.covered.push(prefix.clone());
        }
        let s = self.snap.lock().expect("snapshot lock");
        let mut out: Vec<(String, bool)> = s
            .objects
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, _)| {
                let rest = &k[prefix.len()..];
                match rest.split_once('/') {
                    Some((first, _)) if !first.is_empty() => Some((first.to_string(), true)),
                    None if !rest.is_empty() => Some((rest.to_string(), false)),
                    _ => None,
                }
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn stat(&self, path: &Path) -> io::Result<Option<(u64, u64)>> {
        let key = self.key(path)?;
        if self.covered(&key) {
            let s = self.snap.lock().expect("snapshot lock");
            return Ok(s.objects.get(&key).copied());
        }
        let h = self.rt.block_on(self.bucket.head(&key)).map_err(other)?;
        Ok(h.map(|h| (h.size, h.modified)))
    }

    fn read(&self, path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
        let key = self.key(path)?;
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let b = self
            .rt
            .block_on(self.bucket.get(&key, max))
            .map_err(other)?;
        Ok(b.map(|b| b.to_vec()))
    }

    fn remove_tree(&self, path: &Path) -> io::Result<()> {
        let prefix = self.prefix(path)?;
        if prefix.is_empty() {
            return Err(other("refusing to remove the whole bucket"));
        }
        let l = self
            .rt
            .block_on(self.bucket.list(&prefix, false, MAX_KEYS))
            .map_err(other)?;
        for o in l.objects {
            if let Some(g) = &self.guard {
                g()?;
            }
            self.rt
                .block_on(self.bucket.delete(&o.key))
                .map_err(other)?;
            self.snap
                .lock()
                .expect("snapshot lock")
                .objects
                .remove(&o.key);
        }
        Ok(())
    }
}
