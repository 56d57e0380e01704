//! `slipway agent` and `slipway cleanup`: the node-side shell.
//!
//! Owns the sequence config → CA → containerd inspection → hostconfig plan →
//! apply → report. Files it writes: those of [`crate::node::apply`], and, only with
//! `--fix-containerd-config`, containerd's config file (after a backup
//! `<file>.slipway-backup.<unix-time>` beside it).

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::node::apply::{self, ApplyError, Report};
use crate::node::ca_bundle::{self as ca, CaBundle, CaError};
use crate::node::config::{AgentConfig, ConfigError};
use crate::node::containerd::{self, ContainerdError, Inspection};
use crate::node::fs as fsutil;
use crate::node::hostconfig::HostEntry;

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
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("agent runtime: {0}")]
    Runtime(String),
    #[error("{failed} of {total} registry aliases failed to apply")]
    Partial { failed: usize, total: usize },
}

impl AgentError {
    /// 64 for input the operator must fix, 1 for failures to apply.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Config(_) | AgentError::Ca(_) => crate::EXIT_BAD_CONFIG,
            _ => crate::EXIT_APPLY_FAILED,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct OnceOptions {
    pub fix_containerd_config: bool,
}

/// Read and validate the CA bundle named by the config.
pub fn load_ca(cfg: &AgentConfig) -> Result<CaBundle, CaError> {
    let bytes = std::fs::read(&cfg.ca_file).map_err(|source| CaError::Read {
        path: cfg.ca_file.clone(),
        source,
    })?;
    CaBundle::parse(&cfg.ca_file, &bytes, ca::now_unix())
}

/// The `[host]` entries for every alias, in order. The proxy issue puts the
/// node-local proxy in front of the upstream.
pub fn host_entries(cfg: &AgentConfig) -> Vec<HostEntry> {
    vec![HostEntry::upstream(&cfg.upstream.url)]
}

/// Read containerd's config and its imports through the host root.
pub fn inspect_containerd(cfg: &AgentConfig) -> Result<(Inspection, String), AgentError> {
    let c = &cfg.containerd;
    let main_local = c.local_config_file();
    let read = |p: &Path, shown: &Path| {
        std::fs::read_to_string(p).map_err(|source| AgentError::ContainerdIo {
            path: shown.to_path_buf(),
            op: "cannot read",
            source,
        })
    };
    let text = read(&main_local, &c.config_file)?;
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
        if c.host_root != Path::new("/") && !dir.is_dir() {
            return Err(AgentError::ContainerdIo {
                path: host_pattern.parent().unwrap_or(Path::new("/")).to_path_buf(),
                op: "imports directory not visible to the agent (mount it read-only to let slipway check drop-ins)",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let mut matched: Vec<PathBuf> = glob::glob(&local_pattern.to_string_lossy())
            .map_err(|e| AgentError::ContainerdIo {
                path: c.config_file.clone(),
                op: "bad imports pattern",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{pattern:?}: {e}"),
                ),
            })?
            .filter_map(Result::ok)
            .collect();
        matched.sort();
        for local in matched {
            let host_path = Path::new("/").join(local.strip_prefix(&c.host_root).unwrap_or(&local));
            let t = read(&local, &host_path)?;
            imports.push((host_path, t));
        }
    }
    let insp = containerd::inspect((&c.config_file, &text), &imports, &c.certs_dir)?;
    let fix_text = if insp.file_to_fix() == c.config_file {
        text
    } else {
        read(&c.local(insp.file_to_fix()), insp.file_to_fix())?
    };
    Ok((insp, fix_text))
}

/// Apply `--fix-containerd-config`: backup, then patch. Returns the backup.
pub fn fix_containerd(
    cfg: &AgentConfig,
    insp: &Inspection,
    text: &str,
) -> Result<Option<PathBuf>, AgentError> {
    let Some(new_text) = containerd::plan_fix(insp, text)? else {
        return Ok(None);
    };
    let host_path = insp.file_to_fix();
    let local = cfg.containerd.local(host_path);
    let io = |op: &'static str| {
        move |source| AgentError::ContainerdIo {
            path: host_path.to_path_buf(),
            op,
            source,
        }
    };
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&local)
            .map_err(io("cannot stat"))?
            .permissions()
            .mode()
            & 0o7777
    };
    let backup = PathBuf::from(format!(
        "{}.slipway-backup.{}",
        local.display(),
        ca::now_unix()
    ));
    fsutil::create_new_atomic(&backup, text.as_bytes(), mode).map_err(io("cannot write backup"))?;
    fsutil::write_atomic(&local, new_text.as_bytes(), mode).map_err(io("cannot write"))?;
    warn!(
        file = %host_path.display(),
        backup = %backup.display(),
        config_path = %insp.wanted_config_path(),
        "containerd config patched; containerd must be restarted to read config_path (slipway never restarts it)"
    );
    Ok(Some(backup))
}

/// `slipway agent --once`: apply host configuration and report.
pub fn run_once(cfg: &AgentConfig, opts: OnceOptions) -> Result<Report, AgentError> {
    let ca = load_ca(cfg)?;
    match inspect_containerd(cfg) {
        Ok((insp, text)) => {
            if let Some(advice) = insp.advice() {
                if opts.fix_containerd_config {
                    fix_containerd(cfg, &insp, &text)?;
                } else {
                    warn!("{advice}");
                }
            } else {
                info!(config_path = ?insp.config_path.as_ref().map(|c| &c.0), "containerd reads {}", cfg.containerd.certs_dir.display());
            }
        }
        Err(e) if opts.fix_containerd_config => return Err(e),
        Err(e) => warn!(
            "cannot tell whether containerd reads {}: {e}",
            cfg.containerd.certs_dir.display()
        ),
    }
    let report = apply::apply_all(
        &cfg.containerd.local_certs_dir(),
        &cfg.aliases,
        &host_entries(cfg),
        &ca.file_content(),
    )?;
    log_report(&report);
    Ok(report)
}

/// `slipway cleanup`: remove what slipway wrote, restore merged files.
pub fn cleanup(cfg: &AgentConfig) -> Result<Report, AgentError> {
    let report = apply::cleanup_all(&cfg.containerd.local_certs_dir(), &cfg.aliases)?;
    log_report(&report);
    Ok(report)
}

fn log_report(report: &Report) {
    for a in &report.aliases {
        for w in &a.warnings {
            warn!(alias = %a.alias, "{w}");
        }
        match &a.outcome {
            apply::Outcome::Failed(e) => warn!(alias = %a.alias, error = %e, "alias failed"),
            apply::Outcome::Changed(c) => {
                info!(alias = %a.alias, dir = %a.dir.display(), changes = %c.join(", "), "applied")
            }
            apply::Outcome::Unchanged => info!(alias = %a.alias, "unchanged"),
        }
    }
}

/// Turn a report into the final result of a one-shot command.
pub fn check(report: &Report) -> Result<(), AgentError> {
    match report.failed() {
        0 => Ok(()),
        failed => Err(AgentError::Partial {
            failed,
            total: report.aliases.len(),
        }),
    }
}
