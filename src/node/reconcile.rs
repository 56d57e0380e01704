//! The one node pass: config → CA → containerd inspection → advice → fix →
//! apply → [`NodeStatus`]. `slipway agent --once`, `slipway cleanup` and
//! every reconcile of the daemon call [`NodePass::run`]; nothing else
//! touches host files.
//!
//! Files it writes: those of [`crate::node::apply`], and, only with
//! `--fix-containerd-config`, containerd's config file (after a backup
//! `<file>.slipway-backup.<unix-time>` beside it). Every call goes through
//! [`NodeFs`].
//!
//! The status says per alias whether the directory was applied (the wanted
//! state changed: first pass, a reload, a CA rotation), drifted (someone
//! changed what slipway owns while the wanted state stayed the same, and it
//! was restored) or failed, with the cause. A CA rotation is a node-level
//! event ([`CaState::Rotated`]), never drift (#12).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::node::apply::{self, ApplyError, DirOutcome};
use crate::node::ca_bundle::{self as ca, CaBundle, CaError};
use crate::node::config::{AgentConfig, ConfigError};
use crate::node::containerd::{self, ContainerdError, Inspection};
use crate::node::crio;
use crate::node::fs::{EntryKind, Follow, NodeFs};
use crate::node::hostconfig::{HostEntry, Kind};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error("containerd config {path}: {op}: {source}")]
    ContainerdIo {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error(transparent)]
    Cache(#[from] crate::proxy::cache::CacheError),
    #[error(transparent)]
    Peers(#[from] crate::proxy::peers::PeerError),
    #[error("admin.listen {addr}: cannot listen: {source}")]
    AdminBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("agent runtime: {what}: {source}")]
    Runtime {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{failed} of {total} registry aliases failed to apply")]
    Partial { failed: usize, total: usize },
}

impl crate::ExitStatus for AgentError {
    /// 64 for input the operator must fix, 1 for failures to apply.
    fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) | AgentError::Ca(_) => crate::EXIT_BAD_CONFIG,
            _ => crate::EXIT_APPLY_FAILED,
        }
    }
}

/// What a pass is for.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Bring every alias to the wanted state; with `fix`, patch
    /// containerd's config when it does not read `certs_dir`.
    Apply {
        hosts: Vec<HostEntry>,
        fix_containerd_config: bool,
    },
    /// Remove everything slipway wrote (`slipway cleanup`).
    Cleanup,
}

/// The registry CA after a pass.
#[derive(Debug)]
pub enum CaState {
    /// Not read (cleanup).
    NotNeeded,
    /// Loaded; the same as on the pass before, or the first one.
    Loaded,
    /// Different from the one loaded on the pass before.
    Rotated { subjects: Vec<String> },
    /// The file is bad now; the CA loaded before is still used.
    Kept(CaError),
    /// No usable CA at all: nothing was applied.
    Missing(CaError),
}

/// Whether containerd reads the directory slipway writes.
#[derive(Debug)]
pub enum Coverage {
    /// Not inspected (cleanup).
    NotChecked,
    Covered {
        config_path: String,
    },
    NotCovered {
        advice: String,
    },
    /// containerd's config could not be read or understood.
    Unknown(AgentError),
}

impl Coverage {
    pub fn covered(&self) -> bool {
        matches!(self, Coverage::Covered { .. })
    }
    /// The line an operator reads, `None` when covered.
    pub fn advice(&self, certs_dir: &Path) -> Option<String> {
        match self {
            Coverage::NotChecked | Coverage::Covered { .. } => None,
            Coverage::NotCovered { advice } => Some(advice.clone()),
            Coverage::Unknown(e) => Some(format!(
                "cannot tell whether containerd reads {}: {e}",
                certs_dir.display()
            )),
        }
    }
}

