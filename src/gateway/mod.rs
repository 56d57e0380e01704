//! `slipway gateway`: the registry pod's TLS front (#10).
//!
//! distribution listens on `127.0.0.1:5001` without TLS, inside the pod
//! only; the gateway serves the registry's port (`gateway.listen`, 5000)
//! and relays to it. Reads pass; every write needs a push account from
//! `gateway.push_htpasswd`; the certificate (`gateway.tls_cert`,
//! `gateway.tls_key`) is re-read while running. `/metrics`, `/healthz` and
//! `/readyz` are on `gateway.admin_listen` ([`crate::admin`]).
//!
//! | module | owns |
//! |--------|------|
//! | [`config`] | the `gateway.*` keys, flags and `SLIPWAY_GATEWAY_*` variables |
//! | [`guard`] | the write-guard decision (pure) |
//! | [`htpasswd`] | parsing the push accounts (pure), bcrypt on the blocking pool |
//! | [`tls`] | the certificate pair, its reload, the rustls resolver |
//! | [`metrics`] | the `slipway_gateway_*` series |
//! | [`relay`] | the TLS server and the streaming relay (the async shell) |
//! | [`gc`] | `POST /slipway/v1/gc`: the write fence, the sweep, the pull records (#21) |
//! | [`shared`] | on a bucket, the write fence shared by every replica (#22) |
//! | [`fill`] | the mirror repositories: served from the registry, filled from upstream (#20) |
//!
//! Files read: the config file, the TLS pair and the htpasswd file, each
//! through [`crate::node::fs::RealFs`] (regular files of at most 1 MiB,
//! following the Secret volume's symlinks).

pub mod config;
pub mod fill;
pub mod gc;
pub mod guard;
pub mod htpasswd;
pub mod metrics;
pub mod relay;
pub mod shared;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::{Readiness, ReadyCheck};
use crate::node::fs::{Follow, NodeFs, RealFs};
use config::{ConfigError, GatewayConfig, GatewayOverrides};
use htpasswd::{Htpasswd, HtpasswdError, Verifier};
use metrics::{GatewayMetrics, Reload, ReloadLabels};
use tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Htpasswd(#[from] HtpasswdError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Mirror(#[from] fill::FillError),
    /// The bucket of `gateway.s3_bucket` (its credentials file, endpoint).
    #[error(transparent)]
    Bucket(#[from] crate::s3::bucket::BucketError),
    #[error("{key} {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Runtime {
        what: &'static str,
        source: std::io::Error,
    },
}

impl crate::ExitStatus for GatewayError {
    fn exit_code(&self) -> u8 {
        match self {
            // Input the operator must fix: the config, or a file it names.
            GatewayError::Config(_)
            | GatewayError::Htpasswd(_)
            | GatewayError::Tls(_)
            | GatewayError::Mirror(_)
            | GatewayError::Bucket(_) => crate::EXIT_BAD_CONFIG,
            GatewayError::Bind { .. } | GatewayError::Runtime { .. } => crate::EXIT_APPLY_FAILED,
        }
    }
}

/// A regular file of at most 1 MiB; following symlinks, because a Secret
/// volume's files are links into `..data/`.
pub(crate) fn read_input(path: &Path) -> std::io::Result<Vec<u8>> {
    RealFs
        .read(path, Follow::Yes)?
        .map(|f| f.bytes)
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory")
        })
}

/// The gateway's `/readyz` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayCheck {
    /// `gateway.listen` is bound and serving TLS.
    Listening,
    /// The upstream registry answered [`relay::PROBE_PATH`] on the last
    /// probe, within its deadline and with anything but a 5xx (#22: a
    /// registry whose storage is unreachable or hangs is not ready).
    UpstreamAnswered,
    /// On a bucket, the shared garbage collection fence was read lately
    /// ([`shared::UNSURE_AFTER`]): a gateway that cannot read it refuses
    /// writes, so it takes no traffic either (#22). Always passes on a
    /// filesystem.
    SharedFence,
}

impl ReadyCheck for GatewayCheck {
    const ALL: &'static [GatewayCheck] = &[
        GatewayCheck::Listening,
        GatewayCheck::UpstreamAnswered,
        GatewayCheck::SharedFence,
    ];
    fn name(self) -> &'static str {
        match self {
            GatewayCheck::Listening => "listening",
            GatewayCheck::UpstreamAnswered => "upstream_answered",
            GatewayCheck::SharedFence => "shared_fence",
        }
    }
}

impl std::fmt::Display for GatewayCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How often the upstream is probed for `/readyz`.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Run the gateway until SIGTERM/SIGINT; 0 when every transfer drained.
pub fn run(config: Option<PathBuf>, overrides: GatewayOverrides) -> Result<u8, GatewayError> {
    let cfg = GatewayConfig::load(config.as_deref(), &overrides)?;
    // Both inputs are checked before anything listens: a bad file is the
    // operator's to fix (exit 64), not a crash loop with a port open.
    let entries = Htpasswd::load(&cfg.push_htpasswd)?;
    let pair = tls::load_pair(&cfg.tls_cert, &cfg.tls_key)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| GatewayError::Runtime {
            what: "cannot start the tokio runtime",
            source,
        })?;
    rt.block_on(serve(cfg, entries, pair))
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { key, addr, source })
}

