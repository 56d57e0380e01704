//! Agent configuration: one TOML file, every key overridable by a flag or a
//! `SLIPWAY_*` environment variable (flag > env > file > default).
//!
//! Owns parsing and validation only; it reads the config file and nothing
//! else. Errors name the file and the key (`registry.aliases[1]`), and map to
//! exit code 64.
//!
//! ```toml
//! [registry]
//! aliases  = ["registry.shared-services:5000", "203.0.113.7:5000"]
//! upstream = "https://registry.shared-services.svc.cluster.local:5000"
//! dial     = "10.96.0.20:5000"          # optional: connect here, verify TLS as `upstream`
//! ca_file  = "/etc/slipway/ca/ca.crt"
//!
//! [containerd]
//! host_root   = "/host"                 # where the host's / is mounted (default "/")
//! certs_dir   = "/etc/containerd/certs.d"
//! config_file = "/etc/containerd/config.toml"
//! socket      = "/run/containerd/containerd.sock"  # optional: CRI socket for the canary
//!
//! [agent]
//! canary_image = "registry.shared-services:5000/slipway/canary@sha256:…"  # optional
//! canary_interval_secs = 300
//! startup_taint = "slipway.dev/registry-unready"  # optional; needs NODE_NAME
//!
//! [peers]                               # optional: node-to-node blob sharing (#11); needs cache.dir
//! listen = "0.0.0.0:5052"               # this node's peer port (serves only verified blobs by digest)
//! static = ["10.0.0.11:5052"]           # host:port entries
//! dns = "slipway-peers.kube-system.svc.cluster.local:5052"  # headless Service, re-resolved
//! refresh_secs = 30
//! hold_until_verified = true            # false: a peer's blob streams to containerd unverified
//! client_misses_per_sec = 10            # peer-port requests per client per second that go upstream
//! fanout = 1                            # nodes a blob's owner (and each relay) serves at once; 0: the owner serves all (#23)
//! ```
//!
//! Besides the file it reads one variable that is not a `SLIPWAY_*` key:
//! `NODE_NAME` (or `--node-name`), the downward API's `spec.nodeName`, which
//! only `agent.startup_taint` needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::node::hostconfig::{Alias, AliasError};
pub use crate::proxy::peers::PeerConfig;
use crate::proxy::redirect::HostPattern;
pub use crate::proxy::{Timeouts, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} is not set: set it in the config file, with --{flag}, or with {env}")]
    Missing {
        key: &'static str,
        flag: &'static str,
        env: &'static str,
    },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("registry.aliases[{index}]: {source}")]
    Alias { index: usize, source: AliasError },
}

