//! `slipway build`, `slipway builds`, `slipway logs`: Kaniko builds from git
//! in the cluster, printing a pullable `REG/NAME@sha256:…`.
//!
//! | module | owns |
//! | --- | --- |
//! | this one | the CLI arguments, the `[build]` config (file, `SLIPWAY_BUILD_*`, flags), validation into a [`job::BuildSpec`], [`BuildError`] and its exit codes |
//! | [`job`] (pure) | the Job and ConfigMap objects, the revision classifier, `--render` |
//! | [`log`] (pure) | Kaniko's log → stages, steps, cache hits and steps rebuilt, cache uploads, retries, the final error's class |
//! | [`status`] (pure) | pod and Job status → what happened (success with a digest, or which failure) |
//! | [`run`] (I/O) | the API calls: preflight, create, watch, logs, cancel, list |
//!
//! Configuration (flag > environment > file > default), from `--config`,
//! `SLIPWAY_BUILD_CONFIG`, or `~/.config/slipway/build.toml` if it exists:
//!
//! ```toml
//! [build]
//! registry        = "registry.shared-services:5000"
//! namespace       = "shared-services"
//! executor_image  = "ghcr.io/osscontainertools/kaniko:v1.27.6-debug"
//! git_image       = "docker.io/alpine/git:2.47.2"
//! ca_configmap    = "registry-ca"
//! ca_namespace    = "shared-services"
//! service_account = "slipway-build"
//! cache           = true
//! mirror          = true     # FROM through the cluster's mirror, if it has one (#20)
//! # mirror_registries = ["docker.io"]   # instead of reading ConfigMap slipway-mirror
//! timeout         = "1h"
//! ttl             = "24h"
//! cpu             = "1"
//! memory          = "2Gi"
//! push_retry      = 3
//! ```

pub mod job;
pub mod log;
pub mod run;
pub mod status;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use job::{BuildSpec, Revision};

pub const DEFAULT_REGISTRY: &str = "registry.shared-services:5000";
pub const DEFAULT_NAMESPACE: &str = "shared-services";
/// The maintained fork (upstream GoogleContainerTools/kaniko was archived in
/// June 2025 at v1.24.0). The `-debug` variant, because the wrapper that
/// adds the commit needs its busybox shell; pinned to a release.
pub const DEFAULT_EXECUTOR_IMAGE: &str = "ghcr.io/osscontainertools/kaniko:v1.27.6-debug";
/// Real git (with OpenSSH) for the init container, pinned.
pub const DEFAULT_GIT_IMAGE: &str = "docker.io/alpine/git:2.47.2";
pub const DEFAULT_CA_CONFIGMAP: &str = "registry-ca";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "slipway-build";
pub const DEFAULT_TIMEOUT: &str = "1h";
pub const DEFAULT_TTL: &str = "24h";
pub const DEFAULT_CPU: &str = "1";
pub const DEFAULT_MEMORY: &str = "2Gi";
pub const DEFAULT_PUSH_RETRY: u32 = 3;

