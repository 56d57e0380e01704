//! The async shell of `slipway build`, `slipway builds` and `slipway logs`:
//! every Kubernetes API call, over an injected [`kube::Client`].
//!
//! `slipway build` makes these requests, in this order:
//!
//! 1. `GET serviceaccounts/<sa>` in the build namespace (on 404,
//!    `GET namespaces/<ns>` to tell a missing namespace from a missing
//!    ServiceAccount);
//! 2. `GET secrets/<name>` (metadata only) for `--git-secret` and
//!    `--push-secret`;
//! 3. the registry CA: `GET configmaps/registry-ca` in `shared-services`; for
//!    another build namespace also `GET` it there, and `POST` it (absent) or
//!    `PUT` it with the resourceVersion read (different), `fieldManager=slipway`,
//!    through the PKI planner ([`crate::pki::ensure::ensure_ca_configmap`]):
//!    on 409 (another build copied it first) it is read and planned again;
//! 4. `POST jobs` — with `--detach`, print the name and stop here;
//! 5. `GET pods?watch=true&labelSelector=slipway.dev/build-id=<id>`, again
//!    from the last `resourceVersion` whenever the server ends the watch;
//! 6. `GET pods/<pod>/log?container=git&follow=true` once git has started
//!    (retried while the container is still waiting);
//! 7. `PATCH jobs/<job>`: the `slipway.dev/commit` label;
//! 8. `GET pods/<pod>/log?container=kaniko&follow=true`;
//!
//! and, when needed: `GET jobs/<job>` (did it hit its deadline?),
//! `GET events?fieldSelector=involvedObject…` (no pod appears), and
//! `DELETE jobs/<job>` with `propagationPolicy: Foreground` on Ctrl-C or a
//! pod that cannot start.

use std::fmt::Display;
use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::Client;
use serde::Serialize;

use super::job::{self, BuildSpec, CA_KEY, GIT_CONTAINER, KANIKO_CONTAINER, LABEL_BUILD_ID};
use super::log::{CacheUploadFailure, Event as LogEvent, KanikoLog, Retry};
use super::status::{self, BuildRow, CState, Context, PodView, Verdict};
use super::{BuildArgs, BuildError, CaSource, MirrorSource, OutputFormat, Plan};
use crate::k8s::{self, ApiClass};
use crate::pki::ensure::{ensure_ca_configmap, Change, EnsureError};

/// How long to wait for what; tests shorten these.
#[derive(Debug, Clone)]
pub struct Timing {
    /// No pod event for this long (and no pod yet): look at the Job's events.
    pub quiet: Duration,
    /// Pause between attempts to read the log of a container that has not
    /// started.
    pub log_retry: Duration,
    pub log_retries: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            quiet: Duration::from_secs(30),
            log_retry: Duration::from_secs(1),
            log_retries: 120,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub detach: bool,
    pub output: OutputFormat,
    pub timing: Timing,
}

/// Where the build's progress goes (stderr): log lines, a status line,
/// warnings and notes.
pub trait Progress {
    /// A log line of a container.
    fn line(&mut self, container: &str, line: &str);
    /// The progress line (only shown on a terminal).
    fn status(&mut self, text: &str);
    fn warn(&mut self, text: &str);
    fn info(&mut self, text: &str);
    fn finish(&mut self);
}

/// Plain lines, for a pipe or a file: `[git] …`, `[kaniko] …`,
/// `slipway: …`, `warning: …`.
pub struct PlainProgress<W: Write> {
    pub w: W,
}

impl<W: Write> Progress for PlainProgress<W> {
    fn line(&mut self, container: &str, line: &str) {
        let _ = writeln!(self.w, "[{container}] {}", super::log::strip_ansi(line));
    }
    fn status(&mut self, _text: &str) {}
    fn warn(&mut self, text: &str) {
        let _ = writeln!(self.w, "warning: {text}");
    }
    fn info(&mut self, text: &str) {
        let _ = writeln!(self.w, "slipway: {text}");
    }
    fn finish(&mut self) {
        let _ = self.w.flush();
    }
}

/// On a terminal: log lines scroll above a spinner line with the stage,
/// `STEP n/m` and the cache counts (indicatif, on stderr).
pub struct BarProgress {
    pb: ProgressBar,
}

impl BarProgress {
    pub fn new() -> Self {
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner:.cyan} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        BarProgress { pb }
    }
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for BarProgress {
    fn line(&mut self, container: &str, line: &str) {
        self.pb.println(format!("[{container}] {line}"));
    }
    fn status(&mut self, text: &str) {
        self.pb.set_message(text.to_string());
    }
    fn warn(&mut self, text: &str) {
        self.pb.println(format!("\x1b[1;33mwarning:\x1b[0m {text}"));
    }
    fn info(&mut self, text: &str) {
        self.pb.println(format!("slipway: {text}"));
    }
    fn finish(&mut self) {
        self.pb.finish_and_clear();
    }
}

/// The layer cache's part in a build (`--output json`'s `cache`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheCounts {
    /// Steps whose layer came from the cache.
    pub hits: u32,
    /// Steps that ran (RUN, COPY, ADD not served from the cache). Not
    /// Kaniko's "No cached layer found" count: it stops looking after the
    /// first miss of each stage (#9).
    pub rebuilt: u32,
    /// Cache layers built but not uploaded: the next build misses them.
    pub uploads_failed: u32,
}

