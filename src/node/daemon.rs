//! `slipway agent` as the long-running DaemonSet process: the event loop.
//!
//! Work arrives as one stream of [`Event`]s:
//! - inotify on `certs_dir`, each alias directory and the CA file's
//!   directory (a ConfigMap mount swaps a `..data` symlink on update),
//!   through [`Watch`];
//! - a tick every `agent.reconcile_interval_secs` as a fallback;
//! - SIGHUP (reload) and SIGTERM/SIGINT (drain) from [`crate::signal`].
//!
//! Each pass is [`NodePass::run`], the same pass as `--once`, on the
//! blocking pool: the loop keeps receiving events while it runs, so SIGTERM
//! starts the drain whatever a pass is doing (#13). A pass that ends in
//! error is retried with a growing pause (100 ms doubling to 2 s) instead of
//! on every event. Its status goes to the one writer,
//! [`crate::node::status::StatusWriter`].
//!
//! Serves the proxy ([`crate::proxy`]) and the admin server
//! ([`crate::admin`]). With `containerd.socket` and `agent.canary_image`,
//! runs the canary ([`crate::node::canary`]): after the first pass, after a
//! pass that changed something or followed a reload, and every
//! `agent.canary_interval_secs`. Needs no Kubernetes API access, except
//! with `agent.startup_taint`: then, once every readiness check passes, it
//! removes that taint from its own Node ([`crate::node::taint`]: get and
//! patch on nodes).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::admin::metrics::Metrics;
use crate::admin::{self, Check, Readiness};
use crate::node::canary::{self, Reason, Trigger};
use crate::node::config::{AgentConfig, ConfigError, Overrides};
use crate::node::fs::{NodeFs, RealFs};
use crate::node::hostconfig::HostEntry;
use crate::node::reconcile::{self, AgentError, CaState, Fix, Mode, NodePass, NodeStatus};
use crate::node::status::StatusWriter;
use crate::proxy::cache::Cache;
use crate::proxy::{self, ProxyState, UpstreamClient};
use crate::signal::{Signal, Signals};

/// Something that reports changes under directories. The real one is
/// inotify (through nix); tests record what was asked.
pub trait Watch: Send + Sync {
    /// Watch one directory (idempotent; a vanished directory is fine).
    fn watch(&self, dir: &Path);
}

/// inotify through nix: a thread reads events and nudges the loop.
pub struct Inotify {
    fd: Arc<nix::sys::inotify::Inotify>,
}

impl Inotify {
    pub fn start(tx: mpsc::Sender<Event>) -> std::io::Result<Inotify> {
        use nix::sys::inotify::{InitFlags, Inotify as Fd};
        let fd = Arc::new(Fd::init(InitFlags::IN_CLOEXEC).map_err(std::io::Error::from)?);
        let reader = fd.clone();
        std::thread::Builder::new()
            .name("inotify".into())
            .spawn(move || loop {
                match reader.read_events() {
                    Ok(ev) if !ev.is_empty() => {
                        let _ = tx.try_send(Event::Changed);
                    }
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        warn!(error = %e, "inotify read failed; relying on the periodic reconcile");
                        return;
                    }
                }
            })?;
        Ok(Inotify { fd })
    }
}

impl Watch for Inotify {
    fn watch(&self, dir: &Path) {
        use nix::sys::inotify::AddWatchFlags as F;
        let mask = F::IN_CREATE
            | F::IN_DELETE
            | F::IN_DELETE_SELF
            | F::IN_MOVED_FROM
            | F::IN_MOVED_TO
            | F::IN_CLOSE_WRITE
            | F::IN_ATTRIB
            | F::IN_MODIFY;
        if dir.is_dir() {
            if let Err(e) = self.fd.add_watch(dir, mask) {
                warn!(dir = %dir.display(), error = %e, "cannot watch; relying on the periodic reconcile");
            }
        }
    }
}

struct NoWatch;
impl Watch for NoWatch {
    fn watch(&self, _: &Path) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Something changed under a watched directory.
    Changed,
    Reload,
    Terminate,
}

#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    pub config: Option<PathBuf>,
    pub overrides: Overrides,
    pub fix_containerd_config: bool,
}

// ------------------------------------------------------------- reload

/// A config key that SIGHUP cannot change in a running agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKey {
    ProxyListen,
    AdminListen,
    ProxyAllowNonLoopback,
    CacheDir,
    ContainerdPaths,
    GracePeriod,
    Canary,
    StartupTaint,
    Peers,
}

impl RestartKey {
    pub fn key(self) -> &'static str {
        match self {
            RestartKey::ProxyListen => "proxy.listen",
            RestartKey::AdminListen => "admin.listen",
            RestartKey::ProxyAllowNonLoopback => "proxy.allow_non_loopback",
            RestartKey::CacheDir => "cache.dir",
            RestartKey::ContainerdPaths => "containerd.host_root/certs_dir/config_file",
            RestartKey::GracePeriod => "agent.grace_period_secs",
            RestartKey::Canary => "containerd.socket/agent.canary_image/agent.canary_interval_secs",
            RestartKey::StartupTaint => "agent.startup_taint/NODE_NAME",
            RestartKey::Peers => "peers.listen/static/dns/refresh_secs",
        }
    }
}

