//! The shell around [`crate::node::hostconfig`]: observe, plan, apply, report.
//!
//! Writes, for each alias, under `<host_root>/<certs_dir>/<alias-dir>/`:
//! `hosts.toml`, `slipway-ca.crt` and `.slipway-state.json`, each through
//! [`crate::node::fs::write_atomic`]. Removes only files carrying slipway's
//! marker, and only directories its state says it created. An error in one
//! alias never stops the others; every alias gets a line in the [`Report`].

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::node::fs::{self as fsutil, WriteOutcome};
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

/// What happened to one alias directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    /// Files written or removed, by name.
    Changed(Vec<String>),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct AliasReport {
    pub alias: String,
    pub dir: PathBuf,
    pub kind: Option<Kind>,
    pub outcome: Outcome,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub aliases: Vec<AliasReport>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.aliases
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Failed(_)))
            .count()
    }
    pub fn changed(&self) -> usize {
        self.aliases
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Changed(_)))
            .count()
    }
}

impl fmt::Display for AliasReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Some(Kind::Owned) => " (owned)",
            Some(Kind::Merged) => " (merged)",
            None => "",
        };
        match &self.outcome {
            Outcome::Unchanged => {
                write!(f, "{}: unchanged{kind} {}", self.alias, self.dir.display())
            }
            Outcome::Changed(files) => write!(
                f,
                "{}: changed{kind} {}: {}",
                self.alias,
                self.dir.display(),
                files.join(", ")
            ),
            Outcome::Failed(e) => write!(f, "{}: error: {e}", self.alias),
        }
    }
}

/// Which directory containerd reads for `alias` under `certs_dir`.
pub fn alias_dir(certs_dir: &Path, alias: &Alias) -> PathBuf {
    if let Some(u) = alias.underscore_dir_name() {
        let p = certs_dir.join(u);
        if p.is_dir() {
            return p;
        }
    }
    certs_dir.join(alias.dir_name())
}

/// Read what is in one alias directory.
pub fn observe(dir: &Path) -> Result<Observed, ApplyError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Observed::default()),
        Err(e) => return Err(io_err(dir, "cannot stat directory")(e)),
    };
    if !meta.is_dir() {
        return Err(ApplyError::Io {
            path: dir.to_path_buf(),
            op: "not a directory",
            source: io::Error::from(io::ErrorKind::AlreadyExists),
        });
    }
    let mut obs = Observed {
        dir_exists: true,
        ..Default::default()
    };
    let entries = fs::read_dir(dir).map_err(io_err(dir, "cannot read directory"))?;
    for e in entries {
        let e = e.map_err(io_err(dir, "cannot read directory"))?;
        let name = e.file_name().to_string_lossy().to_string();
        if [".crt", ".cert", ".key"].iter().any(|s| name.ends_with(s)) && name != CA_FILE {
            obs.loose_certs.push(name);
        }
    }
    obs.loose_certs.sort();
    let hosts = dir.join(HOSTS_TOML);
    if let Some(b) = fsutil::read_optional(&hosts).map_err(io_err(&hosts, "cannot read"))? {
        obs.hosts_toml = Some(String::from_utf8(b).map_err(|_| PlanError::NotText {
            path: hosts.display().to_string(),
        })?);
        obs.hosts_toml_mode = Some(
            fs::metadata(&hosts)
                .map_err(io_err(&hosts, "cannot stat"))?
                .permissions()
                .mode()
                & 0o7777,
        );
    }
    let ca = dir.join(CA_FILE);
    obs.ca = fsutil::read_optional(&ca).map_err(io_err(&ca, "cannot read"))?;
    let st = dir.join(STATE_FILE);
    obs.state = fsutil::read_optional(&st)
        .map_err(io_err(&st, "cannot read"))?
        .map(|b| String::from_utf8_lossy(&b).to_string());
    Ok(obs)
}