/// Exit codes, one per failure class (README, "Build an image").
pub mod exit {
    pub const FAILED: i32 = 1;
    pub const GIT_AUTH: i32 = 10;
    pub const REVISION_NOT_FOUND: i32 = 11;
    pub const DOCKERFILE_NOT_FOUND: i32 = 12;
    pub const PUSH_DENIED: i32 = 13;
    pub const CERTIFICATE: i32 = 14;
    pub const OOM_KILLED: i32 = 15;
    pub const DEADLINE_EXCEEDED: i32 = 16;
    pub const EVICTED: i32 = 17;
    pub const IMAGE_PULL: i32 = 18;
    pub const MISSING: i32 = 19;
    pub const PUSH_FAILED: i32 = 20;
    pub const BASE_IMAGE: i32 = 21;
    pub const KILLED: i32 = 22;
    pub const BAD_CONFIG: i32 = crate::EXIT_BAD_CONFIG as i32;
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(String),
    #[error("git auth failed for {url}: {detail}")]
    GitAuth { url: String, detail: String },
    #[error("revision not found: {detail}")]
    RevisionNotFound { revision: String, detail: String },
    #[error("dockerfile not found: {detail}")]
    DockerfileNotFound { detail: String },
    #[error("push denied by {registry}: {detail}; give --push-secret a dockerconfigjson Secret that may push there")]
    PushDenied { registry: String, detail: String },
    /// The push failed for another reason than the credentials: the
    /// registry answered an error (5xx, a broken storage) or could not be
    /// reached.
    #[error("push to {registry} failed: {detail}; the registry is failing or unreachable (not a credentials problem): run the build again once it is healthy")]
    PushFailed { registry: String, detail: String },
    /// A `FROM` image could not be pulled.
    #[error("base image {}: {detail}", if *.unauthorized { "not allowed (unauthorized)" } else { "not found" })]
    BaseImage { unauthorized: bool, detail: String },
    /// A Dockerfile step exited non-zero.
    #[error("build {job} failed at step {}{}: {detail}", .step.as_deref().unwrap_or("(unknown)"), .exit_code.map(|c| format!(" (exit code {c})")).unwrap_or_default())]
    StepFailed {
        job: String,
        step: Option<String>,
        exit_code: Option<i32>,
        detail: String,
    },
    /// Kaniko was killed by a signal (not for memory: that is OomKilled)
    /// before it could say why; the log tail is all there is.
    #[error("kaniko in job {job} was killed (exit code {exit_code}, signal {}) before it finished; its last log lines:\n{tail}", .exit_code - 128)]
    Killed {
        job: String,
        exit_code: i32,
        tail: String,
    },
    #[error("certificate error talking to {registry}: {detail}; check that ConfigMap registry-ca holds the CA that signed the registry's certificate")]
    Certificate { registry: String, detail: String },
    #[error("container {container} of job {job} was OOMKilled at its memory limit {limit}: raise --memory")]
    OomKilled {
        job: String,
        container: String,
        limit: String,
    },
    #[error("deadline exceeded: job {job} ran longer than --timeout {timeout} and was stopped")]
    DeadlineExceeded { job: String, timeout: String },
    #[error("the build pod of job {job} was evicted: {message}")]
    Evicted { job: String, message: String },
    #[error("cannot pull image {image} for container {container}: {reason}: {message}")]
    ImagePull {
        container: String,
        image: String,
        reason: String,
        message: String,
    },
    #[error("{what}: {hint}")]
    Missing { what: String, hint: String },
    #[error("build {job} failed: {detail}")]
    Failed { job: String, detail: String },
    #[error("interrupted: {detail}")]
    Interrupted { detail: String },
    /// The API error is part of the message (not a `source`), so that it
    /// is printed once, and is in `--output json`'s `message`.
    #[error("{action}: {}", error_chain(.error))]
    Kube { action: String, error: kube::Error },
}

/// An error and its sources, each once ("a: b: c"), skipping a source whose
/// text its parent already includes.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

impl BuildError {
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::Config(_) => exit::BAD_CONFIG,
            BuildError::GitAuth { .. } => exit::GIT_AUTH,
            BuildError::RevisionNotFound { .. } => exit::REVISION_NOT_FOUND,
            BuildError::DockerfileNotFound { .. } => exit::DOCKERFILE_NOT_FOUND,
            BuildError::PushDenied { .. } => exit::PUSH_DENIED,
            BuildError::PushFailed { .. } => exit::PUSH_FAILED,
            BuildError::BaseImage { .. } => exit::BASE_IMAGE,
            BuildError::StepFailed { .. } => exit::FAILED,
            BuildError::Killed { .. } => exit::KILLED,
            BuildError::Certificate { .. } => exit::CERTIFICATE,
            BuildError::OomKilled { .. } => exit::OOM_KILLED,
            BuildError::DeadlineExceeded { .. } => exit::DEADLINE_EXCEEDED,
            BuildError::Evicted { .. } => exit::EVICTED,
            BuildError::ImagePull { .. } => exit::IMAGE_PULL,
            BuildError::Missing { .. } => exit::MISSING,
            BuildError::Failed { .. } | BuildError::Kube { .. } => exit::FAILED,
            BuildError::Interrupted { .. } => exit::INTERRUPTED,
        }
    }

    /// A short machine-readable name, for `--output json`.
    pub fn kind(&self) -> &'static str {
        match self {
            BuildError::Config(_) => "bad-config",
            BuildError::GitAuth { .. } => "git-auth-failed",
            BuildError::RevisionNotFound { .. } => "revision-not-found",
            BuildError::DockerfileNotFound { .. } => "dockerfile-not-found",
            BuildError::PushDenied { .. } => "push-denied",
            BuildError::PushFailed { .. } => "push-failed",
            BuildError::BaseImage { .. } => "base-image",
            BuildError::StepFailed { .. } => "step-failed",
            BuildError::Killed { .. } => "killed",
            BuildError::Certificate { .. } => "certificate-error",
            BuildError::OomKilled { .. } => "oom-killed",
            BuildError::DeadlineExceeded { .. } => "deadline-exceeded",
            BuildError::Evicted { .. } => "evicted",
            BuildError::ImagePull { .. } => "image-pull-failed",
            BuildError::Missing { .. } => "missing",
            BuildError::Failed { .. } => "failed",
            BuildError::Interrupted { .. } => "interrupted",
            BuildError::Kube { .. } => "api-error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// `[build]` settings that flags and `SLIPWAY_BUILD_*` can override.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Settings {
    /// Build config file (TOML, [build] table); default ~/.config/slipway/build.toml if it exists
    #[arg(long, env = "SLIPWAY_BUILD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Namespace the build runs in [default: shared-services]
    #[arg(long, short = 'n', env = "SLIPWAY_BUILD_NAMESPACE")]
    pub namespace: Option<String>,
}