/// A config key that SIGHUP applies at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveKey {
    Aliases,
    Mirrors,
    Upstream,
    CaFile,
    ConnectTimeout,
    ResponseTimeout,
    BodyIdleTimeout,
    ClientHeaderTimeout,
    CacheMaxBytes,
    ReconcileInterval,
}

impl LiveKey {
    pub fn key(self) -> &'static str {
        match self {
            LiveKey::Aliases => "registry.aliases",
            LiveKey::Mirrors => "mirror",
            LiveKey::Upstream => "registry.upstream/dial",
            LiveKey::CaFile => "registry.ca_file",
            LiveKey::ConnectTimeout => "proxy.connect_timeout_secs",
            LiveKey::ResponseTimeout => "proxy.response_timeout_secs",
            LiveKey::BodyIdleTimeout => "proxy.body_idle_timeout_secs",
            LiveKey::ClientHeaderTimeout => "proxy.client_header_timeout_secs",
            LiveKey::CacheMaxBytes => "cache.max_bytes",
            LiveKey::ReconcileInterval => "agent.reconcile_interval_secs",
        }
    }
}

/// The proxy's `?ns=` map of mirrored upstreams (#20).
fn mirror_routes(cfg: &AgentConfig) -> Vec<(String, String)> {
    cfg.mirrors
        .registries
        .iter()
        .map(|u| (u.host.dir_name(), u.repo_prefix()))
        .collect()
}

/// What a reload does: the config to run with (keys that need a restart
/// keep their running values), the keys it applies and the keys it cannot.
#[derive(Debug)]
pub struct Reload {
    pub cfg: AgentConfig,
    pub applied: Vec<LiveKey>,
    pub needs_restart: Vec<RestartKey>,
}

/// Compare the running config with a newly loaded one.
pub fn plan_reload(old: &AgentConfig, mut new: AgentConfig) -> Reload {
    let mut needs_restart = Vec::new();
    macro_rules! keep {
        ($field:ident, $key:expr) => {
            if new.$field != old.$field {
                needs_restart.push($key);
                new.$field = old.$field.clone();
            }
        };
    }
    keep!(proxy_listen, RestartKey::ProxyListen);
    keep!(admin_listen, RestartKey::AdminListen);
    keep!(proxy_allow_non_loopback, RestartKey::ProxyAllowNonLoopback);
    keep!(cache_dir, RestartKey::CacheDir);
    keep!(containerd, RestartKey::ContainerdPaths);
    keep!(grace_period, RestartKey::GracePeriod);
    // The taint task is started once, at start, and removes the taint once.
    keep!(startup_taint, RestartKey::StartupTaint);
    // The peer listener and its resolver are started once, at start.
    keep!(peers, RestartKey::Peers);
    // The canary task is built once, at start, from these three.
    if (
        &new.containerd_socket,
        &new.canary_image,
        new.canary_interval,
    ) != (
        &old.containerd_socket,
        &old.canary_image,
        old.canary_interval,
    ) {
        needs_restart.push(RestartKey::Canary);
        new.containerd_socket = old.containerd_socket.clone();
        new.canary_image = old.canary_image.clone();
        new.canary_interval = old.canary_interval;
    }
    let mut applied = Vec::new();
    let (o, n) = (&old.timeouts, &new.timeouts);
    for (changed, key) in [
        (new.aliases != old.aliases, LiveKey::Aliases),
        (new.mirrors != old.mirrors, LiveKey::Mirrors),
        (new.upstream != old.upstream, LiveKey::Upstream),
        (new.ca_file != old.ca_file, LiveKey::CaFile),
        (n.connect != o.connect, LiveKey::ConnectTimeout),
        (n.response != o.response, LiveKey::ResponseTimeout),
        (n.body_idle != o.body_idle, LiveKey::BodyIdleTimeout),
        (
            n.client_header != o.client_header,
            LiveKey::ClientHeaderTimeout,
        ),
        (
            new.cache_max_bytes != old.cache_max_bytes,
            LiveKey::CacheMaxBytes,
        ),
        (
            new.reconcile_interval != old.reconcile_interval,
            LiveKey::ReconcileInterval,
        ),
    ] {
        if changed {
            applied.push(key);
        }
    }
    Reload {
        cfg: new,
        applied,
        needs_restart,
    }
}

// ------------------------------------------------------------- live state

/// What the proxy reads, kept in step with the config and the CA.
pub struct Live {
    pub proxy: Arc<ProxyState>,
    /// What the upstream client was built from: rebuilt when any differs.
    client_built_from: std::sync::Mutex<Option<(crate::proxy::Upstream, Duration, String)>>,
}

impl Live {
    pub fn new(proxy: Arc<ProxyState>) -> Live {
        Live {
            proxy,
            client_built_from: std::sync::Mutex::new(None),
        }
    }