/// A finished build, as `--output json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildReport {
    pub build: String,
    pub namespace: String,
    /// `REG/NAME@sha256:…`.
    pub image: String,
    pub digest: String,
    pub repository: String,
    pub tag: String,
    pub commit: String,
    pub revision: String,
    pub duration_seconds: f64,
    pub cache: CacheCounts,
    /// Retried registry requests (`--push-retry`), cache uploads included.
    pub retries: Vec<super::log::Retry>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `--detach`: the Job exists, nobody watches it.
    Detached {
        build: String,
        namespace: String,
    },
    Built(Box<BuildReport>),
}

fn kube_err(action: impl Display) -> impl FnOnce(kube::Error) -> BuildError {
    let action = action.to_string();
    move |error| BuildError::Kube { action, error }
}

/// Runs one build: preflight, create, follow to the end (unless
/// `--detach`), and prints the result on `out` (the last line on stdout is
/// `REG/NAME@sha256:…`; with `--output json`, one object). `interrupt`
/// resolving (Ctrl-C) deletes the Job and its pod.
pub async fn run<I, W, P>(
    client: Client,
    plan: &Plan,
    opts: &RunOptions,
    interrupt: I,
    out: &mut W,
    progress: &mut P,
) -> Result<Outcome, BuildError>
where
    I: Future<Output = ()>,
    W: Write,
    P: Progress,
{
    let result = run_inner(client, plan, opts, interrupt, progress).await;
    progress.finish();
    let name = plan.spec.job_name();
    let ns = &plan.spec.namespace;
    let written = match (&result, opts.output) {
        (Ok(Outcome::Detached { build, namespace }), OutputFormat::Json) => writeln!(
            out,
            "{}",
            serde_json::json!({ "build": build, "namespace": namespace, "detached": true })
        ),
        (Ok(Outcome::Detached { build, .. }), OutputFormat::Text) => writeln!(out, "{build}"),
        (Ok(Outcome::Built(r)), OutputFormat::Json) => writeln!(
            out,
            "{}",
            serde_json::to_string(r).unwrap_or_else(|_| "{}".into())
        ),
        (Ok(Outcome::Built(r)), OutputFormat::Text) => writeln!(out, "{}", r.image),
        (Err(e), OutputFormat::Json) => writeln!(
            out,
            "{}",
            serde_json::json!({
                "build": name,
                "namespace": ns,
                "error": e.kind(),
                "message": e.to_string(),
                "exit_code": e.exit_code(),
            })
        ),
        (Err(_), OutputFormat::Text) => Ok(()),
    };
    let _ = written.and_then(|_| out.flush());
    result
}

async fn run_inner<I, P>(
    client: Client,
    plan: &Plan,
    opts: &RunOptions,
    interrupt: I,
    progress: &mut P,
) -> Result<Outcome, BuildError>
where
    I: Future<Output = ()>,
    P: Progress,
{
    let mut spec = plan.spec.clone();
    let ns = spec.namespace.clone();
    let name = spec.job_name();
    let mut interrupt = std::pin::pin!(interrupt);

    let pre = tokio::select! {
        r = preflight(&client, plan, progress) => Some(r),
        _ = &mut interrupt => None,
    };
    match pre {
        None => {
            return Err(BuildError::Interrupted {
                detail: "before the Job was created; nothing to clean up".into(),
            })
        }
        Some(r) => {
            if let Some(map) = r? {
                spec.registry_map = map;
            }
        }
    }
    let spec = &spec;

    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let created = jobs
        .create(&PostParams::default(), &job::job(spec))
        .await
        .map_err(|e| create_error(e, spec))?;
    progress.info(&format!(
        "created job {ns}/{name}: {} at {}",
        spec.git_url,
        spec.revision.as_str()
    ));
    if opts.detach {
        return Ok(Outcome::Detached {
            build: name,
            namespace: ns,
        });
    }

    let started = Instant::now();
    let followed = {
        let f = follow(&client, plan, &created, opts, started, progress);
        tokio::select! {
            r = f => Some(r),
            _ = &mut interrupt => None,
        }
    };
    match followed {
        None => {
            progress.info(&format!(
                "interrupted: deleting job {ns}/{name} and its pod"
            ));
            delete_job(&jobs, &name, progress).await;
            Err(BuildError::Interrupted {
                detail: format!("deleted job {ns}/{name} and its pod"),
            })
        }
        Some(Err(Followed::Stuck(e))) => {
            progress.warn(&format!(
                "{e}; deleting job {ns}/{name} (it would wait until its deadline)"
            ));
            delete_job(&jobs, &name, progress).await;
            Err(e)
        }
        Some(Err(Followed::Failed(e))) => Err(e),
        Some(Ok(report)) => {
            progress.info(&format!(
                "built {} from commit {} in {:.0}s (cache: {} hit, {} rebuilt{})",
                report.image,
                report.commit,
                report.duration_seconds,
                report.cache.hits,
                report.cache.rebuilt,
                match report.cache.uploads_failed {
                    0 => String::new(),
                    n => format!(", {n} upload failed"),
                }
            ));
            progress.info(&format!(
                "run it: kubectl run {} --image={}",
                run_name(&spec.repo),
                report.image
            ));
            Ok(Outcome::Built(Box::new(report)))
        }
    }
}