async fn serve(cfg: GatewayConfig, entries: Htpasswd, pair: tls::Pair) -> Result<u8, GatewayError> {
    let mut signals =
        crate::signal::Signals::install().map_err(|source| GatewayError::Runtime {
            what: "cannot install signal handlers",
            source,
        })?;
    let metrics = Arc::new(GatewayMetrics::new());
    metrics.certificate_expiry.set(pair.not_after as f64);
    let ready: Arc<Readiness<GatewayCheck>> = Arc::new(Readiness::default());
    let listener = bind("gateway.listen", cfg.listen).await?;
    let admin = bind("gateway.admin_listen", cfg.admin_listen).await?;
    let local = |l: &TcpListener| {
        l.local_addr().map_err(|source| GatewayError::Runtime {
            what: "cannot read a bound address",
            source,
        })
    };
    let (listen_addr, admin_addr) = (local(&listener)?, local(&admin)?);

    let store = Arc::new(tls::CertStore::new(pair.clone()));
    let server_tls = Arc::new(tls::server_config(store.clone())?);
    let accounts = entries.len();
    let verifier = Arc::new(Verifier::new(entries));
    let mirror = if cfg.mirror.is_empty() {
        None
    } else {
        Some(Arc::new(fill::Mirror::new(
            cfg.mirror.clone(),
            &cfg.upstream.authority,
            metrics.clone(),
            cfg.upstream_response_timeout,
            cfg.body_idle_timeout,
        )?))
    };
    let mirrored: Vec<String> = cfg.mirror.registries.iter().map(|u| u.label()).collect();
    let storage = match (&cfg.storage_root, &cfg.s3) {
        (Some(root), _) => gc::Storage::Filesystem(root.clone()),
        (None, Some(b)) => gc::Storage::Bucket(Arc::new(shared::Shared::new(Arc::new(
            crate::s3::bucket::Bucket::new(b)?,
        )))),
        (None, None) => gc::Storage::None,
    };
    let collector = Arc::new(gc::Collector::new(
        storage,
        &cfg.upstream.authority,
        metrics.clone(),
    ));
    let relay = Arc::new(
        relay::Relay::new(
            cfg.upstream.clone(),
            verifier.clone(),
            metrics.clone(),
            cfg.body_idle_timeout,
            cfg.upstream_response_timeout,
        )
        .with_mirror(mirror)
        .with_gc(collector.clone()),
    );

    // Tests read the bound ports from this line (they pass port 0).
    info!(
        "slipway gateway starting listen={listen_addr} admin={admin_addr} upstream=http://{} accounts={accounts} serial={} mirror={}",
        cfg.upstream.authority, pair.serial, mirrored.join(",")
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::admin::serve(admin, metrics.clone(), ready.clone()));
    let m = metrics.clone();
    tasks.spawn(tls::watch(
        store,
        cfg.tls_cert.clone(),
        cfg.tls_key.clone(),
        move |p, applied| {
            m.certificate_expiry.set(p.not_after as f64);
            let result = if applied {
                Reload::Applied
            } else {
                Reload::Rejected
            };
            m.certificate_reloads
                .get_or_create(&ReloadLabels { result })
                .inc();
        },
    ));
    tasks.spawn(watch_htpasswd(verifier, cfg.push_htpasswd.clone()));
    tasks.spawn(collector.clone().save_loop());
    match collector.shared() {
        Some(s) => {
            info!(bucket = s.bucket.name(), id = %s.id, "gateway: writes wait for the shared fence in the bucket");
            ready.set(
                GatewayCheck::SharedFence,
                Err("the shared fence in the bucket is not read yet".into()),
            );
            let rd = ready.clone();
            tasks.spawn(shared::member_loop(s, collector.clone(), move |r| {
                rd.set(GatewayCheck::SharedFence, r)
            }));
        }
        None => ready.set(GatewayCheck::SharedFence, Ok(())),
    }
    let (r, rd) = (relay.clone(), ready.clone());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        loop {
            tick.tick().await;
            rd.set(GatewayCheck::UpstreamAnswered, r.probe().await);
        }
    });
    ready.set(GatewayCheck::Listening, Ok(()));

    let drained = relay::serve(
        listener,
        server_tls,
        relay,
        cfg.client_header_timeout,
        signals.terminated(),
        cfg.grace_period,
    )
    .await;
    tasks.abort_all();
    collector.save_pulls_now().await;
    // The relay has stopped: nothing of this gateway's writes is in
    // flight, so no collection needs to wait for it any more (#22).
    if let Some(s) = collector.shared() {
        s.leave().await;
    }
    if drained {
        info!("slipway gateway stopped");
        Ok(0)
    } else {
        warn!(grace = ?cfg.grace_period, "slipway gateway stopped with transfers still running");
        Ok(crate::EXIT_APPLY_FAILED)
    }
}

/// Re-read the htpasswd file every second: `pki ensure` rotating the push
/// password reaches the pod as a Secret volume update, not a restart. An
/// unreadable or invalid file keeps the accounts in force.
async fn watch_htpasswd(verifier: Arc<Verifier>, path: PathBuf) {
    let mut tick = tokio::time::interval(tls::POLL);
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let p = path.clone();
        let Ok(loaded) = tokio::task::spawn_blocking(move || Htpasswd::load(&p)).await else {
            continue;
        };
        match loaded {
            Ok(entries) => {
                last_error = None;
                let n = entries.len();
                if verifier.replace(entries) {
                    info!(accounts = n, "gateway: push accounts reloaded");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(&msg) {
                    warn!(error = %msg, "gateway: keeping the current push accounts");
                    last_error = Some(msg);
                }
            }
        }
    }
}
