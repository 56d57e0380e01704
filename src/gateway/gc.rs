//! The gateway's half of `slipway gc` (#21): the write fence, the sweep of
//! distribution's storage, and the record of recent pulls.
//!
//! Endpoint: `POST /slipway/v1/gc` on the registry port (a write, so the
//! push account is required), body a [`GcRequest`], answer a [`GcReport`].
//! One collection runs at a time (`409` otherwise). The storage is
//! distribution's filesystem `rootdirectory` mounted into the gateway
//! (`gateway.storage_root`) or its S3 bucket (`gateway.s3_bucket`, #22);
//! without either it answers `501`. On a bucket, several replicas write,
//! so the fence is also shared through the bucket ([`super::shared`]).
//!
//! With `apply`: every write (any method but `GET`/`HEAD`, every mirror
//! request, since a fill writes, and every blob `HEAD`, which is how a
//! push asks whether to upload) is refused with `503`, `UNAVAILABLE` and
//! a `Retry-After` of the last sweep's length; those already relayed are
//! waited for ([`DRAIN_DEADLINE`]); the tree is read, planned and
//! pruned; then distribution is asked, over loopback, for what was
//! deleted. distribution 2.8 with `storage.cache.blobdescriptor: inmemory`
//! keeps answering `200` for deleted blobs until it restarts, and a push
//! then skips their upload and leaves a tag whose blobs are gone (#21,
//! reproduced with Debian's 2.8.2). If it does, writes stay refused, with
//! a message saying to restart the registry container, until distribution
//! answers `404` for all of them (checked every [`STALE_RECHECK`]). The
//! install runs distribution without that cache, so this does not arise.
//!
//! Blob checks: a blob `HEAD` answered `200` is recorded (in memory), and
//! a blob checked within `gc.min_age_secs` is kept: the push that asked
//! skips its upload and names it in the manifest it sends next, which
//! would otherwise fail with `MANIFEST_BLOB_UNKNOWN` after the sweep.
//!
//! Pulls: every `GET` of a manifest that succeeds is recorded as
//! (repository, digest, time): the nodes' agents relay every manifest
//! request to the registry (they cache blobs only), so this is the record
//! of what the agents pulled. It is kept in memory (at most
//! [`MAX_PULLS`] entries) and in `<storage_root>/slipway/pulls.json`
//! (on a bucket: `slipway/pulls/<gateway>.json`, one per gateway, all
//! read by the collection), written at most every [`PULLS_SAVE_EVERY`];
//! a node that is down removes nothing from it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{Method, Request, StatusCode, Uri};
use tracing::{error, info, warn};

use super::metrics::{GatewayMetrics, GcMode};
use super::shared::Shared;
use crate::gc::GcRequest;
use crate::idle::Idle;

/// How long the writes already relayed may take to finish once writes
/// are refused; past it the collection gives up and writes resume.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(120);
/// How often a distribution that still answers for deleted blobs is asked
/// again.
pub const STALE_RECHECK: Duration = Duration::from_secs(5);
/// Pull records kept in memory.
pub const MAX_PULLS: usize = 200_000;
/// Records older than this are dropped (longer than any sane
/// `gc.keep_pulled_days`).
const PULLS_MAX_AGE: u64 = 90 * 86_400;
pub const PULLS_SAVE_EVERY: Duration = Duration::from_secs(60);
pub const PULLS_SAVE_EVERY_BUCKET: Duration = Duration::from_secs(5);
/// The whole round of questions to distribution after a sweep.
const PROBE_DEADLINE: Duration = Duration::from_secs(60);
/// Deleted objects asked about after a sweep, at most.
const MAX_PROBES: usize = 4096;
/// The request body: 10,000 pods' references are well under 4 MiB.
pub const MAX_REQUEST: usize = 16 << 20;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The write fence. A writer counts itself in, then looks at the fence;
/// the collector raises the fence, then waits for the count to reach 0.
/// With both orders sequentially consistent, either the writer sees the
/// fence or the collector sees the writer.
#[derive(Default)]
pub struct Fence {
    raised: AtomicBool,
    /// Raised because distribution answers for deleted blobs.
    stale: AtomicBool,
    /// Raised by another gateway's collection on the same bucket.
    pub(super) remote: AtomicBool,
    /// On a bucket: the shared fence has not been read lately (or not yet).
    pub(super) unsure: AtomicBool,
    pub(super) writes: AtomicUsize,
    pub(super) retry_after: AtomicU64,
}