/// Raw file form; every field optional so flags/env can fill gaps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    registry: FileRegistry,
    #[serde(default)]
    containerd: FileContainerd,
    #[serde(default)]
    proxy: FileProxy,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    cache: FileCache,
    #[serde(default)]
    agent: FileAgent,
    #[serde(default)]
    peers: FilePeers,
    /// `[mirror]` (#20), shared with the gateway ([`crate::mirror`]).
    #[serde(default)]
    mirror: crate::mirror::FileMirror,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePeers {
    listen: Option<String>,
    #[serde(rename = "static")]
    static_peers: Option<Vec<String>>,
    dns: Option<String>,
    refresh_secs: Option<f64>,
    hold_until_verified: Option<bool>,
    client_misses_per_sec: Option<f64>,
    fanout: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegistry {
    aliases: Option<Vec<String>>,
    upstream: Option<String>,
    dial: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContainerd {
    host_root: Option<PathBuf>,
    certs_dir: Option<PathBuf>,
    config_file: Option<PathBuf>,
    socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProxy {
    listen: Option<String>,
    allow_non_loopback: Option<bool>,
    connect_timeout_secs: Option<f64>,
    response_timeout_secs: Option<f64>,
    body_idle_timeout_secs: Option<f64>,
    client_header_timeout_secs: Option<f64>,
    redirect_hosts: Option<Vec<String>>,
    redirect_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    reconcile_interval_secs: Option<f64>,
    grace_period_secs: Option<f64>,
    canary_image: Option<String>,
    canary_interval_secs: Option<f64>,
    startup_taint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCache {
    dir: Option<PathBuf>,
    max_bytes: Option<u64>,
}

/// Flag and environment overrides; each maps to one config key.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// registry.aliases: comma-separated host[:port] names workloads use
    #[arg(long, env = "SLIPWAY_REGISTRY_ALIASES", value_delimiter = ',')]
    pub registry_aliases: Option<Vec<String>>,
    /// registry.upstream: https URL the agent reaches the registry at
    #[arg(long, env = "SLIPWAY_REGISTRY_UPSTREAM")]
    pub registry_upstream: Option<String>,
    /// registry.dial: optional ip:port to connect to instead of the upstream host
    #[arg(long, env = "SLIPWAY_REGISTRY_DIAL")]
    pub registry_dial: Option<String>,
    /// registry.ca_file: PEM CA bundle that signs the registry's certificate
    #[arg(long, env = "SLIPWAY_REGISTRY_CA_FILE")]
    pub registry_ca_file: Option<PathBuf>,
    /// containerd.host_root: where the host's root is mounted (default /)
    #[arg(long, env = "SLIPWAY_CONTAINERD_HOST_ROOT")]
    pub containerd_host_root: Option<PathBuf>,
    /// containerd.certs_dir: host path of the registry host config directory
    #[arg(long, env = "SLIPWAY_CONTAINERD_CERTS_DIR")]
    pub containerd_certs_dir: Option<PathBuf>,
    /// containerd.config_file: host path of containerd's config.toml
    #[arg(long, env = "SLIPWAY_CONTAINERD_CONFIG_FILE")]
    pub containerd_config_file: Option<PathBuf>,
    /// containerd.socket: host path of containerd's CRI socket, for the canary pull (unset: no canary)
    #[arg(long, env = "SLIPWAY_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// a TOML file whose [mirror] table is used instead of this file's (#20; the install's ConfigMap slipway-mirror)
    #[arg(long, env = "SLIPWAY_MIRROR_CONFIG")]
    pub mirror_config: Option<PathBuf>,
    /// proxy.listen: loopback address of the node-local pull proxy
    #[arg(long, env = "SLIPWAY_PROXY_LISTEN")]
    pub proxy_listen: Option<String>,
    /// admin.listen: address of the metrics and health server
    #[arg(long, env = "SLIPWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// cache.dir: host path of the node blob cache (unset: no cache)
    #[arg(long, env = "SLIPWAY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// cache.max_bytes: size cap of the node blob cache
    #[arg(long, env = "SLIPWAY_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// proxy.allow_non_loopback: let the proxy listen on a non-loopback address
    #[arg(
        long = "allow-non-loopback-proxy",
        env = "SLIPWAY_PROXY_ALLOW_NON_LOOPBACK",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub proxy_allow_non_loopback: Option<bool>,
    /// proxy.connect_timeout_secs: upstream TCP+TLS connect timeout
    #[arg(long, env = "SLIPWAY_PROXY_CONNECT_TIMEOUT_SECS")]
    pub proxy_connect_timeout_secs: Option<f64>,
    /// proxy.response_timeout_secs: upstream response-header timeout
    #[arg(long, env = "SLIPWAY_PROXY_RESPONSE_TIMEOUT_SECS")]
    pub proxy_response_timeout_secs: Option<f64>,
    /// proxy.body_idle_timeout_secs: abort when an upstream body stalls this long
    #[arg(long, env = "SLIPWAY_PROXY_BODY_IDLE_TIMEOUT_SECS")]
    pub proxy_body_idle_timeout_secs: Option<f64>,
    /// proxy.client_header_timeout_secs: cut off clients that trickle a request head
    #[arg(long, env = "SLIPWAY_PROXY_CLIENT_HEADER_TIMEOUT_SECS")]
    pub proxy_client_header_timeout_secs: Option<f64>,
    /// proxy.redirect_hosts: comma-separated hosts or *.suffix patterns upstream redirects may go to
    #[arg(long, env = "SLIPWAY_PROXY_REDIRECT_HOSTS", value_delimiter = ',')]
    pub proxy_redirect_hosts: Option<Vec<String>>,
    /// proxy.redirect_ca_file: PEM CA bundle trusted for redirect hosts (unset: the system roots)
    #[arg(long, env = "SLIPWAY_PROXY_REDIRECT_CA_FILE")]
    pub proxy_redirect_ca_file: Option<PathBuf>,
    /// agent.reconcile_interval_secs: periodic re-check besides inotify
    #[arg(long, env = "SLIPWAY_AGENT_RECONCILE_INTERVAL_SECS")]
    pub agent_reconcile_interval_secs: Option<f64>,
    /// agent.grace_period_secs: how long SIGTERM waits for in-flight transfers
    #[arg(long, env = "SLIPWAY_AGENT_GRACE_PERIOD_SECS")]
    pub agent_grace_period_secs: Option<f64>,
    /// agent.canary_image: REG/REPO@sha256:… under an alias, pulled through CRI to prove readiness
    #[arg(long, env = "SLIPWAY_AGENT_CANARY_IMAGE")]
    pub agent_canary_image: Option<String>,
    /// agent.canary_interval_secs: how often the canary is pulled again (default 300)
    #[arg(long, env = "SLIPWAY_AGENT_CANARY_INTERVAL_SECS")]
    pub agent_canary_interval_secs: Option<f64>,
    /// agent.startup_taint: NoSchedule taint key removed from this Node once it is ready (needs NODE_NAME)
    #[arg(long, env = "SLIPWAY_AGENT_STARTUP_TAINT")]
    pub agent_startup_taint: Option<String>,
    /// peers.listen: this node's address:port for peers (e.g. 0.0.0.0:5052; unset: no sharing)
    #[arg(long, env = "SLIPWAY_PEERS_LISTEN")]
    pub peers_listen: Option<String>,
    /// peers.static: comma-separated host:port of other nodes' peer ports
    #[arg(long, env = "SLIPWAY_PEERS_STATIC", value_delimiter = ',')]
    pub peers_static: Option<Vec<String>>,
    /// peers.dns: name:port of a headless Service whose A/AAAA records are the agents' node IPs
    #[arg(long, env = "SLIPWAY_PEERS_DNS")]
    pub peers_dns: Option<String>,
    /// peers.refresh_secs: how often peers.static and peers.dns are resolved again (default 30)
    #[arg(long, env = "SLIPWAY_PEERS_REFRESH_SECS")]
    pub peers_refresh_secs: Option<f64>,
    /// peers.hold_until_verified: send a blob from a peer to containerd only once all of it verified (default true)
    #[arg(
        long,
        env = "SLIPWAY_PEERS_HOLD_UNTIL_VERIFIED",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub peers_hold_until_verified: Option<bool>,
    /// peers.client_misses_per_sec: requests a second one client of the peer port may make that cost an upstream request (default 10)
    #[arg(long, env = "SLIPWAY_PEERS_CLIENT_MISSES_PER_SEC")]
    pub peers_client_misses_per_sec: Option<f64>,
    /// peers.fanout: nodes a blob's owner, and each node it names, serves the blob to at once; 0: the owner serves every node (default 1)
    #[arg(long, env = "SLIPWAY_PEERS_FANOUT")]
    pub peers_fanout: Option<u64>,
    /// This Node's name, from the downward API (`spec.nodeName`); only agent.startup_taint needs it
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub source: Option<PathBuf>,
    pub aliases: Vec<Alias>,
    pub upstream: Upstream,
    pub ca_file: PathBuf,
    pub containerd: ContainerdPaths,
    pub proxy_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub cache_dir: Option<PathBuf>,
    pub cache_max_bytes: u64,
    pub proxy_allow_non_loopback: bool,
    pub timeouts: Timeouts,
    pub reconcile_interval: Duration,
    pub grace_period: Duration,
    /// Host path of containerd's CRI socket (`containerd.socket`).
    pub containerd_socket: Option<PathBuf>,
    pub canary_image: Option<CanaryImage>,
    pub canary_interval: Duration,
    pub startup_taint: Option<StartupTaint>,
    /// `peers.*` (#11); `None` without `peers.listen`.
    pub peers: Option<PeerConfig>,
    /// `[mirror]` (#20): the upstreams whose `certs.d` directories the
    /// agent writes, and whose `?ns=` the proxy maps; empty when off.
    pub mirrors: crate::mirror::Mirrors,
}

/// `agent.startup_taint` and the Node it is removed from (#8 point 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupTaint {
    /// The taint key, a Kubernetes qualified name; its effect is NoSchedule.
    pub key: String,
    /// `NODE_NAME`: the agent's own Node.
    pub node: String,
}

impl StartupTaint {
    fn parse(key: Option<String>, node: Option<String>) -> Result<Option<Self>, ConfigError> {
        let Some(key) = key else { return Ok(None) };
        // The API server refuses a taint key that is not a qualified name
        // (ValidateTaintsInNodeAnnotations / validation.IsQualifiedName), so
        // a typo here could never match a taint on the Node.
        crate::k8s::check_qualified_name("taint key", &key).map_err(|e| ConfigError::Invalid {
            key: "agent.startup_taint".into(),
            message: e.to_string(),
        })?;
        let node = node.filter(|n| !n.is_empty()).ok_or_else(|| ConfigError::Invalid {
            key: "NODE_NAME".into(),
            message: "not set, and agent.startup_taint needs it: set NODE_NAME from the downward API (fieldRef spec.nodeName), or pass --node-name".into(),
        })?;
        crate::k8s::check_subdomain("NODE_NAME", &node).map_err(|e| ConfigError::Invalid {
            key: "NODE_NAME".into(),
            message: e.to_string(),
        })?;
        Ok(Some(StartupTaint { key, node }))
    }
}

/// `agent.canary_image`: a reference by digest whose registry is one of
/// the aliases, so a pull of it goes containerd → hosts.toml → proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryImage {
    /// As written: `REG/REPO@sha256:<64 hex>`.
    pub reference: String,
    /// `REG`, the alias it is pulled through.
    pub registry: String,
}

impl CanaryImage {
    pub fn parse(raw: &str, aliases: &[Alias]) -> Result<CanaryImage, ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            key: "agent.canary_image".into(),
            message,
        };
        let (name, digest) = raw.split_once("@sha256:").ok_or_else(|| {
            bad(format!(
                "{raw:?} is not a reference by digest (REG/REPO@sha256:…): a tag could move, and a pull by tag also needs resolve"
            ))
        })?;
        if digest.len() != 64
            || !digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad(format!(
                "{raw:?}: the digest is not 64 lowercase hex digits"
            )));
        }
        let (registry, repo) = name
            .split_once('/')
            .ok_or_else(|| bad(format!("{raw:?} has no registry: write REG/REPO@sha256:…")))?;
        if repo.is_empty() || repo.contains(':') {
            return Err(bad(format!("{raw:?}: bad repository {repo:?}")));
        }
        if !aliases.iter().any(|a| a.dir_name() == registry) {
            return Err(bad(format!(
                "{raw:?}: registry {registry:?} is not one of registry.aliases ({}); the canary must be pulled through slipway's host configuration",
                aliases.iter().map(|a| a.dir_name()).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(CanaryImage {
            reference: raw.to_string(),
            registry: registry.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdPaths {
    pub host_root: PathBuf,
    /// As the host (and so containerd) names it.
    pub certs_dir: PathBuf,
    pub config_file: PathBuf,
}

impl ContainerdPaths {
    /// Where a host path is reachable from this process.
    pub fn local(&self, host_path: &Path) -> PathBuf {
        join_under(&self.host_root, host_path)
    }
    pub fn local_certs_dir(&self) -> PathBuf {
        self.local(&self.certs_dir)
    }
    pub fn local_config_file(&self) -> PathBuf {
        self.local(&self.config_file)
    }
}

/// `root` + absolute `p`, without letting `..` climb out of `root`.
pub fn join_under(root: &Path, p: &Path) -> PathBuf {
    let rel: PathBuf = p
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    root.join(rel)
}

pub const DEFAULT_CERTS_DIR: &str = "/etc/containerd/certs.d";
pub const DEFAULT_CONFIG_FILE: &str = "/etc/containerd/config.toml";
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:5050";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 10 << 30;

impl AgentConfig {
    /// Load `path` (if any) and apply overrides.
    pub fn load(path: Option<&Path>, ov: &Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                parse_file(p, &text)?
            }
            None => FileConfig::default(),
        };
        build(path, file, ov)
    }

    /// Parse config text (for tests and `--config -`).
    pub fn from_str(path: &Path, text: &str, ov: &Overrides) -> Result<Self, ConfigError> {
        build(Some(path), parse_file(path, text)?, ov)
    }
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // Its own lines: the caret under the column (#18 point 13).
        message: e.to_string().trim_end().to_string(),
    })
}

fn build(path: Option<&Path>, f: FileConfig, ov: &Overrides) -> Result<AgentConfig, ConfigError> {
    let raw_aliases =
        ov.registry_aliases
            .clone()
            .or(f.registry.aliases)
            .ok_or(ConfigError::Missing {
                key: "registry.aliases",
                flag: "registry-aliases",
                env: "SLIPWAY_REGISTRY_ALIASES",
            })?;
    if raw_aliases.is_empty() {
        return Err(ConfigError::Invalid {
            key: "registry.aliases".into(),
            message: "is empty: list every host[:port] workloads use".into(),
        });
    }
    let mut aliases: Vec<Alias> = Vec::new();
    for (index, a) in raw_aliases.iter().enumerate() {
        let alias = Alias::parse(a).map_err(|source| ConfigError::Alias { index, source })?;
        if aliases.iter().any(|x| x.dir_name() == alias.dir_name()) {
            return Err(ConfigError::Invalid {
                key: format!("registry.aliases[{index}]"),
                message: format!("{a:?} is listed twice"),
            });
        }
        aliases.push(alias);
    }

    let upstream_raw =
        ov.registry_upstream
            .clone()
            .or(f.registry.upstream)
            .ok_or(ConfigError::Missing {
                key: "registry.upstream",
                flag: "registry-upstream",
                env: "SLIPWAY_REGISTRY_UPSTREAM",
            })?;
    let dial_raw = ov.registry_dial.clone().or(f.registry.dial);
    let mut upstream = parse_upstream(&upstream_raw, dial_raw.as_deref())?;
    let redirect_hosts = ov
        .proxy_redirect_hosts
        .clone()
        .or(f.proxy.redirect_hosts)
        .unwrap_or_default();
    for (index, raw) in redirect_hosts.iter().enumerate() {
        let pattern = HostPattern::parse(raw).map_err(|e| ConfigError::Invalid {
            key: format!("proxy.redirect_hosts[{index}]"),
            message: e.to_string(),
        })?;
        upstream.redirects.hosts.push(pattern);
    }
    // Relative to the config file, like registry.ca_file.
    upstream.redirects.ca_file = ov
        .proxy_redirect_ca_file
        .clone()
        .or(f.proxy.redirect_ca_file)
        .map(|p| match path.and_then(|c| c.parent()) {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        });

    let ca_file =
        ov.registry_ca_file
            .clone()
            .or(f.registry.ca_file)
            .ok_or(ConfigError::Missing {
                key: "registry.ca_file",
                flag: "registry-ca-file",
                env: "SLIPWAY_REGISTRY_CA_FILE",
            })?;
    // A relative ca_file is relative to the config file, like containerd's `ca`.
    let ca_file = match (path.and_then(|p| p.parent()), ca_file.is_relative()) {
        (Some(dir), true) => dir.join(ca_file),
        _ => ca_file,
    };

    let host_root = ov
        .containerd_host_root
        .clone()
        .or(f.containerd.host_root)
        .unwrap_or_else(|| PathBuf::from("/"));
    let certs_dir = ov
        .containerd_certs_dir
        .clone()
        .or(f.containerd.certs_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CERTS_DIR));
    let config_file = ov
        .containerd_config_file
        .clone()
        .or(f.containerd.config_file)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
    for (key, p) in [
        ("containerd.host_root", &host_root),
        ("containerd.certs_dir", &certs_dir),
        ("containerd.config_file", &config_file),
    ] {
        if !p.is_absolute() {
            return Err(ConfigError::Invalid {
                key: key.into(),
                message: format!("{} must be an absolute path", p.display()),
            });
        }
        if p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(ConfigError::Invalid {
                key: key.into(),
                message: format!("{} must not contain '..'", p.display()),
            });
        }
    }

    let containerd_socket = ov.containerd_socket.clone().or(f.containerd.socket);
    if let Some(p) = &containerd_socket {
        if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(ConfigError::Invalid {
                key: "containerd.socket".into(),
                message: format!("{} must be an absolute path without '..'", p.display()),
            });
        }
    }
    let canary_image = ov
        .agent_canary_image
        .clone()
        .or(f.agent.canary_image)
        .map(|raw| CanaryImage::parse(&raw, &aliases))
        .transpose()?;

    let proxy_listen = parse_addr(
        "proxy.listen",
        ov.proxy_listen.clone().or(f.proxy.listen).as_deref(),
        DEFAULT_PROXY_LISTEN,
    )?;
    let admin_listen = parse_addr(
        "admin.listen",
        ov.admin_listen.clone().or(f.admin.listen).as_deref(),
        DEFAULT_ADMIN_LISTEN,
    )?;
    let cache_dir = ov.cache_dir.clone().or(f.cache.dir);
    let cache_max_bytes = ov
        .cache_max_bytes
        .or(f.cache.max_bytes)
        .unwrap_or(DEFAULT_CACHE_MAX_BYTES);
    if cache_max_bytes == 0 {
        // A cap of 0 evicts every blob as it lands (#13).
        return Err(ConfigError::Invalid {
            key: "cache.max_bytes".into(),
            message: "0 is out of range: a size in bytes of at least 1".into(),
        });
    }

    let secs = |key: &str, v: Option<f64>, default: f64| -> Result<Duration, ConfigError> {
        let v = v.unwrap_or(default);
        // The message states exactly the bounds checked (#13).
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            return Err(ConfigError::Invalid {
                key: key.into(),
                message: format!(
                    "{v} is out of range: a number of seconds greater than 0 and at most 86400"
                ),
            });
        }
        Ok(Duration::from_secs_f64(v))
    };
    let timeouts = Timeouts {
        connect: secs(
            "proxy.connect_timeout_secs",
            ov.proxy_connect_timeout_secs
                .or(f.proxy.connect_timeout_secs),
            3.0,
        )?,
        response: secs(
            "proxy.response_timeout_secs",
            ov.proxy_response_timeout_secs
                .or(f.proxy.response_timeout_secs),
            15.0,
        )?,
        body_idle: secs(
            "proxy.body_idle_timeout_secs",
            ov.proxy_body_idle_timeout_secs
                .or(f.proxy.body_idle_timeout_secs),
            30.0,
        )?,
        client_header: secs(
            "proxy.client_header_timeout_secs",
            ov.proxy_client_header_timeout_secs
                .or(f.proxy.client_header_timeout_secs),
            10.0,
        )?,
    };
    let reconcile_interval = secs(
        "agent.reconcile_interval_secs",
        ov.agent_reconcile_interval_secs
            .or(f.agent.reconcile_interval_secs),
        30.0,
    )?;
    let grace_period = secs(
        "agent.grace_period_secs",
        ov.agent_grace_period_secs.or(f.agent.grace_period_secs),
        25.0,
    )?;
    let canary_interval = secs(
        "agent.canary_interval_secs",
        ov.agent_canary_interval_secs
            .or(f.agent.canary_interval_secs),
        300.0,
    )?;
    let client_misses_per_sec = match ov
        .peers_client_misses_per_sec
        .or(f.peers.client_misses_per_sec)
    {
        None => crate::proxy::peers::DEFAULT_CLIENT_MISSES_PER_SEC,
        Some(v) if v.is_finite() && v > 0.0 && v <= 1e6 => v,
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "peers.client_misses_per_sec".into(),
                message: format!("{v} is not a rate above 0 (requests per second)"),
            })
        }
    };
    let fanout = match ov.peers_fanout.or(f.peers.fanout) {
        None => crate::proxy::tree::DEFAULT_FANOUT,
        Some(v) if v <= crate::proxy::tree::MAX_FANOUT as u64 => v as usize,
        Some(v) => {
            return Err(ConfigError::Invalid {
                key: "peers.fanout".into(),
                message: format!(
                    "{v} is out of range: a number of nodes from 0 to {}",
                    crate::proxy::tree::MAX_FANOUT
                ),
            })
        }
    };
    let peers = peer_config(
        ov.peers_listen.clone().or(f.peers.listen),
        ov.peers_static.clone().or(f.peers.static_peers),
        ov.peers_dns.clone().or(f.peers.dns),
        secs(
            "peers.refresh_secs",
            ov.peers_refresh_secs.or(f.peers.refresh_secs),
            30.0,
        )?,
        cache_dir.is_some(),
    )?
    .map(|p| PeerConfig {
        hold_until_verified: ov
            .peers_hold_until_verified
            .or(f.peers.hold_until_verified)
            // On by default: a peer's wrong byte that reached containerd
            // breaks that blob on the node for good (see
            // proxy::coalesce), and "containerd never sees a peer failure"
            // outweighs the first byte arriving early (#11).
            .unwrap_or(true),
        client_misses_per_sec,
        fanout,
        ..p
    });
    let startup_taint = StartupTaint::parse(
        ov.agent_startup_taint.clone().or(f.agent.startup_taint),
        ov.node_name.clone(),
    )?;

    // The install keeps [mirror] in its own ConfigMap (daemonset/overlays/
    // mirror), which `slipway build` reads too; re-read on every SIGHUP.
    let mirrors = match &ov.mirror_config {
        Some(file) => crate::mirror::Mirrors::load(file)?,
        None => crate::mirror::Mirrors::parse(&f.mirror, path.and_then(Path::parent))?,
    };
    for u in &mirrors.registries {
        if aliases.iter().any(|a: &Alias| a == &u.host) {
            return Err(ConfigError::Invalid {
                key: "mirror.registries".into(),
                message: format!("{} is also in registry.aliases: a host is either the in-cluster registry or a mirrored upstream", u.host),
            });
        }
    }
    Ok(AgentConfig {
        source: path.map(Path::to_path_buf),
        aliases,
        upstream,
        ca_file,
        containerd: ContainerdPaths {
            host_root,
            certs_dir,
            config_file,
        },
        proxy_listen,
        admin_listen,
        cache_dir,
        cache_max_bytes,
        proxy_allow_non_loopback: ov
            .proxy_allow_non_loopback
            .or(f.proxy.allow_non_loopback)
            .unwrap_or(false),
        timeouts,
        reconcile_interval,
        grace_period,
        containerd_socket,
        canary_image,
        canary_interval,
        startup_taint,
        peers,
        mirrors,
    })
}