/// One alias directory after a pass.
#[derive(Debug)]
pub enum AliasState {
    /// Holds the wanted state; `changes` is what this pass wrote to get
    /// there (empty when nothing needed writing).
    Applied {
        changes: Vec<String>,
    },
    /// The wanted state had not changed, but the directory had: restored.
    Drifted {
        changes: Vec<String>,
    },
    /// A directory slipway manages for an alias no longer configured (or
    /// any, on cleanup): what slipway wrote is gone.
    Removed {
        changes: Vec<String>,
    },
    Error(ApplyError),
    /// A mirrored upstream's directory holds an administrator's
    /// configuration, which wins (#20): nothing was written. The node
    /// still pulls that host as the administrator set it up, so this is
    /// reported (`/readyz` detail, the `conflict` state) but not a failure.
    Conflict(String),
}

#[derive(Debug)]
pub struct AliasStatus {
    /// The alias (`host[:port]`); for a directory of an alias no longer
    /// configured, the directory's name.
    pub alias: String,
    pub configured: bool,
    pub dir: PathBuf,
    pub kind: Option<Kind>,
    pub state: AliasState,
    pub warnings: Vec<String>,
}

impl AliasStatus {
    pub fn failed(&self) -> bool {
        matches!(self.state, AliasState::Error(_))
    }
    pub fn changes(&self) -> &[String] {
        match &self.state {
            AliasState::Applied { changes }
            | AliasState::Drifted { changes }
            | AliasState::Removed { changes } => changes,
            AliasState::Error(_) | AliasState::Conflict(_) => &[],
        }
    }
}

impl fmt::Display for AliasStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Some(Kind::Owned) => " (owned)",
            Some(Kind::Merged) => " (merged)",
            None => "",
        };
        let name = if self.configured {
            self.alias.clone()
        } else {
            format!("{} (no longer configured)", self.alias)
        };
        match &self.state {
            AliasState::Error(e) => write!(f, "{name}: error: {e}"),
            AliasState::Conflict(e) => write!(f, "{name}: conflict: {e}"),
            _ if self.changes().is_empty() => {
                write!(f, "{name}: unchanged{kind} {}", self.dir.display())
            }
            _ => write!(
                f,
                "{name}: changed{kind} {}: {}",
                self.dir.display(),
                self.changes().join(", ")
            ),
        }
    }
}

/// The result of the opt-in `--fix-containerd-config`.
#[derive(Debug)]
pub enum Fix {
    /// Patched; containerd must be restarted to read it.
    Patched {
        file: PathBuf,
        backup: PathBuf,
    },
    Failed(AgentError),
}

/// Everything one pass found and did.
#[derive(Debug)]
pub struct NodeStatus {
    pub ca: CaState,
    pub containerd: Coverage,
    pub fix: Option<Fix>,
    /// Per alias what CRI-O would use, when the node has CRI-O's
    /// `registries.conf.d` (slipway writes only containerd's files).
    pub crio: Option<String>,
    pub aliases: Vec<AliasStatus>,
    /// `certs_dir` itself could not be read or created: no alias applied.
    pub certs_dir_error: Option<ApplyError>,
}

impl NodeStatus {
    /// How many configured or managed directories failed, counting a
    /// `certs_dir` or CA failure as every configured alias failing.
    pub fn failed(&self, configured: usize) -> usize {
        if self.certs_dir_error.is_some() || matches!(self.ca, CaState::Missing(_)) {
            return configured.max(1);
        }
        self.aliases.iter().filter(|a| a.failed()).count()
    }

    /// Every directory holds the wanted state.
    pub fn applied(&self) -> bool {
        self.failed(1) == 0 && self.certs_dir_error.is_none()
    }

    /// The result of a one-shot command (`--once`, `cleanup`).
    pub fn into_result(self, configured: usize) -> Result<(), AgentError> {
        let failed = self.failed(configured);
        let total = self.aliases.len().max(configured);
        if let CaState::Missing(e) = self.ca {
            return Err(AgentError::Ca(e));
        }
        if let Some(Fix::Failed(e)) = self.fix {
            return Err(e);
        }
        match failed {
            0 => Ok(()),
            failed => Err(AgentError::Partial { failed, total }),
        }
    }
}