    /// Bring the proxy's state to `cfg` and the CA in use.
    /// The parts that need no CA: timeouts, aliases, the cache cap.
    pub fn sync_config(&self, cfg: &AgentConfig) {
        *self.proxy.timeouts.write().expect("timeouts lock") = cfg.timeouts;
        *self.proxy.aliases.write().expect("aliases lock") =
            cfg.aliases.iter().map(|a| a.dir_name()).collect();
        *self.proxy.mirrors.write().expect("mirrors lock") = mirror_routes(cfg);
        if let Some(c) = &self.proxy.cache {
            c.set_max_bytes(cfg.cache_max_bytes);
        }
    }

    pub fn sync(&self, cfg: &AgentConfig, ca_pem: Option<&str>) {
        self.sync_config(cfg);
        let Some(pem) = ca_pem else { return };
        let wanted = (cfg.upstream.clone(), cfg.timeouts.connect, pem.to_string());
        let mut built = self.client_built_from.lock().expect("client lock");
        if built.as_ref() == Some(&wanted) {
            return;
        }
        match UpstreamClient::new(&cfg.upstream, pem.as_bytes(), &cfg.timeouts) {
            Ok(c) => {
                *self.proxy.upstream.write().expect("upstream lock") = Arc::new(c);
                if built.is_some() {
                    info!(upstream = %cfg.upstream.url, "upstream client rebuilt (CA, upstream or connect timeout changed)");
                    self.proxy.upstream_seen.store(false, Ordering::Relaxed);
                }
                *built = Some(wanted);
            }
            Err(e) => error!("{e}; keeping the upstream client built before"),
        }
    }
}

// ------------------------------------------------------------- the loop

/// The node side of the daemon: the pass and its inputs.
pub struct Node {
    pub cfg: AgentConfig,
    pub pass: NodePass,
    pub proxy_url: String,
    pub fix_containerd_config: bool,
}

impl Node {
    fn mode(&self) -> Mode {
        let mut hosts = vec![HostEntry::proxy(&self.proxy_url)];
        hosts.extend(reconcile::host_entries(&self.cfg));
        Mode::Apply {
            hosts,
            fix_containerd_config: self.fix_containerd_config,
        }
    }
}

/// Why the loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    Terminate,
    /// Every event source is gone.
    Closed,
}

const SETTLE: Duration = Duration::from_millis(100);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Everything the loop needs besides the node.
pub struct LoopParts<'a> {
    pub live: Arc<Live>,
    pub writer: StatusWriter,
    pub watcher: &'a dyn Watch,
    /// Reads the config again on SIGHUP.
    pub reload: Box<dyn Fn() -> Result<AgentConfig, ConfigError> + Send + 'a>,
    /// Called after every pass (tests observe passes through it).
    pub after_pass: Box<dyn FnMut(&NodeStatus) + Send + 'a>,
    /// Asks for a canary pull, when one is configured.
    pub canary: Option<Trigger>,
}

/// Whether a pass changed what containerd reads: host files, its config, or
/// the CA. A canary proves the node path again after each.
fn changed_something(status: &NodeStatus) -> bool {
    status.aliases.iter().any(|a| !a.changes().is_empty())
        || matches!(status.fix, Some(Fix::Patched { .. }))
        || matches!(status.ca, CaState::Rotated { .. })
}

/// Run passes as events, ticks and retries ask, until Terminate.
pub async fn event_loop(
    node: Node,
    mut parts: LoopParts<'_>,
    rx: &mut mpsc::Receiver<Event>,
) -> LoopEnd {
    let mut node = Some(node);
    let mut running: Option<tokio::task::JoinHandle<(Node, NodeStatus)>> = None;
    let mut dirty = true;
    let mut reload_pending = false;
    let mut earliest = Instant::now();
    let mut retry = RETRY_MIN;
    // The first pass writes the host files the first canary proves.
    let mut canary_due = Some(Reason::Start);
    let mut next_tick = Instant::now()
        + node
            .as_ref()
            .map_or(RETRY_MAX, |n| n.cfg.reconcile_interval);
    loop {
        if let (Some(n), true) = (node.as_mut(), reload_pending) {
            reload_pending = false;
            reload(n, &parts);
            dirty = true;
            canary_due = canary_due.or(Some(Reason::Reload));
        }
        if running.is_none() && dirty && Instant::now() >= earliest {
            let mut n = node.take().expect("node is home between passes");
            // Watch before the pass, so a change made while it runs is
            // seen; a directory the pass creates shows up as an event on
            // certs_dir, and the pass that follows watches it.
            watch_inputs(&n.cfg, parts.watcher);
            dirty = false;
            let live = parts.live.clone();
            running = Some(tokio::task::spawn_blocking(move || {
                let mode = n.mode();
                let cfg = n.cfg.clone();
                // The proxy trusts a rotated CA before any slipway-ca.crt
                // names it: containerd may pull the moment the file changes.
                let status = n
                    .pass
                    .run_with(&cfg, &mode, &|ca| live.sync(&cfg, Some(&ca.pem)));
                (n, status)
            }));
        }
        let wake = if running.is_none() && dirty {
            earliest
        } else {
            next_tick
        };
        tokio::select! {
            done = async { running.as_mut().expect("running").await }, if running.is_some() => {
                running = None;
                let (n, status) = match done {
                    Ok(v) => v,
                    Err(e) => {
                        error!(error = %e, "node pass panicked; the agent must restart");
                        return LoopEnd::Closed;
                    }
                };
                after(&n, &status, &mut parts);
                if changed_something(&status) {
                    canary_due = canary_due.or(Some(Reason::Changed));
                }
                if let (Some(r), Some(t)) = (canary_due.take(), &parts.canary) {
                    t.ask(r);
                }
                if status.applied() {
                    retry = RETRY_MIN;
                } else {
                    earliest = Instant::now() + retry;
                    retry = (retry * 2).min(RETRY_MAX);
                }
                next_tick = Instant::now() + n.cfg.reconcile_interval;
                node = Some(n);
            }
            ev = rx.recv() => match ev {
                None => return LoopEnd::Closed,
                Some(Event::Terminate) => return LoopEnd::Terminate,
                Some(Event::Reload) => reload_pending = true,
                Some(Event::Changed) => {
                    // Let a burst of events (ours included) settle: the
                    // pause starts at the burst's first event, so a stream
                    // of events cannot postpone the pass forever.
                    if !dirty {
                        dirty = true;
                        earliest = earliest.max(Instant::now() + SETTLE);
                    }
                }
            },
            _ = tokio::time::sleep_until(wake.into()) => {
                if Instant::now() >= next_tick {
                    dirty = true;
                    next_tick = Instant::now() + node.as_ref().map_or(RETRY_MAX, |n| n.cfg.reconcile_interval);
                    let state = parts.live.proxy.clone();
                    tokio::spawn(probe_upstream(state));
                }
            }
        }
    }
}

