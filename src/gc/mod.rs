//! `slipway gc`: registry garbage collection that knows what the cluster
//! uses (#21).
//!
//! | module | owns |
//! |--------|------|
//! | [`plan`] | the keep set, the closure and the deletions (pure) |
//! | [`store`] | distribution's filesystem tree: read it, prune it |
//! | [`bucket`] | the same tree in an S3 bucket (#22) |
//! | [`cluster`] | the images pods run and workloads would start (API lists) |
//!
//! The command (a CronJob in the install) lists what the cluster uses and
//! sends it, with the policy (`[gc]` of `--config`, flags, `SLIPWAY_GC_*`),
//! to the gateway as `POST /slipway/v1/gc` over TLS with the push account.
//! The gateway holds the storage and sees every write, so it is the one
//! that sweeps ([`crate::gateway::gc`]): it refuses writes with `503` and
//! `Retry-After`, waits for the writes in flight, reads the tree, plans,
//! deletes, checks that distribution no longer answers for what it
//! deleted, and takes writes again. It adds its own record of recent pulls
//! to the keep set. Without `--apply` (or `SLIPWAY_GC_APPLY=true`) nothing
//! is fenced or deleted: the plan is only reported.
//!
//! The report (what is kept and why, what is freed per repository) is
//! printed, and its summary written to the termination message
//! (`--termination-log`, `/dev/termination-log` in a pod). Failures: a bad
//! `[gc]` file or flag exits 64 naming it; an API list that fails, an
//! unreachable gateway or a sweep error exits 1 and deletes nothing more.

pub mod bucket;
pub mod cluster;
pub mod plan;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use plan::{Freed, ImageRef, Kept, Plan, Policy, Roots, UseKind};

/// The gateway's endpoint.
pub const GC_PATH: &str = "/slipway/v1/gc";
/// Kubernetes keeps 4096 bytes of a termination message.
const TERMINATION_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("gc config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("gc config: {key}: {message}")]
    Value { key: &'static str, message: String },
    #[error("gc: cannot reach the API server: {0}")]
    Client(#[source] Box<kube::Error>),
    #[error("gc: cannot list {kind} in all namespaces (the keep set would miss images in use): {source}")]
    List {
        kind: &'static str,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("gc: registry {url}: {message}")]
    Registry { url: String, message: String },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("gc: cannot write the termination message {path}: {source}")]
    Termination {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl crate::ExitStatus for GcError {
    fn exit_code(&self) -> u8 {
        match self {
            GcError::Config { .. } | GcError::Value { .. } => crate::EXIT_BAD_CONFIG,
            _ => crate::EXIT_APPLY_FAILED,
        }
    }
}

// ------------------------------------------------------------ the wire

/// What `slipway gc` sends the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GcRequest {
    pub apply: bool,
    pub images: Vec<(String, UseKind)>,
    pub policy: WirePolicy,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct WirePolicy {
    pub keep_builds: usize,
    pub keep_pulled_days: f64,
    pub cache_ttl_hours: f64,
    pub min_age_secs: u64,
}

impl WirePolicy {
    pub fn policy(&self) -> Policy {
        let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
        Policy {
            keep_builds: self.keep_builds,
            keep_pulled: secs(self.keep_pulled_days * 86_400.0),
            cache_ttl: secs(self.cache_ttl_hours * 3600.0),
            min_age: Duration::from_secs(self.min_age_secs),
        }
    }
}

impl Default for WirePolicy {
    fn default() -> Self {
        let p = Policy::default();
        WirePolicy {
            keep_builds: p.keep_builds,
            keep_pulled_days: p.keep_pulled.as_secs_f64() / 86_400.0,
            cache_ttl_hours: p.cache_ttl.as_secs_f64() / 3600.0,
            min_age_secs: p.min_age.as_secs(),
        }
    }
}

/// What the gateway answers, and what the command prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GcReport {
    pub applied: bool,
    pub total: Freed,
    /// Freed per repository (`""`: blobs no repository linked).
    pub repositories: BTreeMap<String, Freed>,
    pub kept: BTreeMap<String, Vec<Kept>>,
    /// References from the cluster that do not parse.
    pub unparsed: Vec<String>,
    pub images_in_use: usize,
    pub pulls_known: usize,
    pub blobs_scanned: usize,
    pub seconds: f64,
}

impl GcReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        for (repo, kept) in &self.kept {
            for k in kept {
                let tags = if k.tags.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", k.tags.join(", "))
                };
                s.push_str(&format!(
                    "keep {repo}@{}{tags}: {}\n",
                    k.digest,
                    serde_json::to_value(k.reason)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ));
            }
        }
        for u in &self.unparsed {
            s.push_str(&format!(
                "note: image reference {u:?} does not parse; ignored\n"
            ));
        }
        s.push_str(&self.summary());
        s
    }

    /// The totals and each repository's share: the termination message.
    pub fn summary(&self) -> String {
        let verb = if self.applied { "freed" } else { "would free" };
        let mut s = format!(
            "gc {}: {verb} {} bytes: {} blobs, {} manifests, {} tags; {} images in use, {} recent pulls, {} blobs scanned, {:.1} s\n",
            if self.applied { "applied" } else { "dry run" },
            self.total.bytes,
            self.total.blobs,
            self.total.manifests,
            self.total.tags,
            self.images_in_use,
            self.pulls_known,
            self.blobs_scanned,
            self.seconds,
        );
        for (repo, f) in &self.repositories {
            let name = if repo.is_empty() {
                "(unlinked blobs)"
            } else {
                repo
            };
            s.push_str(&format!(
                "{name}: {verb} {} bytes: {} blobs, {} manifests, {} tags\n",
                f.bytes, f.blobs, f.manifests, f.tags
            ));
        }
        s
    }
}