/// Carries what one pass must remember for the next: the CA last loaded
/// and, per alias, a fingerprint of the state last applied (to tell drift
/// from a wanted change).
pub struct NodePass {
    fs: Arc<dyn NodeFs>,
    ca: Option<CaBundle>,
    applied: HashMap<String, [u8; 32]>,
    fix_tried: bool,
}

impl NodePass {
    pub fn new(fs: Arc<dyn NodeFs>) -> NodePass {
        NodePass {
            fs,
            ca: None,
            applied: HashMap::new(),
            fix_tried: false,
        }
    }

    /// The CA the last pass used.
    pub fn ca(&self) -> Option<&CaBundle> {
        self.ca.as_ref()
    }

    /// Forget what was applied: the next pass reports changes as applied,
    /// not drift (after a reload the wanted state may differ).
    pub fn forget_applied(&mut self) {
        self.applied.clear();
    }

    /// Read and validate the CA bundle named by the config.
    pub fn load_ca(&self, cfg: &AgentConfig) -> Result<CaBundle, CaError> {
        let read = self
            .fs
            .read(&cfg.ca_file, Follow::Yes)
            .map_err(|source| CaError::Read {
                path: cfg.ca_file.clone(),
                source,
            })?;
        let bytes = read.ok_or_else(|| CaError::Read {
            path: cfg.ca_file.clone(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        CaBundle::parse(&cfg.ca_file, &bytes.bytes, ca::now_unix())
    }

    /// One pass.
    pub fn run(&mut self, cfg: &AgentConfig, mode: &Mode) -> NodeStatus {
        self.run_with(cfg, mode, &|_| {})
    }

    /// One pass; `ca_ready` sees the CA in use before any file is written
    /// (the daemon points the proxy's upstream trust at it first).
    pub fn run_with(
        &mut self,
        cfg: &AgentConfig,
        mode: &Mode,
        ca_ready: &dyn Fn(&CaBundle),
    ) -> NodeStatus {
        let certs = cfg.containerd.local_certs_dir();
        let hosts = match mode {
            Mode::Cleanup => return self.cleanup(cfg, &certs),
            Mode::Apply { hosts, .. } => hosts,
        };
        let fix = matches!(
            mode,
            Mode::Apply {
                fix_containerd_config: true,
                ..
            }
        );
        let ca = match (self.load_ca(cfg), &self.ca) {
            (Ok(new), Some(old)) if new.pem != old.pem => {
                let subjects = new.subjects.clone();
                self.ca = Some(new);
                CaState::Rotated { subjects }
            }
            (Ok(new), _) => {
                self.ca = Some(new);
                CaState::Loaded
            }
            (Err(e), Some(_)) => CaState::Kept(e),
            (Err(e), None) => CaState::Missing(e),
        };
        let (containerd, fix) = self.containerd(cfg, fix);
        let crio = self.crio(cfg);
        let mut status = NodeStatus {
            ca,
            containerd,
            fix,
            crio,
            aliases: vec![],
            certs_dir_error: None,
        };
        let Some(bundle) = &self.ca else {
            return status;
        };
        ca_ready(bundle);
        let ca_content = bundle.file_content();
        let fingerprint: [u8; 32] = Sha256::digest(format!("{hosts:?}\n{ca_content}")).into();
        let mirrors = mirror_dirs(cfg);
        match apply::apply_all(
            self.fs.as_ref(),
            &certs,
            &cfg.aliases,
            &mirrors,
            hosts,
            &ca_content,
        ) {
            Ok(dirs) => {
                for d in dirs {
                    let same_wanted = self.applied.get(&d.alias) == Some(&fingerprint);
                    if d.configured {
                        match &d.result {
                            Ok(_) => self.applied.insert(d.alias.clone(), fingerprint),
                            Err(_) => self.applied.remove(&d.alias),
                        };
                    }
                    status.aliases.push(alias_status(d, same_wanted));
                }
            }
            Err(e) => status.certs_dir_error = Some(e),
        }
        self.applied.retain(|a, _| {
            cfg.aliases.iter().any(|c| &c.dir_name() == a)
                || mirrors.iter().any(|m| &m.host.dir_name() == a)
        });
        status
    }

    fn cleanup(&mut self, cfg: &AgentConfig, certs: &Path) -> NodeStatus {
        let mut status = NodeStatus {
            ca: CaState::NotNeeded,
            containerd: Coverage::NotChecked,
            fix: None,
            crio: None,
            aliases: vec![],
            certs_dir_error: None,
        };
        match apply::cleanup_all(self.fs.as_ref(), certs, &cfg.aliases) {
            Ok(dirs) => {
                for mut d in dirs {
                    // On cleanup every directory is removed, configured or not.
                    d.configured = true;
                    status.aliases.push(alias_status(d, false));
                }
                for a in &mut status.aliases {
                    if let AliasState::Applied { changes } = &mut a.state {
                        a.state = AliasState::Removed {
                            changes: std::mem::take(changes),
                        };
                    }
                }
            }
            Err(e) => status.certs_dir_error = Some(e),
        }
        self.applied.clear();
        status
    }

    fn containerd(&mut self, cfg: &AgentConfig, fix: bool) -> (Coverage, Option<Fix>) {
        let (insp, text) = match inspect_containerd(self.fs.as_ref(), cfg) {
            Ok(v) => v,
            Err(e) => return (Coverage::Unknown(e), None),
        };
        if insp.covered {
            let config_path = insp
                .config_path
                .as_ref()
                .map(|c| c.0.clone())
                .unwrap_or_default();
            return (Coverage::Covered { config_path }, None);
        }
        let advice = insp.advice().unwrap_or_default();
        // The fix runs once per process: containerd reads config_path only
        // at start, so a patched file stays "not covered" until the
        // operator restarts it, and patching again would stack backups.
        if !fix || self.fix_tried {
            return (Coverage::NotCovered { advice }, None);
        }
        self.fix_tried = true;
        let fix = match fix_containerd(self.fs.as_ref(), cfg, &insp, &text) {
            Ok(Some(backup)) => Some(Fix::Patched {
                file: insp.file_to_fix().to_path_buf(),
                backup,
            }),
            Ok(None) => None,
            Err(e) => Some(Fix::Failed(e)),
        };
        (Coverage::NotCovered { advice }, fix)
    }

    fn crio(&self, cfg: &AgentConfig) -> Option<String> {
        let dir = cfg.containerd.local(Path::new(crio::REGISTRIES_CONF_D));
        if self.fs.kind(&dir).ok() != Some(EntryKind::Dir) {
            return None;
        }
        let mut regs = Vec::new();
        for (name, kind) in self.fs.list(&dir).ok()? {
            if kind != EntryKind::File || !name.ends_with(".conf") {
                continue;
            }
            let p = dir.join(&name);
            let shown = Path::new(crio::REGISTRIES_CONF_D).join(&name);
            match self.fs.read(&p, Follow::No) {
                Ok(Some(d)) => match crio::parse(
                    &shown.display().to_string(),
                    &String::from_utf8_lossy(&d.bytes),
                ) {
                    Ok(r) => regs.extend(r),
                    Err(e) => return Some(format!("CRI-O: {e}")),
                },
                Ok(None) => {}
                Err(e) => return Some(format!("CRI-O: {}: {e}", shown.display())),
            }
        }
        Some(crio::report(&regs, &cfg.aliases))
    }
}

fn alias_status(d: DirOutcome, same_wanted: bool) -> AliasStatus {
    let DirOutcome {
        alias,
        configured,
        dir,
        result,
    } = d;
    match result {
        Ok(a) => AliasStatus {
            alias,
            configured,
            dir,
            kind: Some(a.kind),
            state: match (configured, same_wanted && !a.changes.is_empty()) {
                (false, _) => AliasState::Removed { changes: a.changes },
                (true, true) => AliasState::Drifted { changes: a.changes },
                (true, false) => AliasState::Applied { changes: a.changes },
            },
            warnings: a.warnings,
        },
        Err(ApplyError::Plan(e @ crate::node::hostconfig::PlanError::ForeignMirror { .. })) => {
            AliasStatus {
                alias,
                configured,
                dir,
                kind: None,
                state: AliasState::Conflict(e.to_string()),
                warnings: vec![],
            }
        }
        Err(e) => AliasStatus {
            alias,
            configured,
            dir,
            kind: None,
            state: AliasState::Error(e),
            warnings: vec![],
        },
    }
}

/// The mirrored upstreams' directories (#20).
pub fn mirror_dirs(cfg: &AgentConfig) -> Vec<apply::MirrorDir> {
    cfg.mirrors
        .registries
        .iter()
        .map(|u| apply::MirrorDir {
            host: u.host.clone(),
            server: u.server_url(),
        })
        .collect()
}

/// The `[host]` entries behind the node-local proxy (or alone, for
/// `--once`, which runs no proxy): the upstream itself.
pub fn host_entries(cfg: &AgentConfig) -> Vec<HostEntry> {
    vec![HostEntry::upstream(&cfg.upstream.url)]
}

fn cio<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> AgentError + 'a {
    move |source| AgentError::ContainerdIo {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn read_config(fs: &dyn NodeFs, local: &Path, shown: &Path) -> Result<String, AgentError> {
    let d = fs
        .read(local, Follow::Yes)
        .map_err(cio(shown, "cannot read"))?
        .ok_or_else(|| {
            cio(shown, "cannot read")(std::io::Error::from(std::io::ErrorKind::NotFound))
        })?;
    String::from_utf8(d.bytes).map_err(|_| {
        cio(shown, "cannot read")(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8",
        ))
    })
}

/// Read containerd's config and its imports through the host root.
pub fn inspect_containerd(
    fs: &dyn NodeFs,
    cfg: &AgentConfig,
) -> Result<(Inspection, String), AgentError> {
    let c = &cfg.containerd;
    let text = read_config(fs, &c.local_config_file(), &c.config_file)?;
    let doc = containerd::parse(&c.config_file, &text)?;
    let mut imports = Vec::new();
    for pattern in containerd::import_patterns(&c.config_file, &doc)? {
        // Relative imports are relative to the main file's directory.
        let host_pattern = match Path::new(&pattern).is_relative() {
            true => c
                .config_file
                .parent()
                .unwrap_or(Path::new("/"))
                .join(&pattern),
            false => PathBuf::from(&pattern),
        };
        let local_pattern = c.local(&host_pattern);
        // In the DaemonSet only config.toml is mounted: a drop-in directory
        // that exists on the host would look empty, and slipway would give
        // wrong advice. containerd itself imports nothing from a directory
        // that does not exist, which is what "/" as host_root means here.
        let dir = local_pattern.parent().unwrap_or(Path::new("/"));
        if c.host_root != Path::new("/") && fs.kind(dir).ok() != Some(EntryKind::Dir) {
            return Err(AgentError::ContainerdIo {
                path: host_pattern.parent().unwrap_or(Path::new("/")).to_path_buf(),
                op: "imports directory not visible to the agent (mount it read-only to let slipway check drop-ins)",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let matched = fs
            .glob(&local_pattern.to_string_lossy())
            .map_err(cio(&c.config_file, "bad imports pattern"))?;
        for local in matched {
            let host_path = Path::new("/").join(local.strip_prefix(&c.host_root).unwrap_or(&local));
            let t = read_config(fs, &local, &host_path)?;
            imports.push((host_path, t));
        }
    }
    let insp = containerd::inspect((&c.config_file, &text), &imports, &c.certs_dir)?;
    let fix_text = if insp.file_to_fix() == c.config_file {
        text
    } else {
        read_config(fs, &c.local(insp.file_to_fix()), insp.file_to_fix())?
    };
    Ok((insp, fix_text))
}

/// Apply `--fix-containerd-config`: backup, then patch. Returns the backup.
fn fix_containerd(
    fs: &dyn NodeFs,
    cfg: &AgentConfig,
    insp: &Inspection,
    text: &str,
) -> Result<Option<PathBuf>, AgentError> {
    let Some(new_text) = containerd::plan_fix(insp, text)? else {
        return Ok(None);
    };
    let host_path = insp.file_to_fix();
    let local = cfg.containerd.local(host_path);
    let mode = fs
        .read(&local, Follow::Yes)
        .map_err(cio(host_path, "cannot stat"))?
        .map(|d| d.mode)
        .unwrap_or(0o644);
    let backup = PathBuf::from(format!(
        "{}.slipway-backup.{}",
        local.display(),
        ca::now_unix()
    ));
    fs.create_new_atomic(&backup, text.as_bytes(), mode)
        .map_err(cio(host_path, "cannot write backup"))?;
    fs.write_atomic(&local, new_text.as_bytes(), mode)
        .map_err(cio(host_path, "cannot write"))?;
    Ok(Some(backup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::Metrics;
    use crate::admin::readiness::{Check, Readiness};
    use crate::node::fs::fake::{self, ca_pem, node, Node, Op};
    use crate::node::status::StatusWriter;
    use nix::libc;

    const A: &str = "registry.shared-services:5000";
    const B: &str = "203.0.113.7:5000";

    fn config(aliases: &[&str]) -> AgentConfig {
        fake::config(&fake::config_text(aliases, ""))
    }

    fn mode() -> Mode {
        Mode::Apply {
            hosts: vec![HostEntry::upstream("https://registry.example:5000")],
            fix_containerd_config: false,
        }
    }

    fn hosts(alias: &str) -> PathBuf {
        Path::new("/etc/containerd/certs.d")
            .join(alias)
            .join("hosts.toml")
    }

    fn state_of<'a>(s: &'a NodeStatus, alias: &str) -> &'a AliasState {
        &s.aliases.iter().find(|a| a.alias == alias).unwrap().state
    }

    #[test]
    fn a_first_pass_applies_and_a_second_changes_nothing() {
        let fs = node(&ca_pem());
        let mut pass = NodePass::new(fs.clone());
        let cfg = config(&[A, B]);
        let s = pass.run(&cfg, &mode());
        assert!(s.containerd.covered());
        assert!(s.applied(), "{s:?}");
        assert!(matches!(state_of(&s, A), AliasState::Applied { changes } if !changes.is_empty()));
        assert!(fs.content(&hosts(A)).is_some());
        let writes = fs.ops(Op::Write).len();
        let s = pass.run(&cfg, &mode());
        assert!(matches!(state_of(&s, A), AliasState::Applied { changes } if changes.is_empty()));
        assert_eq!(
            fs.ops(Op::Write).len(),
            writes,
            "unchanged files are not rewritten"
        );
    }

    /// #12: drift and CA rotation were the same state.
    #[test]
    fn drift_is_told_from_a_ca_rotation() {
        let fs = node(&ca_pem());
        let mut pass = NodePass::new(fs.clone());
        let cfg = config(&[A]);
        pass.run(&cfg, &mode());
        fs.remove_file(&hosts(A)).unwrap();
        let s = pass.run(&cfg, &mode());
        assert!(matches!(s.ca, CaState::Loaded));
        assert!(
            matches!(state_of(&s, A), AliasState::Drifted { changes } if changes == &["hosts.toml written"])
        );
        // The CA file changes to a new valid CA: a rotation, not drift.
        fs.file(Path::new("/ca/ca.crt"), ca_pem().as_bytes(), 0o644);
        let s = pass.run(&cfg, &mode());
        assert!(matches!(s.ca, CaState::Rotated { .. }), "{:?}", s.ca);
        assert!(
            matches!(state_of(&s, A), AliasState::Applied { changes } if changes == &["slipway-ca.crt written"])
        );
        // A bad CA file keeps the CA loaded before.
        fs.file(Path::new("/ca/ca.crt"), b"not a certificate", 0o644);
        let s = pass.run(&cfg, &mode());
        assert!(matches!(s.ca, CaState::Kept(_)));
        assert!(s.applied());
    }

    fn failing(errno: i32, op: Op, path: &Path) -> NodeStatus {
        let fs = node(&ca_pem());
        fs.fail(op, path, errno);
        NodePass::new(fs).run(&config(&[A, B]), &mode())
    }

    fn error_text(s: &NodeStatus, alias: &str) -> String {
        match state_of(s, alias) {
            AliasState::Error(e) => e.to_string(),
            other => panic!("{alias}: {other:?}"),
        }
    }

    #[test]
    fn write_errors_fail_only_their_alias_and_name_the_file() {
        for (errno, text) in [
            (libc::EACCES, "Permission denied"),
            (libc::ENOSPC, "No space left on device"),
            (libc::EROFS, "Read-only file system"),
        ] {
            let s = failing(errno, Op::Write, &hosts(A));
            let e = error_text(&s, A);
            assert!(
                e.starts_with(&format!("{}: cannot write: {text}", hosts(A).display())),
                "{e}"
            );
            assert!(matches!(state_of(&s, B), AliasState::Applied { .. }));
            assert_eq!(s.failed(2), 1);
        }
        // A failed rename leaves no new file.
        let fs = node(&ca_pem());
        fs.fail(Op::Rename, &hosts(A), libc::EBUSY);
        let s = NodePass::new(fs.clone()).run(&config(&[A]), &mode());
        assert!(error_text(&s, A).contains("cannot write"));
        assert_eq!(fs.content(&hosts(A)), None);
    }

    #[test]
    fn a_read_only_certs_dir_fails_each_alias_on_create() {
        let dir = Path::new("/etc/containerd/certs.d").join(A);
        let s = failing(libc::EROFS, Op::CreateDir, &dir);
        assert_eq!(
            error_text(&s, A),
            format!(
                "{}: cannot create directory: Read-only file system (os error 30)",
                dir.display()
            )
        );
    }

    #[test]
    fn a_fifo_hosts_toml_is_an_error_that_names_it_and_readiness_says_so() {
        let fs = node(&ca_pem());
        fs.mkdir_p(hosts(A).parent().unwrap());
        fs.put(&hosts(A), Node::Fifo);
        let s = NodePass::new(fs).run(&config(&[A, B]), &mode());
        let e = error_text(&s, A);
        assert!(e.contains("hosts.toml: cannot read: is a FIFO"), "{e}");
        let ready = Arc::new(Readiness::default());
        let mut w = StatusWriter::new(Arc::new(Metrics::new()), ready.clone());
        w.write(
            &s,
            None,
            Path::new("/etc/containerd/certs.d"),
            std::time::Instant::now(),
        );
        assert_eq!(ready.failing()[0].0, Check::HostconfigApplied);
        let (_, body) = ready.report();
        assert!(
            body.contains(&format!("{A}: {}", hosts(A).display())),
            "{body}"
        );
    }

    #[test]
    fn cleanup_errors_and_a_directory_someone_else_filled() {
        let fs = node(&ca_pem());
        let cfg = config(&[A, B]);
        NodePass::new(fs.clone()).run(&cfg, &mode());
        // Someone put a file in the directory slipway created for B.
        let b_dir = Path::new("/etc/containerd/certs.d").join(B);
        fs.file(&b_dir.join("client.cert"), b"theirs", 0o600);
        fs.fail(Op::RemoveFile, &hosts(A), libc::EACCES);
        let s = NodePass::new(fs.clone()).run(&cfg, &Mode::Cleanup);
        assert!(error_text(&s, A).contains("cannot remove: Permission denied"));
        match state_of(&s, B) {
            AliasState::Removed { changes } => {
                assert!(
                    changes.contains(&"directory kept (not empty)".to_string()),
                    "{changes:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fs.content(&b_dir.join("client.cert")).unwrap(), b"theirs");
        assert!(s.into_result(2).is_err());
    }

    /// #12: a removed alias stayed in /metrics as `applied`, labelled with
    /// display text.
    #[test]
    fn a_removed_alias_leaves_metrics() {
        let fs = node(&ca_pem());
        let m = Arc::new(Metrics::new());
        let mut w = StatusWriter::new(m.clone(), Arc::new(Readiness::default()));
        let mut pass = NodePass::new(fs);
        let certs = Path::new("/etc/containerd/certs.d");
        let now = std::time::Instant::now();
        let s = pass.run(&config(&[A, B]), &mode());
        w.write(&s, pass.ca(), certs, now);
        assert!(m
            .encode()
            .contains(&format!("alias=\"{B}\",state=\"applied\"}} 1")));
        let s = pass.run(&config(&[A]), &mode());
        assert!(matches!(
            s.aliases.iter().find(|a| !a.configured).map(|a| &a.state),
            Some(AliasState::Removed { .. })
        ));
        w.write(&s, pass.ca(), certs, now);
        let t = m.encode();
        assert!(!t.contains(B), "{t}");
        assert!(!t.contains("no longer configured"), "{t}");
        assert!(
            t.contains(&format!("alias=\"{A}\",state=\"applied\"}} 1")),
            "{t}"
        );
    }

    #[test]
    fn an_uncovered_containerd_is_advice_and_the_fix_patches_once_with_a_backup() {
        let fs = node(&ca_pem());
        fs.file(
            Path::new("/etc/containerd/config.toml"),
            b"version = 2\n",
            0o644,
        );
        let cfg = config(&[A]);
        let fix = Mode::Apply {
            hosts: vec![HostEntry::upstream("https://registry.example:5000")],
            fix_containerd_config: true,
        };
        let mut pass = NodePass::new(fs.clone());
        let s = pass.run(&cfg, &fix);
        assert!(!s.containerd.covered());
        assert!(matches!(&s.fix, Some(Fix::Patched { .. })), "{:?}", s.fix);
        let patched = String::from_utf8(
            fs.content(Path::new("/etc/containerd/config.toml"))
                .unwrap(),
        )
        .unwrap();
        assert!(
            patched.contains("config_path = \"/etc/containerd/certs.d\""),
            "{patched}"
        );
        assert_eq!(fs.ops(Op::CreateNew).len(), 1);
        // containerd reads config_path at start only: no second patch.
        let s = pass.run(&cfg, &fix);
        assert!(s.fix.is_none());
        assert_eq!(fs.ops(Op::CreateNew).len(), 1);
    }

    /// #12: crio.rs was called by no command; `--once` now reports what
    /// CRI-O would use on a node that has its drop-in directory.
    #[test]
    fn a_crio_node_gets_a_report_per_alias() {
        let fs = node(&ca_pem());
        fs.file(
            &Path::new(crio::REGISTRIES_CONF_D).join("01-registries.conf"),
            b"[[registry]]\nprefix = \"registry.shared-services:5000\"\nlocation = \"registry.shared-services:5000\"\n",
            0o644,
        );
        let s = NodePass::new(fs).run(&config(&[A, B]), &mode());
        let report = s.crio.expect("CRI-O report");
        assert!(report.contains(&format!("{A}: prefix \"{A}\"")), "{report}");
        assert!(
            report.contains(&format!("{B}: no [[registry]] entry")),
            "{report}"
        );
        let s = NodePass::new(node(&ca_pem())).run(&config(&[A]), &mode());
        assert!(s.crio.is_none());
    }
}
