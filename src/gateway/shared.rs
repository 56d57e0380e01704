//! The write fence shared by every gateway of a registry whose storage is
//! an S3 bucket (#22). With N replicas a push's requests reach any of
//! them, so the collector that sweeps the bucket must know that no
//! replica is writing, not only itself. The replicas meet in the bucket,
//! next to distribution's tree (which never reads `slipway/`):
//!
//! | key (under `rootdirectory`) | written by | holds |
//! |-----|-----|-----|
//! | `slipway/gateways/<id>` | each gateway, every [`HEARTBEAT_EVERY`] | that it is alive (its `Last-Modified`) |
//! | `slipway/fence` | the collector, renewed every [`FENCE_RENEW`] | the run that asks for writes to stop |
//! | `slipway/fence-acks/<run>/<id>` | each gateway | that its writes stopped, and its blob checks and pulls |
//! | `slipway/pulls/<id>.json` | each gateway, at most every minute | its pull records, kept across restarts |
//!
//! **A gateway** ([`member_loop`]) writes its heartbeat, then reads the
//! fence, every [`POLL`]. When the fence names another gateway's run it
//! refuses writes as it does for its own collections (503, `Retry-After`),
//! waits until the writes it relayed have finished, and writes its ack.
//! When the fence is gone it takes writes again. It refuses writes from
//! its start until its first heartbeat and fence read have succeeded, and
//! whenever neither has for [`UNSURE_AFTER`]: a gateway that cannot see
//! the fence must not write behind it.
//!
//! **The collector** ([`Shared::hold`]) writes the fence, then waits for
//! an ack from every gateway whose heartbeat is younger than
//! [`MEMBER_TTL`] ([`members`]: by `Last-Modified`, the store's clock, so
//! pods' clocks do not matter), listing the heartbeats again each time: a
//! gateway that starts meanwhile wrote its heartbeat after the fence, so
//! its first read sees the fence and it acks too; one that dies meanwhile
//! ages out. A gateway that stops removes its heartbeat once its relay
//! has stopped ([`Shared::leave`]). A gateway that does not ack in time
//! fails the run before anything is deleted.
//!
//! **The lease.** A fence whose content (ETag) has not changed for
//! [`FENCE_LEASE`] is abandoned (its collector died) and ignored. The
//! collector renews it every [`FENCE_RENEW`], and deletes nothing once its
//! last renewal is older than [`HOLD_LIMIT`], well inside the lease.
//!
//! Limit: a gateway cut off from the bucket for longer than
//! [`MEMBER_TTL`] is no longer waited for; it refuses new writes after
//! [`UNSURE_AFTER`], but a write it was already relaying then is not seen.
//! distribution in the same pod is cut off from the same bucket.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::gc::Collector;
use crate::gc::bucket::Guard;
use crate::gc::Seen;
use crate::s3::bucket::{Bucket, BucketError};