/// Options of `slipway build` that the config file can also set.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Registry host:port images are pushed to [default: registry.shared-services:5000]
    #[arg(long, env = "SLIPWAY_BUILD_REGISTRY")]
    pub registry: Option<String>,
    /// Kaniko executor image (needs /busybox/sh: a -debug tag)
    #[arg(long, env = "SLIPWAY_BUILD_EXECUTOR_IMAGE")]
    pub executor_image: Option<String>,
    /// Image of the git init container
    #[arg(long, env = "SLIPWAY_BUILD_GIT_IMAGE")]
    pub git_image: Option<String>,
    /// ConfigMap with the registry CA (key ca.crt) [default: registry-ca]
    #[arg(long, env = "SLIPWAY_BUILD_CA_CONFIGMAP")]
    pub ca_configmap: Option<String>,
    /// Namespace the CA ConfigMap is published in [default: shared-services]
    #[arg(long, env = "SLIPWAY_BUILD_CA_NAMESPACE")]
    pub ca_namespace: Option<String>,
    /// Registry CA file to use instead of the cluster's ConfigMap (and to put in --render)
    #[arg(long, env = "SLIPWAY_BUILD_CA_FILE")]
    pub registry_ca_file: Option<PathBuf>,
    /// ServiceAccount of the build pod [default: slipway-build]
    #[arg(long, env = "SLIPWAY_BUILD_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// Use the registry layer cache (--no-cache turns it off) [default: true]
    #[arg(long, env = "SLIPWAY_BUILD_CACHE", hide = true)]
    pub cache: Option<bool>,
    /// Pull FROM images of mirrored upstreams through the cluster's mirror (--no-mirror turns it off) [default: true]
    #[arg(long, env = "SLIPWAY_BUILD_MIRROR", hide = true)]
    pub mirror: Option<bool>,
    /// The mirrored upstreams (e.g. docker.io,ghcr.io), instead of reading them from ConfigMap slipway-mirror in the CA namespace
    #[arg(long, env = "SLIPWAY_BUILD_MIRROR_REGISTRIES", value_delimiter = ',')]
    pub mirror_registries: Option<Vec<String>>,
    /// Give up after this long (e.g. 30m, 1h30m) [default: 1h]
    #[arg(long, env = "SLIPWAY_BUILD_TIMEOUT")]
    pub timeout: Option<String>,
    /// Delete the finished Job after this long [default: 24h]
    #[arg(long, env = "SLIPWAY_BUILD_TTL")]
    pub ttl: Option<String>,
    /// CPU request of the build [default: 1]
    #[arg(long, env = "SLIPWAY_BUILD_CPU")]
    pub cpu: Option<String>,
    /// Memory request and limit of the build [default: 2Gi]
    #[arg(long, env = "SLIPWAY_BUILD_MEMORY")]
    pub memory: Option<String>,
    /// Kaniko --push-retry [default: 3]
    #[arg(long, env = "SLIPWAY_BUILD_PUSH_RETRY")]
    pub push_retry: Option<u32>,
}

/// `slipway build`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct BuildArgs {
    /// Git repository URL: https://, ssh://, git@host:path, or without
    /// --git-secret also http:// and git://
    #[arg(long = "git")]
    pub git: String,
    /// Branch, tag, full commit or short commit (7+ hex digits)
    #[arg(long)]
    pub rev: String,
    /// Image repository name under the registry (e.g. team/app)
    #[arg(long)]
    pub repo: String,
    /// Dockerfile, relative to --context-dir
    #[arg(long, default_value = "Dockerfile")]
    pub dockerfile: String,
    /// Build context directory inside the repository
    #[arg(long)]
    pub context_dir: Option<String>,
    /// Dockerfile stage to build
    #[arg(long)]
    pub target: Option<String>,
    /// Build argument K=V (repeatable); visible in the Job: no secrets
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// Image tag [default: the short commit]
    #[arg(long)]
    pub tag: Option<String>,
    /// Secret with git credentials: token, or username+password, or ssh-privatekey (+known_hosts)
    #[arg(long)]
    pub git_secret: Option<String>,
    /// Secret with the Docker config.json Kaniko pushes with, in the build
    /// namespace [default: registry-push, made by `slipway pki ensure`]
    #[arg(long, conflicts_with = "no_push_secret")]
    pub push_secret: Option<String>,
    /// Key of --push-secret that holds the config.json (a
    /// kubernetes.io/dockerconfigjson Secret: .dockerconfigjson)
    /// [default: config.json]
    #[arg(long, conflicts_with = "no_push_secret")]
    pub push_secret_key: Option<String>,
    /// Push without credentials (a registry without slipway's gateway)
    #[arg(long)]
    pub no_push_secret: bool,
    /// Do not use the registry layer cache
    #[arg(long)]
    pub no_cache: bool,
    /// Pull FROM images from their own registries, not through the
    /// cluster's mirror (no --registry-map)
    #[arg(long)]
    pub no_mirror: bool,
    /// Print the build's name and exit once the Job is created
    #[arg(long)]
    pub detach: bool,
    /// Print the Job (and any ConfigMap it needs) as YAML; no API call
    #[arg(long)]
    pub render: bool,
    /// Output format of the result
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Build id (the random part of the names), for reproducible --render output
    #[arg(long, env = "SLIPWAY_BUILD_ID")]
    pub build_id: Option<String>,
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub overrides: Overrides,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    build: FileBuild,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBuild {
    registry: Option<String>,
    namespace: Option<String>,
    executor_image: Option<String>,
    git_image: Option<String>,
    ca_configmap: Option<String>,
    ca_namespace: Option<String>,
    ca_file: Option<PathBuf>,
    service_account: Option<String>,
    cache: Option<bool>,
    mirror: Option<bool>,
    mirror_registries: Option<Vec<String>>,
    timeout: Option<String>,
    ttl: Option<String>,
    cpu: Option<String>,
    memory: Option<String>,
    push_retry: Option<u32>,
}