/// A pod name for the `kubectl run` hint: the last path component.
fn run_name(repo: &str) -> String {
    let last = repo.rsplit('/').next().unwrap_or(repo);
    let n: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let n = n.trim_matches('-');
    if n.is_empty() {
        "app".into()
    } else {
        n.into()
    }
}

async fn delete_job<P: Progress>(jobs: &Api<Job>, name: &str, progress: &mut P) {
    // Foreground: the Job goes away only after its pod, so nothing of the
    // build outlives the command.
    match jobs.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(e) if k8s::classify(&e) == ApiClass::NotFound => {}
        Err(e) => progress.warn(&format!(
            "could not delete job {name}: {e}; delete it with kubectl delete job {name}"
        )),
    }
}

fn create_error(e: kube::Error, spec: &BuildSpec) -> BuildError {
    if let kube::Error::Api(s) = &e {
        let kind = s.details.as_ref().map(|d| d.kind.as_str()).unwrap_or("");
        if s.code == 404 && kind == "namespaces" {
            return missing_namespace(&spec.namespace, &spec.service_account);
        }
    }
    BuildError::Kube {
        action: format!(
            "cannot create job {} in namespace {}",
            spec.job_name(),
            spec.namespace
        ),
        error: e,
    }
}

fn missing_namespace(ns: &str, sa: &str) -> BuildError {
    BuildError::Missing {
        what: format!("namespace {ns} does not exist"),
        hint: format!(
            "create it, and a ServiceAccount {sa} in it: kubectl create namespace {ns} && kubectl -n {ns} create serviceaccount {sa}"
        ),
    }
}

fn sa_hint(ns: &str, sa: &str) -> String {
    format!(
        "create it: kubectl -n {ns} create serviceaccount {sa} && kubectl -n {ns} patch serviceaccount {sa} -p '{{\"automountServiceAccountToken\":false}}'"
    )
}

/// Checks what the Job needs, and copies the registry CA into the build
/// namespace. A check the caller may not make (403) is skipped with a
/// warning: the pod would then fail to start, which `follow` reports.
/// Checks what the build pod needs, copies the CA, and returns the
/// cluster's `--registry-map` when the plan reads it from there.
async fn preflight<P: Progress>(
    client: &Client,
    plan: &Plan,
    progress: &mut P,
) -> Result<Option<Vec<String>>, BuildError> {
    ca_and_access(client, plan, progress).await?;
    match &plan.mirror {
        MirrorSource::Cluster { namespace } => {
            mirror_map(client, namespace, &plan.spec.registry, progress)
                .await
                .map(Some)
        }
        MirrorSource::Off | MirrorSource::Given => Ok(None),
    }
}

/// #20: the upstreams of ConfigMap `slipway-mirror` (the mirror overlay's
/// `mirror.toml`), as Kaniko `--registry-map` values. No ConfigMap: the
/// cluster has no mirror, and FROM images come from their registries.
async fn mirror_map<P: Progress>(
    client: &Client,
    namespace: &str,
    registry: &str,
    progress: &mut P,
) -> Result<Vec<String>, BuildError> {
    use crate::mirror::{Mirrors, CONFIGMAP, CONFIGMAP_KEY};
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = match cms.get_opt(CONFIGMAP).await {
        Ok(cm) => cm,
        Err(e) if k8s::classify(&e) == ApiClass::Denied => {
            progress.warn(&format!(
                "cannot read ConfigMap {namespace}/{CONFIGMAP} (forbidden): FROM images are \
                 pulled from their own registries, not through the mirror"
            ));
            return Ok(vec![]);
        }
        Err(e) => {
            return Err(kube_err(format!(
                "cannot read ConfigMap {namespace}/{CONFIGMAP}"
            ))(e))
        }
    };
    let Some(text) = cm
        .as_ref()
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(CONFIGMAP_KEY))
    else {
        return Ok(vec![]);
    };
    let origin = format!("ConfigMap {namespace}/{CONFIGMAP} key {CONFIGMAP_KEY}");
    let mirrors = Mirrors::from_toml(std::path::Path::new(&origin), text)
        .map_err(|e| BuildError::Config(e.to_string()))?;
    let map = mirrors.registry_map(registry);
    if !map.is_empty() {
        progress.info(&format!("FROM through the mirror: {}", map.join(", ")));
    }
    Ok(map)
}