/// The keep set's outside half, parsed.
pub fn roots(
    images: &[(String, UseKind)],
    pulls: Vec<(String, String, u64)>,
    checked: Vec<(String, String, u64)>,
) -> (Roots, Vec<String>) {
    let mut r = Roots {
        images: Vec::new(),
        pulls,
        checked,
    };
    let mut unparsed = Vec::new();
    for (s, k) in images {
        match ImageRef::parse(s) {
            Some(i) => r.images.push((i, *k)),
            None => unparsed.push(s.clone()),
        }
    }
    (r, unparsed)
}

/// What the gateway saw: manifest pulls and blob checks, as
/// `(repository, digest, unix seconds)`.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    pub pulls: Vec<(String, String, u64)>,
    pub checked: Vec<(String, String, u64)>,
}

/// Read the tree under `root`, plan, and (with `apply`) delete. The
/// caller fences writes first. Blocking: run it off the async runtime.
pub fn collect(
    fs: &dyn store::RegistryFs,
    root: &Path,
    req: &GcRequest,
    seen: Seen,
    now: u64,
) -> Result<(Plan, GcReport), GcError> {
    let started = Instant::now();
    let s = store::Store::open(fs, root)?;
    let inv = s.inventory()?;
    let pulls_known = seen.pulls.len();
    let (roots, unparsed) = roots(&req.images, seen.pulls, seen.checked);
    let p = plan::plan(&inv, &roots, &req.policy.policy(), now);
    if req.apply {
        s.apply(&p)?;
    }
    let report = GcReport {
        applied: req.apply,
        total: p.total(),
        repositories: p.freed.clone(),
        kept: p.kept.clone(),
        unparsed,
        images_in_use: req.images.len(),
        pulls_known,
        blobs_scanned: inv.blobs.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((p, report))
}

// ------------------------------------------------------------ the command

/// `[gc]` of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGc {
    keep_builds: Option<usize>,
    keep_pulled_days: Option<f64>,
    cache_ttl_hours: Option<f64>,
    min_age_secs: Option<u64>,
    registry: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(default)]
    gc: FileGc,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct GcArgs {
    /// Config file (TOML) with a [gc] table
    #[arg(long, env = "SLIPWAY_GC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Delete; without it, only report what would be deleted
    #[arg(long, env = "SLIPWAY_GC_APPLY", num_args = 0..=1, default_missing_value = "true")]
    pub apply: Option<bool>,
    /// gc.registry: the gateway, https://host:port
    #[arg(long, env = "SLIPWAY_GC_REGISTRY")]
    pub registry: Option<String>,
    /// gc.ca_file: the registry CA (PEM)
    #[arg(long, env = "SLIPWAY_GC_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The push account's user
    #[arg(long, env = "SLIPWAY_GC_USERNAME", default_value = crate::pki::push::PUSH_USER)]
    pub username: String,
    /// A file holding the push account's password (else SLIPWAY_GC_PASSWORD; never a flag)
    #[arg(long, env = "SLIPWAY_GC_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// gc.keep_builds: the last builds kept per repository [default: 10]
    #[arg(long, env = "SLIPWAY_GC_KEEP_BUILDS")]
    pub keep_builds: Option<usize>,
    /// gc.keep_pulled_days: keep what was pulled within this many days [default: 7]
    #[arg(long, env = "SLIPWAY_GC_KEEP_PULLED_DAYS")]
    pub keep_pulled_days: Option<f64>,
    /// gc.cache_ttl_hours: the builds' Kaniko --cache-ttl [default: 336]
    #[arg(long, env = "SLIPWAY_GC_CACHE_TTL_HOURS")]
    pub cache_ttl_hours: Option<f64>,
    /// gc.min_age_secs: nothing pushed more recently is deleted [default: 3600]
    #[arg(long, env = "SLIPWAY_GC_MIN_AGE_SECS")]
    pub min_age_secs: Option<u64>,
    /// Do not read the cluster: only the registry's own rules and --image
    /// (outside Kubernetes; in a cluster this deletes images in use)
    #[arg(long, env = "SLIPWAY_GC_NO_CLUSTER", num_args = 0..=1, default_missing_value = "true")]
    pub no_cluster: Option<bool>,
    /// An image to keep, as a reference (repeatable)
    #[arg(long = "image")]
    pub images: Vec<String>,
    /// Where the summary goes for `kubectl describe` (if the file exists)
    #[arg(
        long,
        env = "SLIPWAY_GC_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// The settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub apply: bool,
    pub registry: String,
    pub ca_file: PathBuf,
    pub policy: WirePolicy,
    pub cluster: bool,
}

