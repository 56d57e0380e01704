//! distribution 2.8's filesystem storage, read into a [`plan::Inventory`]
//! and pruned by a [`plan::Plan`] (#21). Every call goes through
//! [`RegistryFs`], so the walk and the deletions are tested on a recording
//! fake as well as on the real tree distribution writes.
//!
//! Files, under `<root>/docker/registry/v2/` (`gateway.storage_root` is
//! distribution's `rootdirectory`):
//! - `blobs/sha256/<2 hex>/<hex>/data`: every blob, manifests included;
//! - `repositories/<name>/_manifests/revisions/sha256/<hex>/link`;
//! - `repositories/<name>/_manifests/tags/<tag>/current/link`;
//! - `repositories/<name>/_layers/sha256/<hex>/link`;
//! - `repositories/<name>/_uploads/`: uploads in progress, never touched.
//!
//! Deletions run in the order that never leaves a reference to something
//! gone: tags, then manifest revisions, then layer links, then blob data.
//! A run that stops halfway (an I/O error, a killed pod) leaves garbage for
//! the next run, never a tag whose manifest or blobs are missing. The first
//! failure stops the run with the path in the error.

use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::plan::{self, Blob, Digest, Inventory, Plan, RepoKind};

/// A manifest larger than this is not read (distribution refuses manifests
/// over 4 MiB).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Image configs are read for their `created` only.
const MAX_CONFIG: u64 = 1 << 20;
/// Repository names nest (`a/b/c`); deeper trees are not walked.
const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("registry storage {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("registry storage {0}: not a distribution filesystem tree (no docker/registry/v2)")]
    NotATree(PathBuf),
}

/// The file operations the collector needs.
pub trait RegistryFs: Send + Sync {
    /// Entries of a directory as `(name, is_dir)`; empty if it is missing.
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>>;
    /// Size and modification time (Unix seconds) of a file, if it exists.
    fn stat(&self, path: &Path) -> io::Result<Option<(u64, u64)>>;
    /// A file's content, if it exists and is at most `max` bytes.
    fn read(&self, path: &Path, max: u64) -> io::Result<Option<Vec<u8>>>;
    /// Remove a directory and everything under it.
    fn remove_tree(&self, path: &Path) -> io::Result<()>;
}

pub struct RealRegistryFs;

