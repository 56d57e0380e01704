//! Gateway configuration: an optional TOML file (`[gateway]`), every key
//! overridable by a `--gateway-*` flag or a `SLIPWAY_GATEWAY_*` variable
//! (flag > env > file > default), as the agent's ([`crate::node::config`],
//! whose [`ConfigError`] it shares so errors name the file and the key).
//!
//! Reads the config file only; the files it names (TLS pair, htpasswd) are
//! read by [`super::tls`] and [`super::htpasswd`].
//!
//! ```toml
//! [gateway]
//! listen         = "0.0.0.0:5000"
//! upstream       = "http://127.0.0.1:5001"
//! tls_cert       = "/etc/slipway/tls/tls.crt"
//! tls_key        = "/etc/slipway/tls/tls.key"
//! push_htpasswd  = "/etc/slipway/push/htpasswd"
//! admin_listen   = "0.0.0.0:9465"
//! # The [mirror] table of this file, or of the file named here (the
//! # install names agent.toml, so the agents and the gateway read one list).
//! mirror_config  = "/etc/slipway/agent/agent.toml"
//! # Where distribution keeps its tree, for `slipway gc` (#21, #22): a
//! # filesystem rootdirectory mounted here, or an S3 bucket (not both).
//! storage_root   = "/var/lib/registry"
//! # s3_bucket           = "registry"
//! # s3_endpoint         = "http://store.example:8333"   # empty: AWS
//! # s3_region           = "us-east-1"
//! # s3_root_directory   = ""                            # distribution's rootdirectory
//! # s3_credentials_file = "/etc/slipway/storage/credentials"  # default $AWS_SHARED_CREDENTIALS_FILE
//! # s3_profile          = "default"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::node::config::ConfigError;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:5001";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9465";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    gateway: FileGateway,
    mirror: Option<crate::mirror::FileMirror>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGateway {
    listen: Option<String>,
    upstream: Option<String>,
    allow_non_loopback_upstream: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    push_htpasswd: Option<PathBuf>,
    admin_listen: Option<String>,
    client_header_timeout_secs: Option<f64>,
    body_idle_timeout_secs: Option<f64>,
    upstream_response_timeout_secs: Option<f64>,
    grace_period_secs: Option<f64>,
    mirror_config: Option<PathBuf>,
    storage_root: Option<PathBuf>,
    s3_bucket: Option<String>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    s3_root_directory: Option<String>,
    s3_credentials_file: Option<PathBuf>,
    s3_profile: Option<String>,
}