/// The ServiceAccount, the Secrets and the CA ConfigMap.
async fn ca_and_access<P: Progress>(
    client: &Client,
    plan: &Plan,
    progress: &mut P,
) -> Result<(), BuildError> {
    let spec = &plan.spec;
    let ns = &spec.namespace;
    let sa = &spec.service_account;

    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    match sas.get_opt(sa).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            let nss: Api<Namespace> = Api::all(client.clone());
            return Err(match nss.get_opt(ns).await {
                Ok(None) => missing_namespace(ns, sa),
                Ok(Some(_)) => BuildError::Missing {
                    what: format!("ServiceAccount {sa} not found in namespace {ns}"),
                    hint: sa_hint(ns, sa),
                },
                Err(_) => BuildError::Missing {
                    what: format!(
                        "ServiceAccount {sa} not found in namespace {ns} (or the namespace does not exist)"
                    ),
                    hint: sa_hint(ns, sa),
                },
            });
        }
        Err(e) if k8s::classify(&e) == ApiClass::Denied => progress.warn(&format!(
            "cannot check ServiceAccount {ns}/{sa} (forbidden); continuing"
        )),
        Err(e) => return Err(kube_err(format!("cannot read ServiceAccount {ns}/{sa}"))(e)),
    }

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let push = spec.push_secret.as_ref().map(|p| p.name.clone());
    for (flag, s) in [("--git-secret", &spec.git_secret), ("--push-secret", &push)] {
        let Some(s) = s else { continue };
        match secrets.get_metadata_opt(s).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                // A missing Secret volume leaves the pod in ContainerCreating
                // with no error the follower could report: say it now.
                let hint = if flag == "--push-secret" {
                    "`slipway pki ensure` makes registry-push in the registry's namespace; to \
                     build in another namespace copy it there (README, \"Pushing from another \
                     namespace\"), or pass --no-push-secret for a registry without slipway's \
                     gateway"
                } else {
                    "create it in the build namespace (see README, \"Build an image\")"
                };
                return Err(BuildError::Missing {
                    what: format!("Secret {s} ({flag}) not found in namespace {ns}"),
                    hint: hint.into(),
                });
            }
            Err(e) if k8s::classify(&e) == ApiClass::Denied => progress.warn(&format!(
                "cannot check Secret {ns}/{s} (forbidden); continuing"
            )),
            Err(e) => return Err(kube_err(format!("cannot read Secret {ns}/{s}"))(e)),
        }
    }

    let target = &spec.ca_configmap;
    match &plan.ca {
        CaSource::Pem(pem) => {
            ensure_ca(client, &spec.job_name(), ns, target, pem, None, progress).await
        }
        CaSource::Cluster {
            namespace: from_ns,
            name: from,
        } => {
            let cms_from: Api<ConfigMap> = Api::namespaced(client.clone(), from_ns);
            let source = cms_from
                .get_opt(from)
                .await
                .map_err(kube_err(format!("cannot read ConfigMap {from_ns}/{from}")))?;
            let pem = source
                .as_ref()
                .and_then(|c| c.data.as_ref())
                .and_then(|d| d.get(CA_KEY))
                .filter(|p| !p.trim().is_empty())
                .cloned();
            let Some(pem) = pem else {
                return Err(BuildError::Missing {
                    what: format!(
                        "ConfigMap {from_ns}/{from} with key {CA_KEY} (the registry CA) not found"
                    ),
                    hint: "it is published by slipway pki: install slipway (kubectl apply -k daemonset) and wait for job/slipway-pki, or pass --registry-ca-file".into(),
                });
            };
            if from_ns == ns && from == target {
                return Ok(());
            }
            ensure_ca(
                client,
                &spec.job_name(),
                ns,
                target,
                &pem,
                Some(&format!("{from_ns}/{from}")),
                progress,
            )
            .await
        }
    }
}

/// Makes the CA ConfigMap in the build namespace hold `pem` (a pod can only
/// mount a ConfigMap from its own namespace), through the PKI planner's
/// conditional writes: two builds that start together in a new namespace
/// race to create it, and the loser re-reads instead of failing (#12).
async fn ensure_ca<P: Progress>(
    client: &Client,
    job: &str,
    ns: &str,
    name: &str,
    pem: &str,
    copied_from: Option<&str>,
    progress: &mut P,
) -> Result<(), BuildError> {
    let annotations = job::copied_from_annotation(copied_from);
    let change = ensure_ca_configmap(client.clone(), ns, name, pem, &annotations)
        .await
        .map_err(|e| match e {
            EnsureError::Api {
                verb,
                namespace,
                name,
                error,
                ..
            } => BuildError::Kube {
                action: format!("cannot {verb} ConfigMap {namespace}/{name} (the registry CA)"),
                error,
            },
            other => BuildError::Failed {
                job: job.into(),
                detail: format!("cannot copy the registry CA: {other}"),
            },
        })?;
    match change {
        Change::Created(_) => progress.info(&format!(
            "copied the registry CA into ConfigMap {ns}/{name}"
        )),
        Change::Replaced(_) => {
            progress.info(&format!("updated the registry CA in ConfigMap {ns}/{name}"))
        }
        Change::Unchanged => {}
    }
    Ok(())
}

enum Followed {
    /// The Job must be deleted (it would otherwise wait for its deadline).
    Stuck(BuildError),
    Failed(BuildError),
}

enum Item {
    Pod(PodView),
    Deleted(PodView),
    /// Nothing happened for `Timing::quiet`.
    Quiet,
}

/// The build's pod, through a watch that is re-established from the last
/// resourceVersion whenever the server ends it.
struct PodWatch {
    api: Api<Pod>,
    wp: WatchParams,
    rv: String,
    stream: Option<BoxStream<'static, kube::Result<WatchEvent<Pod>>>>,
    pod: Option<String>,
    quiet: Duration,
    failures: u32,
}

