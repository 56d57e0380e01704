//! The shell around [`crate::node::hostconfig`]: observe, plan, apply, report.
//!
//! Writes, for each alias, under `<host_root>/<certs_dir>/<alias-dir>/`:
//! `hosts.toml`, `slipway-ca.crt` and `.slipway-state.json`, each through
//! [`NodeFs::write_atomic`]; every host file call goes through [`NodeFs`].
//! Removes only files carrying slipway's marker, and only directories its
//! state says it created. An error in one alias never stops the others;
//! every directory gets a [`DirOutcome`].

use std::io;
use std::path::{Path, PathBuf};

use crate::node::fs::{EntryKind, Follow, NodeFs, WriteOutcome, TEMP_PREFIX};
use crate::node::hostconfig::{
    self, Alias, HostEntry, Kind, Observed, Op, Plan, PlanError, CA_FILE, HOSTS_TOML, STATE_FILE,
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> ApplyError + 'a {
    move |source| ApplyError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// What one directory's pass did, when it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub kind: Kind,
    /// Files written or removed, by name; empty when nothing changed.
    pub changes: Vec<String>,
    pub warnings: Vec<String>,
}

/// One directory under `certs_dir` after a pass.
#[derive(Debug)]
pub struct DirOutcome {
    /// The alias (`host[:port]`) for a configured alias; the directory's
    /// name for one slipway manages that is no longer configured.
    pub alias: String,
    pub configured: bool,
    pub dir: PathBuf,
    pub result: Result<Applied, ApplyError>,
}

/// Which directory containerd reads for `alias` under `certs_dir`.
pub fn alias_dir(fs: &dyn NodeFs, certs_dir: &Path, alias: &Alias) -> PathBuf {
    if let Some(u) = alias.underscore_dir_name() {
        let p = certs_dir.join(u);
        if matches!(fs.kind(&p), Ok(EntryKind::Dir)) {
            return p;
        }
    }
    certs_dir.join(alias.dir_name())
}

fn read_text(fs: &dyn NodeFs, p: &Path) -> Result<Option<(String, u32)>, ApplyError> {
    match fs.read(p, Follow::No).map_err(io_err(p, "cannot read"))? {
        None => Ok(None),
        Some(d) => Ok(Some((
            String::from_utf8(d.bytes).map_err(|_| PlanError::NotText {
                path: p.display().to_string(),
            })?,
            d.mode,
        ))),
    }
}

/// Read what is in one alias directory.
pub fn observe(fs: &dyn NodeFs, dir: &Path) -> Result<Observed, ApplyError> {
    match fs.kind(dir).map_err(io_err(dir, "cannot stat directory"))? {
        EntryKind::Missing => return Ok(Observed::default()),
        EntryKind::Dir => {}
        _ => {
            return Err(ApplyError::Io {
                path: dir.to_path_buf(),
                op: "not a directory",
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            })
        }
    }
    let mut obs = Observed {
        dir_exists: true,
        ..Default::default()
    };
    for (name, _) in fs.list(dir).map_err(io_err(dir, "cannot read directory"))? {
        if [".crt", ".cert", ".key"].iter().any(|s| name.ends_with(s)) && name != CA_FILE {
            obs.loose_certs.push(name);
        }
    }
    let hosts = dir.join(HOSTS_TOML);
    if let Some((text, mode)) = read_text(fs, &hosts)? {
        obs.hosts_toml = Some(text);
        obs.hosts_toml_mode = Some(mode);
    }
    let ca = dir.join(CA_FILE);
    obs.ca = fs
        .read(&ca, Follow::No)
        .map_err(io_err(&ca, "cannot read"))?
        .map(|d| d.bytes);
    let st = dir.join(STATE_FILE);
    obs.state = fs
        .read(&st, Follow::No)
        .map_err(io_err(&st, "cannot read"))?
        .map(|d| String::from_utf8_lossy(&d.bytes).into_owned());
    Ok(obs)
}