/// Where the build's registry CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// The ConfigMap `slipway pki` publishes, copied into the build
    /// namespace when that is another one.
    Cluster { namespace: String, name: String },
    /// A PEM file given with `--registry-ca-file` / `ca_file`.
    Pem(String),
}

/// Which upstreams the build maps to the mirror (#20).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorSource {
    /// `--no-mirror` / `mirror = false`.
    Off,
    /// ConfigMap [`crate::mirror::CONFIGMAP`] in this namespace (the CA
    /// namespace), read at preflight; missing means no mirror.
    Cluster { namespace: String },
    /// `mirror_registries`: already in the spec's `registry_map`.
    Given,
}

/// Everything a build needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub spec: BuildSpec,
    pub ca: CaSource,
    pub mirror: MirrorSource,
    /// As typed (for messages).
    pub timeout: String,
}

impl Plan {
    /// What `--render` can say about the CA without the API.
    pub fn render_ca(&self) -> job::RenderCa<'_> {
        match &self.ca {
            CaSource::Pem(p) => job::RenderCa::Pem(p),
            CaSource::Cluster { namespace, .. } if *namespace == self.spec.namespace => {
                job::RenderCa::InPlace
            }
            CaSource::Cluster { namespace, .. } => job::RenderCa::CopyNeeded {
                from_namespace: namespace,
            },
        }
    }
}

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    let p = base.join("slipway").join("build.toml");
    p.is_file().then_some(p)
}

fn read_config(path: Option<&Path>) -> Result<(Option<PathBuf>, FileBuild), BuildError> {
    let path = path.map(Path::to_path_buf).or_else(default_config_path);
    let Some(p) = path else {
        return Ok((None, FileBuild::default()));
    };
    let text = std::fs::read_to_string(&p)
        .map_err(|e| BuildError::Config(format!("cannot read config file {}: {e}", p.display())))?;
    let f: FileConfig = toml::from_str(&text).map_err(|e| {
        BuildError::Config(format!(
            "config file {}: {}",
            p.display(),
            e.to_string().trim_end().replace('\n', " | ")
        ))
    })?;
    Ok((Some(p), f.build))
}

/// The namespace `slipway builds` and `slipway logs` look in.
pub fn namespace(settings: &Settings) -> Result<String, BuildError> {
    let (_, f) = read_config(settings.config.as_deref())?;
    let ns = settings
        .namespace
        .clone()
        .or(f.namespace)
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    check_dns_label("namespace", &ns)?;
    Ok(ns)
}

fn bad(msg: impl Into<String>) -> BuildError {
    BuildError::Config(msg.into())
}

fn check_dns_label(what: &str, v: &str) -> Result<(), BuildError> {
    crate::k8s::check_label(what, v).map_err(|e| bad(e.to_string()))
}

fn check_dns_subdomain(what: &str, v: &str) -> Result<(), BuildError> {
    crate::k8s::check_subdomain(what, v).map_err(|e| bad(e.to_string()))
}

/// `30s`, `45m`, `1h30m`, `2h`, `1d` or plain seconds.
pub fn parse_duration(what: &str, s: &str) -> Result<u64, BuildError> {
    let err = || {
        bad(format!(
            "{what} {s:?} is not a duration (e.g. 90s, 30m, 1h30m)"
        ))
    };
    if let Ok(n) = s.parse::<u64>() {
        return (n > 0).then_some(n).ok_or_else(err);
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(err()),
        };
        let n: u64 = num.parse().map_err(|_| err())?;
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(err)?)
            .ok_or_else(err)?;
        num.clear();
    }
    if !num.is_empty() || total == 0 {
        return Err(err());
    }
    Ok(total)
}