/// `peers.*`: sharing needs a listen address (the node is a member of the
/// set the others hash over) and the cache (downloads are coalesced in it).
fn peer_config(
    listen: Option<String>,
    static_peers: Option<Vec<String>>,
    dns: Option<String>,
    refresh: Duration,
    have_cache: bool,
) -> Result<Option<PeerConfig>, ConfigError> {
    let static_peers = static_peers.unwrap_or_default();
    for (index, p) in static_peers.iter().enumerate() {
        crate::proxy::peers::parse_host_port(p).map_err(|message| ConfigError::Invalid {
            key: format!("peers.static[{index}]"),
            message,
        })?;
    }
    if let Some(d) = &dns {
        crate::proxy::peers::parse_host_port(d).map_err(|message| ConfigError::Invalid {
            key: "peers.dns".into(),
            message,
        })?;
    }
    let Some(listen) = listen else {
        if !static_peers.is_empty() || dns.is_some() {
            return Err(ConfigError::Invalid {
                key: "peers.listen".into(),
                message: "is not set, and peers.static or peers.dns is: a node that shares blobs must serve its peers too (e.g. 0.0.0.0:5052)".into(),
            });
        }
        return Ok(None);
    };
    let listen = parse_addr("peers.listen", Some(&listen), "")?;
    if !have_cache {
        return Err(ConfigError::Invalid {
            key: "peers.listen".into(),
            message: "needs cache.dir: blobs are shared through the node blob cache".into(),
        });
    }
    Ok(Some(PeerConfig {
        listen,
        static_peers,
        dns,
        refresh,
        hold_until_verified: false,
        client_misses_per_sec: crate::proxy::peers::DEFAULT_CLIENT_MISSES_PER_SEC,
        fanout: crate::proxy::tree::DEFAULT_FANOUT,
    }))
}