/// Flag and environment overrides; each maps to one `gateway.*` key.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct GatewayOverrides {
    /// gateway.listen: address the TLS registry endpoint listens on
    #[arg(long, env = "SLIPWAY_GATEWAY_LISTEN")]
    pub gateway_listen: Option<String>,
    /// gateway.upstream: http URL of the distribution registry (loopback)
    #[arg(long, env = "SLIPWAY_GATEWAY_UPSTREAM")]
    pub gateway_upstream: Option<String>,
    /// gateway.allow_non_loopback_upstream: relay to a non-loopback upstream (plain http!)
    #[arg(
        long = "allow-non-loopback-upstream",
        env = "SLIPWAY_GATEWAY_ALLOW_NON_LOOPBACK_UPSTREAM",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub gateway_allow_non_loopback_upstream: Option<bool>,
    /// gateway.tls_cert: PEM certificate chain served to clients (reloaded on change)
    #[arg(long, env = "SLIPWAY_GATEWAY_TLS_CERT")]
    pub gateway_tls_cert: Option<PathBuf>,
    /// gateway.tls_key: PEM private key of tls_cert (reloaded on change)
    #[arg(long, env = "SLIPWAY_GATEWAY_TLS_KEY")]
    pub gateway_tls_key: Option<PathBuf>,
    /// gateway.push_htpasswd: htpasswd file with the bcrypt push accounts
    #[arg(long, env = "SLIPWAY_GATEWAY_PUSH_HTPASSWD")]
    pub gateway_push_htpasswd: Option<PathBuf>,
    /// gateway.admin_listen: address of /metrics, /healthz and /readyz
    #[arg(long, env = "SLIPWAY_GATEWAY_ADMIN_LISTEN")]
    pub gateway_admin_listen: Option<String>,
    /// gateway.client_header_timeout_secs: cut off clients that trickle a request head
    #[arg(long, env = "SLIPWAY_GATEWAY_CLIENT_HEADER_TIMEOUT_SECS")]
    pub gateway_client_header_timeout_secs: Option<f64>,
    /// gateway.body_idle_timeout_secs: abort a body (either way) that stalls this long
    #[arg(long, env = "SLIPWAY_GATEWAY_BODY_IDLE_TIMEOUT_SECS")]
    pub gateway_body_idle_timeout_secs: Option<f64>,
    /// gateway.upstream_response_timeout_secs: answer 504 when distribution sends no response head this long after the request (its body included) was sent
    #[arg(long, env = "SLIPWAY_GATEWAY_UPSTREAM_RESPONSE_TIMEOUT_SECS")]
    pub gateway_upstream_response_timeout_secs: Option<f64>,
    /// gateway.grace_period_secs: how long SIGTERM waits for in-flight transfers
    #[arg(long, env = "SLIPWAY_GATEWAY_GRACE_PERIOD_SECS")]
    pub gateway_grace_period_secs: Option<f64>,
    /// gateway.mirror_config: a TOML file whose [mirror] table configures the mirror (#20)
    #[arg(long, env = "SLIPWAY_GATEWAY_MIRROR_CONFIG")]
    pub gateway_mirror_config: Option<PathBuf>,
    /// gateway.storage_root: distribution's filesystem rootdirectory, for `slipway gc` (#21)
    #[arg(long, env = "SLIPWAY_GATEWAY_STORAGE_ROOT")]
    pub gateway_storage_root: Option<PathBuf>,
    /// gateway.s3_bucket: distribution's S3 bucket, for `slipway gc` on a bucket (#22)
    #[arg(long, env = "SLIPWAY_GATEWAY_S3_BUCKET")]
    pub gateway_s3_bucket: Option<String>,
    /// gateway.s3_endpoint: the store's http(s) URL, as distribution's regionendpoint (empty: AWS)
    #[arg(long, env = "SLIPWAY_GATEWAY_S3_ENDPOINT")]
    pub gateway_s3_endpoint: Option<String>,
    /// gateway.s3_region: the region requests are signed for
    #[arg(long, env = "SLIPWAY_GATEWAY_S3_REGION")]
    pub gateway_s3_region: Option<String>,
    /// gateway.s3_root_directory: distribution's rootdirectory in the bucket
    #[arg(long, env = "SLIPWAY_GATEWAY_S3_ROOT_DIRECTORY")]
    pub gateway_s3_root_directory: Option<String>,
    /// gateway.s3_credentials_file: AWS shared credentials file (default $AWS_SHARED_CREDENTIALS_FILE)
    #[arg(long, env = "SLIPWAY_GATEWAY_S3_CREDENTIALS_FILE")]
    pub gateway_s3_credentials_file: Option<PathBuf>,
    /// gateway.s3_profile: the profile of the credentials file
    #[arg(long, env = "SLIPWAY_GATEWAY_S3_PROFILE")]
    pub gateway_s3_profile: Option<String>,
}

/// The plain-http upstream; the request path and query are appended to it
/// and nothing a client sends chooses another host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port`, as dialled and as in request URIs.
    pub authority: String,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub source: Option<PathBuf>,
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub push_htpasswd: PathBuf,
    pub admin_listen: SocketAddr,
    pub client_header_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub upstream_response_timeout: Duration,
    pub grace_period: Duration,
    /// `[mirror]` (#20); empty when off.
    pub mirror: crate::mirror::Mirrors,
    /// distribution's `rootdirectory`, where `slipway gc` sweeps (#21).
    pub storage_root: Option<PathBuf>,
    /// distribution's bucket, where `slipway gc` sweeps (#22).
    pub s3: Option<crate::s3::bucket::BucketConfig>,
}