/// A Kubernetes quantity such as `500m`, `2`, `1.5`, `512Mi`, `2Gi`, `1G`.
fn check_quantity(what: &str, q: &str) -> Result<(), BuildError> {
    let (num, suffix) = q.split_at(q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len()));
    let num_ok = !num.is_empty()
        && num.chars().filter(|c| *c == '.').count() <= 1
        && num.chars().all(|c| c.is_ascii_digit() || c == '.')
        && num.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    );
    if num_ok && suffix_ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{what} {q:?} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 4Gi)"
        )))
    }
}

/// An image repository path: lowercase components of `[a-z0-9]` joined by
/// single `.`, `_`, `__` or `-` runs, separated by `/`.
fn check_repo(repo: &str) -> Result<(), BuildError> {
    let comp_ok = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
    };
    if repo.len() <= 200 && repo.split('/').all(comp_ok) && !repo.starts_with("cache/") {
        Ok(())
    } else if repo.starts_with("cache/") {
        Err(bad(format!(
            "--repo {repo:?}: cache/ is where the layer cache lives; pick another name"
        )))
    } else {
        Err(bad(format!(
            "--repo {repo:?} is not an image repository name (lowercase letters, digits, '.', '_', '-', '/')"
        )))
    }
}

fn check_tag(tag: &str) -> Result<(), BuildError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && (tag.as_bytes()[0].is_ascii_alphanumeric() || tag.starts_with('_'))
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(format!("--tag {tag:?} is not a valid image tag")))
    }
}

/// host:port, with the port: Kaniko's `--registry-certificate` matches
/// host:port exactly, and without a port Kaniko tries :443.
fn check_registry(r: &str) -> Result<(), BuildError> {
    let Some((host, port)) = r.rsplit_once(':') else {
        return Err(bad(format!(
            "registry {r:?} has no port: give host:port, e.g. {DEFAULT_REGISTRY}"
        )));
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b));
    if host_ok && port.parse::<u16>().is_ok_and(|p| p > 0) {
        Ok(())
    } else {
        Err(bad(format!("registry {r:?} is not host:port")))
    }
}

/// https://, ssh://, scp-like `user@host:path`, and without a secret
/// http:// and git:// (the help of `--git` says the same, #19). A password
/// in the URL is refused: it would be stored in the Job for anyone who can
/// read it.
fn check_git_url(url: &str, has_secret: bool) -> Result<(), BuildError> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!("--git {url:?} contains whitespace")));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        match scheme {
            "https" | "ssh" => {}
            "http" | "git" if !has_secret => {}
            "http" => {
                return Err(bad(format!(
                    "--git {url}: credentials from --git-secret would go over plain http; use https"
                )))
            }
            "git" => {
                return Err(bad(format!(
                    "--git {url}: the git:// protocol has no authentication, so --git-secret would not be used; use https:// or ssh://"
                )))
            }
            _ => return Err(bad(format!("--git {url}: unsupported scheme {scheme}://"))),
        }
        let authority = rest.split('/').next().unwrap_or("");
        if authority.is_empty() {
            return Err(bad(format!("--git {url}: no host")));
        }
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if userinfo.contains(':') {
                return Err(bad(
                    "--git: the URL contains a password, which would be stored in the Job; put it in a Secret and pass --git-secret",
                ));
            }
        }
        return Ok(());
    }
    // scp-like: [user@]host:path
    if let Some((host, path)) = url.split_once(':') {
        if !host.is_empty() && !path.is_empty() && !host.contains('/') {
            return Ok(());
        }
    }
    Err(bad(format!(
        "--git {url:?} is not a git URL (https://…, ssh://…, git@host:path, http://… or git://…)"
    )))
}

/// A build id: 10 lowercase letters and digits, from the clock and the
/// process's hash seed (no RNG dependency; unique enough for names that
/// also carry the repository).
pub fn new_build_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    let mut n = h.finish();
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = String::new();
    for _ in 0..10 {
        s.push(ALPHABET[(n % 36) as usize] as char);
        n /= 36;
    }
    s
}