fn after(n: &Node, status: &NodeStatus, parts: &mut LoopParts<'_>) {
    let ca = n.pass.ca();
    parts
        .writer
        .write(status, ca, &n.cfg.containerd.certs_dir, Instant::now());
    parts.live.sync(&n.cfg, ca.map(|c| c.pem.as_str()));
    for a in &status.aliases {
        parts.watcher.watch(&a.dir);
    }
    (parts.after_pass)(status);
}

/// certs_dir, the CA file's directory and every alias directory there is.
fn watch_inputs(cfg: &AgentConfig, watcher: &dyn Watch) {
    let certs = cfg.containerd.local_certs_dir();
    watcher.watch(&certs);
    for a in &cfg.aliases {
        watcher.watch(&certs.join(a.dir_name()));
        if let Some(u) = a.underscore_dir_name() {
            watcher.watch(&certs.join(u));
        }
    }
    if let Some(dir) = cfg.ca_file.parent() {
        watcher.watch(dir);
    }
}

/// SIGHUP: re-read the config; keep the running one if the new one is bad.
fn reload(n: &mut Node, parts: &LoopParts<'_>) {
    let new = match (parts.reload)() {
        Ok(c) => c,
        Err(e) => {
            error!("config reload failed, keeping the running config: {e}");
            return;
        }
    };
    let r = plan_reload(&n.cfg, new);
    for k in &r.needs_restart {
        warn!(
            key = k.key(),
            "config reload: {} changed; it takes effect on restart, the running value is kept",
            k.key()
        );
    }
    let applied: Vec<&str> = r.applied.iter().map(|k| k.key()).collect();
    info!(applied = ?applied, aliases = r.cfg.aliases.len(), "config reloaded");
    n.cfg = r.cfg;
    parts.live.sync_config(&n.cfg);
}

/// Ask the upstream's `/v2/` once; any HTTP answer counts.
async fn probe_upstream(state: Arc<ProxyState>) {
    if state.upstream_seen.load(Ordering::Relaxed) {
        return;
    }
    let client = state.upstream.read().expect("upstream lock").clone();
    if client.probe().await {
        state.upstream_seen.store(true, Ordering::Relaxed);
        info!("upstream answered /v2/");
    }
}

// ------------------------------------------------------------- the process

/// Run the agent until SIGTERM/SIGINT. Returns the process exit code.
pub fn run(opts: DaemonOptions) -> Result<u8, AgentError> {
    let cfg = AgentConfig::load(opts.config.as_deref(), &opts.overrides)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| AgentError::Runtime {
            what: "cannot start the tokio runtime",
            source,
        })?;
    rt.block_on(run_async(cfg, opts))
}