/// A write in flight; counted out when dropped.
pub struct WriteGuard<'a>(&'a Fence);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.0.writes.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a write is refused: the message and the `Retry-After` seconds.
pub struct Refused {
    pub message: String,
    pub retry_after: u64,
}

impl Fence {
    pub fn enter(&self) -> Result<WriteGuard<'_>, Refused> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let g = WriteGuard(self);
        if self.unsure.load(Ordering::SeqCst) {
            return Err(Refused {
                message: "the gateway cannot read the registry storage's shared garbage \
                          collection fence; retry after 5 s"
                    .into(),
                retry_after: 5,
            });
        }
        if self.raised.load(Ordering::SeqCst) || self.remote.load(Ordering::SeqCst) {
            let retry_after = self.retry_after.load(Ordering::Relaxed).max(1);
            let message = if self.stale.load(Ordering::SeqCst) {
                "registry garbage collection deleted blobs that distribution still answers for \
                 (its storage.cache.blobdescriptor is on): writes resume once the registry \
                 container has restarted"
                    .to_string()
            } else {
                format!("registry garbage collection in progress; retry after {retry_after} s")
            };
            return Err(Refused {
                message,
                retry_after,
            });
        }
        Ok(g)
    }

    fn raise(&self, retry_after: u64) {
        self.retry_after.store(retry_after, Ordering::Relaxed);
        self.raised.store(true, Ordering::SeqCst);
    }

    fn lower(&self) {
        self.stale.store(false, Ordering::SeqCst);
        self.raised.store(false, Ordering::SeqCst);
    }

    pub(super) async fn drained(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while self.writes.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// `(name, digest)` of a blob path `/v2/<name>/blobs/<digest>`.
pub fn blob_path(path: &str) -> Option<(&str, &str)> {
    let (name, digest) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
    (digest.starts_with("sha256:") && !name.is_empty()).then_some((name, digest))
}

/// Recent pulls or blob checks: (repository, digest) → Unix seconds.
#[derive(Default)]
struct Records {
    map: HashMap<(String, String), u64>,
    dirty: bool,
}

impl Records {
    fn record(&mut self, repo: &str, digest: &str, at: u64) {
        if self.map.len() >= MAX_PULLS && !self.map.contains_key(&(repo.into(), digest.into())) {
            // Full: drop the older half (by time); one pass per half-fill.
            let mut times: Vec<u64> = self.map.values().copied().collect();
            let mid = times.len() / 2;
            let (_, cut, _) = times.select_nth_unstable(mid);
            let cut = *cut;
            self.map.retain(|_, t| *t > cut);
        }
        self.map.insert((repo.to_string(), digest.to_string()), at);
        self.dirty = true;
    }
}

/// Where distribution's tree is.
pub enum Storage {
    /// No storage visible: `slipway gc` answers 501.
    None,
    /// `gateway.storage_root`: the filesystem `rootdirectory`.
    Filesystem(PathBuf),
    /// `gateway.s3_bucket`: the bucket, shared with the other replicas.
    Bucket(Arc<Shared>),
}

pub struct Collector {
    storage: Storage,
    upstream: String,
    pub fence: Fence,
    pulls: Mutex<Records>,
    /// Blob `HEAD`s answered `200` (kept in memory only: they matter for
    /// `gc.min_age_secs`).
    checked: Mutex<Records>,
    running: tokio::sync::Mutex<()>,
    metrics: Arc<GatewayMetrics>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Idle<http_body_util::Empty<bytes::Bytes>>,
    >,
}

impl Collector {
    pub fn new(storage: Storage, upstream: &str, metrics: Arc<GatewayMetrics>) -> Collector {
        let c = Collector {
            storage,
            upstream: upstream.to_string(),
            fence: Fence::default(),
            pulls: Mutex::new(Records::default()),
            checked: Mutex::new(Records::default()),
            running: tokio::sync::Mutex::new(()),
            metrics,
            client: super::relay::local_client(),
        };
        c.fence.retry_after.store(30, Ordering::Relaxed);
        if let Storage::Bucket(_) = c.storage {
            // Until the shared fence has been read once (#22).
            c.fence.unsure.store(true, Ordering::SeqCst);
        }
        c.load_pulls();
        c
    }

    /// The bucket's shared state, when the storage is a bucket.
    pub fn shared(&self) -> Option<Arc<Shared>> {
        match &self.storage {
            Storage::Bucket(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn pulls_file(&self) -> Option<PathBuf> {
        match &self.storage {
            Storage::Filesystem(root) => Some(root.join("slipway/pulls.json")),
            _ => None,
        }
    }

    /// The records to save, if they changed (marked saved).
    fn pulls_to_save(&self) -> Option<Vec<(String, String, u64)>> {
        let mut p = self.pulls.lock().expect("pulls lock");
        if !p.dirty {
            return None;
        }
        p.dirty = false;
        let since = now().saturating_sub(PULLS_MAX_AGE);
        p.map.retain(|_, t| *t >= since);
        Some(
            p.map
                .iter()
                .map(|((r, d), t)| (r.clone(), d.clone(), *t))
                .collect(),
        )
    }

    /// Save the pull records if they changed: to the file, or the bucket.
    pub async fn save_pulls_now(self: &Arc<Self>) {
        if let Storage::Bucket(s) = &self.storage {
            let Some(v) = self.pulls_to_save() else {
                return;
            };
            if let Err(e) = s.save_pulls(&v).await {
                warn!(error = %e, "gc: cannot store the pull records");
                self.pulls.lock().expect("pulls lock").dirty = true;
            }
            return;
        }
        let c = self.clone();
        let _ = tokio::task::spawn_blocking(move || c.save_pulls()).await;
    }

    fn load_pulls(&self) {
        let Some(f) = self.pulls_file() else { return };
        let Ok(bytes) = std::fs::read(&f) else { return };
        match serde_json::from_slice::<Vec<(String, String, u64)>>(&bytes) {
            Ok(v) => {
                let mut p = self.pulls.lock().expect("pulls lock");
                let since = now().saturating_sub(PULLS_MAX_AGE);
                for (r, d, t) in v.into_iter().filter(|(_, _, t)| *t >= since) {
                    p.map.insert((r, d), t);
                }
            }
            Err(e) => {
                warn!(file = %f.display(), error = %e, "gc: pull records do not parse; starting without them")
            }
        }
    }

    /// Write the pull records if they changed (the atomic write).
    pub fn save_pulls(&self) {
        let Some(f) = self.pulls_file() else { return };
        let Some(v) = self.pulls_to_save() else {
            return;
        };
        let bytes = serde_json::to_vec(&v).expect("records serialise");
        let r = f
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|_| crate::atomic::replace(&f, &bytes, 0o640));
        if let Err(e) = r {
            warn!(file = %f.display(), error = %e, "gc: cannot write the pull records");
            self.pulls.lock().expect("pulls lock").dirty = true;
        }
    }

    pub async fn save_loop(self: Arc<Self>) {
        // On a bucket the records are the other replicas' only view of
        // this one's pulls between collections (a dry run reads them):
        // one small PUT every few seconds while pulls happen.
        let every = match self.storage {
            Storage::Bucket(_) => PULLS_SAVE_EVERY_BUCKET,
            _ => PULLS_SAVE_EVERY,
        };
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.save_pulls_now().await;
        }
    }

    /// A manifest `GET` of `path` (`/v2/<name>/manifests/<ref>`, with the
    /// mirror's `ns`) answered with `digest`.
    pub fn record_pull(&self, path: &str, ns: Option<&str>, digest: &str) {
        let Some(name) = path
            .strip_prefix("/v2/")
            .and_then(|p| p.rsplit_once("/manifests/"))
            .map(|(n, _)| n)
        else {
            return;
        };
        let repo = match ns {
            Some(host) => format!("mirror/{host}/{name}"),
            None => name.to_string(),
        };
        self.pulls
            .lock()
            .expect("pulls lock")
            .record(&repo, digest, now());
    }

    /// A blob `HEAD` of `path` (`/v2/<name>/blobs/<digest>`) answered
    /// `200`: a push checking whether to upload it.
    pub fn record_check(&self, path: &str) {
        let Some((name, digest)) = blob_path(path) else {
            return;
        };
        self.checked
            .lock()
            .expect("checked lock")
            .record(name, digest, now());
    }

    pub(super) fn seen_now(&self) -> crate::gc::Seen {
        let list = |m: &Mutex<Records>| -> Vec<(String, String, u64)> {
            m.lock()
                .expect("records lock")
                .map
                .iter()
                .map(|((r, d), t)| (r.clone(), d.clone(), *t))
                .collect()
        };
        crate::gc::Seen {
            pulls: list(&self.pulls),
            checked: list(&self.checked),
        }
    }

    /// Whether distribution answers `200` for any of `paths`.
    async fn serves_any(&self, paths: &[String]) -> bool {
        let ask = async {
            for p in paths {
                let Ok(uri) = format!("http://{}{p}", self.upstream).parse::<Uri>() else {
                    continue;
                };
                let req = Request::builder()
                    .method(Method::HEAD)
                    .uri(uri)
                    .body(Idle::empty(Duration::from_secs(10)))
                    .expect("valid request");
                match tokio::time::timeout(Duration::from_secs(5), self.client.request(req)).await {
                    Ok(Ok(r)) if r.status() == StatusCode::NOT_FOUND => {}
                    // 200, another answer, or none: not known to be gone.
                    _ => return true,
                }
            }
            false
        };
        // A distribution that does not answer is not known to have let go
        // of the deleted blobs either: writes stay refused.
        tokio::time::timeout(PROBE_DEADLINE, ask)
            .await
            .unwrap_or(true)
    }

    /// Run one collection. The status and the JSON body of the answer.
    pub async fn run(self: &Arc<Self>, req: GcRequest) -> (StatusCode, Vec<u8>) {
        let err = |s: StatusCode, m: String| {
            (
                s,
                crate::proxy::route::Refusal {
                    status: s.as_u16(),
                    code: "UNAVAILABLE",
                    message: m,
                }
                .body()
                .into_bytes(),
            )
        };
        if let Storage::None = self.storage {
            return err(
                StatusCode::NOT_IMPLEMENTED,
                "neither gateway.storage_root nor gateway.s3_bucket is set: this gateway cannot \
                 see the registry's storage"
                    .into(),
            );
        }
        let Ok(_one) = self.running.try_lock() else {
            return err(
                StatusCode::CONFLICT,
                "a garbage collection is already running".into(),
            );
        };
        // A run now would end by lowering the fence that the last one
        // left raised for distribution's stale cache.
        if self.fence.stale.load(Ordering::SeqCst) {
            return err(
                StatusCode::SERVICE_UNAVAILABLE,
                "distribution still answers for blobs the last gc deleted: restart the registry container first"
                    .into(),
            );
        }
        let mode = if req.apply {
            GcMode::Apply
        } else {
            GcMode::DryRun
        };
        let started = Instant::now();
        if req.apply {
            self.fence
                .raise(self.fence.retry_after.load(Ordering::Relaxed));
            if !self.fence.drained(DRAIN_DEADLINE).await {
                self.fence.lower();
                self.metrics.gc_run(mode, false);
                return err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "writes still running {} s after they were refused; nothing deleted",
                        DRAIN_DEADLINE.as_secs()
                    ),
                );
            }
            info!("gc: writes refused and drained");
        }
        let mut seen = self.seen_now();
        // On a bucket, the other replicas' writes too, and their records
        // (#22).
        let mut hold = None;
        if let Storage::Bucket(shared) = &self.storage {
            if req.apply {
                let retry_after = self.fence.retry_after.load(Ordering::Relaxed);
                match shared
                    .hold(retry_after, DRAIN_DEADLINE + 2 * super::shared::POLL)
                    .await
                {
                    Ok((h, others)) => {
                        seen.pulls.extend(others.pulls);
                        seen.checked.extend(others.checked);
                        hold = Some(h);
                    }
                    Err(e) => {
                        self.fence.lower();
                        self.metrics.gc_run(mode, false);
                        error!(error = %crate::report(&e), "gc: the other gateways did not stop their writes; writes resume");
                        return err(StatusCode::SERVICE_UNAVAILABLE, crate::report(&e));
                    }
                }
            }
            match shared.load_pulls(PULLS_MAX_AGE, now(), req.apply).await {
                Ok(p) => seen.pulls.extend(p),
                Err(e) => {
                    if let Some(h) = hold.take() {
                        h.release().await;
                    }
                    self.fence.lower();
                    self.metrics.gc_run(mode, false);
                    return err(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "cannot read the stored pull records: {}; nothing deleted",
                            crate::report(&e)
                        ),
                    );
                }
            }
        }
        let req2 = req.clone();
        let result = match &self.storage {
            Storage::Filesystem(root) => {
                let r2 = root.clone();
                tokio::task::spawn_blocking(move || {
                    crate::gc::collect(&crate::gc::store::RealRegistryFs, &r2, &req2, seen, now())
                })
                .await
            }
            Storage::Bucket(shared) => {
                let fs = crate::gc::bucket::BucketRegistryFs::new(
                    shared.bucket.clone(),
                    tokio::runtime::Handle::current(),
                    hold.as_ref().map(|h| h.guard()),
                );
                tokio::task::spawn_blocking(move || {
                    crate::gc::collect(&fs, std::path::Path::new("/"), &req2, seen, now())
                })
                .await
            }
            Storage::None => unreachable!("answered 501 above"),
        };
        let (plan, mut report) = match result {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                if let Some(h) = hold.take() {
                    h.release().await;
                }
                self.fence.lower();
                self.metrics.gc_run(mode, false);
                error!(error = %crate::report(&e), "gc failed; writes resume");
                return err(StatusCode::INTERNAL_SERVER_ERROR, crate::report(&e));
            }
            Err(e) => {
                if let Some(h) = hold.take() {
                    h.release().await;
                }
                self.fence.lower();
                self.metrics.gc_run(mode, false);
                return err(StatusCode::INTERNAL_SERVER_ERROR, format!("gc task: {e}"));
            }
        };
        // The other replicas take writes again. This replica's own fence
        // stays up until its distribution is known to have let go of what
        // was deleted (below); the install runs every replica without
        // distribution's descriptor cache, which is what that guards.
        if let Some(h) = hold.take() {
            h.release().await;
        }
        if req.apply {
            // The blobs a push would skip: those of deleted layer links.
            // (Not manifests: a push sends its manifest whatever the
            // registry says it has.)
            let mut probes: Vec<String> = plan
                .delete_layer_links
                .iter()
                .map(|(r, d)| format!("/v2/{r}/blobs/{d}"))
                .collect();
            probes.truncate(MAX_PROBES);
            let took = started.elapsed();
            self.fence
                .retry_after
                .store(took.as_secs().clamp(5, 3600) + 5, Ordering::Relaxed);
            if self.serves_any(&probes).await {
                self.fence.stale.store(true, Ordering::SeqCst);
                self.metrics.gc_stale.set(1);
                error!(
                    "gc: distribution still answers for deleted blobs (storage.cache.blobdescriptor is on); writes stay refused until the registry container restarts"
                );
                let c = self.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(STALE_RECHECK).await;
                        if !c.serves_any(&probes).await {
                            c.fence.lower();
                            c.metrics.gc_stale.set(0);
                            info!("gc: distribution no longer answers for deleted blobs; writes resume");
                            return;
                        }
                    }
                });
                self.metrics.gc_run(mode, false);
                return err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "deleted, but distribution still answers for deleted blobs from its \
                     descriptor cache: restart the registry container; writes stay refused \
                     until then"
                        .into(),
                );
            }
            self.fence.lower();
        }
        report.seconds = started.elapsed().as_secs_f64();
        self.metrics.gc_report(&report);
        self.metrics.gc_run(mode, true);
        info!(
            applied = report.applied,
            bytes = report.total.bytes,
            blobs = report.total.blobs,
            manifests = report.total.manifests,
            tags = report.total.tags,
            seconds = report.seconds,
            "gc: {}",
            report.summary().lines().next().unwrap_or_default()
        );
        for (repo, f) in &report.repositories {
            info!(repository = %repo, bytes = f.bytes, blobs = f.blobs, manifests = f.manifests, tags = f.tags, applied = report.applied, "gc: repository");
        }
        (
            StatusCode::OK,
            serde_json::to_vec(&report).expect("report serialises"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_sees_the_fence_or_is_counted_before_it() {
        let f = Fence::default();
        let g = f.enter().ok().unwrap();
        f.raise(7);
        assert_eq!(
            f.writes.load(Ordering::SeqCst),
            1,
            "the collector waits for it"
        );
        let r = f.enter().err().unwrap();
        assert_eq!(r.retry_after, 7);
        assert!(r.message.contains("retry after 7 s"), "{}", r.message);
        assert_eq!(
            f.writes.load(Ordering::SeqCst),
            1,
            "a refused write is not counted"
        );
        drop(g);
        assert_eq!(f.writes.load(Ordering::SeqCst), 0);
        f.lower();
        assert!(f.enter().is_ok());
    }

    #[test]
    fn pull_records_are_bounded_and_name_the_mirror_repository() {
        let m = Arc::new(GatewayMetrics::new());
        let c = Collector::new(Storage::None, "127.0.0.1:1", m);
        c.record_pull("/v2/team/app/manifests/v1", None, "sha256:aa");
        c.record_pull(
            "/v2/library/alpine/manifests/3.19",
            Some("docker.io"),
            "sha256:bb",
        );
        c.record_pull("/v2/team/app/blobs/sha256:cc", None, "sha256:cc");
        c.record_check("/v2/team/app/blobs/sha256:dd");
        c.record_check("/v2/team/app/manifests/sha256:ee");
        let checked: Vec<_> = c
            .seen_now()
            .checked
            .into_iter()
            .map(|(r, d, _)| (r, d))
            .collect();
        assert_eq!(checked, [("team/app".to_string(), "sha256:dd".to_string())]);
        let mut v: Vec<_> = c
            .seen_now()
            .pulls
            .into_iter()
            .map(|(r, d, _)| (r, d))
            .collect();
        v.sort();
        assert_eq!(
            v,
            [
                ("mirror/docker.io/library/alpine".into(), "sha256:bb".into()),
                ("team/app".to_string(), "sha256:aa".to_string())
            ]
        );
        let mut p = Records::default();
        for i in 0..MAX_PULLS as u64 + 10 {
            p.record("r", &format!("sha256:{i}"), i);
        }
        assert!(p.map.len() <= MAX_PULLS / 2 + 11, "{}", p.map.len());
        assert!(p
            .map
            .contains_key(&("r".into(), format!("sha256:{}", MAX_PULLS + 9))));
    }
}