impl BuildArgs {
    /// Merges flags, environment and the config file, and validates
    /// everything into a [`Plan`]. Reads the config file and the CA file,
    /// nothing else.
    pub fn plan(&self) -> Result<Plan, BuildError> {
        let (cfg_path, f) = read_config(self.settings.config.as_deref())?;
        let o = &self.overrides;
        let namespace = self
            .settings
            .namespace
            .clone()
            .or(f.namespace)
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        check_dns_label("namespace", &namespace)?;
        let registry = o
            .registry
            .clone()
            .or(f.registry)
            .unwrap_or_else(|| DEFAULT_REGISTRY.into());
        check_registry(&registry)?;
        let executor_image = o
            .executor_image
            .clone()
            .or(f.executor_image)
            .unwrap_or_else(|| DEFAULT_EXECUTOR_IMAGE.into());
        let git_image = o
            .git_image
            .clone()
            .or(f.git_image)
            .unwrap_or_else(|| DEFAULT_GIT_IMAGE.into());
        for (what, img) in [
            ("executor image", &executor_image),
            ("git image", &git_image),
        ] {
            if img.is_empty() || img.chars().any(char::is_whitespace) {
                return Err(bad(format!("{what} {img:?} is not an image reference")));
            }
        }
        let ca_configmap = o
            .ca_configmap
            .clone()
            .or(f.ca_configmap)
            .unwrap_or_else(|| DEFAULT_CA_CONFIGMAP.into());
        check_dns_subdomain("ca_configmap", &ca_configmap)?;
        let ca_namespace = o
            .ca_namespace
            .clone()
            .or(f.ca_namespace)
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        check_dns_label("ca_namespace", &ca_namespace)?;
        // A file from the config is relative to the config file.
        let ca_file = o.registry_ca_file.clone().or_else(|| {
            f.ca_file.map(|p| match (&cfg_path, p.is_relative()) {
                (Some(c), true) => c.parent().unwrap_or(Path::new(".")).join(p),
                _ => p,
            })
        });
        let ca = match ca_file {
            Some(p) => {
                let pem = std::fs::read_to_string(&p).map_err(|e| {
                    bad(format!("cannot read registry CA file {}: {e}", p.display()))
                })?;
                crate::pki::inspect(&p.display().to_string(), &pem)
                    .map_err(|e| bad(format!("registry CA file: {e}")))?;
                CaSource::Pem(pem)
            }
            None => CaSource::Cluster {
                namespace: ca_namespace.clone(),
                name: ca_configmap.clone(),
            },
        };
        let service_account = o
            .service_account
            .clone()
            .or(f.service_account)
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.into());
        check_dns_subdomain("service account", &service_account)?;
        let cache = !self.no_cache && o.cache.or(f.cache).unwrap_or(true);
        let mirror_on = !self.no_mirror && o.mirror.or(f.mirror).unwrap_or(true);
        let (mirror, registry_map) = match o.mirror_registries.clone().or(f.mirror_registries) {
            _ if !mirror_on => (MirrorSource::Off, vec![]),
            Some(list) => {
                let m = crate::mirror::Mirrors::parse(
                    &crate::mirror::FileMirror {
                        registries: Some(list),
                        ..Default::default()
                    },
                    None,
                )
                .map_err(|e| bad(format!("mirror_registries: {e}")))?;
                (MirrorSource::Given, m.registry_map(&registry))
            }
            None => (
                MirrorSource::Cluster {
                    namespace: ca_namespace.clone(),
                },
                vec![],
            ),
        };
        let timeout = o
            .timeout
            .clone()
            .or(f.timeout)
            .unwrap_or_else(|| DEFAULT_TIMEOUT.into());
        let timeout_secs = parse_duration("timeout", &timeout)?;
        let ttl = o
            .ttl
            .clone()
            .or(f.ttl)
            .unwrap_or_else(|| DEFAULT_TTL.into());
        let ttl_secs = parse_duration("ttl", &ttl)?;
        let cpu = o
            .cpu
            .clone()
            .or(f.cpu)
            .unwrap_or_else(|| DEFAULT_CPU.into());
        check_quantity("cpu", &cpu)?;
        let memory = o
            .memory
            .clone()
            .or(f.memory)
            .unwrap_or_else(|| DEFAULT_MEMORY.into());
        check_quantity("memory", &memory)?;
        let push_retry = o.push_retry.or(f.push_retry).unwrap_or(DEFAULT_PUSH_RETRY);