fn parse_addr(key: &str, v: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
    let s = v.unwrap_or(default);
    s.parse().map_err(|_| ConfigError::Invalid {
        key: key.into(),
        message: format!("{s:?} is not an ip:port address"),
    })
}

fn parse_upstream(raw: &str, dial: Option<&str>) -> Result<Upstream, ConfigError> {
    let bad = |message: String| ConfigError::Invalid {
        key: "registry.upstream".into(),
        message,
    };
    let url = url::Url::parse(raw).map_err(|e| bad(format!("{raw:?} is not a URL: {e}")))?;
    if url.scheme() != "https" {
        // containerd and Kaniko must verify the registry with the cluster CA;
        // plain http is the seed's "server gave HTTP response to HTTPS client".
        return Err(bad(format!("{raw:?} must use https")));
    }
    if !(url.path() == "/" || url.path().is_empty())
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(bad(format!(
            "{raw:?} must be a bare https://host[:port] with no path"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(format!("{raw:?} must not carry credentials")));
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        None => return Err(bad(format!("{raw:?} has no host"))),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let dial = match dial {
        None => None,
        Some(d) => Some(d.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid {
            key: "registry.dial".into(),
            message: format!("{d:?} is not an ip:port address"),
        })?),
    };
    Ok(Upstream {
        url: format!("https://{authority}"),
        authority,
        host: host.trim_matches(['[', ']']).to_string(),
        port,
        dial,
        redirects: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[registry]
aliases = ["registry.shared-services:5000", "203.0.113.7:5000"]
upstream = "https://registry.shared-services.svc.cluster.local:5000"
dial = "10.96.0.20:5000"
ca_file = "ca.crt"
"#;

    fn p() -> &'static Path {
        Path::new("/etc/slipway/agent.toml")
    }

    #[test]
    fn parses_file_and_resolves_relative_ca() {
        let c = AgentConfig::from_str(p(), GOOD, &Overrides::default()).unwrap();
        assert_eq!(c.aliases.len(), 2);
        assert_eq!(
            c.upstream.url,
            "https://registry.shared-services.svc.cluster.local:5000"
        );
        assert_eq!(
            c.upstream.host,
            "registry.shared-services.svc.cluster.local"
        );
        assert_eq!(c.upstream.dial, Some("10.96.0.20:5000".parse().unwrap()));
        assert_eq!(c.ca_file, PathBuf::from("/etc/slipway/ca.crt"));
        assert_eq!(c.containerd.certs_dir, PathBuf::from(DEFAULT_CERTS_DIR));
    }

    #[test]
    fn flags_override_file() {
        let ov = Overrides {
            registry_aliases: Some(vec!["a:1".into()]),
            containerd_certs_dir: Some("/x/certs.d".into()),
            ..Default::default()
        };
        let c = AgentConfig::from_str(p(), GOOD, &ov).unwrap();
        assert_eq!(c.aliases[0].dir_name(), "a:1");
        assert_eq!(c.containerd.certs_dir, PathBuf::from("/x/certs.d"));
    }

    #[test]
    fn malformed_toml_names_file_and_line() {
        let e = AgentConfig::from_str(p(), "[registry\naliases = 1", &Overrides::default())
            .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("config file /etc/slipway/agent.toml:"), "{s}");
        assert!(s.contains("line 1"), "{s}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = AgentConfig::from_str(
            p(),
            &format!("{GOOD}\n[containerd]\ncerts_dri = \"/x\"\n"),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("certs_dri"), "{e}");
    }

    #[test]
    fn bad_alias_is_named_by_index() {
        for (alias, why) in [
            ("registry/evil:5000", "'/'"),
            ("..:5000", "'..'"),
            ("reg istry:5000", "space"),
            (":5000", "empty host"),
        ] {
            let text = GOOD.replace("203.0.113.7:5000", alias);
            let e = AgentConfig::from_str(p(), &text, &Overrides::default()).unwrap_err();
            let s = e.to_string();
            assert!(s.starts_with("registry.aliases[1]:"), "{s}");
            assert!(s.contains(why), "{alias}: {s}");
        }
    }

    #[test]
    fn upstream_must_be_https_without_path() {
        for (u, why) in [
            ("http://r:5000", "must use https"),
            ("https://r:5000/v2", "no path"),
            ("not a url", "not a URL"),
        ] {
            let text = GOOD.replace("https://registry.shared-services.svc.cluster.local:5000", u);
            let e = AgentConfig::from_str(p(), &text, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains(why), "{u}: {e}");
            assert!(e.to_string().starts_with("registry.upstream"), "{e}");
        }
    }

    #[test]
    fn missing_key_says_how_to_set_it() {
        let e = AgentConfig::from_str(p(), "", &Overrides::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "registry.aliases is not set: set it in the config file, with --registry-aliases, or with SLIPWAY_REGISTRY_ALIASES"
        );
    }

    /// #13: `cache.max_bytes = 0` would evict every blob as it lands.
    #[test]
    fn zero_cache_max_bytes_is_refused() {
        let e = AgentConfig::from_str(
            p(),
            &format!("{GOOD}\n[cache]\ndir = \"/c\"\nmax_bytes = 0\n"),
            &Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cache.max_bytes: 0 is out of range: a size in bytes of at least 1"
        );
        let ov = Overrides {
            cache_max_bytes: Some(0),
            ..Default::default()
        };
        let e = AgentConfig::from_str(p(), GOOD, &ov).unwrap_err();
        assert!(e.to_string().starts_with("cache.max_bytes: 0 "), "{e}");
    }

    /// #13: a range message states the bounds it checks
    /// (it said `0 is not a number of seconds between 0 and 86400`).
    #[test]
    fn range_messages_state_their_real_bounds() {
        for (v, shown) in [
            ("0", "0"),
            ("-1.5", "-1.5"),
            ("86400.5", "86400.5"),
            ("nan", "NaN"),
        ] {
            let e = AgentConfig::from_str(
                p(),
                &format!("{GOOD}\n[agent]\ngrace_period_secs = {v}\n"),
                &Overrides::default(),
            )
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("agent.grace_period_secs: {shown} is out of range: a number of seconds greater than 0 and at most 86400"),
            );
        }
        let c = AgentConfig::from_str(
            p(),
            &format!("{GOOD}\n[agent]\ngrace_period_secs = 86400\n[proxy]\nconnect_timeout_secs = 0.001\n"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.grace_period, Duration::from_secs(86_400));
    }

    #[test]
    fn redirect_hosts_and_ca_file_from_file_flag_and_env_form() {
        let c = AgentConfig::from_str(
            p(),
            &format!("{GOOD}\n[proxy]\nredirect_hosts = [\"*.s3.amazonaws.com\", \"10.1.2.3\"]\nredirect_ca_file = \"s3-ca.crt\"\n"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.upstream.redirects.hosts,
            vec![
                HostPattern::Suffix("s3.amazonaws.com".into()),
                HostPattern::Ip("10.1.2.3".parse().unwrap())
            ]
        );
        assert_eq!(
            c.upstream.redirects.ca_file,
            Some(PathBuf::from("/etc/slipway/s3-ca.crt"))
        );
        let ov = Overrides {
            proxy_redirect_hosts: Some(vec!["storage.example".into()]),
            ..Default::default()
        };
        let c = AgentConfig::from_str(p(), GOOD, &ov).unwrap();
        assert_eq!(
            c.upstream.redirects.hosts,
            vec![HostPattern::Name("storage.example".into())]
        );
        assert_eq!(c.upstream.redirects.ca_file, None);
        let e = AgentConfig::from_str(
            p(),
            &format!("{GOOD}\n[proxy]\nredirect_hosts = [\"ok.example\", \"https://bad\"]\n"),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("proxy.redirect_hosts[1]: \"https://bad\" is not a host name"),
            "{e}"
        );
    }

    #[test]
    fn canary_image_is_by_digest_under_an_alias() {
        let d = "0".repeat(64);
        let good = format!("registry.shared-services:5000/slipway/canary@sha256:{d}");
        let text = format!("{GOOD}\n[agent]\ncanary_image = {good:?}\n[containerd]\nsocket = \"/run/containerd/containerd.sock\"\n");
        let c = AgentConfig::from_str(p(), &text, &Overrides::default()).unwrap();
        assert_eq!(
            c.canary_image.unwrap().registry,
            "registry.shared-services:5000"
        );
        assert_eq!(
            c.containerd_socket,
            Some(PathBuf::from("/run/containerd/containerd.sock"))
        );
        assert_eq!(c.canary_interval, Duration::from_secs(300));
        for (img, why) in [
            (
                "registry.shared-services:5000/slipway/canary:v1".to_string(),
                "not a reference by digest",
            ),
            (
                format!("docker.io/library/busybox@sha256:{d}"),
                "is not one of registry.aliases",
            ),
            (
                "registry.shared-services:5000/c@sha256:abc".to_string(),
                "64 lowercase hex",
            ),
            (format!("canary@sha256:{d}"), "has no registry"),
        ] {
            let ov = Overrides {
                agent_canary_image: Some(img.clone()),
                ..Default::default()
            };
            let e = AgentConfig::from_str(p(), GOOD, &ov).unwrap_err();
            let s = e.to_string();
            assert!(s.starts_with("agent.canary_image: "), "{s}");
            assert!(s.contains(why), "{img}: {s}");
            assert_eq!(
                crate::ExitStatus::exit_code(&crate::node::reconcile::AgentError::Config(e)),
                64
            );
        }
        let ov = Overrides {
            containerd_socket: Some("run/containerd.sock".into()),
            ..Default::default()
        };
        let e = AgentConfig::from_str(p(), GOOD, &ov).unwrap_err();
        assert!(e.to_string().starts_with("containerd.socket: "), "{e}");
    }

    #[test]
    fn startup_taint_is_a_qualified_name_and_needs_node_name() {
        let c = AgentConfig::from_str(p(), GOOD, &Overrides::default()).unwrap();
        assert_eq!(c.startup_taint, None, "opt-in");
        let text = format!("{GOOD}\n[agent]\nstartup_taint = \"slipway.dev/registry-unready\"\n");
        let ov = Overrides {
            node_name: Some("worker-1".into()),
            ..Default::default()
        };
        let c = AgentConfig::from_str(p(), &text, &ov).unwrap();
        assert_eq!(
            c.startup_taint,
            Some(StartupTaint {
                key: "slipway.dev/registry-unready".into(),
                node: "worker-1".into()
            })
        );
        let e = AgentConfig::from_str(p(), &text, &Overrides::default()).unwrap_err();
        assert!(e.to_string().starts_with("NODE_NAME: not set"), "{e}");
        assert_eq!(
            crate::ExitStatus::exit_code(&crate::node::reconcile::AgentError::Config(e)),
            64
        );
        for bad in [
            "",
            "slipway.dev/",
            "/x",
            "Slipway.dev/x",
            "a/b/c",
            "-x",
            "x y",
            &"a".repeat(64),
        ] {
            let ov = Overrides {
                agent_startup_taint: Some(bad.into()),
                node_name: Some("worker-1".into()),
                ..Default::default()
            };
            let e = AgentConfig::from_str(p(), GOOD, &ov).unwrap_err();
            assert!(
                e.to_string().starts_with("agent.startup_taint: "),
                "{bad:?}: {e}"
            );
            assert_eq!(
                crate::ExitStatus::exit_code(&crate::node::reconcile::AgentError::Config(e)),
                64
            );
        }
        for good in ["registry-unready", "Unready_1.x", "example.com/x"] {
            assert!(
                StartupTaint::parse(Some(good.into()), Some("n".into())).is_ok(),
                "{good}"
            );
        }
    }

    /// #11: `peers.*` from the file, flags and env (the flag wins), and
    /// what sharing needs.
    #[test]
    fn peers_keys_and_their_requirements() {
        let with =
            |extra: &str, ov: &Overrides| AgentConfig::from_str(p(), &format!("{GOOD}{extra}"), ov);
        let file = "[cache]\ndir = \"/var/cache/slipway\"\n[peers]\nlisten = \"0.0.0.0:5052\"\nstatic = [\"10.0.0.11:5052\", \"[fd00::2]:5052\"]\ndns = \"slipway-peers.kube-system.svc:5052\"\nrefresh_secs = 5\n";
        let c = with(file, &Overrides::default()).unwrap();
        let peers = c.peers.unwrap();
        assert_eq!(peers.listen, "0.0.0.0:5052".parse().unwrap());
        assert_eq!(peers.static_peers.len(), 2);
        assert_eq!(
            peers.dns.as_deref(),
            Some("slipway-peers.kube-system.svc:5052")
        );
        assert_eq!(peers.refresh, Duration::from_secs(5));
        assert!(peers.hold_until_verified, "on by default");
        assert_eq!(peers.fanout, crate::proxy::tree::DEFAULT_FANOUT);
        let wide = with(&format!("{file}fanout = 3\n"), &Overrides::default())
            .unwrap()
            .peers
            .unwrap();
        assert_eq!(wide.fanout, 3);
        let streamed = with(
            &format!("{file}hold_until_verified = false\n"),
            &Overrides::default(),
        )
        .unwrap()
        .peers
        .unwrap();
        assert!(!streamed.hold_until_verified);
        let ov = Overrides {
            peers_listen: Some("10.0.0.10:6000".into()),
            peers_static: Some(vec!["n1:6000".into()]),
            peers_refresh_secs: Some(60.0),
            peers_hold_until_verified: Some(false),
            peers_fanout: Some(0),
            ..Default::default()
        };
        let peers = with(file, &ov).unwrap().peers.unwrap();
        assert!(!peers.hold_until_verified);
        assert_eq!(peers.fanout, 0, "0: one owner serves every node");
        assert_eq!(peers.listen, "10.0.0.10:6000".parse().unwrap());
        assert_eq!(peers.static_peers, vec!["n1:6000".to_string()]);
        assert_eq!(peers.refresh, Duration::from_secs(60));
        // Unset: no sharing.
        assert!(with("", &Overrides::default()).unwrap().peers.is_none());
        for (extra, key) in [
            ("[peers]\nlisten = \"0.0.0.0:5052\"\n", "peers.listen"),
            (
                "[cache]\ndir = \"/c\"\n[peers]\nstatic = [\"n1:5052\"]\n",
                "peers.listen",
            ),
            (
                "[cache]\ndir = \"/c\"\n[peers]\nlisten = \"0.0.0.0:5052\"\nstatic = [\"n1\"]\n",
                "peers.static[0]",
            ),
            (
                "[cache]\ndir = \"/c\"\n[peers]\nlisten = \"0.0.0.0:5052\"\ndns = \"svc:0\"\n",
                "peers.dns",
            ),
            (
                "[cache]\ndir = \"/c\"\n[peers]\nlisten = \"0.0.0.0:5052\"\nrefresh_secs = 0\n",
                "peers.refresh_secs",
            ),
            (
                "[cache]\ndir = \"/c\"\n[peers]\nlisten = \"0.0.0.0:5052\"\nfanout = 65\n",
                "peers.fanout",
            ),
        ] {
            let e = with(extra, &Overrides::default()).unwrap_err().to_string();
            assert!(e.starts_with(key), "{extra}: {e}");
        }
    }

    #[test]
    fn join_under_cannot_escape() {
        assert_eq!(
            join_under(Path::new("/host"), Path::new("/etc/../../x")),
            PathBuf::from("/host/etc/x")
        );
    }
}
