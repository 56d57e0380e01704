//! `slipway agent` as the long-running DaemonSet process.
//!
//! Owns the event loop: apply the host configuration (now with the
//! node-local proxy first), then keep it true. Sources of work:
//! - inotify on `certs_dir`, each alias directory and the CA file's
//!   directory (a ConfigMap mount swaps a `..data` symlink on update), via
//!   [`Watch`], with a periodic reconcile as a fallback;
//! - SIGHUP reloads the config file; SIGTERM/SIGINT drain the proxy (stop
//!   accepting, let in-flight transfers finish within the grace period) and
//!   exit 0; a second signal exits at once (signal-hook).
//!
//! Serves the proxy ([`crate::proxy`]) and the admin server
//! ([`crate::admin`]). Needs no Kubernetes API access.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::admin::metrics::Metrics;
use crate::admin::{self, Readiness};
use crate::node::apply::{self, Outcome};
use crate::node::ca_bundle::CaBundle;
use crate::node::config::{AgentConfig, ConfigError, Overrides};
use crate::node::hostconfig::HostEntry;
use crate::node::reconcile::{self as agent, AgentError};
use crate::proxy::cache::Cache;
use crate::proxy::{self, ProxyState, UpstreamClient};

/// Something that reports changes under directories. The real one is
/// inotify (through nix); tests can use a channel.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Changed,
    Tick,
    Reload,
    Terminate,
}

#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    pub config: Option<PathBuf>,
    pub overrides: Overrides,
    pub fix_containerd_config: bool,
}

struct Agent {
    cfg: AgentConfig,
    opts: DaemonOptions,
    proxy_url: String,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    proxy: Arc<ProxyState>,
    ca: Option<CaBundle>,
    last_advice: Option<String>,
    first: bool,
}

impl Agent {
    fn hosts(&self) -> Vec<HostEntry> {
        let mut v = vec![HostEntry::proxy(&self.proxy_url)];
        v.extend(agent::host_entries(&self.cfg));
        v
    }

    /// Re-read the CA (it may have rotated), check containerd's config,
    /// and bring every alias directory to the desired state.
    fn reconcile(&mut self, watcher: &dyn Watch) {
        match agent::load_ca(&self.cfg) {
            Ok(ca) => self.use_ca(ca),
            Err(e) => error!("{e}; keeping the CA loaded before"),
        }
        match agent::inspect_containerd(&self.cfg) {
            Ok((insp, text)) => {
                if !insp.covered && self.opts.fix_containerd_config && self.first {
                    if let Err(e) = agent::fix_containerd(&self.cfg, &insp, &text) {
                        error!("{e}");
                    }
                }
                let advice = insp.advice();
                if advice != self.last_advice {
                    match &advice {
                        Some(a) => warn!("{a}"),
                        None => info!(
                            "containerd reads {}",
                            self.cfg.containerd.certs_dir.display()
                        ),
                    }
                    self.last_advice = advice;
                }
                self.metrics
                    .config_path_covered
                    .set(i64::from(insp.covered));
                self.ready
                    .config_path_covered
                    .store(insp.covered, Ordering::Relaxed);
            }
            Err(e) => {
                let advice = Some(format!(
                    "cannot tell whether containerd reads {}: {e}",
                    self.cfg.containerd.certs_dir.display()
                ));
                if advice != self.last_advice {
                    warn!("{}", advice.as_deref().unwrap_or_default());
                    self.last_advice = advice;
                }
                self.metrics.config_path_covered.set(0);
                self.ready
                    .config_path_covered
                    .store(false, Ordering::Relaxed);
            }
        }
        let certs = self.cfg.containerd.local_certs_dir();
        let Some(ca_content) = self.ca.as_ref().map(CaBundle::file_content) else {
            error!("no usable registry CA; host configuration not applied");
            self.ready
                .hostconfig_applied
                .store(false, Ordering::Relaxed);
            return;
        };
        match apply::apply_all(&certs, &self.cfg.aliases, &self.hosts(), &ca_content) {
            Ok(report) => {
                let mut all_ok = true;
                for a in &report.aliases {
                    let state = match &a.outcome {
                        Outcome::Unchanged => "applied",
                        Outcome::Changed(files) => {
                            if self.first {
                                info!(alias = %a.alias, changes = %files.join(", "), "applied");
                            } else {
                                warn!(alias = %a.alias, changes = %files.join(", "), "host configuration drifted; restored");
                            }
                            if self.first {
                                "applied"
                            } else {
                                "drifted"
                            }
                        }
                        Outcome::Failed(e) => {
                            error!(alias = %a.alias, "{e}");
                            all_ok = false;
                            "error"
                        }
                    };
                    for w in &a.warnings {
                        warn!(alias = %a.alias, "{w}");
                    }
                    self.metrics.set_alias_state(&a.alias, state);
                    watcher.watch(&a.dir);
                }
                self.ready
                    .hostconfig_applied
                    .store(all_ok, Ordering::Relaxed);
            }
            Err(e) => {
                error!("{e}");
                self.ready
                    .hostconfig_applied
                    .store(false, Ordering::Relaxed);
            }
        }
        watcher.watch(&certs);
        if let Some(dir) = self.cfg.ca_file.parent() {
            watcher.watch(dir);
        }
        self.first = false;
    }

