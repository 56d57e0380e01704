//! Every host file call the node agent makes, behind [`NodeFs`].
//!
//! [`RealFs`] writes every file on a node the one way slipway writes files
//! ([`crate::atomic`]): a temp file in the same directory, `fsync`,
//! `rename` over the target, then `fsync` of the directory. A reader (containerd re-reads `hosts.toml` on every pull)
//! sees either the old or the new content, never a torn file, even if the
//! agent is SIGKILLed mid-write. The temp file is removed if anything fails
//! before the rename, so nothing half-written is left behind.
//!
//! Reads open with `O_NONBLOCK` (and `O_NOFOLLOW` for host files), then
//! `fstat` the handle: anything that is not a regular file, or is larger
//! than [`MAX_FILE_BYTES`], is refused with an error. A FIFO named
//! `hosts.toml` used to block the agent's loop in `open` until someone
//! opened the other end, and a 1 GiB sparse file was read whole on every
//! pass (#13).
//!
//! [`fake::FakeFs`] (tests only) is an in-memory tree that records every
//! call and can inject an errno into any of them, so the error paths of
//! apply and cleanup are tested without root.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::atomic::sync_dir;
/// Prefix of every temp file slipway creates; a crash between create and
/// rename leaves one behind, and the next run removes such files (they are
/// ours by name and never referenced by containerd, which reads only
/// `hosts.toml` and, without one, `*.crt`/`*.cert`/`*.key`).
pub use crate::atomic::TEMP_PREFIX;

/// The largest host file slipway reads: hosts.toml, a CA bundle, a
/// containerd config or a state file are a few KiB; anything this large is
/// not one of them.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Outcome of [`NodeFs::write_atomic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Unchanged,
    Written,
}

/// Whether a read may follow a symlink at the final path component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Host configuration under `certs_dir`: a symlinked `hosts.toml` would
    /// have its target's content copied into the merged file (#13).
    No,
    /// slipway's own inputs: the CA file is a ConfigMap mount, whose files
    /// are symlinks into `..data/`.
    Yes,
}

/// A regular file's bytes and permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// What is at a path, without following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    Missing,
    Dir,
    File,
    Symlink,
    /// A FIFO, socket or device.
    Other,
}

/// The host file operations of the node agent.
pub trait NodeFs: Send + Sync {
    /// A regular file of at most [`MAX_FILE_BYTES`]; `None` if missing.
    /// Never blocks on a FIFO or device.
    fn read(&self, path: &Path, follow: Follow) -> io::Result<Option<FileData>>;
    /// What is at `path` (`lstat`).
    fn kind(&self, path: &Path) -> io::Result<EntryKind>;
    /// The names in a directory with their kinds, sorted by name.
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>>;
    /// Write atomically with `mode`; skipped when the file already holds
    /// exactly `content` with that mode.
    fn write_atomic(&self, path: &Path, content: &[u8], mode: u32) -> io::Result<WriteOutcome>;
    /// Create a file that must not exist yet (a backup), atomically.
    fn create_new_atomic(&self, path: &Path, content: &[u8], mode: u32) -> io::Result<()>;
    /// Remove a file durably; a missing file is fine.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Create one directory (mode 0755) durably.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Create a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Remove an empty directory durably (`ENOTEMPTY` otherwise).
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Paths matching a shell glob (containerd's `imports`), sorted.
    fn glob(&self, pattern: &str) -> io::Result<Vec<PathBuf>>;
}

/// An error for a path that is there but is not what slipway may read.
pub fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn kind_of(ft: fs::FileType) -> EntryKind {
    if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    }
}