        check_git_url(&self.git, self.git_secret.is_some())?;
        let revision = Revision::parse(&self.rev).map_err(|e| bad(format!("--rev: {e}")))?;
        check_repo(&self.repo)?;
        if let Some(t) = &self.tag {
            check_tag(t)?;
        }
        let context_dir = match &self.context_dir {
            None => None,
            Some(d) => match job::normalize_rel(d) {
                Some(n) if n.is_empty() => None,
                Some(n) => Some(n),
                None => {
                    return Err(bad(format!(
                        "--context-dir {d:?} must be a path inside the repository"
                    )))
                }
            },
        };
        let joined = match &context_dir {
            Some(d) => format!("{d}/{}", self.dockerfile),
            None => self.dockerfile.clone(),
        };
        match job::normalize_rel(&joined) {
            Some(p) if !p.is_empty() => {}
            _ => {
                return Err(bad(format!(
                    "--dockerfile {:?} must be a file inside the repository",
                    self.dockerfile
                )))
            }
        }
        if let Some(t) = &self.target {
            if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(format!("--target {t:?} is not a stage name")));
            }
        }
        let mut build_args = Vec::new();
        for a in &self.build_args {
            let Some((k, v)) = a.split_once('=') else {
                return Err(bad(format!("--build-arg {a:?}: expected KEY=VALUE")));
            };
            let key_ok = !k.is_empty()
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !key_ok {
                return Err(bad(format!("--build-arg {a:?}: {k:?} is not an ARG name")));
            }
            build_args.push((k.to_string(), v.to_string()));
        }
        // With slipway's gateway in front of the registry every push needs
        // credentials (#10): the push Secret is on unless turned off.
        let push_secret = match (&self.push_secret, self.no_push_secret) {
            (_, true) => None,
            (Some(s), false) => Some(s.clone()),
            (None, false) => Some(crate::builds::job::DEFAULT_PUSH_SECRET.to_string()),
        };
        for (what, s) in [
            ("--git-secret", &self.git_secret),
            ("--push-secret", &push_secret),
        ] {
            if let Some(s) = s {
                check_dns_subdomain(what, s)?;
            }
        }
        let key = self
            .push_secret_key
            .as_deref()
            .unwrap_or(job::DEFAULT_PUSH_SECRET_KEY);
        let key_ok = !key.is_empty()
            && key.len() <= 253
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !key_ok {
            return Err(bad(format!(
                "--push-secret-key {key:?} is not a Secret key (letters, digits, '-', '_', '.')"
            )));
        }
        let build_id = match &self.build_id {
            Some(id) => {
                let ok = !id.is_empty()
                    && id.len() <= 20
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                if !ok {
                    return Err(bad(format!(
                        "--build-id {id:?}: 1 to 20 lowercase letters and digits"
                    )));
                }
                id.clone()
            }
            None => new_build_id(),
        };
        let timeout_i64 = i64::try_from(timeout_secs).map_err(|_| bad("timeout too long"))?;
        let ttl_i32 = i32::try_from(ttl_secs).map_err(|_| bad("ttl too long"))?;
        Ok(Plan {
            spec: BuildSpec {
                build_id,
                git_url: self.git.clone(),
                revision,
                repo: self.repo.clone(),
                dockerfile: self.dockerfile.clone(),
                context_dir,
                target: self.target.clone(),
                build_args,
                tag: self.tag.clone(),
                namespace,
                registry,
                executor_image,
                git_image,
                service_account,
                ca_configmap,
                cache,
                push_retry,
                timeout_secs: timeout_i64,
                ttl_secs: ttl_i32,
                cpu,
                memory,
                git_secret: self.git_secret.clone(),
                push_secret: push_secret.map(|name| job::PushSecret {
                    name,
                    key: key.to_string(),
                }),
                registry_map,
            },
            ca,
            mirror,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> BuildArgs {
        BuildArgs {
            git: "https://git.example.com/team/app.git".into(),
            rev: "main".into(),
            repo: "team/app".into(),
            dockerfile: "Dockerfile".into(),
            build_id: Some("abc123def4".into()),
            settings: Settings {
                // Never pick up the developer's own ~/.config.
                config: Some(PathBuf::from("/dev/null")),
                namespace: None,
            },
            ..Default::default()
        }
    }

    #[test]
    fn defaults_make_a_usable_plan() {
        let p = args().plan().unwrap();
        assert_eq!(p.spec.registry, DEFAULT_REGISTRY);
        assert_eq!(p.spec.namespace, "shared-services");
        assert_eq!(p.spec.executor_image, DEFAULT_EXECUTOR_IMAGE);
        assert!(p.spec.cache);
        assert_eq!(p.spec.timeout_secs, 3600);
        assert_eq!(p.spec.ttl_secs, 86400);
        assert_eq!(p.spec.job_name(), "build-team-app-abc123def4");
        assert_eq!(p.render_ca(), job::RenderCa::InPlace);
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("build.toml");
        std::fs::write(
            &cfg,
            "[build]\nregistry = \"reg.example:5443\"\nnamespace = \"team-a\"\ncache = false\ntimeout = \"20m\"\nmemory = \"4Gi\"\n",
        )
        .unwrap();
        let mut a = args();
        a.settings.config = Some(cfg.clone());
        let p = a.plan().unwrap();
        assert_eq!(p.spec.registry, "reg.example:5443");
        assert_eq!(p.spec.namespace, "team-a");
        assert!(!p.spec.cache);
        assert_eq!(p.spec.timeout_secs, 1200);
        assert_eq!(p.spec.memory, "4Gi");
        assert_eq!(
            p.render_ca(),
            job::RenderCa::CopyNeeded {
                from_namespace: "shared-services"
            }
        );
        // Flags (and SLIPWAY_BUILD_* through clap) win over the file.
        a.settings.namespace = Some("team-b".into());
        a.overrides.timeout = Some("1h30m".into());
        a.overrides.cache = Some(true);
        let p = a.plan().unwrap();
        assert_eq!(p.spec.namespace, "team-b");
        assert_eq!(p.spec.timeout_secs, 5400);
        assert!(p.spec.cache);
        a.no_cache = true;
        assert!(!a.plan().unwrap().spec.cache);
    }

    #[test]
    fn unknown_config_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("build.toml");
        std::fs::write(&cfg, "[build]\nregistery = \"x:1\"\n").unwrap();
        let mut a = args();
        a.settings.config = Some(cfg);
        let e = a.plan().unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("registery"), "{e}");
    }

    #[test]
    fn bad_input_is_exit_64() {
        type Edit = Box<dyn Fn(&mut BuildArgs)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("revision", Box::new(|a| a.rev = "a..b".into())),
            ("repo", Box::new(|a| a.repo = "Team/App".into())),
            ("cache repo", Box::new(|a| a.repo = "cache/app".into())),
            ("tag", Box::new(|a| a.tag = Some("-x".into()))),
            ("git url", Box::new(|a| a.git = "ftp://x/y".into())),
            (
                "password in url",
                Box::new(|a| a.git = "https://me:hunter2@git.example.com/x.git".into()),
            ),
            (
                "http with secret",
                Box::new(|a| {
                    a.git = "http://git.example.com/x.git".into();
                    a.git_secret = Some("creds".into());
                }),
            ),
            (
                "git protocol with secret",
                Box::new(|a| {
                    a.git = "git://git.example.com/x.git".into();
                    a.git_secret = Some("creds".into());
                }),
            ),
            (
                "build arg",
                Box::new(|a| a.build_args = vec!["NOVALUE".into()]),
            ),
            (
                "build arg key",
                Box::new(|a| a.build_args = vec!["1X=2".into()]),
            ),
            (
                "context dir",
                Box::new(|a| a.context_dir = Some("../up".into())),
            ),
            (
                "dockerfile",
                Box::new(|a| a.dockerfile = "../../Dockerfile".into()),
            ),
            (
                "registry port",
                Box::new(|a| a.overrides.registry = Some("registry".into())),
            ),
            (
                "timeout",
                Box::new(|a| a.overrides.timeout = Some("soon".into())),
            ),
            (
                "memory",
                Box::new(|a| a.overrides.memory = Some("lots".into())),
            ),
            (
                "namespace",
                Box::new(|a| a.settings.namespace = Some("Team_A".into())),
            ),
            ("build id", Box::new(|a| a.build_id = Some("UPPER".into()))),
        ];
        for (what, f) in cases {
            let mut a = args();
            f(&mut a);
            let e = a.plan().expect_err(what);
            assert_eq!(e.exit_code(), 64, "{what}: {e}");
        }
    }

    #[test]
    fn accepts_the_usual_git_urls_and_paths() {
        for url in [
            "https://github.com/example/app.git",
            "ssh://git@github.com/example/app.git",
            "git@github.com:example/app.git",
            "http://gitea.local:3000/x/y.git",
            "git://git-app.slipway-git:9418/app",
        ] {
            let mut a = args();
            a.git = url.into();
            a.plan().unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        let mut a = args();
        a.context_dir = Some("services/api/".into());
        a.dockerfile = "../../docker/api.Dockerfile".into();
        let p = a.plan().unwrap();
        assert_eq!(p.spec.context_dir.as_deref(), Some("services/api"));
        assert_eq!(p.spec.dockerfile_in_repo(), "docker/api.Dockerfile");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("t", "90").unwrap(), 90);
        assert_eq!(parse_duration("t", "90s").unwrap(), 90);
        assert_eq!(parse_duration("t", "2h").unwrap(), 7200);
        assert_eq!(parse_duration("t", "1h30m").unwrap(), 5400);
        assert_eq!(parse_duration("t", "1d").unwrap(), 86400);
        for bad in ["", "0", "0s", "h", "1x", "1h30", "-5m"] {
            assert!(parse_duration("t", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn build_ids_are_names() {
        let a = new_build_id();
        assert_eq!(a.len(), 10);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }

    #[test]
    fn exit_codes_are_distinct() {
        let codes = [
            exit::GIT_AUTH,
            exit::REVISION_NOT_FOUND,
            exit::DOCKERFILE_NOT_FOUND,
            exit::PUSH_DENIED,
            exit::CERTIFICATE,
            exit::OOM_KILLED,
            exit::DEADLINE_EXCEEDED,
            exit::EVICTED,
            exit::IMAGE_PULL,
            exit::MISSING,
            exit::PUSH_FAILED,
            exit::BASE_IMAGE,
            exit::KILLED,
            exit::FAILED,
            exit::BAD_CONFIG,
            exit::INTERRUPTED,
        ];
        let set: std::collections::BTreeSet<_> = codes.iter().collect();
        assert_eq!(set.len(), codes.len());
    }
}