impl PodWatch {
    fn new(api: Api<Pod>, selector: &str, quiet: Duration) -> Self {
        PodWatch {
            api,
            wp: WatchParams::default().labels(selector),
            rv: "0".into(),
            stream: None,
            pod: None,
            quiet,
            failures: 0,
        }
    }

    async fn next(&mut self) -> Result<Item, BuildError> {
        loop {
            match tokio::time::timeout(self.quiet, self.step()).await {
                Err(_) => return Ok(Item::Quiet),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Some(item))) => return Ok(item),
                Ok(Ok(None)) => {}
            }
        }
    }

    /// One event; `None` for one that is not about the build's pod.
    async fn step(&mut self) -> Result<Option<Item>, BuildError> {
        if self.stream.is_none() {
            let s = self
                .api
                .watch(&self.wp, &self.rv)
                .await
                .map_err(kube_err("cannot watch the build's pod"))?;
            self.stream = Some(s.boxed());
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        let ev = match stream.next().await {
            None => {
                // The server ends every watch (timeoutSeconds); resume.
                self.stream = None;
                return Ok(None);
            }
            Some(Err(e)) => {
                self.stream = None;
                self.failures += 1;
                if self.failures > 5 {
                    return Err(kube_err("lost the watch on the build's pod")(e));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(None);
            }
            Some(Ok(ev)) => ev,
        };
        let (pod, deleted) = match ev {
            WatchEvent::Added(p) | WatchEvent::Modified(p) => (p, false),
            WatchEvent::Deleted(p) => (p, true),
            WatchEvent::Bookmark(b) => {
                self.rv = b.metadata.resource_version;
                return Ok(None);
            }
            WatchEvent::Error(s) if s.code == 410 => {
                // Too old a resourceVersion: start over with the current state.
                self.rv = "0".into();
                self.stream = None;
                return Ok(None);
            }
            WatchEvent::Error(s) => {
                return Err(BuildError::Kube {
                    action: "watch on the build's pod failed".into(),
                    error: kube::Error::Api(s),
                })
            }
        };
        if let Some(rv) = &pod.metadata.resource_version {
            self.rv = rv.clone();
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        // backoffLimit 0: one pod per Job; ignore anything else.
        match &self.pod {
            None => self.pod = Some(name),
            Some(n) if *n != name => return Ok(None),
            Some(_) => {}
        }
        let view = PodView::from_pod(&pod);
        Ok(Some(if deleted {
            Item::Deleted(view)
        } else {
            Item::Pod(view)
        }))
    }
}

struct Follower<'a, P: Progress> {
    client: &'a Client,
    plan: &'a Plan,
    ctx: Context,
    created: &'a Job,
    timing: &'a Timing,
    progress: &'a mut P,
    watch: PodWatch,
    klog: KanikoLog,
    last_status: String,
    /// The pod as the last watch event showed it.
    last: Option<PodView>,
}

impl<P: Progress> Follower<'_, P> {
    fn status(&mut self, s: &str) {
        if s != self.last_status {
            self.progress.info(s);
            self.progress.status(s);
            self.last_status = s.to_string();
        }
    }

    /// Waits until `pred` holds for the pod; fails on the way if the pod
    /// fails.
    async fn wait_for(&mut self, pred: impl Fn(&PodView) -> bool) -> Result<PodView, Followed> {
        // The event a wait ended on may already satisfy the next one: a
        // real kubelet reports git terminated and Kaniko running in one
        // status update (#19). Waiting for another event then waited for
        // Kaniko's end, and its log came all at once.
        if let Some(v) = self.last.as_ref().filter(|v| pred(v)) {
            return Ok(v.clone());
        }
        loop {
            match self.watch.next().await.map_err(Followed::Failed)? {
                Item::Pod(v) => {
                    self.last = Some(v.clone());
                    if pred(&v) {
                        return Ok(v);
                    }
                    match status::assess(&v, &self.klog, &self.ctx) {
                        Verdict::Going(s) => self.status(&s),
                        Verdict::Stuck(e) => return Err(Followed::Stuck(e)),
                        Verdict::Failed(e) => return Err(Followed::Failed(self.deadline(e).await)),
                        Verdict::Built(_) => return Ok(v),
                    }
                }
                Item::Deleted(v) => {
                    let e = match status::assess(&v, &self.klog, &self.ctx) {
                        Verdict::Failed(e) | Verdict::Stuck(e) => e,
                        _ => BuildError::Failed {
                            job: self.ctx.job.clone(),
                            detail: format!("pod {} was deleted", v.name),
                        },
                    };
                    return Err(Followed::Failed(self.deadline(e).await));
                }
                Item::Quiet => {
                    if self.watch.pod.is_none() {
                        self.no_pod().await?;
                    }
                }
            }
        }
    }

    /// A generic failure may be the Job's deadline: the Job controller
    /// kills the pod (exit 137/143) and marks the Job.
    async fn deadline(&mut self, e: BuildError) -> BuildError {
        // A step that dies because its pod is being killed, or Kaniko itself
        // killed, looks like a failure of its own; the Job's condition tells.
        if !matches!(
            e,
            BuildError::Failed { .. } | BuildError::StepFailed { .. } | BuildError::Killed { .. }
        ) {
            return e;
        }
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.plan.spec.namespace);
        let hit = match jobs.get(&self.ctx.job).await {
            Ok(j) => status::job_deadline_exceeded(&j),
            Err(err) => {
                self.progress
                    .warn(&format!("cannot read job {}: {err}", self.ctx.job));
                false
            }
        };
        if hit {
            BuildError::DeadlineExceeded {
                job: self.ctx.job.clone(),
                timeout: self.ctx.timeout.clone(),
            }
        } else {
            e
        }
    }

    /// No pod yet: the Job controller may be failing to create it (its
    /// events say why: a missing ServiceAccount, a quota, Pod Security).
    async fn no_pod(&mut self) -> Result<(), Followed> {
        let ns = &self.plan.spec.namespace;
        let events: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let lp = ListParams::default().fields(&format!(
            "involvedObject.kind=Job,involvedObject.name={}",
            self.ctx.job
        ));
        match events.list(&lp).await {
            Ok(list) => {
                let failed = list
                    .items
                    .iter()
                    .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
                    .filter_map(|e| e.message.clone())
                    .next_back();
                if let Some(m) = failed {
                    let sa = &self.plan.spec.service_account;
                    return Err(Followed::Stuck(if m.contains("serviceaccount") {
                        BuildError::Missing {
                            what: format!("ServiceAccount {sa} not found in namespace {ns}"),
                            hint: format!("{}; the Job controller said: {m}", sa_hint(ns, sa)),
                        }
                    } else {
                        BuildError::Failed {
                            job: self.ctx.job.clone(),
                            detail: format!("the Job controller cannot create the pod: {m}"),
                        }
                    }));
                }
            }
            Err(e) => self.progress.warn(&format!(
                "cannot read the events of job {}: {e}",
                self.ctx.job
            )),
        }
        self.status("waiting for the Job controller to create the pod");
        Ok(())
    }

    async fn follow(mut self) -> Result<BuildReport, Followed> {
        let ns = self.plan.spec.namespace.clone();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);

        let v = self.wait_for(|v| v.git.started()).await?;
        self.status("git: fetching");
        stream_logs(
            &pods,
            &v.name,
            GIT_CONTAINER,
            self.timing,
            &mut *self.progress,
            None,
        )
        .await;

        let v = self.wait_for(|v| v.git.terminated()).await?;
        // Kaniko starts only after git succeeded. If it has already run
        // (a RUN that fails at once ends the pod between two watch events
        // on a real kubelet, #19), its verdict needs its log, read below:
        // judging the pod now, with no Kaniko log, named no step.
        if !v.kaniko.started() {
            match status::assess(&v, &KanikoLog::default(), &self.ctx) {
                Verdict::Failed(e) => return Err(Followed::Failed(self.deadline(e).await)),
                Verdict::Stuck(e) => return Err(Followed::Stuck(e)),
                _ => {}
            }
        }
        let git = match &v.git {
            CState::Terminated { message, .. } => status::git_ok(message),
            _ => None,
        };
        let Some(git) = git else {
            return Err(Followed::Failed(BuildError::Failed {
                job: self.ctx.job.clone(),
                detail: "the git container succeeded but did not report a commit".into(),
            }));
        };
        self.progress.info(&format!(
            "{} is commit {}",
            self.plan.spec.revision.as_str(),
            git.commit
        ));
        if !matches!(self.plan.spec.revision, job::Revision::Commit(_)) {
            let jobs: Api<Job> = Api::namespaced(self.client.clone(), &ns);
            let patch = serde_json::json!({
                "metadata": { "labels": { job::LABEL_COMMIT: git.commit } }
            });
            if let Err(e) = jobs
                .patch(
                    &self.ctx.job,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                self.progress.warn(&format!(
                    "cannot label job {} with the commit: {e}",
                    self.ctx.job
                ));
            }
        }

        let v = self.wait_for(|v| v.kaniko.started()).await?;
        self.status("kaniko: building");
        stream_logs(
            &pods,
            &v.name,
            KANIKO_CONTAINER,
            self.timing,
            &mut *self.progress,
            Some(&mut self.klog),
        )
        .await;

        let v = self.wait_for(|v| v.kaniko.terminated()).await?;
        let built = match status::assess(&v, &self.klog, &self.ctx) {
            Verdict::Built(b) => b,
            Verdict::Failed(e) => return Err(Followed::Failed(self.deadline(e).await)),
            Verdict::Stuck(e) => return Err(Followed::Stuck(e)),
            Verdict::Going(s) => {
                return Err(Followed::Failed(BuildError::Failed {
                    job: self.ctx.job.clone(),
                    detail: format!("kaniko ended but the pod is still {s}"),
                }))
            }
        };
        let finished = match &v.kaniko {
            CState::Terminated { finished_at, .. } => *finished_at,
            _ => None,
        };
        let created = self
            .created
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0);
        let duration_seconds = match (created, finished) {
            (Some(c), Some(f)) => f.duration_since(c).as_secs_f64().max(0.0),
            _ => 0.0,
        };
        let spec = &self.plan.spec;
        Ok(BuildReport {
            build: self.ctx.job.clone(),
            namespace: ns,
            image: built.image_ref,
            digest: built.digest,
            repository: spec.image(),
            tag: spec
                .tag
                .clone()
                .unwrap_or_else(|| git.commit.chars().take(7).collect()),
            commit: git.commit,
            revision: spec.revision.as_str().to_string(),
            duration_seconds,
            cache: CacheCounts {
                hits: self.klog.cache_hits,
                rebuilt: self.klog.rebuilt(),
                uploads_failed: self.klog.cache_upload_failures.len() as u32,
            },
            retries: self.klog.retries.clone(),
            warnings: self
                .klog
                .cache_upload_failures
                .iter()
                .map(cache_upload_warning)
                .collect(),
        })
    }
}