impl Settings {
    pub fn resolve(args: &GcArgs, text: Option<&str>) -> Result<Settings, GcError> {
        let f = match (&args.config, text) {
            (Some(p), Some(t)) => {
                toml::from_str::<FileConfig>(t)
                    .map_err(|e| GcError::Config {
                        path: p.clone(),
                        message: e.to_string().trim_end().to_string(),
                    })?
                    .gc
            }
            _ => FileGc::default(),
        };
        let d = WirePolicy::default();
        let policy = WirePolicy {
            keep_builds: args.keep_builds.or(f.keep_builds).unwrap_or(d.keep_builds),
            keep_pulled_days: args
                .keep_pulled_days
                .or(f.keep_pulled_days)
                .unwrap_or(d.keep_pulled_days),
            cache_ttl_hours: args
                .cache_ttl_hours
                .or(f.cache_ttl_hours)
                .unwrap_or(d.cache_ttl_hours),
            min_age_secs: args
                .min_age_secs
                .or(f.min_age_secs)
                .unwrap_or(d.min_age_secs),
        };
        for (key, v) in [
            ("gc.keep_pulled_days", policy.keep_pulled_days),
            ("gc.cache_ttl_hours", policy.cache_ttl_hours),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(GcError::Value {
                    key,
                    message: format!("{v} is not a number of at least 0"),
                });
            }
        }
        let registry = args.registry.clone().or(f.registry).ok_or(GcError::Value {
            key: "gc.registry",
            message: "not set (--registry, SLIPWAY_GC_REGISTRY)".into(),
        })?;
        let u = url::Url::parse(&registry).map_err(|e| GcError::Value {
            key: "gc.registry",
            message: format!("{registry:?}: {e}"),
        })?;
        if u.scheme() != "https" || !(u.path() == "/" || u.path().is_empty()) {
            return Err(GcError::Value {
                key: "gc.registry",
                message: format!("{registry:?} must be https://host[:port]"),
            });
        }
        let ca_file = args.ca_file.clone().or(f.ca_file).ok_or(GcError::Value {
            key: "gc.ca_file",
            message: "not set (--ca-file, SLIPWAY_GC_CA_FILE)".into(),
        })?;
        Ok(Settings {
            apply: args.apply.unwrap_or(false),
            registry: registry.trim_end_matches('/').to_string(),
            ca_file,
            policy,
            cluster: !args.no_cluster.unwrap_or(false),
        })
    }
}

/// `slipway gc`.
pub async fn run(args: &GcArgs) -> Result<GcReport, GcError> {
    let text = match &args.config {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| GcError::Config {
            path: p.clone(),
            message: e.to_string(),
        })?),
        None => None,
    };
    let s = Settings::resolve(args, text.as_deref())?;
    let password = match (&args.password_file, std::env::var("SLIPWAY_GC_PASSWORD")) {
        (Some(f), _) => std::fs::read_to_string(f)
            .map(|p| p.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|e| GcError::Config {
                path: f.clone(),
                message: format!("cannot read the password file: {e}"),
            })?,
        (None, Ok(p)) => p,
        (None, Err(_)) => {
            return Err(GcError::Value {
                key: "SLIPWAY_GC_PASSWORD",
                message: "not set, nor --password-file: the push account's password (Secret registry-push, key password)"
                    .into(),
            })
        }
    };
    let mut images: Vec<(String, UseKind)> = args
        .images
        .iter()
        .map(|i| (i.clone(), UseKind::Template))
        .collect();
    if s.cluster {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| GcError::Client(Box::new(e)))?;
        images.extend(cluster::images_in_use(&client).await?);
    }
    let req = GcRequest {
        apply: s.apply,
        images,
        policy: s.policy,
    };
    let report = post(&s, &args.username, &password, &req).await?;
    if args.termination_log.exists() {
        let mut m = report.summary();
        if m.len() > TERMINATION_MAX {
            let mut cut = TERMINATION_MAX - 4;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
            m.push_str("\n…\n");
        }
        std::fs::write(&args.termination_log, m).map_err(|source| GcError::Termination {
            path: args.termination_log.clone(),
            source,
        })?;
    }
    Ok(report)
}