impl GatewayConfig {
    pub fn load(path: Option<&Path>, ov: &GatewayOverrides) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => None,
        };
        Self::from_text(path, text.as_deref(), ov)
    }

    pub fn from_text(
        path: Option<&Path>,
        text: Option<&str>,
        ov: &GatewayOverrides,
    ) -> Result<Self, ConfigError> {
        let f: FileConfig = match (path, text) {
            (Some(p), Some(t)) => toml::from_str(t).map_err(|e| ConfigError::Parse {
                path: p.to_path_buf(),
                // Its own lines: the caret under the column (#18 point 13).
                message: e.to_string().trim_end().to_string(),
            })?,
            _ => FileConfig::default(),
        };
        let g = f.gateway;
        let listen = addr(
            "gateway.listen",
            ov.gateway_listen.clone().or(g.listen),
            DEFAULT_LISTEN,
        )?;
        let admin_listen = addr(
            "gateway.admin_listen",
            ov.gateway_admin_listen.clone().or(g.admin_listen),
            DEFAULT_ADMIN_LISTEN,
        )?;
        let allow = ov
            .gateway_allow_non_loopback_upstream
            .or(g.allow_non_loopback_upstream)
            .unwrap_or(false);
        let upstream = parse_upstream(
            ov.gateway_upstream
                .as_deref()
                .or(g.upstream.as_deref())
                .unwrap_or(DEFAULT_UPSTREAM),
            allow,
        )?;
        // Relative file paths are relative to the config file, like the
        // agent's ca_file.
        let rel = |p: PathBuf| match (path.and_then(Path::parent), p.is_relative()) {
            (Some(dir), true) => dir.join(p),
            _ => p,
        };
        let tls_cert =
            rel(ov
                .gateway_tls_cert
                .clone()
                .or(g.tls_cert)
                .ok_or(ConfigError::Missing {
                    key: "gateway.tls_cert",
                    flag: "gateway-tls-cert",
                    env: "SLIPWAY_GATEWAY_TLS_CERT",
                })?);
        let tls_key =
            rel(ov
                .gateway_tls_key
                .clone()
                .or(g.tls_key)
                .ok_or(ConfigError::Missing {
                    key: "gateway.tls_key",
                    flag: "gateway-tls-key",
                    env: "SLIPWAY_GATEWAY_TLS_KEY",
                })?);
        let push_htpasswd = rel(ov.gateway_push_htpasswd.clone().or(g.push_htpasswd).ok_or(
            ConfigError::Missing {
                key: "gateway.push_htpasswd",
                flag: "gateway-push-htpasswd",
                env: "SLIPWAY_GATEWAY_PUSH_HTPASSWD",
            },
        )?);
        let mirror = match ov
            .gateway_mirror_config
            .clone()
            .or(g.mirror_config)
            .map(rel)
        {
            Some(file) => crate::mirror::Mirrors::load(&file)?,
            None => crate::mirror::Mirrors::parse(
                &f.mirror.unwrap_or_default(),
                path.and_then(Path::parent),
            )?,
        };
        let storage_root = ov.gateway_storage_root.clone().or(g.storage_root).map(rel);
        let s3 = match ov
            .gateway_s3_bucket
            .clone()
            .or(g.s3_bucket)
            .filter(|b| !b.is_empty())
        {
            None => None,
            Some(bucket) => {
                if storage_root.is_some() {
                    return Err(ConfigError::Invalid {
                        key: "gateway.s3_bucket".into(),
                        message: "set together with gateway.storage_root: distribution keeps its \
                                  tree in one of them"
                            .into(),
                    });
                }
                let endpoint = ov
                    .gateway_s3_endpoint
                    .clone()
                    .or(g.s3_endpoint)
                    .unwrap_or_default();
                if !(endpoint.is_empty()
                    || endpoint.starts_with("http://")
                    || endpoint.starts_with("https://"))
                {
                    return Err(ConfigError::Invalid {
                        key: "gateway.s3_endpoint".into(),
                        message: format!("{endpoint:?} is not an http:// or https:// URL"),
                    });
                }
                let credentials_file = ov
                    .gateway_s3_credentials_file
                    .clone()
                    .or(g.s3_credentials_file)
                    .map(rel)
                    .or_else(|| std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from))
                    .ok_or(ConfigError::Missing {
                        key: "gateway.s3_credentials_file",
                        flag: "gateway-s3-credentials-file",
                        env: "SLIPWAY_GATEWAY_S3_CREDENTIALS_FILE",
                    })?;
                Some(crate::s3::bucket::BucketConfig {
                    endpoint,
                    bucket,
                    region: ov
                        .gateway_s3_region
                        .clone()
                        .or(g.s3_region)
                        .filter(|r| !r.is_empty())
                        .unwrap_or_else(|| "us-east-1".into()),
                    root: ov
                        .gateway_s3_root_directory
                        .clone()
                        .or(g.s3_root_directory)
                        .unwrap_or_default(),
                    credentials_file,
                    profile: ov
                        .gateway_s3_profile
                        .clone()
                        .or(g.s3_profile)
                        .unwrap_or_else(|| "default".into()),
                })
            }
        };
        Ok(GatewayConfig {
            s3,
            storage_root,
            mirror,
            source: path.map(Path::to_path_buf),
            listen,
            upstream,
            tls_cert,
            tls_key,
            push_htpasswd,
            admin_listen,
            client_header_timeout: secs(
                "gateway.client_header_timeout_secs",
                ov.gateway_client_header_timeout_secs
                    .or(g.client_header_timeout_secs),
                10.0,
            )?,
            // A PATCH of a large layer can pause while the client reads its
            // source (Kaniko snapshots and compresses as it pushes); 60 s
            // of silence is a dead client, not a slow one.
            body_idle_timeout: secs(
                "gateway.body_idle_timeout_secs",
                ov.gateway_body_idle_timeout_secs
                    .or(g.body_idle_timeout_secs),
                60.0,
            )?,
            // From the end of the request body, so a large monolithic PUT
            // (whose answer comes once distribution has it all) is not cut.
            // A hung distribution (#18 point 8) then costs a client 30 s,
            // not as long as it waits.
            upstream_response_timeout: secs(
                "gateway.upstream_response_timeout_secs",
                ov.gateway_upstream_response_timeout_secs
                    .or(g.upstream_response_timeout_secs),
                30.0,
            )?,
            grace_period: secs(
                "gateway.grace_period_secs",
                ov.gateway_grace_period_secs.or(g.grace_period_secs),
                25.0,
            )?,
        })
    }
}