async fn follow<P: Progress>(
    client: &Client,
    plan: &Plan,
    created: &Job,
    opts: &RunOptions,
    started: Instant,
    progress: &mut P,
) -> Result<BuildReport, Followed> {
    let selector = format!("{LABEL_BUILD_ID}={}", plan.spec.build_id);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &plan.spec.namespace);
    let f = Follower {
        client,
        plan,
        ctx: Context::from_spec(&plan.spec, &plan.timeout),
        created,
        timing: &opts.timing,
        progress,
        watch: PodWatch::new(pods, &selector, opts.timing.quiet),
        klog: KanikoLog::default(),
        last_status: String::new(),
        last: None,
    };
    let mut r = f.follow().await;
    if let Ok(rep) = &mut r {
        if rep.duration_seconds == 0.0 {
            rep.duration_seconds = started.elapsed().as_secs_f64();
        }
    }
    r
}

fn waiting_to_start(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => {
            s.code == 400
                && (s.message.contains("waiting to start")
                    || s.message.contains("PodInitializing")
                    || s.message.contains("ContainerCreating"))
        }
        _ => false,
    }
}

/// Streams one container's log to `progress` (through the Kaniko parser if
/// given), retrying while the container has not started. Logs are shown
/// for the user; the result comes from the pod status, so a log that
/// cannot be read is a warning, not a failure.
async fn stream_logs<P: Progress>(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    timing: &Timing,
    progress: &mut P,
    mut klog: Option<&mut KanikoLog>,
) {
    let lp = LogParams {
        container: Some(container.into()),
        follow: true,
        ..Default::default()
    };
    let mut attempt = 0;
    let reader = loop {
        match pods.log_stream(pod, &lp).await {
            Ok(r) => break r,
            Err(e) if waiting_to_start(&e) && attempt < timing.log_retries => {
                attempt += 1;
                tokio::time::sleep(timing.log_retry).await;
            }
            Err(e) => {
                progress.warn(&format!(
                    "cannot read the {container} log of pod {pod}: {e}"
                ));
                return;
            }
        }
    };
    let mut lines = reader.lines();
    loop {
        match lines.try_next().await {
            Ok(Some(line)) => {
                progress.line(container, &line);
                if let Some(k) = klog.as_deref_mut() {
                    match k.feed(&line) {
                        Some(LogEvent::CacheUploadFailed(f)) => {
                            progress.warn(&cache_upload_warning(&f));
                            progress.status(&k.status());
                        }
                        Some(LogEvent::Retry(r)) => progress.warn(&retry_warning(&r)),
                        Some(_) => progress.status(&k.status()),
                        None => {}
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                progress.warn(&format!("the {container} log of pod {pod} broke off: {e}"));
                return;
            }
        }
    }
}

/// What the user reads about a cache layer Kaniko could not upload.
fn cache_upload_warning(f: &CacheUploadFailure) -> String {
    let mut s = "kaniko could not upload a layer to the cache (the build goes on; the next build rebuilds that step)".to_string();
    match (f.retries, f.seconds) {
        (0, None) => {}
        (r, Some(secs)) => s.push_str(&format!(", after {r} retries and {secs}s")),
        (r, None) => s.push_str(&format!(", after {r} retries")),
    }
    s.push_str(&format!(": Error uploading layer to cache: {}", f.detail));
    s
}

/// What the user reads about a retried registry request.
fn retry_warning(r: &Retry) -> String {
    format!(
        "kaniko is retrying {} ({}) in {}: {}",
        r.operation,
        if r.cache {
            "cache upload"
        } else {
            "image push"
        },
        r.after,
        r.cause
    )
}

/// `slipway builds`: every build Job in the namespace, oldest first.
pub async fn list_builds(
    client: Client,
    ns: &str,
    now: Timestamp,
) -> Result<Vec<BuildRow>, BuildError> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let lp = ListParams::default().labels(job::BUILD_SELECTOR);
    let js = jobs
        .list(&lp)
        .await
        .map_err(kube_err(format!("cannot list jobs in namespace {ns}")))?;
    let ps = pods
        .list(&lp)
        .await
        .map_err(kube_err(format!("cannot list pods in namespace {ns}")))?;
    let id = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.labels
            .as_ref()
            .and_then(|l| l.get(LABEL_BUILD_ID))
            .cloned()
    };
    let mut items = js.items;
    items.sort_by_key(|j| {
        (
            j.metadata.creation_timestamp.as_ref().map(|t| t.0),
            j.metadata.name.clone(),
        )
    });
    Ok(items
        .iter()
        .map(|j| {
            let pod = ps
                .items
                .iter()
                .filter(|p| id(&p.metadata).is_some() && id(&p.metadata) == id(&j.metadata))
                .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
            status::build_row(j, pod, now)
        })
        .collect())
}

