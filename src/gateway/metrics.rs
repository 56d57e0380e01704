//! The gateway's Prometheus/OpenMetrics metrics (prometheus-client), served
//! on `gateway.admin_listen` `/metrics` by [`crate::admin::serve`].
//!
//! Owns every `slipway_gateway_*` series: requests by method class and
//! guard outcome (#10: a refused push is counted, never logged with its
//! password), relayed bytes, upstream failures, certificate reloads and
//! the served certificate's expiry.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::guard::{MethodClass, Outcome};
use crate::admin::metrics::FGauge;

impl EncodeLabelValue for MethodClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub class: MethodClass,
    pub result: Outcome,
}

/// Whether a certificate reload took the new files.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reload {
    Applied,
    Rejected,
}

impl EncodeLabelValue for Reload {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(
            encoder,
            match self {
                Reload::Applied => "applied",
                Reload::Rejected => "rejected",
            },
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: Reload,
}

/// What a mirror request was for (#20).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum MirrorKind {
    Tag,
    Manifest,
    Blob,
}

impl MirrorKind {
    pub const ALL: [MirrorKind; 3] = [MirrorKind::Tag, MirrorKind::Manifest, MirrorKind::Blob];
}

impl EncodeLabelValue for MirrorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(
            encoder,
            match self {
                MirrorKind::Tag => "tag",
                MirrorKind::Manifest => "manifest",
                MirrorKind::Blob => "blob",
            },
        )
    }
}

/// `upstream` is a configured `mirror.registries` entry: a closed set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub upstream: String,
    pub kind: MirrorKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

/// `status` is the HTTP status upstream answered, or `unreachable`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamStatusLabels {
    pub upstream: String,
    pub status: String,
}

/// A garbage collection's mode (#21).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum GcMode {
    DryRun,
    Apply,
}

