//! Crash-safe host file writes.
//!
//! Owns the one way slipway writes a file on a node: a temp file in the same
//! directory, `fsync`, `rename` over the target, then `fsync` of the
//! directory. A reader (containerd re-reads `hosts.toml` on every pull) sees
//! either the old or the new content, never a torn file, even if the agent is
//! SIGKILLed mid-write. The temp file is removed if anything fails before the
//! rename, so nothing half-written is left behind.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Prefix of every temp file slipway creates; a crash between create and
/// rename leaves one behind, and the next run removes such files (they are
/// ours by name and never referenced by containerd, which reads only
/// `hosts.toml` and, without one, `*.crt`/`*.cert`/`*.key`).
pub const TEMP_PREFIX: &str = ".slipway-tmp-";

/// Outcome of [`write_atomic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Unchanged,
    Written,
}

/// Read a file, mapping "not found" to `None`.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write `content` to `path` atomically with the given mode; skip the write
/// when the file already holds exactly `content` (and has that mode).
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<WriteOutcome> {
    if let Some(current) = read_optional(path)? {
        let same_mode = fs::metadata(path)?.permissions().mode() & 0o7777 == mode;
        if current == content && same_mode {
            return Ok(WriteOutcome::Unchanged);
        }
    }
    let (dir, tmp) = synced_temp(path, content, mode)?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)?;
    Ok(WriteOutcome::Written)
}

/// Create a new file exclusively (fails if it exists), atomically, for files
/// that must never be overwritten (backups, keys without `--force`).
pub fn create_new_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let (dir, tmp) = synced_temp(path, content, mode)?;
    tmp.persist_noclobber(path).map_err(|e| e.error)?;
    sync_dir(dir)
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

/// Remove a file and make the removal durable. Missing files are fine.
pub fn remove_durable(path: &Path) -> io::Result<()> {
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

/// Create one directory (mode 0755) and make it durable.
pub fn create_dir_durable(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// fsync a directory so a rename or unlink inside it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECTORY.bits())
        .open(dir)?
        .sync_all()
}

/// Remove stale temp files left by a crash between create and rename.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
            && entry.file_type()?.is_file()
        {
            fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    if n > 0 {
        sync_dir(dir)?;
    }
    Ok(n)
}

/// Open for reading, used to probe readability with a clear error.
pub fn probe_dir(dir: &Path) -> io::Result<()> {
    fs::read_dir(dir).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_is_skipped_when_unchanged_and_mode_is_set() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        assert_eq!(
            write_atomic(&p, b"a", 0o644).unwrap(),
            WriteOutcome::Written
        );
        assert_eq!(
            write_atomic(&p, b"a", 0o644).unwrap(),
            WriteOutcome::Unchanged
        );
        assert_eq!(
            write_atomic(&p, b"b", 0o600).unwrap(),
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
        create_new_atomic(&p, b"one", 0o600).unwrap();
        assert!(create_new_atomic(&p, b"two", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