    fn use_ca(&mut self, ca: CaBundle) {
        self.metrics.ca_expiry.set(ca.not_after_unix as f64);
        if self.ca.as_ref().is_some_and(|c| c.pem == ca.pem) {
            return;
        }
        match UpstreamClient::new(&self.cfg.upstream, ca.pem.as_bytes(), &self.cfg.timeouts) {
            Ok(c) => {
                if self.ca.is_some() {
                    info!(subjects = ?ca.subjects, "registry CA changed; using the new one");
                }
                *self.proxy.upstream.write().expect("upstream lock") = Arc::new(c);
                self.ca = Some(ca);
            }
            Err(e) => error!("{e}"),
        }
    }

    /// SIGHUP: re-read the config; keep the old one if the new one is bad.
    fn reload(&mut self) {
        let new = match AgentConfig::load(self.opts.config.as_deref(), &self.opts.overrides) {
            Ok(c) => c,
            Err(e) => {
                error!("config reload failed, keeping the running config: {e}");
                return;
            }
        };
        if new.proxy_listen != self.cfg.proxy_listen || new.admin_listen != self.cfg.admin_listen {
            warn!("proxy.listen and admin.listen changes take effect on restart");
        }
        if new.upstream != self.cfg.upstream || new.timeouts.connect != self.cfg.timeouts.connect {
            self.ca = None; // rebuild the upstream client on the next CA load
        }
        *self.proxy.aliases.write().expect("aliases lock") =
            new.aliases.iter().map(|a| a.dir_name()).collect();
        info!(aliases = new.aliases.len(), "config reloaded");
        self.cfg = new;
        self.first = true;
    }
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

/// Run the agent until SIGTERM/SIGINT. Returns the process exit code.
pub fn run(opts: DaemonOptions) -> Result<i32, AgentError> {
    let cfg = AgentConfig::load(opts.config.as_deref(), &opts.overrides)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AgentError::Runtime(e.to_string()))?;
    rt.block_on(run_async(cfg, opts))
}