async fn run_async(cfg: AgentConfig, opts: DaemonOptions) -> Result<u8, AgentError> {
    let fs: Arc<dyn NodeFs> = Arc::new(RealFs);
    let pass = NodePass::new(fs);
    let ca = pass.load_ca(&cfg)?;
    let listener = proxy::bind(cfg.proxy_listen, cfg.proxy_allow_non_loopback)
        .await
        .map_err(|e| match e {
            proxy::ProxyError::Bind { source, addr }
                if source.kind() == std::io::ErrorKind::InvalidInput =>
            {
                AgentError::Config(ConfigError::Invalid {
                    key: "proxy.listen".into(),
                    message: format!("{addr}: {source}"),
                })
            }
            e => AgentError::Proxy(e),
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AgentError::Runtime {
            what: "proxy listener has no address",
            source,
        })?;
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|source| AgentError::AdminBind {
            addr: cfg.admin_listen,
            source,
        })?;
    let metrics = Arc::new(Metrics::new());
    let cache = match &cfg.cache_dir {
        Some(d) => Some(Arc::new(Cache::open(
            &cfg.containerd.local(d),
            cfg.cache_max_bytes,
            metrics.clone(),
        )?)),
        None => None,
    };
    let peer_listener = match &cfg.peers {
        Some(p) => Some(proxy::peers::bind(p.listen).await?),
        None => None,
    };
    let peers = cfg
        .peers
        .clone()
        .map(|p| Arc::new(proxy::peers::Peers::new(p, metrics.clone())));
    let upstream = UpstreamClient::new(&cfg.upstream, ca.pem.as_bytes(), &cfg.timeouts)?;
    let ready: Arc<Readiness> = Arc::new(Readiness::default());
    let upstream_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state = Arc::new(ProxyState {
        upstream: RwLock::new(Arc::new(upstream)),
        aliases: RwLock::new(cfg.aliases.iter().map(|a| a.dir_name()).collect()),
        mirrors: RwLock::new(mirror_routes(&cfg)),
        cache,
        metrics: metrics.clone(),
        timeouts: RwLock::new(cfg.timeouts),
        upstream_seen: upstream_seen.clone(),
        downloads: Default::default(),
        peers: peers.clone(),
    });
    ready.set(Check::ProxyBound, Ok(()));
    let peers_bound = peer_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .unwrap_or_else(|| "none".into());
    info!(proxy = %bound, admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), peers = %peers_bound, upstream = %cfg.upstream.url, "slipway agent starting");

    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let watcher: Box<dyn Watch> = match Inotify::start(tx.clone()) {
        Ok(w) => Box::new(w),
        Err(e) => {
            warn!(error = %e, "inotify unavailable; relying on the periodic reconcile");
            Box::new(NoWatch)
        }
    };
    let mut signals = Signals::install().map_err(|source| AgentError::Runtime {
        what: "cannot install signal handlers",
        source,
    })?;
    let sig_tx = tx.clone();
    tokio::spawn(async move {
        while let Some(s) = signals.recv().await {
            let ev = match s {
                Signal::Reload => Event::Reload,
                Signal::Terminate => Event::Terminate,
            };
            if sig_tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    // The upstream probe and the proxy mark the upstream as seen; readiness
    // follows it.
    let r2 = ready.clone();
    let seen = upstream_seen.clone();
    tokio::spawn(async move {
        loop {
            r2.set(
                Check::UpstreamAnswered,
                if seen.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("the upstream has not answered /v2/ yet".into())
                },
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    let grace = cfg.grace_period;
    tokio::spawn(admin::serve(admin_listener, metrics.clone(), ready.clone()));
    tokio::spawn(probe_upstream(state.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The peer port drains with the proxy: a peer mid-blob is a pull too.
    let (peer_stop_tx, peer_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let peer_server = match (peer_listener, &peers) {
        (Some(l), Some(p)) => {
            tokio::spawn(p.clone().refresh_loop());
            Some(tokio::spawn(proxy::serve_peers(
                l,
                state.clone(),
                async {
                    let _ = peer_stop_rx.await;
                },
                grace,
            )))
        }
        _ => None,
    };
    let proxy_server = tokio::spawn(proxy::serve(
        listener,
        state.clone(),
        async move {
            let _ = stop_rx.await;
            let _ = peer_stop_tx.send(());
        },
        grace,
    ));
    // Drained once both ports are: a peer mid-blob is another node's pull,
    // and dropping the peer server's handle (as before) let the process
    // exit under it, so that node fetched the whole blob again from
    // upstream (#18 point 3). Both stop at once and drain within `grace`.
    let server = tokio::spawn(async move {
        let proxy_drained = proxy_server.await.unwrap_or(false);
        let peers_drained = match peer_server {
            Some(p) => p.await.unwrap_or(false),
            None => true,
        };
        proxy_drained && peers_drained
    });

    let trigger = match (&cfg.containerd_socket, &cfg.canary_image) {
        (Some(sock), Some(image)) => {
            let (trigger, rx) = Trigger::channel();
            let c = canary::Canary {
                cri: Arc::new(canary::socket(&cfg.containerd.host_root, sock)),
                image: image.reference.clone(),
                proxy: format!("http://{bound}"),
                interval: cfg.canary_interval,
                deadline: canary::PULL_DEADLINE,
                ready: ready.clone(),
                metrics: metrics.clone(),
            };
            info!(image = %image.reference, socket = %sock.display(), interval_secs = cfg.canary_interval.as_secs_f64(), "canary pulls through CRI enabled");
            tokio::spawn(c.run(rx));
            Some(trigger)
        }
        (sock, image) => {
            if sock.is_some() != image.is_some() {
                warn!("the canary needs both containerd.socket and agent.canary_image; only one is set, so readiness is not proven by a pull");
            }
            ready.set(Check::Canary, Ok(()));
            None
        }
    };
    if let Some(taint) = cfg.startup_taint.clone() {
        info!(node = %taint.node, taint = %taint.key, "the startup taint is removed from this node once it is ready");
        tokio::spawn(crate::node::taint::when_ready(taint, ready.clone()));
    }
    let config_path = opts.config.clone();
    let overrides = opts.overrides.clone();
    let node = Node {
        proxy_url: format!("http://{bound}"),
        cfg,
        pass,
        fix_containerd_config: opts.fix_containerd_config,
    };
    let parts = LoopParts {
        live: Arc::new(Live::new(state.clone())),
        writer: StatusWriter::new(metrics, ready),
        watcher: watcher.as_ref(),
        reload: Box::new(move || AgentConfig::load(config_path.as_deref(), &overrides)),
        after_pass: Box::new(|_| {}),
        canary: trigger,
    };
    match event_loop(node, parts, &mut rx).await {
        LoopEnd::Terminate => drain(stop_tx, server, &mut rx, grace).await,
        LoopEnd::Closed => Ok(0),
    }
}

/// Stop accepting, wait for in-flight transfers up to `grace`; a second
/// signal ends the process at once.
async fn drain(
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<bool>,
    rx: &mut mpsc::Receiver<Event>,
    grace: Duration,
) -> Result<u8, AgentError> {
    info!(
        grace_secs = grace.as_secs_f64(),
        "draining: no new connections; waiting for in-flight transfers"
    );
    let _ = stop.send(());
    let second = async {
        loop {
            match rx.recv().await {
                Some(Event::Terminate) => return,
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        done = server => {
            if done.unwrap_or(false) {
                info!("drained; exiting");
            } else {
                warn!("grace period over with transfers still running; exiting");
            }
            Ok(0)
        }
        _ = second => {
            warn!("second signal: exiting now");
            Ok(130)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::fs::fake::{ca_pem, config, config_text, node as fake_node, FakeFs, Op};
    use std::sync::Mutex;

    const A: &str = "registry.shared-services:5000";

    #[derive(Default)]
    struct Watched(Mutex<Vec<PathBuf>>);
    impl Watch for Watched {
        fn watch(&self, dir: &Path) {
            self.0.lock().unwrap().push(dir.to_path_buf());
        }
    }

    struct Harness {
        proxy: Arc<ProxyState>,
        passes: Arc<Mutex<Vec<Vec<String>>>>,
        tx: mpsc::Sender<Event>,
        task: tokio::task::JoinHandle<LoopEnd>,
        next_config: Arc<Mutex<String>>,
        metrics: Arc<Metrics>,
        _cache_dir: tempfile::TempDir,
    }

    fn start(fs: Arc<FakeFs>, text: &str, ca: &str) -> Harness {
        start_with(fs, text, ca, None)
    }

    fn start_with(fs: Arc<FakeFs>, text: &str, ca: &str, canary: Option<Trigger>) -> Harness {
        let cfg = config(text);
        let metrics = Arc::new(Metrics::new());
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(cache_dir.path(), cfg.cache_max_bytes, metrics.clone()).unwrap();
        let proxy = Arc::new(ProxyState {
            upstream: RwLock::new(Arc::new(
                UpstreamClient::new(&cfg.upstream, ca.as_bytes(), &cfg.timeouts).unwrap(),
            )),
            aliases: RwLock::new(vec![]),
            mirrors: RwLock::new(vec![]),
            cache: Some(Arc::new(cache)),
            metrics: metrics.clone(),
            timeouts: RwLock::new(cfg.timeouts),
            upstream_seen: Arc::new(Default::default()),
            downloads: Default::default(),
            peers: None,
        });
        let passes = Arc::new(Mutex::new(Vec::new()));
        let next_config = Arc::new(Mutex::new(text.to_string()));
        let (tx, mut rx) = mpsc::channel(64);
        let p2 = passes.clone();
        let nc = next_config.clone();
        let live = Arc::new(Live::new(proxy.clone()));
        let m2 = metrics.clone();
        let task = tokio::spawn(async move {
            let watched = Watched::default();
            let parts = LoopParts {
                live,
                writer: StatusWriter::new(m2, Arc::new(Readiness::default())),
                watcher: &watched,
                reload: Box::new(move || {
                    let t = nc.lock().unwrap().clone();
                    AgentConfig::from_str(
                        Path::new("/etc/slipway/agent.toml"),
                        &t,
                        &Overrides::default(),
                    )
                }),
                after_pass: Box::new(move |s: &NodeStatus| {
                    p2.lock().unwrap().push(
                        s.aliases
                            .iter()
                            .map(|a| {
                                format!(
                                    "{}={}",
                                    a.alias,
                                    match &a.state {
                                        reconcile::AliasState::Applied { .. } => "applied",
                                        reconcile::AliasState::Drifted { .. } => "drifted",
                                        reconcile::AliasState::Removed { .. } => "removed",
                                        reconcile::AliasState::Error(_) => "error",
                                        reconcile::AliasState::Conflict(_) => "conflict",
                                    }
                                )
                            })
                            .collect(),
                    )
                }),
                canary,
            };
            let node = Node {
                cfg,
                pass: NodePass::new(fs),
                proxy_url: "http://127.0.0.1:5050".into(),
                fix_containerd_config: false,
            };
            event_loop(node, parts, &mut rx).await
        });
        Harness {
            proxy,
            passes,
            tx,
            task,
            next_config,
            metrics,
            _cache_dir: cache_dir,
        }
    }

    async fn wait_passes(h: &Harness, n: usize) -> Vec<Vec<String>> {
        for _ in 0..200 {
            if h.passes.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h.passes.lock().unwrap().clone()
    }

    fn hosts(alias: &str) -> PathBuf {
        Path::new("/etc/containerd/certs.d")
            .join(alias)
            .join("hosts.toml")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_event_restores_drift_and_terminate_ends_the_loop() {
        let ca = ca_pem();
        let fs = fake_node(&ca);
        let h = start(fs.clone(), &config_text(&[A], ""), &ca);
        assert_eq!(wait_passes(&h, 1).await[0], vec![format!("{A}=applied")]);
        fs.remove_file(&hosts(A)).unwrap();
        h.tx.send(Event::Changed).await.unwrap();
        let p = wait_passes(&h, 2).await;
        assert_eq!(p[1], vec![format!("{A}=drifted")]);
        assert!(fs.content(&hosts(A)).is_some());
        h.tx.send(Event::Terminate).await.unwrap();
        assert_eq!(h.task.await.unwrap(), LoopEnd::Terminate);
    }

    /// #13: a pass stuck on a file kept SIGTERM waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminate_is_not_starved_by_a_stuck_pass() {
        let ca = ca_pem();
        let fs = fake_node(&ca);
        *fs.stall.lock().unwrap() = Some((hosts(A), Duration::from_secs(30)));
        let h = start(fs.clone(), &config_text(&[A], ""), &ca);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            fs.calls.lock().unwrap().iter().any(|(_, p)| p == &hosts(A))
                || h.passes.lock().unwrap().is_empty()
        );
        let t = Instant::now();
        h.tx.send(Event::Terminate).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(2), h.task).await;
        assert_eq!(end.expect("loop ended").unwrap(), LoopEnd::Terminate);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    /// #13: a persistent error used to be retried on every event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_pass_backs_off_under_a_flood_of_events() {
        let ca = ca_pem();
        let fs = fake_node(&ca);
        fs.fail(Op::Write, &hosts(A), nix::libc::EACCES);
        let h = start(fs.clone(), &config_text(&[A], ""), &ca);
        for _ in 0..100 {
            let _ = h.tx.try_send(Event::Changed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 2 s of events; retries after 0.1, 0.2, 0.4, 0.8 s (then 1.6 s).
        let n = h.passes.lock().unwrap().len();
        assert!((3..=7).contains(&n), "{n} passes in 2 s");
        assert!(h.metrics.encode().contains(&format!(
            "slipway_hostconfig_errors_total{{alias=\"{A}\"}} {n}"
        )));
        h.task.abort();
    }

    #[test]
    fn reload_applies_runtime_keys_and_names_the_others() {
        let old = config(&config_text(&[A], ""));
        let changed = [
            (
                "[proxy]\nconnect_timeout_secs = 7\n",
                LiveKey::ConnectTimeout,
            ),
            (
                "[proxy]\nresponse_timeout_secs = 7\n",
                LiveKey::ResponseTimeout,
            ),
            (
                "[proxy]\nbody_idle_timeout_secs = 7\n",
                LiveKey::BodyIdleTimeout,
            ),
            (
                "[proxy]\nclient_header_timeout_secs = 7\n",
                LiveKey::ClientHeaderTimeout,
            ),
            ("[cache]\nmax_bytes = 12345\n", LiveKey::CacheMaxBytes),
            (
                "[agent]\nreconcile_interval_secs = 7\n",
                LiveKey::ReconcileInterval,
            ),
        ];
        for (extra, key) in changed {
            let r = plan_reload(&old, config(&config_text(&[A], extra)));
            assert_eq!(r.applied, vec![key], "{extra}");
            assert!(r.needs_restart.is_empty());
        }
        let r = plan_reload(&old, config(&config_text(&[A, "other:5000"], "")));
        assert_eq!(r.applied, vec![LiveKey::Aliases]);
        let r = plan_reload(
            &old,
            config(&config_text(&[A], "").replace("registry.example:5000", "registry.other:5000")),
        );
        assert_eq!(r.applied, vec![LiveKey::Upstream]);
        let r = plan_reload(
            &old,
            config(&config_text(&[A], "").replace("/ca/ca.crt", "/ca2/ca.crt")),
        );
        assert_eq!(r.applied, vec![LiveKey::CaFile]);
        let r = plan_reload(
            &old,
            config(&config_text(
                &[A],
                "[proxy]\nlisten = \"127.0.0.1:6000\"\n[admin]\nlisten = \"127.0.0.1:6001\"\n[agent]\ngrace_period_secs = 3\n[containerd]\ncerts_dir = \"/elsewhere\"\n",
            )),
        );
        assert_eq!(
            r.needs_restart,
            vec![
                RestartKey::ProxyListen,
                RestartKey::AdminListen,
                RestartKey::ContainerdPaths,
                RestartKey::GracePeriod
            ]
        );
        // The running values are kept for those.
        assert_eq!(r.cfg.proxy_listen, old.proxy_listen);
        assert_eq!(r.cfg.containerd, old.containerd);
        assert_eq!(r.cfg.grace_period, old.grace_period);
    }

    /// #8: a canary after the first pass, after a pass that changed
    /// something and after a reload; none after a pass that changed nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn canaries_are_asked_for_at_start_after_changes_and_reloads() {
        let ca = ca_pem();
        let fs = fake_node(&ca);
        let (trigger, mut rx) = Trigger::channel();
        let h = start_with(
            fs.clone(),
            &config_text(&[A], "[agent]\nreconcile_interval_secs = 3600\n"),
            &ca,
            Some(trigger),
        );
        let next = |rx: &mut mpsc::Receiver<Reason>| rx.try_recv().ok();
        wait_passes(&h, 1).await;
        assert_eq!(next(&mut rx), Some(Reason::Start));
        // An event, nothing changed: no canary.
        h.tx.send(Event::Changed).await.unwrap();
        wait_passes(&h, 2).await;
        assert_eq!(next(&mut rx), None);
        // Drift restored: a canary.
        fs.remove_file(&hosts(A)).unwrap();
        h.tx.send(Event::Changed).await.unwrap();
        wait_passes(&h, 3).await;
        assert_eq!(next(&mut rx), Some(Reason::Changed));
        // SIGHUP with the same config: the pass changes nothing, and still
        // a canary, since a reload may change what the node pulls through.
        h.tx.send(Event::Reload).await.unwrap();
        wait_passes(&h, 4).await;
        assert_eq!(next(&mut rx), Some(Reason::Reload));
        assert_eq!(next(&mut rx), None);
        h.task.abort();
    }

    #[test]
    fn canary_keys_need_a_restart() {
        let d = "0".repeat(64);
        let old = config(&config_text(&[A], ""));
        let r = plan_reload(
            &old,
            config(&config_text(
                &[A],
                &format!("[containerd]\nsocket = \"/run/containerd/containerd.sock\"\n[agent]\ncanary_image = \"{A}/slipway/canary@sha256:{d}\"\n"),
            )),
        );
        assert_eq!(r.needs_restart, vec![RestartKey::Canary]);
        assert_eq!(r.cfg.canary_image, None);
        assert_eq!(r.cfg.containerd_socket, None);
    }

    /// #11: the peer listener and resolver start once; changing peers.*
    /// needs a restart, and the running peer config is kept.
    #[test]
    fn peer_keys_need_a_restart() {
        let old = config(&config_text(&[A], "[cache]\ndir = \"/c\"\n"));
        let r = plan_reload(
            &old,
            config(&config_text(
                &[A],
                "[cache]\ndir = \"/c\"\n[peers]\nlisten = \"0.0.0.0:5052\"\nstatic = [\"10.0.0.2:5052\"]\n",
            )),
        );
        assert_eq!(r.needs_restart, vec![RestartKey::Peers]);
        assert_eq!(r.cfg.peers, None);
    }

    /// #12: SIGHUP dropped timeout, cache and interval changes silently.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_takes_effect_on_the_running_proxy_and_loop() {
        let ca = ca_pem();
        let fs = fake_node(&ca);
        let h = start(
            fs.clone(),
            &config_text(&[A], "[agent]\nreconcile_interval_secs = 3600\n"),
            &ca,
        );
        wait_passes(&h, 1).await;
        let client_before = h.proxy.upstream.read().unwrap().clone();
        *h.next_config.lock().unwrap() = config_text(
            &[A, "other:5000"],
            "[proxy]\nconnect_timeout_secs = 1.5\nresponse_timeout_secs = 2.5\nbody_idle_timeout_secs = 3.5\nclient_header_timeout_secs = 4.5\n[cache]\nmax_bytes = 4096\n[agent]\nreconcile_interval_secs = 0.2\n",
        )
        .replace("registry.example:5000", "registry.other:5000");
        h.tx.send(Event::Reload).await.unwrap();
        let p = wait_passes(&h, 2).await;
        assert!(p[1].contains(&"other:5000=applied".to_string()), "{p:?}");
        let t = h.proxy.timeouts();
        assert_eq!(
            (t.connect, t.response, t.body_idle, t.client_header),
            (
                Duration::from_secs_f64(1.5),
                Duration::from_secs_f64(2.5),
                Duration::from_secs_f64(3.5),
                Duration::from_secs_f64(4.5)
            )
        );
        assert_eq!(h.proxy.cache.as_ref().unwrap().max_bytes(), 4096);
        assert_eq!(
            *h.proxy.aliases.read().unwrap(),
            vec![A.to_string(), "other:5000".to_string()]
        );
        assert!(!Arc::ptr_eq(
            &client_before,
            &h.proxy.upstream.read().unwrap()
        ));
        // The new interval: passes now come without events.
        let before = h.passes.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let after = h.passes.lock().unwrap().len();
        assert!(after - before >= 3, "{before} -> {after}");
        // A bad config keeps the running one.
        *h.next_config.lock().unwrap() = "[registry\n".into();
        h.tx.send(Event::Reload).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(h.proxy.timeouts().response, Duration::from_secs_f64(2.5));
        h.task.abort();
    }
}