pub const POLL: Duration = Duration::from_secs(2);
/// How often a gateway waiting to ack looks at its writes.
const ACK_POLL: Duration = Duration::from_millis(250);
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// A heartbeat older than this (seconds, store clock) is a gateway gone.
pub const MEMBER_TTL: u64 = 40;
pub const FENCE_LEASE: Duration = Duration::from_secs(60);
pub const FENCE_RENEW: Duration = Duration::from_secs(10);
/// The collector deletes only this soon after a renewal that succeeded.
pub const HOLD_LIMIT: Duration = Duration::from_secs(30);
pub const UNSURE_AFTER: Duration = Duration::from_secs(15);
/// Heartbeats this old are removed by the next collection.
const MEMBER_FORGET: u64 = 86_400;
/// An ack or pull record file, at most (200,000 records of ~150 bytes).
const MAX_DOC: usize = 64 << 20;
/// Keys under one `slipway/` prefix, at most.
const MAX_LIST: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error("bucket {bucket}: {key} does not parse: {source}")]
    Doc {
        bucket: String,
        key: String,
        source: serde_json::Error,
    },
    #[error(
        "gateway {id} did not stop its writes within {secs} s of the fence in bucket {bucket}; nothing deleted"
    )]
    NoAck {
        bucket: String,
        id: String,
        secs: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct FenceDoc {
    run: String,
    by: String,
    retry_after: u64,
    /// Changed by each renewal, so the ETag changes.
    seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Ack {
    run: String,
    id: String,
    seen: Seen,
}

/// This gateway's place in the bucket.
pub struct Shared {
    pub bucket: Arc<Bucket>,
    /// Unique per process: `<hostname>-<random>`.
    pub id: String,
    /// The run this gateway's own collection holds the fence for.
    own_run: Mutex<Option<String>>,
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system random source");
    hex::encode(b)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "gateway".into())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect()
}

impl Shared {
    pub fn new(bucket: Arc<Bucket>) -> Shared {
        Shared {
            bucket,
            id: format!("{}-{}", hostname(), random_hex(4)),
            own_run: Mutex::new(None),
        }
    }

    fn k(&self, rel: &str) -> String {
        self.bucket.key(&format!("slipway/{rel}"))
    }

    fn doc<T: serde::de::DeserializeOwned>(&self, key: &str, b: &[u8]) -> Result<T, SharedError> {
        serde_json::from_slice(b).map_err(|source| SharedError::Doc {
            bucket: self.bucket.name().to_string(),
            key: key.to_string(),
            source,
        })
    }

    async fn beat(&self) -> Result<(), SharedError> {
        let body = serde_json::json!({ "id": self.id }).to_string();
        self.bucket
            .put(&self.k(&format!("gateways/{}", self.id)), Bytes::from(body))
            .await?;
        Ok(())
    }

    /// The fence and its ETag, if there is one.
    async fn read_fence(&self) -> Result<Option<(FenceDoc, String)>, SharedError> {
        let key = self.k("fence");
        match self.bucket.get_tagged(&key, 4096).await? {
            None => Ok(None),
            // Not a fence this gateway wrote (those are ~150 bytes): a
            // fence all the same.
            Some((None, etag)) => Ok(Some((
                FenceDoc {
                    run: format!("unreadable-{etag}"),
                    by: "unknown".into(),
                    retry_after: 30,
                    seq: 0,
                },
                etag,
            ))),
            Some((Some(b), etag)) => Ok(Some((self.doc(&key, &b)?, etag))),
        }
    }

    /// Store this gateway's pull records.
    pub async fn save_pulls(&self, records: &[(String, String, u64)]) -> Result<(), SharedError> {
        let body = serde_json::to_vec(records).expect("records serialise");
        self.bucket
            .put(
                &self.k(&format!("pulls/{}.json", self.id)),
                Bytes::from(body),
            )
            .await?;
        Ok(())
    }

    /// Every gateway's stored pull records (those of gateways gone
    /// included: a pull is a pull). Files untouched for `max_age` seconds
    /// are skipped, and with `prune` (an apply; a dry run writes nothing)
    /// removed.
    pub async fn load_pulls(
        &self,
        max_age: u64,
        now: u64,
        prune: bool,
    ) -> Result<Vec<(String, String, u64)>, SharedError> {
        let l = self.bucket.list(&self.k("pulls/"), false, MAX_LIST).await?;
        let mut out = Vec::new();
        for o in l.objects {
            if o.modified + max_age < now {
                if prune {
                    self.bucket.delete(&o.key).await?;
                }
                continue;
            }
            if let Some(b) = self.bucket.get(&o.key, MAX_DOC).await? {
                out.extend(self.doc::<Vec<(String, String, u64)>>(&o.key, &b)?);
            }
        }
        Ok(out)
    }

    /// Stop every gateway's writes for a collection: write the fence, wait
    /// for every live gateway's ack (at most `deadline`), and return the
    /// hold with what the others saw. The caller has fenced and drained
    /// its own writes.
    pub async fn hold(
        self: &Arc<Self>,
        retry_after: u64,
        deadline: Duration,
    ) -> Result<(Hold, Seen), SharedError> {
        let run = random_hex(8);
        *self.own_run.lock().expect("run lock") = Some(run.clone());
        let renewed = Arc::new(Mutex::new(Instant::now()));
        let doc = FenceDoc {
            run: run.clone(),
            by: self.id.clone(),
            retry_after,
            seq: 0,
        };
        let fence_key = self.k("fence");
        let first = self
            .bucket
            .put(
                &fence_key,
                Bytes::from(serde_json::to_vec(&doc).expect("fence serialises")),
            )
            .await;
        let (s, r, mut d) = (self.clone(), renewed.clone(), doc.clone());
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(FENCE_RENEW).await;
                d.seq += 1;
                let body = Bytes::from(serde_json::to_vec(&d).expect("fence serialises"));
                match s.bucket.put(&s.k("fence"), body).await {
                    Ok(()) => *r.lock().expect("renew lock") = Instant::now(),
                    Err(e) => warn!(error = %e, "gc: cannot renew the shared fence"),
                }
            }
        });
        let hold = Hold {
            shared: self.clone(),
            run: run.clone(),
            renewed,
            renew,
        };
        if let Err(e) = first {
            hold.release().await;
            return Err(e.into());
        }
        match self.gather(&run, deadline).await {
            Ok(seen) => Ok((hold, seen)),
            Err(e) => {
                hold.release().await;
                Err(e)
            }
        }
    }

    /// The heartbeats: `(gateway id, Last-Modified)`, and the keys of
    /// those forgotten (older than [`MEMBER_FORGET`] at `at`).
    async fn beats(&self, at: u64) -> Result<(Vec<(String, u64)>, Vec<String>), SharedError> {
        let prefix = self.k("gateways/");
        let l = self.bucket.list(&prefix, false, MAX_LIST).await?;
        let (mut beats, mut old) = (Vec::new(), Vec::new());
        for o in l.objects {
            if o.modified + MEMBER_FORGET < at {
                old.push(o.key);
            } else {
                beats.push((o.key[prefix.len()..].to_string(), o.modified));
            }
        }
        Ok((beats, old))
    }

    async fn gather(&self, run: &str, deadline: Duration) -> Result<Seen, SharedError> {
        let fence_key = self.k("fence");
        let at = match self.bucket.head(&fence_key).await? {
            Some(h) => h.modified,
            None => 0,
        };
        let (beats, old) = self.beats(at).await?;
        for k in old {
            self.bucket.delete(&k).await?;
        }
        info!(
            run,
            gateways = members(&beats, &self.id, at).len(),
            "gc: shared fence written; waiting for the other gateways"
        );
        let acks = self.k(&format!("fence-acks/{run}/"));
        let until = Instant::now() + deadline;
        let mut seen = Seen::default();
        let mut have: Vec<String> = Vec::new();
        loop {
            // Asked again each time: a gateway that started since must
            // ack too, and one that died since (its heartbeat stops) is
            // not waited for once it is older than MEMBER_TTL.
            let (beats, _) = self.beats(at).await?;
            let members = members(&beats, &self.id, at);
            let l = self.bucket.list(&acks, false, MAX_LIST).await?;
            for o in l.objects {
                let id = o.key[acks.len()..].to_string();
                if have.contains(&id) {
                    continue;
                }
                if let Some(b) = self.bucket.get(&o.key, MAX_DOC).await? {
                    let a: Ack = self.doc(&o.key, &b)?;
                    if a.run == run {
                        seen.pulls.extend(a.seen.pulls);
                        seen.checked.extend(a.seen.checked);
                        have.push(id);
                    }
                }
            }
            let missing: Vec<&String> = members.iter().filter(|m| !have.contains(m)).collect();
            let Some(first) = missing.first() else {
                info!(
                    run,
                    acks = have.len(),
                    "gc: every gateway stopped its writes"
                );
                return Ok(seen);
            };
            if Instant::now() >= until {
                return Err(SharedError::NoAck {
                    bucket: self.bucket.name().to_string(),
                    id: first.to_string(),
                    secs: deadline.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Leave: remove the heartbeat, so that no collection waits for this
    /// gateway. Only once its relay has stopped (no write in flight).
    pub async fn leave(&self) {
        let key = self.k(&format!("gateways/{}", self.id));
        match tokio::time::timeout(Duration::from_secs(5), self.bucket.delete(&key)).await {
            Ok(Ok(())) => info!("gateway: heartbeat removed from the bucket"),
            Ok(Err(e)) => {
                warn!(error = %e, "gateway: cannot remove the heartbeat; collections wait for it to age")
            }
            Err(_) => {
                warn!("gateway: no answer removing the heartbeat; collections wait for it to age")
            }
        }
    }
}

/// The gateways a collection waits for: every heartbeat but `own`'s
/// younger than [`MEMBER_TTL`], by the store's clock: the newer of the
/// fence's time `at` and the newest heartbeat (live gateways beat every
/// [`HEARTBEAT_EVERY`], so the newest is the store's time within that).
pub(super) fn members(beats: &[(String, u64)], own: &str, at: u64) -> Vec<String> {
    let now = beats.iter().map(|(_, t)| *t).max().unwrap_or(0).max(at);
    beats
        .iter()
        .filter(|(id, t)| id != own && t + MEMBER_TTL >= now)
        .map(|(id, _)| id.clone())
        .collect()
}

/// The fence held for one collection; [`Hold::release`] removes it.
pub struct Hold {
    shared: Arc<Shared>,
    run: String,
    renewed: Arc<Mutex<Instant>>,
    renew: tokio::task::JoinHandle<()>,
}

impl Drop for Hold {
    // Never a fence renewed with no collection behind it: without
    // `release`, it then ends with its lease.
    fn drop(&mut self) {
        self.renew.abort();
    }
}

impl Hold {
    /// For the sweep: an error once the lease is no longer surely held.
    pub fn guard(&self) -> Guard {
        let renewed = self.renewed.clone();
        let bucket = self.shared.bucket.name().to_string();
        Arc::new(move || {
            let age = renewed.lock().expect("renew lock").elapsed();
            if age > HOLD_LIMIT {
                return Err(std::io::Error::other(format!(
                    "the shared fence in bucket {bucket} was last renewed {} s ago; \
                     the other gateways may take writes again, so the sweep stops",
                    age.as_secs()
                )));
            }
            Ok(())
        })
    }

    /// Remove the fence and the acks: the other gateways take writes
    /// within [`POLL`]. Failures are logged; the lease ends the fence
    /// anyway.
    pub async fn release(self) {
        self.renew.abort();
        let s = &self.shared;
        if let Err(e) = s.bucket.delete(&s.k("fence")).await {
            warn!(error = %e, "gc: cannot remove the shared fence; the other gateways take writes again when its lease ends");
        }
        let acks = s.k(&format!("fence-acks/{}/", self.run));
        match s.bucket.list(&acks, false, MAX_LIST).await {
            Ok(l) => {
                for o in l.objects {
                    if let Err(e) = s.bucket.delete(&o.key).await {
                        warn!(error = %e, "gc: cannot remove an ack");
                    }
                }
            }
            Err(e) => warn!(error = %e, "gc: cannot list the acks"),
        }
        *s.own_run.lock().expect("run lock") = None;
    }
}

/// What a gateway does about the fence after one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Another gateway's collection: refuse writes (this `Retry-After`);
    /// `ack` is the run to ack once the writes in flight are done, if not
    /// acked yet.
    Fenced {
        retry_after: u64,
        ack: Option<String>,
    },
    /// No fence, an abandoned one, or this gateway's own: take writes.
    Open { abandoned: bool },
    /// The round failed; `unsure` once rounds have failed for
    /// [`UNSURE_AFTER`] (or none has succeeded yet).
    Failed { unsure: bool },
}

/// The pure core of [`member_loop`]: what the rounds have shown so far.
#[derive(Debug, Default)]
pub(super) struct Watch {
    last_ok: Option<Instant>,
    /// The fence's ETag and when this gateway first saw it.
    etag: Option<(String, Instant)>,
    acked: Option<String>,
}

impl Watch {
    /// One round's outcome: the fence read (`Err` if the heartbeat or the
    /// read failed), with `own` the run of this gateway's own collection.
    pub(super) fn round(
        &mut self,
        read: Result<Option<(&FenceDoc, &str)>, ()>,
        own: Option<&str>,
        now: Instant,
    ) -> Verdict {
        let fence = match read {
            Ok(f) => {
                self.last_ok = Some(now);
                f
            }
            Err(()) => {
                let unsure = self
                    .last_ok
                    .is_none_or(|t| now.saturating_duration_since(t) > UNSURE_AFTER);
                return Verdict::Failed { unsure };
            }
        };
        let Some((doc, etag)) = fence else {
            self.etag = None;
            return Verdict::Open { abandoned: false };
        };
        if Some(doc.run.as_str()) == own {
            return Verdict::Open { abandoned: false };
        }
        let since = match &self.etag {
            Some((e, t)) if e == etag => *t,
            _ => {
                self.etag = Some((etag.to_string(), now));
                now
            }
        };
        // A collector renews its fence (a new ETag) every FENCE_RENEW; one
        // unchanged for the lease is one whose collector is gone.
        if now.saturating_duration_since(since) > FENCE_LEASE {
            return Verdict::Open { abandoned: true };
        }
        let ack = (self.acked.as_deref() != Some(doc.run.as_str())).then(|| doc.run.clone());
        Verdict::Fenced {
            retry_after: doc.retry_after.max(1),
            ack,
        }
    }

    /// The ack for `run` is written.
    pub(super) fn acked(&mut self, run: &str) {
        self.acked = Some(run.to_string());
    }
}

/// A gateway's part: heartbeat, watch the fence, stop writes and ack.
/// `readable` gets whether writes are taken as far as the fence goes
/// (for `/readyz`), at each change.
pub async fn member_loop(
    shared: Arc<Shared>,
    c: Arc<Collector>,
    readable: impl Fn(Result<(), String>) + Send + 'static,
) {
    let mut watch = Watch::default();
    let mut last_beat: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    loop {
        let mut wait = POLL;
        let round = async {
            if last_beat.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY) {
                shared.beat().await?;
                last_beat = Some(Instant::now());
            }
            shared.read_fence().await
        }
        .await;
        let own = shared.own_run.lock().expect("run lock").clone();
        let read = match &round {
            Ok(f) => Ok(f.as_ref().map(|(d, e)| (d, e.as_str()))),
            Err(_) => Err(()),
        };
        let verdict = watch.round(read, own.as_deref(), Instant::now());
        if round.is_ok()
            && (last_error.take().is_some() || c.fence.unsure.swap(false, Ordering::SeqCst))
        {
            info!(
                bucket = shared.bucket.name(),
                "gateway: the shared fence is readable; writes are taken"
            );
            readable(Ok(()));
        }
        let by = match &round {
            Ok(Some((doc, _))) => format!("run {} of {}", doc.run, doc.by),
            _ => String::new(),
        };
        match verdict {
            Verdict::Open { abandoned } => {
                if c.fence.remote.swap(false, Ordering::SeqCst) {
                    if abandoned {
                        warn!("gateway: the shared fence ({by}) was not renewed for {} s: its collector is gone; writes are taken again", FENCE_LEASE.as_secs());
                    } else {
                        info!("gateway: garbage collection on another gateway finished; writes are taken");
                    }
                }
            }
            Verdict::Fenced { retry_after, ack } => {
                c.fence.retry_after.store(retry_after, Ordering::Relaxed);
                if !c.fence.remote.swap(true, Ordering::SeqCst) {
                    info!("gateway: writes refused: garbage collection on another gateway ({by})");
                }
                if let Some(run) = ack {
                    // The fence is up (SeqCst, as in Fence::enter): a write
                    // either saw it or is counted here.
                    if c.fence.writes.load(Ordering::SeqCst) == 0 {
                        let a = Ack {
                            run: run.clone(),
                            id: shared.id.clone(),
                            seen: c.seen_now(),
                        };
                        let key = shared.k(&format!("fence-acks/{run}/{}", shared.id));
                        let body = serde_json::to_vec(&a).expect("ack serialises");
                        match shared.bucket.put(&key, Bytes::from(body)).await {
                            Ok(()) => watch.acked(&run),
                            Err(e) => warn!(error = %e, "gateway: cannot write the ack"),
                        }
                    }
                    wait = ACK_POLL;
                }
            }
            Verdict::Failed { unsure } => {
                let msg = match &round {
                    Err(e) => e.to_string(),
                    Ok(_) => String::new(),
                };
                if last_error.as_deref() != Some(&msg) {
                    warn!(error = %msg, "gateway: cannot read the shared fence");
                    last_error = Some(msg.clone());
                }
                if unsure && !c.fence.unsure.swap(true, Ordering::SeqCst) {
                    warn!(
                        "gateway: the shared fence unread for {} s; writes refused until it is",
                        UNSURE_AFTER.as_secs()
                    );
                    readable(Err(format!(
                        "the shared fence in bucket {} was not read for {} s: {msg}",
                        shared.bucket.name(),
                        UNSURE_AFTER.as_secs()
                    )));
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(run: &str) -> FenceDoc {
        FenceDoc {
            run: run.into(),
            by: "gw-a".into(),
            retry_after: 0,
            seq: 0,
        }
    }

    #[test]
    fn a_fence_is_obeyed_acked_once_and_lifted_when_gone() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        assert_eq!(
            w.round(Ok(None), None, t0),
            Verdict::Open { abandoned: false }
        );
        let f = fence("r1");
        let v = w.round(Ok(Some((&f, "e1"))), None, t0 + POLL);
        assert_eq!(
            v,
            Verdict::Fenced {
                retry_after: 1,
                ack: Some("r1".into())
            }
        );
        w.acked("r1");
        // Renewed (a new ETag): still fenced, no second ack.
        let v = w.round(Ok(Some((&f, "e2"))), None, t0 + 2 * POLL);
        assert_eq!(
            v,
            Verdict::Fenced {
                retry_after: 1,
                ack: None
            }
        );
        assert_eq!(
            w.round(Ok(None), None, t0 + 3 * POLL),
            Verdict::Open { abandoned: false }
        );
        // A new run is acked again.
        let g = fence("r2");
        assert!(matches!(
            w.round(Ok(Some((&g, "e3"))), None, t0 + 4 * POLL),
            Verdict::Fenced { ack: Some(r), .. } if r == "r2"
        ));
    }

    #[test]
    fn a_fence_not_renewed_for_the_lease_is_abandoned() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        let f = fence("r1");
        assert!(matches!(
            w.round(Ok(Some((&f, "e1"))), None, t0),
            Verdict::Fenced { .. }
        ));
        // Renewals keep it: the lease counts from the last new ETag.
        let later = t0 + FENCE_LEASE - Duration::from_secs(1);
        assert!(matches!(
            w.round(Ok(Some((&f, "e2"))), None, later),
            Verdict::Fenced { .. }
        ));
        assert!(matches!(
            w.round(
                Ok(Some((&f, "e2"))),
                None,
                later + FENCE_LEASE - Duration::from_secs(1)
            ),
            Verdict::Fenced { .. }
        ));
        assert_eq!(
            w.round(
                Ok(Some((&f, "e2"))),
                None,
                later + FENCE_LEASE + Duration::from_secs(1)
            ),
            Verdict::Open { abandoned: true }
        );
    }

    #[test]
    fn its_own_fence_does_not_stop_the_collector() {
        let mut w = Watch::default();
        let f = fence("mine");
        assert_eq!(
            w.round(Ok(Some((&f, "e1"))), Some("mine"), Instant::now()),
            Verdict::Open { abandoned: false }
        );
    }

    #[test]
    fn writes_are_refused_until_the_first_read_and_after_failing_reads() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        // Never read: unsure at once.
        assert_eq!(w.round(Err(()), None, t0), Verdict::Failed { unsure: true });
        assert_eq!(
            w.round(Ok(None), None, t0),
            Verdict::Open { abandoned: false }
        );
        // Failures shorter than UNSURE_AFTER are ridden out.
        assert_eq!(
            w.round(Err(()), None, t0 + UNSURE_AFTER - Duration::from_secs(1)),
            Verdict::Failed { unsure: false }
        );
        assert_eq!(
            w.round(Err(()), None, t0 + UNSURE_AFTER + Duration::from_secs(1)),
            Verdict::Failed { unsure: true }
        );
    }

    #[test]
    fn the_collector_waits_for_live_gateways_only() {
        let beats = vec![
            ("me".to_string(), 1000),
            ("b".to_string(), 995),
            // Died 45 s ago (a SIGKILL; a graceful stop removes its beat).
            ("c".to_string(), 955),
            // Started after the fence.
            ("d".to_string(), 1012),
        ];
        assert_eq!(members(&beats, "me", 1000), ["b", "d"]);
        // Later: b's beats stopped too.
        let later: Vec<(String, u64)> = vec![("b".to_string(), 995), ("d".to_string(), 1042)];
        assert_eq!(members(&later, "me", 1000), ["d"]);
        // A gateway that cannot beat any more is not waited for beyond
        // MEMBER_TTL, and refuses writes well before (UNSURE_AFTER plus a
        // beat and a round).
        assert!(UNSURE_AFTER + HEARTBEAT_EVERY + POLL < Duration::from_secs(MEMBER_TTL));
    }
}