async fn run_async(cfg: AgentConfig, opts: DaemonOptions) -> Result<i32, AgentError> {
    let ca = agent::load_ca(&cfg)?;
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
            e => AgentError::Proxy(e.to_string()),
        })?;
    let bound = listener
        .local_addr()
        .map_err(|e| AgentError::Proxy(e.to_string()))?;
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| AgentError::Proxy(format!("admin.listen {}: {e}", cfg.admin_listen)))?;
    let metrics = Arc::new(Metrics::new());
    let cache = match &cfg.cache_dir {
        Some(d) => Some(Arc::new(
            Cache::open(
                &cfg.containerd.local(d),
                cfg.cache_max_bytes,
                metrics.clone(),
            )
            .map_err(|e| AgentError::Proxy(e.to_string()))?,
        )),
        None => None,
    };
    let upstream = UpstreamClient::new(&cfg.upstream, ca.pem.as_bytes(), &cfg.timeouts)
        .map_err(|e| AgentError::Proxy(e.to_string()))?;
    let ready = Arc::new(Readiness::default());
    let state = Arc::new(ProxyState {
        upstream: RwLock::new(Arc::new(upstream)),
        aliases: RwLock::new(cfg.aliases.iter().map(|a| a.dir_name()).collect()),
        cache,
        metrics: metrics.clone(),
        timeouts: cfg.timeouts,
        upstream_seen: ready.upstream_seen.clone(),
    });
    ready.proxy_bound.store(true, Ordering::Relaxed);
    info!(proxy = %bound, admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), upstream = %cfg.upstream.url, "slipway agent starting");

    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let watcher: Box<dyn Watch> = match Inotify::start(tx.clone()) {
        Ok(w) => Box::new(w),
        Err(e) => {
            warn!(error = %e, "inotify unavailable; relying on the periodic reconcile");
            Box::new(NoWatch)
        }
    };
    spawn_signals(tx.clone())?;
    let interval = cfg.reconcile_interval;
    let tick_tx = tx.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(interval);
        t.tick().await;
        loop {
            t.tick().await;
            if tick_tx.send(Event::Tick).await.is_err() {
                return;
            }
        }
    });

    let grace = cfg.grace_period;
    let mut agent = Agent {
        proxy_url: format!("http://{bound}"),
        cfg,
        opts,
        metrics: metrics.clone(),
        ready: ready.clone(),
        proxy: state.clone(),
        ca: None,
        last_advice: None,
        first: true,
    };
    agent.use_ca(ca);
    agent.reconcile(watcher.as_ref());
    tokio::spawn(admin::serve(admin_listener, metrics, ready));
    tokio::spawn(probe_upstream(state.clone()));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(proxy::serve(
        listener,
        state.clone(),
        async {
            let _ = stop_rx.await;
        },
        grace,
    ));

    loop {
        let Some(ev) = rx.recv().await else { break };
        tracing::trace!(?ev, "event");
        match ev {
            Event::Changed => {
                // Let a burst of events (ours included) settle, then look once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut reload = false;
                while let Ok(e) = rx.try_recv() {
                    match e {
                        Event::Terminate => return drain(stop_tx, server, &mut rx, grace).await,
                        Event::Reload => reload = true,
                        Event::Changed | Event::Tick => {}
                    }
                }
                if reload {
                    agent.reload();
                }
                agent.reconcile(watcher.as_ref());
            }
            Event::Tick => {
                agent.reconcile(watcher.as_ref());
                tokio::spawn(probe_upstream(state.clone()));
            }
            Event::Reload => {
                agent.reload();
                agent.reconcile(watcher.as_ref());
            }
            Event::Terminate => return drain(stop_tx, server, &mut rx, grace).await,
        }
    }
    Ok(0)
}

/// Stop accepting, wait for in-flight transfers up to `grace`; a second
/// signal ends the process at once.
async fn drain(
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<bool>,
    rx: &mut mpsc::Receiver<Event>,
    grace: Duration,
) -> Result<i32, AgentError> {
    info!(
        grace_secs = grace.as_secs_f64(),
        "draining: no new connections; waiting for in-flight transfers"
    );
    let _ = stop.send(());
    let second = async {
        loop {
            if let Some(Event::Terminate) = rx.recv().await {
                return;
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

struct NoWatch;
impl Watch for NoWatch {
    fn watch(&self, _: &Path) {}
}

fn spawn_signals(tx: mpsc::Sender<Event>) -> Result<(), AgentError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .map_err(|e| AgentError::Runtime(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let ev = if sig == SIGHUP {
                    Event::Reload
                } else {
                    Event::Terminate
                };
                if tx.blocking_send(ev).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| AgentError::Runtime(e.to_string()))?;
    Ok(())
}