impl EncodeLabelValue for GcMode {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(
            encoder,
            match self {
                GcMode::DryRun => "dry-run",
                GcMode::Apply => "apply",
            },
        )
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum GcResult {
    Ok,
    Error,
}

impl EncodeLabelValue for GcResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(
            encoder,
            match self {
                GcResult::Ok => "ok",
                GcResult::Error => "error",
            },
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GcRunLabels {
    pub mode: GcMode,
    pub result: GcResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GcModeLabels {
    pub mode: GcMode,
}

/// What a freed object was.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum GcObject {
    Blob,
    Manifest,
    Tag,
}

impl EncodeLabelValue for GcObject {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(
            encoder,
            match self {
                GcObject::Blob => "blob",
                GcObject::Manifest => "manifest",
                GcObject::Tag => "tag",
            },
        )
    }
}

/// `repository` is `(unlinked)` for blobs no repository linked.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GcRepoLabels {
    pub repository: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GcObjectLabels {
    pub repository: String,
    pub kind: GcObject,
}

/// Repositories given series of their own per run, the largest first.
const GC_MAX_REPO_SERIES: usize = 500;

pub struct GatewayMetrics {
    registry: Registry,
    /// `slipway_gc_*` (#21).
    gc: Registry,
    pub gc_runs: Family<GcRunLabels, Counter>,
    pub gc_freed_bytes: Family<GcRepoLabels, Counter>,
    pub gc_freed_objects: Family<GcObjectLabels, Counter>,
    pub gc_reclaimable_bytes: Family<GcRepoLabels, prometheus_client::metrics::gauge::Gauge>,
    pub gc_last_bytes: Family<GcModeLabels, prometheus_client::metrics::gauge::Gauge>,
    pub gc_last_run: Family<GcModeLabels, FGauge>,
    pub gc_last_seconds: Family<GcModeLabels, FGauge>,
    pub gc_writes_refused: Counter,
    pub gc_stale: prometheus_client::metrics::gauge::Gauge,
    /// `slipway_mirror_*` (#20).
    mirror: Registry,
    pub mirror_hits: Family<MirrorLabels, Counter>,
    pub mirror_misses: Family<MirrorLabels, Counter>,
    pub mirror_upstream_requests: Family<UpstreamStatusLabels, Counter>,
    pub mirror_stale_tags: Family<UpstreamLabels, Counter>,
    pub mirror_bytes: Family<UpstreamLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub upstream_errors: Counter,
    pub upstream_timeouts: Counter,
    pub certificate_expiry: FGauge,
    pub certificate_reloads: Family<ReloadLabels, Counter>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("slipway_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        r.register(
            "requests",
            "Gateway requests by method class (read, write) and result (allowed, unauthenticated, denied)",
            requests.clone(),
        );
        let upstream_errors = Counter::default();
        r.register(
            "upstream_errors",
            "Allowed requests the upstream registry did not answer",
            upstream_errors.clone(),
        );
        let upstream_timeouts = Counter::default();
        r.register(
            "upstream_timeouts",
            "Requests answered 504: the upstream registry sent no response head within gateway.upstream_response_timeout_secs",
            upstream_timeouts.clone(),
        );
        let certificate_expiry = FGauge::default();
        r.register(
            "certificate_expiry_timestamp_seconds",
            "Unix time the served TLS certificate expires",
            certificate_expiry.clone(),
        );
        let certificate_reloads = Family::<ReloadLabels, Counter>::default();
        r.register(
            "certificate_reloads",
            "Changes of the TLS files: applied (a new valid pair) or rejected (kept the old one)",
            certificate_reloads.clone(),
        );
        // Every series exists from the start, so a fresh gateway's /metrics
        // lists them all and a rate() over a first refusal works.
        for class in MethodClass::ALL {
            for result in Outcome::ALL {
                let _ = requests.get_or_create(&RequestLabels { class, result });
            }
        }
        for result in [Reload::Applied, Reload::Rejected] {
            let _ = certificate_reloads.get_or_create(&ReloadLabels { result });
        }
        let mut mirror = Registry::with_prefix("slipway_mirror");
        let mirror_hits = Family::<MirrorLabels, Counter>::default();
        mirror.register(
            "hits",
            "Mirror requests served from the in-cluster registry without asking upstream, by upstream and kind (tag: confirmed within mirror.tag_ttl_secs or by a HEAD that found the same digest)",
            mirror_hits.clone(),
        );
        let mirror_misses = Family::<MirrorLabels, Counter>::default();
        mirror.register(
            "misses",
            "Mirror requests that fetched content from upstream, by upstream and kind",
            mirror_misses.clone(),
        );
        let mirror_upstream_requests = Family::<UpstreamStatusLabels, Counter>::default();
        mirror.register(
            "upstream_requests",
            "Requests the mirror sent upstream, by upstream and the status it answered (unreachable: no answer)",
            mirror_upstream_requests.clone(),
        );
        let mirror_stale_tags = Family::<UpstreamLabels, Counter>::default();
        mirror.register(
            "stale_tags_served",
            "Tags served from the last digest known because upstream was unreachable or answered 429 or 5xx",
            mirror_stale_tags.clone(),
        );
        let mirror_bytes = Family::<UpstreamLabels, Counter>::default();
        mirror.register(
            "upstream_bytes",
            "Bytes of manifests and blobs the mirror received from upstream",
            mirror_bytes.clone(),
        );
        let mut gc = Registry::with_prefix("slipway_gc");
        let gc_runs = Family::<GcRunLabels, Counter>::default();
        gc.register(
            "runs",
            "Garbage collections by mode (dry-run, apply) and result",
            gc_runs.clone(),
        );
        let gc_freed_bytes = Family::<GcRepoLabels, Counter>::default();
        gc.register(
            "freed_bytes",
            "Bytes of blob data (manifests included) deleted by gc --apply, by repository",
            gc_freed_bytes.clone(),
        );
        let gc_freed_objects = Family::<GcObjectLabels, Counter>::default();
        gc.register(
            "freed_objects",
            "Blobs, manifests and tags deleted by gc --apply, by repository",
            gc_freed_objects.clone(),
        );
        let gc_reclaimable_bytes =
            Family::<GcRepoLabels, prometheus_client::metrics::gauge::Gauge>::default();
        gc.register(
            "reclaimable_bytes",
            "Bytes the last dry run would free, by repository (0 after an apply)",
            gc_reclaimable_bytes.clone(),
        );
        let gc_last_bytes =
            Family::<GcModeLabels, prometheus_client::metrics::gauge::Gauge>::default();
        gc.register(
            "last_run_bytes",
            "Bytes the last run freed (apply) or would free (dry-run)",
            gc_last_bytes.clone(),
        );
        let gc_last_run = Family::<GcModeLabels, FGauge>::default();
        gc.register(
            "last_run_timestamp_seconds",
            "Unix time the last successful run ended",
            gc_last_run.clone(),
        );
        let gc_last_seconds = Family::<GcModeLabels, FGauge>::default();
        gc.register(
            "last_run_duration_seconds",
            "How long the last successful run took (for apply: how long writes were refused)",
            gc_last_seconds.clone(),
        );
        let gc_writes_refused = Counter::default();
        gc.register(
            "writes_refused",
            "Writes answered 503 because a garbage collection was sweeping",
            gc_writes_refused.clone(),
        );
        let gc_stale = prometheus_client::metrics::gauge::Gauge::default();
        gc.register(
            "registry_stale",
            "1 while distribution still answers for blobs gc deleted (restart the registry container)",
            gc_stale.clone(),
        );
        for mode in [GcMode::DryRun, GcMode::Apply] {
            for result in [GcResult::Ok, GcResult::Error] {
                let _ = gc_runs.get_or_create(&GcRunLabels { mode, result });
            }
        }
        GatewayMetrics {
            registry: r,
            gc,
            gc_runs,
            gc_freed_bytes,
            gc_freed_objects,
            gc_reclaimable_bytes,
            gc_last_bytes,
            gc_last_run,
            gc_last_seconds,
            gc_writes_refused,
            gc_stale,
            mirror,
            mirror_hits,
            mirror_misses,
            mirror_upstream_requests,
            mirror_stale_tags,
            mirror_bytes,
            requests,
            upstream_errors,
            upstream_timeouts,
            certificate_expiry,
            certificate_reloads,
        }
    }