fn other_name(ft: fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl NodeFs for RealFs {
    fn read(&self, path: &Path, follow: Follow) -> io::Result<Option<FileData>> {
        use nix::fcntl::OFlag;
        let mut flags = OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        if follow == Follow::No {
            flags |= OFlag::O_NOFOLLOW;
        }
        let mut f = match OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits())
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Err(refused(
                    "is a symlink; slipway does not follow symlinks in host configuration".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        if !meta.file_type().is_file() {
            return Err(refused(format!(
                "is {}, not a regular file",
                other_name(meta.file_type())
            )));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(refused(format!(
                "is {} bytes, more than the {MAX_FILE_BYTES}-byte limit for a host file",
                meta.len()
            )));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // The file may grow between fstat and read: never take more.
        (&mut f).take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(refused(format!(
                "grew past the {MAX_FILE_BYTES}-byte limit for a host file while being read"
            )));
        }
        Ok(Some(FileData {
            bytes,
            mode: meta.permissions().mode() & 0o7777,
        }))
    }

    fn kind(&self, path: &Path) -> io::Result<EntryKind> {
        match fs::symlink_metadata(path) {
            Ok(m) => Ok(kind_of(m.file_type())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(EntryKind::Missing),
            Err(e) => Err(e),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>> {
        let mut v = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            v.push((
                e.file_name().to_string_lossy().into_owned(),
                kind_of(e.file_type()?),
            ));
        }
        v.sort();
        Ok(v)
    }

    fn write_atomic(&self, path: &Path, content: &[u8], mode: u32) -> io::Result<WriteOutcome> {
        if let Some(current) = self.read(path, Follow::No)? {
            if current.bytes == content && current.mode == mode {
                return Ok(WriteOutcome::Unchanged);
            }
        }
        crate::atomic::replace(path, content, mode)?;
        Ok(WriteOutcome::Written)
    }

    fn create_new_atomic(&self, path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
        crate::atomic::create_new(path, content, mode)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o755).create(path)?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }

    fn glob(&self, pattern: &str) -> io::Result<Vec<PathBuf>> {
        let paths = glob::glob(pattern).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{pattern:?}: {e}"))
        })?;
        let mut v: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
        v.sort();
        Ok(v)
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory [`NodeFs`] that records calls and injects errors.

    use std::collections::BTreeMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::{EntryKind, FileData, Follow, NodeFs, WriteOutcome, MAX_FILE_BYTES};

    /// The operations a fault can target.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        Read,
        Kind,
        List,
        /// Creating the temp file of a write (EACCES, ENOSPC, EROFS).
        Write,
        /// The rename at the end of a write: the old content stays.
        Rename,
        CreateNew,
        RemoveFile,
        CreateDir,
        RemoveDir,
        Glob,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Node {
        Dir,
        File(FileData),
        Fifo,
        Symlink(PathBuf),
    }

    #[derive(Default)]
    pub struct FakeFs {
        pub nodes: Mutex<BTreeMap<PathBuf, Node>>,
        pub calls: Mutex<Vec<(Op, PathBuf)>>,
        faults: Mutex<Vec<(Op, PathBuf, i32)>>,
        /// A read of this path sleeps this long first (a hung mount).
        pub stall: Mutex<Option<(PathBuf, std::time::Duration)>>,
    }

    impl FakeFs {
        pub fn new() -> Self {
            let f = FakeFs::default();
            f.put(Path::new("/"), Node::Dir);
            f
        }
        pub fn put(&self, p: &Path, n: Node) {
            self.nodes.lock().unwrap().insert(p.to_path_buf(), n);
        }
        pub fn mkdir_p(&self, p: &Path) {
            for a in p.ancestors() {
                self.put(a, Node::Dir);
            }
        }
        pub fn file(&self, p: &Path, bytes: &[u8], mode: u32) {
            if let Some(d) = p.parent() {
                self.mkdir_p(d);
            }
            self.put(
                p,
                Node::File(FileData {
                    bytes: bytes.to_vec(),
                    mode,
                }),
            );
        }
        pub fn get(&self, p: &Path) -> Option<Node> {
            self.nodes.lock().unwrap().get(p).cloned()
        }
        pub fn content(&self, p: &Path) -> Option<Vec<u8>> {
            match self.get(p) {
                Some(Node::File(f)) => Some(f.bytes),
                _ => None,
            }
        }
        /// Make `op` on `path` fail with `errno` (every time).
        pub fn fail(&self, op: Op, path: &Path, errno: i32) {
            self.faults
                .lock()
                .unwrap()
                .push((op, path.to_path_buf(), errno));
        }
        pub fn heal(&self) {
            self.faults.lock().unwrap().clear();
        }
        pub fn ops(&self, op: Op) -> Vec<PathBuf> {
            let c = self.calls.lock().unwrap();
            c.iter()
                .filter(|(o, _)| *o == op)
                .map(|(_, p)| p.clone())
                .collect()
        }
        /// Records the call, then fails it if a fault targets it.
        fn enter(&self, op: Op, p: &Path) -> io::Result<()> {
            self.calls.lock().unwrap().push((op, p.to_path_buf()));
            let faults = self.faults.lock().unwrap();
            match faults.iter().find(|(o, fp, _)| *o == op && fp == p) {
                Some((_, _, errno)) => Err(io::Error::from_raw_os_error(*errno)),
                None => Ok(()),
            }
        }
        fn parent_is_dir(&self, p: &Path) -> io::Result<()> {
            match p.parent().and_then(|d| self.get(d)) {
                Some(Node::Dir) => Ok(()),
                _ => Err(io::Error::from(io::ErrorKind::NotFound)),
            }
        }
    }

    /// A node as the agent sees it: a valid CA at `/ca/ca.crt`, and a
    /// containerd 1.x config whose `config_path` is
    /// `/etc/containerd/certs.d`, which exists.
    pub fn node(ca_pem: &str) -> std::sync::Arc<FakeFs> {
        let fs = std::sync::Arc::new(FakeFs::new());
        fs.file(Path::new("/ca/ca.crt"), ca_pem.as_bytes(), 0o644);
        fs.file(
            Path::new("/etc/containerd/config.toml"),
            b"version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
            0o644,
        );
        fs.mkdir_p(Path::new("/etc/containerd/certs.d"));
        fs
    }

    /// A fresh, valid CA certificate (PEM).
    pub fn ca_pem() -> String {
        crate::pki::issue_ca(time::OffsetDateTime::now_utc())
            .unwrap()
            .cert_pem
    }

    /// The agent config for [`node`]: `aliases`, then `extra` TOML.
    pub fn config_text(aliases: &[&str], extra: &str) -> String {
        let list: Vec<String> = aliases.iter().map(|a| format!("{a:?}")).collect();
        format!(
            "[registry]\naliases = [{}]\nupstream = \"https://registry.example:5000\"\nca_file = \"/ca/ca.crt\"\n{extra}",
            list.join(", ")
        )
    }

    pub fn config(text: &str) -> crate::node::config::AgentConfig {
        crate::node::config::AgentConfig::from_str(
            Path::new("/etc/slipway/agent.toml"),
            text,
            &Default::default(),
        )
        .unwrap()
    }

    impl NodeFs for FakeFs {
        fn read(&self, p: &Path, follow: Follow) -> io::Result<Option<FileData>> {
            let stall = self.stall.lock().unwrap().clone();
            if let Some((sp, d)) = stall {
                if sp == p {
                    std::thread::sleep(d);
                }
            }
            self.enter(Op::Read, p)?;
            match self.get(p) {
                None => Ok(None),
                Some(Node::File(f)) if f.bytes.len() as u64 > MAX_FILE_BYTES => {
                    Err(super::refused("too large".into()))
                }
                Some(Node::File(f)) => Ok(Some(f)),
                Some(Node::Symlink(t)) if follow == Follow::Yes => self.read(&t, follow),
                Some(Node::Symlink(_)) => Err(super::refused("is a symlink".into())),
                Some(Node::Fifo) => Err(super::refused("is a FIFO, not a regular file".into())),
                Some(Node::Dir) => Err(super::refused("is a directory".into())),
            }
        }
        fn kind(&self, p: &Path) -> io::Result<EntryKind> {
            self.enter(Op::Kind, p)?;
            Ok(match self.get(p) {
                None => EntryKind::Missing,
                Some(Node::Dir) => EntryKind::Dir,
                Some(Node::File(_)) => EntryKind::File,
                Some(Node::Symlink(_)) => EntryKind::Symlink,
                Some(Node::Fifo) => EntryKind::Other,
            })
        }
        fn list(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>> {
            self.enter(Op::List, dir)?;
            if self.get(dir) != Some(Node::Dir) {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            let nodes = self.nodes.lock().unwrap();
            Ok(nodes
                .iter()
                .filter(|(p, _)| p.parent() == Some(dir) && p.as_path() != dir)
                .map(|(p, n)| {
                    let k = match n {
                        Node::Dir => EntryKind::Dir,
                        Node::File(_) => EntryKind::File,
                        Node::Symlink(_) => EntryKind::Symlink,
                        Node::Fifo => EntryKind::Other,
                    };
                    (p.file_name().unwrap().to_string_lossy().into_owned(), k)
                })
                .collect())
        }
        fn write_atomic(&self, p: &Path, content: &[u8], mode: u32) -> io::Result<WriteOutcome> {
            if let Some(Node::File(f)) = self.get(p) {
                if f.bytes == content && f.mode == mode {
                    return Ok(WriteOutcome::Unchanged);
                }
            }
            self.enter(Op::Write, p)?;
            self.parent_is_dir(p)?;
            self.enter(Op::Rename, p)?;
            self.file(p, content, mode);
            Ok(WriteOutcome::Written)
        }
        fn create_new_atomic(&self, p: &Path, content: &[u8], mode: u32) -> io::Result<()> {
            self.enter(Op::CreateNew, p)?;
            self.parent_is_dir(p)?;
            if self.get(p).is_some() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            self.file(p, content, mode);
            Ok(())
        }
        fn remove_file(&self, p: &Path) -> io::Result<()> {
            self.enter(Op::RemoveFile, p)?;
            self.nodes.lock().unwrap().remove(p);
            Ok(())
        }
        fn create_dir(&self, p: &Path) -> io::Result<()> {
            self.enter(Op::CreateDir, p)?;
            self.parent_is_dir(p)?;
            if self.get(p).is_some() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            self.put(p, Node::Dir);
            Ok(())
        }
        fn create_dir_all(&self, p: &Path) -> io::Result<()> {
            self.enter(Op::CreateDir, p)?;
            self.mkdir_p(p);
            Ok(())
        }
        fn remove_dir(&self, p: &Path) -> io::Result<()> {
            self.enter(Op::RemoveDir, p)?;
            let mut nodes = self.nodes.lock().unwrap();
            if nodes.keys().any(|k| k.parent() == Some(p) && k != p) {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOTEMPTY));
            }
            nodes.remove(p);
            Ok(())
        }
        fn glob(&self, pattern: &str) -> io::Result<Vec<PathBuf>> {
            self.enter(Op::Glob, Path::new(pattern))?;
            let pat = glob::Pattern::new(pattern)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            let nodes = self.nodes.lock().unwrap();
            Ok(nodes
                .keys()
                .filter(|p| pat.matches_path(p))
                .cloned()
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_is_skipped_when_unchanged_and_mode_is_set() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let fs_ = RealFs;
        assert_eq!(
            fs_.write_atomic(&p, b"a", 0o644).unwrap(),
            WriteOutcome::Written
        );
        assert_eq!(
            fs_.write_atomic(&p, b"a", 0o644).unwrap(),
            WriteOutcome::Unchanged
        );
        assert_eq!(
            fs_.write_atomic(&p, b"b", 0o600).unwrap(),
            WriteOutcome::Written
        );
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&p).unwrap(), b"b");
        // no temp files remain
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_new_never_clobbers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        RealFs.create_new_atomic(&p, b"one", 0o600).unwrap();
        assert!(RealFs.create_new_atomic(&p, b"two", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    /// #13: a FIFO used to block `open` until a writer appeared.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.toml");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(RealFs.read(&p2, Follow::No).map(|_| ()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("read of a FIFO must not block");
        let e = r.unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    /// #13: a 1 GiB sparse file used to be read whole, on every pass.
    #[test]
    fn a_large_file_is_refused_by_its_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.toml");
        fs::File::create(&p).unwrap().set_len(1 << 30).unwrap();
        let e = RealFs.read(&p, Follow::No).unwrap_err();
        assert!(e.to_string().contains("1048576-byte limit"), "{e}");
    }

    /// #13: a symlinked hosts.toml's target was copied into the merge.
    #[test]
    fn a_symlink_is_not_followed_for_host_files() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere");
        fs::write(&target, b"secret").unwrap();
        let p = d.path().join("hosts.toml");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let e = RealFs.read(&p, Follow::No).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        // slipway's own inputs (a ConfigMap mount) may be symlinks.
        assert_eq!(
            RealFs.read(&p, Follow::Yes).unwrap().unwrap().bytes,
            b"secret"
        );
        assert_eq!(RealFs.kind(&p).unwrap(), EntryKind::Symlink);
    }
}
