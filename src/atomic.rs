//! The one way slipway writes a file: a temp file in the same directory,
//! `fsync`, `rename` over the target, then `fsync` of the directory. A
//! reader sees the old content or the new, never a torn file, even after a
//! crash mid-write, and a failure before the rename leaves nothing behind
//! (the temp file is removed when dropped).
//!
//! Below every program that writes files: the node agent's host files
//! ([`crate::node::fs::RealFs`]), the blob cache's metadata
//! ([`crate::proxy::cache`]) and `slipway pki init`. Fails with the
//! `io::Error` of the step that failed; callers name the path.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Prefix of every temp file slipway creates beside a file it writes.
pub const TEMP_PREFIX: &str = ".slipway-tmp-";

/// fsync a directory so a rename or unlink inside it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECTORY.bits())
        .open(dir)?
        .sync_all()
}

/// `content` in a fsynced temp file beside `path`, with `mode`. Dropped
/// without being persisted, it is removed: a failure leaves nothing behind.
fn synced_temp<'a>(
    path: &'a Path,
    content: &[u8],
    mode: u32,
) -> io::Result<(&'a Path, tempfile::NamedTempFile)> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(content)?;
    // tempfile honours the umask; set the mode explicitly so 0644/0600 hold.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    Ok((dir, tmp))
}

/// Write `path` with `content` and `mode`, replacing what is there.
pub fn replace(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let (dir, tmp) = synced_temp(path, content, mode)?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Create `path` with `content` and `mode`; fails if it exists.
pub fn create_new(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let (dir, tmp) = synced_temp(path, content, mode)?;
    tmp.persist_noclobber(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_creates_new_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        create_new(&p, b"one", 0o600).unwrap();
        assert!(create_new(&p, b"two", 0o600).is_err(), "never clobbers");
        assert_eq!(fs::read(&p).unwrap(), b"one");
        replace(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(replace(&d.path().join("missing/f"), b"x", 0o644).is_err());
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }
}