/// Execute a plan in `dir`; returns the names of what changed.
pub fn execute(dir: &Path, plan: &Plan) -> Result<Vec<String>, ApplyError> {
    let mut changed = Vec::new();
    if dir.is_dir() {
        let n = fsutil::remove_stale_temps(dir).map_err(io_err(dir, "cannot remove temp files"))?;
        if n > 0 {
            changed.push(format!("{n} stale temp file(s) removed"));
        }
    }
    for op in &plan.ops {
        match op {
            Op::CreateDir => {
                fsutil::create_dir_durable(dir).map_err(io_err(dir, "cannot create directory"))?;
                changed.push("directory created".into());
            }
            Op::Write {
                file,
                content,
                mode,
            } => {
                let p = dir.join(file);
                if fsutil::write_atomic(&p, content.as_bytes(), *mode)
                    .map_err(io_err(&p, "cannot write"))?
                    == WriteOutcome::Written
                {
                    changed.push(format!("{file} written"));
                }
            }
            Op::Remove { file } => {
                let p = dir.join(file);
                fsutil::remove_durable(&p).map_err(io_err(&p, "cannot remove"))?;
                changed.push(format!("{file} removed"));
            }
            Op::RemoveDirIfEmpty => match fs::remove_dir(dir) {
                Ok(()) => {
                    if let Some(parent) = dir.parent() {
                        fsutil::sync_dir(parent).map_err(io_err(parent, "cannot sync"))?;
                    }
                    changed.push("directory removed".into());
                }
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

fn report_for(
    alias: String,
    dir: PathBuf,
    r: Result<(Plan, Vec<String>), ApplyError>,
) -> AliasReport {
    match r {
        Ok((plan, changed)) => AliasReport {
            alias,
            dir,
            kind: Some(plan.kind),
            outcome: if changed.is_empty() {
                Outcome::Unchanged
            } else {
                Outcome::Changed(changed)
            },
            warnings: plan.warnings,
        },
        Err(e) => AliasReport {
            alias,
            dir,
            kind: None,
            outcome: Outcome::Failed(e.to_string()),
            warnings: vec![],
        },
    }
}

/// Directories under `certs_dir` that hold slipway state.
fn managed_dirs(certs_dir: &Path) -> Result<Vec<PathBuf>, ApplyError> {
    let rd = match fs::read_dir(certs_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_err(certs_dir, "cannot read directory")(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io_err(certs_dir, "cannot read directory"))?;
        let p = e.path();
        if p.is_dir() && p.join(STATE_FILE).exists() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Bring every alias directory to the desired state, and clean up
/// directories of aliases no longer configured.
pub fn apply_all(
    certs_dir: &Path,
    aliases: &[Alias],
    hosts: &[HostEntry],
    ca_content: &str,
) -> Result<Report, ApplyError> {
    if !certs_dir.exists() {
        fs::create_dir_all(certs_dir).map_err(io_err(certs_dir, "cannot create certs_dir"))?;
    }
    fsutil::probe_dir(certs_dir).map_err(io_err(certs_dir, "cannot read certs_dir"))?;
    let mut report = Report::default();
    let mut wanted = Vec::new();
    for alias in aliases {
        let dir = alias_dir(certs_dir, alias);
        wanted.push(dir.clone());
        let r = (|| {
            let obs = observe(&dir)?;
            let plan =
                hostconfig::plan_alias(&dir.display().to_string(), alias, hosts, ca_content, &obs)?;
            let changed = execute(&dir, &plan)?;
            Ok((plan, changed))
        })();
        report.aliases.push(report_for(alias.dir_name(), dir, r));
    }
    for dir in managed_dirs(certs_dir)? {
        if !wanted.contains(&dir) {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let r = cleanup_dir(&dir);
            report
                .aliases
                .push(report_for(format!("{name} (no longer configured)"), dir, r));
        }
    }
    Ok(report)
}

fn cleanup_dir(dir: &Path) -> Result<(Plan, Vec<String>), ApplyError> {
    let obs = observe(dir)?;
    let plan = hostconfig::plan_cleanup(&dir.display().to_string(), &obs)?;
    let changed = execute(dir, &plan)?;
    Ok((plan, changed))
}

/// Remove everything slipway wrote: configured aliases and any other
/// directory holding slipway state.
pub fn cleanup_all(certs_dir: &Path, aliases: &[Alias]) -> Result<Report, ApplyError> {
    let mut dirs: Vec<PathBuf> = aliases.iter().map(|a| alias_dir(certs_dir, a)).collect();
    for d in managed_dirs(certs_dir)? {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    let mut report = Report::default();
    for dir in dirs {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let r = if dir.exists() {
            cleanup_dir(&dir)
        } else {
            Ok((
                Plan {
                    kind: Kind::Owned,
                    ops: vec![],
                    warnings: vec![],
                },
                vec![],
            ))
        };
        report.aliases.push(report_for(name, dir, r));
    }
    Ok(report)
}