/// `slipway logs BUILD`: the git and then the Kaniko log of a build, to
/// the end (following a running build).
pub async fn show_logs<W: Write>(
    client: Client,
    ns: &str,
    build: &str,
    timing: &Timing,
    out: &mut W,
) -> Result<(), BuildError> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let job = jobs
        .get_opt(build)
        .await
        .map_err(kube_err(format!("cannot read job {ns}/{build}")))?
        .ok_or_else(|| BuildError::Missing {
            what: format!("build {build} not found in namespace {ns}"),
            hint: "list builds with slipway builds (finished builds are deleted after their ttl)"
                .into(),
        })?;
    let id = job
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_BUILD_ID))
        .cloned()
        .ok_or_else(|| BuildError::Missing {
            what: format!("job {ns}/{build} is not a slipway build"),
            hint: "give a name from slipway builds".into(),
        })?;
    let lp = ListParams::default().labels(&format!("{LABEL_BUILD_ID}={id}"));
    let pod = pods
        .list(&lp)
        .await
        .map_err(kube_err(format!("cannot list the pods of build {build}")))?
        .items
        .into_iter()
        .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .ok_or_else(|| BuildError::Missing {
            what: format!("build {build} has no pod"),
            hint: "it has not started yet, or its pod was deleted".into(),
        })?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut printer = PlainProgress { w: &mut *out };
    let mut view = PodView::from_pod(&pod);
    for container in [GIT_CONTAINER, KANIKO_CONTAINER] {
        let state = |v: &PodView| {
            if container == GIT_CONTAINER {
                v.git.clone()
            } else {
                v.kaniko.clone()
            }
        };
        // A running build: wait for the container to start, unless the
        // pod is over.
        let mut waited = 0;
        while !state(&view).started()
            && !matches!(view.phase.as_str(), "Succeeded" | "Failed")
            && waited < timing.log_retries
        {
            tokio::time::sleep(timing.log_retry).await;
            waited += 1;
            let p = pods
                .get(&name)
                .await
                .map_err(kube_err(format!("cannot read pod {ns}/{name}")))?;
            view = PodView::from_pod(&p);
        }
        if !state(&view).started() {
            printer.info(&format!("{container} did not run"));
            continue;
        }
        stream_logs(&pods, &name, container, timing, &mut printer, None).await;
        if container == GIT_CONTAINER {
            let p = pods
                .get(&name)
                .await
                .map_err(kube_err(format!("cannot read pod {ns}/{name}")))?;
            view = PodView::from_pod(&p);
        }
    }
    printer.finish();
    Ok(())
}