fn addr(key: &str, v: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let s = v.unwrap_or_else(|| default.to_string());
    s.parse().map_err(|_| ConfigError::Invalid {
        key: key.into(),
        message: format!("{s:?} is not an ip:port address"),
    })
}

fn secs(key: &str, v: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if !(v.is_finite() && v > 0.0 && v < 86_400.0) {
        return Err(ConfigError::Invalid {
            key: key.into(),
            message: format!("{v} is not a number of seconds between 0 and 86400"),
        });
    }
    Ok(Duration::from_secs_f64(v))
}

/// `http://ip:port`, loopback unless `allow`: the gateway speaks plain http
/// to the registry, which is only safe inside the pod (#10).
fn parse_upstream(raw: &str, allow: bool) -> Result<Upstream, ConfigError> {
    let bad = |message: String| ConfigError::Invalid {
        key: "gateway.upstream".into(),
        message,
    };
    let url = url::Url::parse(raw).map_err(|e| bad(format!("{raw:?} is not a URL: {e}")))?;
    if url.scheme() != "http" {
        return Err(bad(format!(
            "{raw:?} must use http: the registry listens without TLS behind the gateway"
        )));
    }
    if !(url.path() == "/" || url.path().is_empty())
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(bad(format!("{raw:?} must be a bare http://host:port")));
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let host = match url.host() {
        Some(url::Host::Ipv4(ip)) => std::net::IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => std::net::IpAddr::V6(ip),
        Some(url::Host::Domain(d)) if allow => {
            return Ok(Upstream {
                authority: format!("{d}:{port}"),
            })
        }
        Some(url::Host::Domain(d)) => {
            return Err(bad(format!(
                "{d:?} is a name: give a loopback IP (or pass --allow-non-loopback-upstream)"
            )))
        }
        None => return Err(bad(format!("{raw:?} has no host"))),
    };
    if !host.is_loopback() && !allow {
        return Err(bad(format!(
            "{host} is not a loopback address: the relay is plain http (pass --allow-non-loopback-upstream to override)"
        )));
    }
    Ok(Upstream {
        authority: SocketAddr::new(host, port).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ov() -> GatewayOverrides {
        GatewayOverrides {
            gateway_tls_cert: Some("/t/tls.crt".into()),
            gateway_tls_key: Some("/t/tls.key".into()),
            gateway_push_htpasswd: Some("/p/htpasswd".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_the_issue() {
        let c = GatewayConfig::from_text(None, None, &ov()).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:9465");
        assert_eq!(c.upstream.authority, "127.0.0.1:5001");
    }

    #[test]
    fn file_keys_flags_override_and_relative_paths() {
        let p = Path::new("/etc/slipway/gateway.toml");
        let text = "[gateway]\nlisten = \"127.0.0.1:6000\"\ntls_cert = \"tls/tls.crt\"\ntls_key = \"tls/tls.key\"\npush_htpasswd = \"htpasswd\"\n";
        let c = GatewayConfig::from_text(Some(p), Some(text), &Default::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:6000");
        assert_eq!(c.tls_cert, PathBuf::from("/etc/slipway/tls/tls.crt"));
        let o = GatewayOverrides {
            gateway_listen: Some("127.0.0.1:7000".into()),
            ..Default::default()
        };
        let c = GatewayConfig::from_text(Some(p), Some(text), &o).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        let e =
            GatewayConfig::from_text(Some(p), Some("[gateway]\nlistn = 1\n"), &ov()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file /etc/slipway/gateway.toml"),
            "{e}"
        );
    }

    #[test]
    fn upstream_is_loopback_http_unless_allowed() {
        for (u, why) in [
            ("https://127.0.0.1:5001", "must use http"),
            ("http://10.0.0.1:5001", "not a loopback"),
            ("http://registry:5001", "is a name"),
            ("http://127.0.0.1:5001/v2", "bare"),
        ] {
            let o = GatewayOverrides {
                gateway_upstream: Some(u.into()),
                ..ov()
            };
            let e = GatewayConfig::from_text(None, None, &o)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("gateway.upstream: "), "{e}");
            assert!(e.contains(why), "{u}: {e}");
        }
        let o = GatewayOverrides {
            gateway_upstream: Some("http://10.0.0.1:5001".into()),
            gateway_allow_non_loopback_upstream: Some(true),
            ..ov()
        };
        assert_eq!(
            GatewayConfig::from_text(None, None, &o)
                .unwrap()
                .upstream
                .authority,
            "10.0.0.1:5001"
        );
        let o = GatewayOverrides {
            gateway_upstream: Some("http://[::1]:5001".into()),
            ..ov()
        };
        assert_eq!(
            GatewayConfig::from_text(None, None, &o)
                .unwrap()
                .upstream
                .authority,
            "[::1]:5001"
        );
    }

    #[test]
    fn missing_files_say_how_to_set_them() {
        let e = GatewayConfig::from_text(None, None, &Default::default()).unwrap_err();
        assert_eq!(e.to_string(), "gateway.tls_cert is not set: set it in the config file, with --gateway-tls-cert, or with SLIPWAY_GATEWAY_TLS_CERT");
    }
}