/// Remove temp files a crash between create and rename left behind.
fn remove_stale_temps(fs: &dyn NodeFs, dir: &Path) -> Result<usize, ApplyError> {
    let mut n = 0;
    for (name, kind) in fs.list(dir).map_err(io_err(dir, "cannot read directory"))? {
        if name.starts_with(TEMP_PREFIX) && kind == EntryKind::File {
            let p = dir.join(&name);
            fs.remove_file(&p)
                .map_err(io_err(&p, "cannot remove temp file"))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Execute a plan in `dir`; returns the names of what changed.
pub fn execute(fs: &dyn NodeFs, dir: &Path, plan: &Plan) -> Result<Vec<String>, ApplyError> {
    let mut changed = Vec::new();
    if fs.kind(dir).ok() == Some(EntryKind::Dir) {
        let n = remove_stale_temps(fs, dir)?;
        if n > 0 {
            changed.push(format!("{n} stale temp file(s) removed"));
        }
    }
    for op in &plan.ops {
        match op {
            Op::CreateDir => {
                fs.create_dir(dir)
                    .map_err(io_err(dir, "cannot create directory"))?;
                changed.push("directory created".into());
            }
            Op::Write {
                file,
                content,
                mode,
            } => {
                let p = dir.join(file);
                if fs
                    .write_atomic(&p, content.as_bytes(), *mode)
                    .map_err(io_err(&p, "cannot write"))?
                    == WriteOutcome::Written
                {
                    changed.push(format!("{file} written"));
                }
            }
            Op::Remove { file } => {
                let p = dir.join(file);
                fs.remove_file(&p).map_err(io_err(&p, "cannot remove"))?;
                changed.push(format!("{file} removed"));
            }
            Op::RemoveDirIfEmpty => match fs.remove_dir(dir) {
                Ok(()) => changed.push("directory removed".into()),
                // Someone else put files in the directory we created: keep it.
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => {
                    changed.push("directory kept (not empty)".into());
                }
                Err(e) => return Err(io_err(dir, "cannot remove directory")(e)),
            },
        }
    }
    Ok(changed)
}

fn outcome(
    alias: String,
    configured: bool,
    dir: PathBuf,
    r: Result<(Plan, Vec<String>), ApplyError>,
) -> DirOutcome {
    DirOutcome {
        alias,
        configured,
        dir,
        result: r.map(|(plan, changes)| Applied {
            kind: plan.kind,
            changes,
            warnings: plan.warnings,
        }),
    }
}

/// Directories under `certs_dir` that hold slipway state.
fn managed_dirs(fs: &dyn NodeFs, certs_dir: &Path) -> Result<Vec<PathBuf>, ApplyError> {
    let entries = match fs.list(certs_dir) {
        Ok(v) => v,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_err(certs_dir, "cannot read directory")(e)),
    };
    let mut out = Vec::new();
    for (name, kind) in entries {
        let p = certs_dir.join(name);
        if kind == EntryKind::Dir && fs.kind(&p.join(STATE_FILE)).ok() == Some(EntryKind::File) {
            out.push(p);
        }
    }
    Ok(out)
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A mirrored upstream's directory (#20): its host and the `server`
/// containerd falls back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorDir {
    pub host: Alias,
    pub server: String,
}

/// Bring every alias and mirror directory to the desired state, and clean
/// up directories slipway manages that are no longer configured. An error
/// in one directory never stops the others.
pub fn apply_all(
    fs: &dyn NodeFs,
    certs_dir: &Path,
    aliases: &[Alias],
    mirrors: &[MirrorDir],
    hosts: &[HostEntry],
    ca_content: &str,
) -> Result<Vec<DirOutcome>, ApplyError> {
    if fs
        .kind(certs_dir)
        .map_err(io_err(certs_dir, "cannot stat certs_dir"))?
        == EntryKind::Missing
    {
        fs.create_dir_all(certs_dir)
            .map_err(io_err(certs_dir, "cannot create certs_dir"))?;
    }
    fs.list(certs_dir)
        .map_err(io_err(certs_dir, "cannot read certs_dir"))?;
    let mut out = Vec::new();
    let mut wanted = Vec::new();
    for alias in aliases {
        let dir = alias_dir(fs, certs_dir, alias);
        wanted.push(dir.clone());
        let r = (|| {
            let obs = observe(fs, &dir)?;
            let plan =
                hostconfig::plan_alias(&dir.display().to_string(), alias, hosts, ca_content, &obs)?;
            let changed = execute(fs, &dir, &plan)?;
            Ok((plan, changed))
        })();
        out.push(outcome(alias.dir_name(), true, dir, r));
    }
    for m in mirrors {
        let dir = alias_dir(fs, certs_dir, &m.host);
        wanted.push(dir.clone());
        let r = (|| {
            let obs = observe(fs, &dir)?;
            let plan = hostconfig::plan_mirror(
                &dir.display().to_string(),
                &m.host,
                &m.server,
                hosts,
                ca_content,
                &obs,
            )?;
            let changed = execute(fs, &dir, &plan)?;
            Ok((plan, changed))
        })();
        out.push(outcome(m.host.dir_name(), true, dir, r));
    }
    for dir in managed_dirs(fs, certs_dir)? {
        if !wanted.contains(&dir) {
            let r = cleanup_dir(fs, &dir);
            out.push(outcome(dir_name(&dir), false, dir, r));
        }
    }
    Ok(out)
}

fn cleanup_dir(fs: &dyn NodeFs, dir: &Path) -> Result<(Plan, Vec<String>), ApplyError> {
    let obs = observe(fs, dir)?;
    let plan = hostconfig::plan_cleanup(&dir.display().to_string(), &obs)?;
    let changed = execute(fs, dir, &plan)?;
    Ok((plan, changed))
}

/// Remove everything slipway wrote: configured aliases and any other
/// directory holding slipway state.
pub fn cleanup_all(
    fs: &dyn NodeFs,
    certs_dir: &Path,
    aliases: &[Alias],
) -> Result<Vec<DirOutcome>, ApplyError> {
    let mut dirs: Vec<(String, bool, PathBuf)> = aliases
        .iter()
        .map(|a| (a.dir_name(), true, alias_dir(fs, certs_dir, a)))
        .collect();
    for d in managed_dirs(fs, certs_dir)? {
        if !dirs.iter().any(|(_, _, p)| p == &d) {
            dirs.push((dir_name(&d), false, d));
        }
    }
    let mut out = Vec::new();
    for (alias, configured, dir) in dirs {
        let r = match fs.kind(&dir) {
            Ok(EntryKind::Missing) => Ok((
                Plan {
                    kind: Kind::Owned,
                    ops: vec![],
                    warnings: vec![],
                },
                vec![],
            )),
            _ => cleanup_dir(fs, &dir),
        };
        out.push(outcome(alias, configured, dir, r));
    }
    Ok(out)
}