/// `slipway build` from the command line: plan, then `--render` (no API
/// call) or a real build against the current kubeconfig context.
/// `interrupt` resolving (SIGINT or SIGTERM) cancels: the Job and its pod
/// are deleted.
pub async fn cli_build<I: Future<Output = ()>>(
    args: &BuildArgs,
    interrupt: I,
) -> Result<Outcome, BuildError> {
    let plan = args.plan()?;
    let mut stdout = std::io::stdout();
    if args.render {
        let yaml = job::render(&plan.spec, plan.render_ca())
            .map_err(|e| BuildError::Config(format!("cannot render the Job as YAML: {e}")))?;
        let _ = stdout
            .write_all(yaml.as_bytes())
            .and_then(|_| stdout.flush());
        return Ok(Outcome::Detached {
            build: plan.spec.job_name(),
            namespace: plan.spec.namespace.clone(),
        });
    }
    let client = Client::try_default().await.map_err(kube_err(
        "cannot connect to the cluster (kubeconfig or in-cluster config)",
    ))?;
    let opts = RunOptions {
        detach: args.detach,
        output: args.output,
        timing: Timing::default(),
    };

    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let mut p = BarProgress::new();
        run(client, &plan, &opts, interrupt, &mut stdout, &mut p).await
    } else {
        let mut p = PlainProgress {
            w: std::io::stderr(),
        };
        run(client, &plan, &opts, interrupt, &mut stdout, &mut p).await
    }
}

/// `slipway builds`.
pub async fn cli_builds(
    settings: &super::Settings,
    output: OutputFormat,
) -> Result<(), BuildError> {
    let ns = super::namespace(settings)?;
    let client = Client::try_default().await.map_err(kube_err(
        "cannot connect to the cluster (kubeconfig or in-cluster config)",
    ))?;
    let rows = list_builds(client, &ns, Timestamp::now()).await?;
    let mut stdout = std::io::stdout();
    let text = match output {
        OutputFormat::Json => serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n",
        OutputFormat::Text if rows.is_empty() => format!("no builds in namespace {ns}\n"),
        OutputFormat::Text => status::format_table(&rows),
    };
    let _ = stdout.write_all(text.as_bytes());
    Ok(())
}

/// `slipway logs BUILD`.
pub async fn cli_logs(settings: &super::Settings, build: &str) -> Result<(), BuildError> {
    let ns = super::namespace(settings)?;
    let client = Client::try_default().await.map_err(kube_err(
        "cannot connect to the cluster (kubeconfig or in-cluster config)",
    ))?;
    show_logs(
        client,
        &ns,
        build,
        &Timing::default(),
        &mut std::io::stdout(),
    )
    .await
}