/// How long a sweep may take before the command gives up waiting (the
/// gateway finishes it regardless and takes writes again).
const SWEEP_WAIT: Duration = Duration::from_secs(3600);

async fn post(
    s: &Settings,
    user: &str,
    password: &str,
    req: &GcRequest,
) -> Result<GcReport, GcError> {
    use base64::Engine as _;
    use http_body_util::{BodyExt, Full};
    let url = format!("{}{GC_PATH}", s.registry);
    let bad = |message: String| GcError::Registry {
        url: url.clone(),
        message,
    };
    let client = crate::node::canary_image::client(&s.ca_file).map_err(|e| bad(e.to_string()))?;
    let body = serde_json::to_vec(req).map_err(|e| bad(e.to_string()))?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let r = http::Request::post(&url)
        .header(http::header::AUTHORIZATION, format!("Basic {auth}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| bad(e.to_string()))?;
    let resp = tokio::time::timeout(SWEEP_WAIT, async {
        let resp = client
            .request(r)
            .await
            .map_err(|e| bad(crate::report(&e)))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| bad(e.to_string()))?
            .to_bytes();
        Ok::<_, GcError>((status, body))
    })
    .await
    .map_err(|_| bad(format!("no answer within {} s", SWEEP_WAIT.as_secs())))??;
    let (status, body) = resp;
    if !status.is_success() {
        let mut t = String::from_utf8_lossy(&body).trim().to_string();
        t.truncate(1024);
        return Err(bad(format!("answered {status}: {t}")));
    }
    serde_json::from_slice(&body).map_err(|e| bad(format!("the report does not parse: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> GcArgs {
        GcArgs {
            registry: Some("https://registry.shared-services:5000".into()),
            ca_file: Some("/ca.crt".into()),
            username: "u".into(),
            ..GcArgs::default()
        }
    }

    #[test]
    fn settings_come_from_flags_then_the_file_then_defaults() {
        let mut a = args();
        a.config = Some("/etc/slipway/gc.toml".into());
        a.keep_builds = Some(3);
        let s =
            Settings::resolve(&a, Some("[gc]\nkeep_builds = 5\nkeep_pulled_days = 2\n")).unwrap();
        assert_eq!(s.policy.keep_builds, 3);
        assert_eq!(s.policy.keep_pulled_days, 2.0);
        assert_eq!(s.policy.cache_ttl_hours, 336.0);
        assert_eq!(s.policy.min_age_secs, 3600);
        assert!(!s.apply, "a dry run unless asked");
        assert!(s.cluster);
    }

    #[test]
    fn bad_settings_name_the_file_or_key_and_exit_64() {
        use crate::ExitStatus;
        let mut a = args();
        a.config = Some("/etc/slipway/gc.toml".into());
        let e = Settings::resolve(&a, Some("[gc]\nkeep_bilds = 5\n")).unwrap_err();
        assert!(e.to_string().contains("/etc/slipway/gc.toml"), "{e}");
        assert!(e.to_string().contains("keep_bilds"), "{e}");
        assert_eq!(e.exit_code(), 64);
        let mut a = args();
        a.registry = Some("http://r:5000".into());
        let e = Settings::resolve(&a, None).unwrap_err();
        assert!(e.to_string().contains("gc.registry"), "{e}");
        assert_eq!(e.exit_code(), 64);
        let mut a = args();
        a.keep_pulled_days = Some(-1.0);
        let e = Settings::resolve(&a, None).unwrap_err();
        assert!(e.to_string().contains("gc.keep_pulled_days"), "{e}");
    }

    #[test]
    fn the_summary_fits_a_termination_message_per_repository() {
        let mut r = GcReport {
            applied: true,
            ..GcReport::default()
        };
        r.total.bytes = 30;
        r.repositories.insert(
            "app".into(),
            Freed {
                bytes: 30,
                blobs: 2,
                manifests: 1,
                tags: 1,
            },
        );
        let s = r.summary();
        assert!(s.starts_with("gc applied: freed 30 bytes"), "{s}");
        assert!(
            s.contains("app: freed 30 bytes: 2 blobs, 1 manifests, 1 tags"),
            "{s}"
        );
    }
}