impl RegistryFs for RealRegistryFs {
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            out.push((name, e.file_type()?.is_dir()));
        }
        out.sort();
        Ok(out)
    }

    fn stat(&self, path: &Path) -> io::Result<Option<(u64, u64)>> {
        match std::fs::symlink_metadata(path) {
            Ok(m) => {
                let t = m
                    .modified()?
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Ok(Some((m.len(), t)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read(&self, path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = Vec::new();
        f.take(max + 1).read_to_end(&mut buf)?;
        Ok((buf.len() as u64 <= max).then_some(buf))
    }

    fn remove_tree(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// The storage tree under distribution's `rootdirectory`.
pub struct Store<'a> {
    fs: &'a dyn RegistryFs,
    v2: PathBuf,
}

fn hex_of(d: &str) -> Option<&str> {
    let h = d.strip_prefix("sha256:")?;
    (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then_some(h)
}

impl<'a> Store<'a> {
    pub fn open(fs: &'a dyn RegistryFs, root: &Path) -> Result<Store<'a>, StoreError> {
        let v2 = root.join("docker/registry/v2");
        let top = fs.list(&v2).map_err(|source| StoreError::Io {
            path: v2.clone(),
            source,
        })?;
        // `slipway/` beside the tree is the gateway's own (pull records,
        // and on a bucket the shared fence): an empty registry has it.
        let others = |l: Vec<(String, bool)>| l.iter().any(|(n, _)| n != "slipway");
        if top.is_empty() && fs.list(root).map(others).unwrap_or(false) {
            return Err(StoreError::NotATree(root.to_path_buf()));
        }
        Ok(Store { fs, v2 })
    }

    fn io<T>(&self, path: &Path, r: io::Result<T>) -> Result<T, StoreError> {
        r.map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn blob_path(&self, d: &str) -> Option<PathBuf> {
        let h = hex_of(d)?;
        Some(self.v2.join("blobs/sha256").join(&h[..2]).join(h))
    }

    fn repo_path(&self, repo: &str) -> PathBuf {
        self.v2.join("repositories").join(repo)
    }

    /// A blob's content, if small enough.
    pub fn read_blob(&self, d: &str, max: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(p) = self.blob_path(d) else {
            return Ok(None);
        };
        let p = p.join("data");
        let r = self.fs.read(&p, max);
        self.io(&p, r)
    }

    /// Read the whole tree.
    pub fn inventory(&self) -> Result<Inventory, StoreError> {
        let mut inv = Inventory::default();
        let blobs = self.v2.join("blobs/sha256");
        let l = self.fs.list(&blobs);
        for (pre, dir) in self.io(&blobs, l)? {
            if !dir {
                continue;
            }
            let p = blobs.join(&pre);
            let l = self.fs.list(&p);
            for (h, dir) in self.io(&p, l)? {
                let data = p.join(&h).join("data");
                if !dir || hex_of(&format!("sha256:{h}")).is_none() {
                    continue;
                }
                let s = self.fs.stat(&data);
                if let Some((size, mtime)) = self.io(&data, s)? {
                    inv.blobs
                        .insert(format!("sha256:{h}"), Blob { size, mtime });
                }
            }
        }
        let mut names = Vec::new();
        self.repos(&self.v2.join("repositories"), "", 0, &mut names)?;
        for name in names {
            let repo = self.repo(&name)?;
            inv.repos.insert(name, repo);
        }
        // Manifests: every revision, then whatever they name as a manifest
        // (index children, mirror targets), until nothing new.
        let mut work: Vec<Digest> = inv
            .repos
            .values()
            .flat_map(|r| r.revisions.keys().cloned())
            .collect();
        while let Some(d) = work.pop() {
            if inv.manifests.contains_key(&d) {
                continue;
            }
            let Some(bytes) = self.read_blob(&d, MAX_MANIFEST)? else {
                continue;
            };
            if let Some(p) = plan::parse_manifest(&bytes) {
                work.extend(p.manifests.iter().cloned());
                inv.manifests.insert(d, p);
            }
        }
        // Kaniko cache entries: their config's `created`.
        let configs: Vec<Digest> = inv
            .repos
            .iter()
            .filter(|(n, _)| RepoKind::of(n) == RepoKind::Cache)
            .flat_map(|(_, r)| r.revisions.keys())
            .filter_map(|d| inv.manifests.get(d)?.config.clone())
            .collect();
        for c in configs {
            if let Some(t) = self
                .read_blob(&c, MAX_CONFIG)?
                .and_then(|b| plan::config_created(&b))
            {
                inv.created.insert(c, t);
            }
        }
        Ok(inv)
    }

    /// Repository names: directories holding `_manifests` or `_layers`.
    fn repos(
        &self,
        dir: &Path,
        prefix: &str,
        depth: usize,
        out: &mut Vec<String>,
    ) -> Result<(), StoreError> {
        if depth > MAX_DEPTH {
            return Ok(());
        }
        let l = self.fs.list(dir);
        let entries = self.io(dir, l)?;
        if !prefix.is_empty()
            && entries
                .iter()
                .any(|(n, d)| *d && (n == "_manifests" || n == "_layers"))
        {
            out.push(prefix.to_string());
        }
        for (n, d) in entries {
            if d && !n.starts_with('_') {
                let p = if prefix.is_empty() {
                    n.clone()
                } else {
                    format!("{prefix}/{n}")
                };
                self.repos(&dir.join(&n), &p, depth + 1, out)?;
            }
        }
        Ok(())
    }

    fn links(&self, dir: &Path) -> Result<Vec<(Digest, u64)>, StoreError> {
        let l = self.fs.list(dir);
        let mut out = Vec::new();
        for (h, d) in self.io(dir, l)? {
            let digest = format!("sha256:{h}");
            if !d || hex_of(&digest).is_none() {
                continue;
            }
            let link = dir.join(&h).join("link");
            let s = self.fs.stat(&link);
            if let Some((_, t)) = self.io(&link, s)? {
                out.push((digest, t));
            }
        }
        Ok(out)
    }

    fn repo(&self, name: &str) -> Result<plan::Repo, StoreError> {
        let base = self.repo_path(name);
        let mut r = plan::Repo::default();
        r.revisions
            .extend(self.links(&base.join("_manifests/revisions/sha256"))?);
        r.layers.extend(self.links(&base.join("_layers/sha256"))?);
        let tags = base.join("_manifests/tags");
        let l = self.fs.list(&tags);
        for (t, d) in self.io(&tags, l)? {
            if !d {
                continue;
            }
            let link = tags.join(&t).join("current/link");
            let c = self.fs.read(&link, 1024);
            if let Some(bytes) = self.io(&link, c)? {
                let digest = String::from_utf8_lossy(&bytes).trim().to_string();
                if hex_of(&digest).is_some() {
                    r.tags.insert(t, digest);
                }
            }
        }
        Ok(r)
    }

    fn remove(&self, p: &Path) -> Result<(), StoreError> {
        let r = self.fs.remove_tree(p);
        self.io(p, r)
    }

    /// Carry out the deletions of `plan`, in the safe order.
    pub fn apply(&self, plan: &Plan) -> Result<(), StoreError> {
        for (repo, tag) in &plan.delete_tags {
            self.remove(&self.repo_path(repo).join("_manifests/tags").join(tag))?;
        }
        for (repo, d) in &plan.delete_revisions {
            if let Some(h) = hex_of(d) {
                self.remove(
                    &self
                        .repo_path(repo)
                        .join("_manifests/revisions/sha256")
                        .join(h),
                )?;
            }
        }
        for (repo, d) in &plan.delete_layer_links {
            if let Some(h) = hex_of(d) {
                self.remove(&self.repo_path(repo).join("_layers/sha256").join(h))?;
            }
        }
        for d in &plan.delete_blobs {
            if let Some(p) = self.blob_path(d) {
                self.remove(&p)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory tree that records every removal.
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct FakeRegistryFs {
        /// Files: path → (content, mtime).
        pub files: Mutex<BTreeMap<PathBuf, (Vec<u8>, u64)>>,
        pub removed: Mutex<Vec<PathBuf>>,
    }

    impl FakeRegistryFs {
        pub fn put(&self, p: &str, content: &[u8], mtime: u64) {
            self.files
                .lock()
                .unwrap()
                .insert(PathBuf::from(p), (content.to_vec(), mtime));
        }
    }

    impl RegistryFs for FakeRegistryFs {
        fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
            let files = self.files.lock().unwrap();
            let mut out: Vec<(String, bool)> = files
                .keys()
                .filter_map(|p| p.strip_prefix(dir).ok())
                .filter_map(|rest| {
                    let mut c = rest.components();
                    let first = c.next()?.as_os_str().to_str()?.to_string();
                    Some((first, c.next().is_some()))
                })
                .collect();
            out.sort();
            out.dedup();
            Ok(out)
        }
        fn stat(&self, path: &Path) -> io::Result<Option<(u64, u64)>> {
            Ok(self
                .files
                .lock()
                .unwrap()
                .get(path)
                .map(|(c, t)| (c.len() as u64, *t)))
        }
        fn read(&self, path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
            Ok(self
                .files
                .lock()
                .unwrap()
                .get(path)
                .filter(|(c, _)| c.len() as u64 <= max)
                .map(|(c, _)| c.clone()))
        }
        fn remove_tree(&self, path: &Path) -> io::Result<()> {
            self.files
                .lock()
                .unwrap()
                .retain(|p, _| !p.starts_with(path));
            self.removed.lock().unwrap().push(path.to_path_buf());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeRegistryFs;
    use super::*;
    use crate::mirror::sha256_hex;
    use plan::{Policy, Roots};
    use std::time::Duration;

    const V2: &str = "/r/docker/registry/v2";
    const NOW: u64 = 1_800_000_000;

    /// Store `bytes` as a blob, linked into `repo` as a layer; its digest.
    fn blob(fs: &FakeRegistryFs, repo: &str, bytes: &[u8], t: u64) -> String {
        let h = sha256_hex(bytes);
        fs.put(&format!("{V2}/blobs/sha256/{}/{h}/data", &h[..2]), bytes, t);
        fs.put(
            &format!("{V2}/repositories/{repo}/_layers/sha256/{h}/link"),
            format!("sha256:{h}").as_bytes(),
            t,
        );
        format!("sha256:{h}")
    }

    fn manifest(fs: &FakeRegistryFs, repo: &str, layers: &[&str], t: u64) -> String {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{}]}}"#,
            layers[0],
            layers[1..]
                .iter()
                .map(|l| format!(r#"{{"digest":"{l}"}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let h = sha256_hex(m.as_bytes());
        fs.put(
            &format!("{V2}/blobs/sha256/{}/{h}/data", &h[..2]),
            m.as_bytes(),
            t,
        );
        fs.put(
            &format!("{V2}/repositories/{repo}/_manifests/revisions/sha256/{h}/link"),
            format!("sha256:{h}").as_bytes(),
            t,
        );
        format!("sha256:{h}")
    }

    fn tag(fs: &FakeRegistryFs, repo: &str, tag: &str, d: &str) {
        fs.put(
            &format!("{V2}/repositories/{repo}/_manifests/tags/{tag}/current/link"),
            d.as_bytes(),
            NOW,
        );
        fs.put(
            &format!(
                "{V2}/repositories/{repo}/_manifests/tags/{tag}/index/sha256/{}/link",
                &d[7..]
            ),
            d.as_bytes(),
            NOW,
        );
    }

    #[test]
    fn the_tree_is_read_and_pruned_tags_first_blobs_last() {
        let fs = FakeRegistryFs::default();
        let old = NOW - 100 * 86_400;
        let c1 = blob(&fs, "team/app", b"{\"created\":\"x\"}", old);
        let l1 = blob(&fs, "team/app", b"layer one", old);
        let l2 = blob(&fs, "team/app", b"layer two", old);
        let keep = manifest(&fs, "team/app", &[&c1, &l1], old + 10);
        let gone = manifest(&fs, "team/app", &[&c1, &l2], old);
        tag(&fs, "team/app", "v2", &keep);
        tag(&fs, "team/app", "v1", &gone);
        fs.put(
            &format!("{V2}/repositories/team/app/_uploads/u1/data"),
            b"partial",
            old,
        );
        let store = Store::open(&fs, Path::new("/r")).unwrap();
        let inv = store.inventory().unwrap();
        assert_eq!(inv.repos.keys().collect::<Vec<_>>(), ["team/app"]);
        let repo = &inv.repos["team/app"];
        assert_eq!(repo.tags["v2"], keep);
        assert_eq!(repo.revisions.len(), 2);
        assert_eq!(repo.layers.len(), 3);
        assert_eq!(inv.manifests[&keep].blobs, [c1.clone(), l1.clone()]);
        let policy = Policy {
            keep_builds: 1,
            min_age: Duration::from_secs(3600),
            ..Policy::default()
        };
        let p = plan::plan(&inv, &Roots::default(), &policy, NOW);
        store.apply(&p).unwrap();
        let removed: Vec<String> = fs
            .removed
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(V2).unwrap().display().to_string())
            .collect();
        let (gh, l2h) = (&gone[7..], &l2[7..]);
        let mut blobs = vec![
            format!("blobs/sha256/{}/{gh}", &gh[..2]),
            format!("blobs/sha256/{}/{l2h}", &l2h[..2]),
        ];
        blobs.sort();
        let mut want = vec![
            "repositories/team/app/_manifests/tags/v1".to_string(),
            format!("repositories/team/app/_manifests/revisions/sha256/{gh}"),
            format!("repositories/team/app/_layers/sha256/{l2h}"),
        ];
        want.extend(blobs);
        assert_eq!(removed, want);
        assert_eq!(
            p.freed["team/app"].bytes,
            "layer two".len() as u64 + fs_size_of_manifest(&gone)
        );
        // The upload in progress and the kept image are untouched.
        let files = fs.files.lock().unwrap();
        assert!(files.contains_key(Path::new(&format!(
            "{V2}/repositories/team/app/_uploads/u1/data"
        ))));
        assert!(files.contains_key(Path::new(&format!(
            "{V2}/repositories/team/app/_manifests/tags/v2/current/link"
        ))));
    }

    fn fs_size_of_manifest(d: &str) -> u64 {
        // The manifest JSON of `manifest()` with a config and one layer.
        format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{d}"}},"layers":[{{"digest":"{d}"}}]}}"#
        )
        .len() as u64
    }

    #[test]
    fn a_root_that_is_not_a_registry_tree_is_refused() {
        let fs = FakeRegistryFs::default();
        fs.put("/r/something/else", b"x", 1);
        assert!(matches!(
            Store::open(&fs, Path::new("/r")),
            Err(StoreError::NotATree(_))
        ));
        // An empty root is an empty registry.
        let fs = FakeRegistryFs::default();
        fs.put("/r/slipway/pulls.json", b"[]", 1);
        assert!(Store::open(&fs, Path::new("/r"))
            .unwrap()
            .inventory()
            .unwrap()
            .repos
            .is_empty());
    }
}