    pub fn gc_run(&self, mode: GcMode, ok: bool) {
        let result = if ok { GcResult::Ok } else { GcResult::Error };
        self.gc_runs
            .get_or_create(&GcRunLabels { mode, result })
            .inc();
    }

    /// The series of one successful run.
    pub fn gc_report(&self, r: &crate::gc::GcReport) {
        let mode = if r.applied {
            GcMode::Apply
        } else {
            GcMode::DryRun
        };
        let l = GcModeLabels { mode };
        self.gc_last_bytes
            .get_or_create(&l)
            .set(i64::try_from(r.total.bytes).unwrap_or(i64::MAX));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.gc_last_run.get_or_create(&l).set(now);
        self.gc_last_seconds.get_or_create(&l).set(r.seconds);
        let mut repos: Vec<(&String, &crate::gc::plan::Freed)> = r.repositories.iter().collect();
        repos.sort_by_key(|r| std::cmp::Reverse(r.1.bytes));
        self.gc_reclaimable_bytes.clear();
        for (repo, f) in repos.into_iter().take(GC_MAX_REPO_SERIES) {
            let repository = if repo.is_empty() {
                "(unlinked)".to_string()
            } else {
                repo.clone()
            };
            if !r.applied {
                self.gc_reclaimable_bytes
                    .get_or_create(&GcRepoLabels {
                        repository: repository.clone(),
                    })
                    .set(i64::try_from(f.bytes).unwrap_or(i64::MAX));
                continue;
            }
            self.gc_freed_bytes
                .get_or_create(&GcRepoLabels {
                    repository: repository.clone(),
                })
                .inc_by(f.bytes);
            for (kind, n) in [
                (GcObject::Blob, f.blobs),
                (GcObject::Manifest, f.manifests),
                (GcObject::Tag, f.tags),
            ] {
                self.gc_freed_objects
                    .get_or_create(&GcObjectLabels {
                        repository: repository.clone(),
                        kind,
                    })
                    .inc_by(n);
            }
        }
    }

    pub fn count(&self, class: MethodClass, result: Outcome) {
        self.requests
            .get_or_create(&RequestLabels { class, result })
            .inc();
    }
}

impl crate::admin::Exposition for GatewayMetrics {
    fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode_registry(&mut s, &self.registry)
            .expect("writing to a String");
        prometheus_client::encoding::text::encode_registry(&mut s, &self.mirror)
            .expect("writing to a String");
        prometheus_client::encoding::text::encode_registry(&mut s, &self.gc)
            .expect("writing to a String");
        prometheus_client::encoding::text::encode_eof(&mut s).expect("writing to a String");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::Exposition;

    #[test]
    fn series_are_named_by_class_and_result() {
        let m = GatewayMetrics::new();
        m.count(MethodClass::Write, Outcome::Denied);
        m.certificate_expiry.set(1_900_000_000.0);
        let t = m.encode();
        assert!(
            t.contains("slipway_gateway_requests_total{class=\"write\",result=\"denied\"} 1"),
            "{t}"
        );
        assert!(t.contains("slipway_gateway_requests_total{class=\"read\",result=\"allowed\"} 0"));
        assert!(
            t.contains("slipway_gateway_certificate_expiry_timestamp_seconds 1900000000"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
    }
}
