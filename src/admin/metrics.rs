//! The agent's Prometheus/OpenMetrics metrics (prometheus-client).
//!
//! Owns every metric the admin server exposes on `/metrics`; the proxy,
//! cache and reconcile loop update them through [`Metrics`].

use std::sync::atomic::AtomicU64;

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;

/// One series per method, route class and status. Every value comes from
/// a closed set (#13): any local process can send `M00000001 /v2/`, and a
/// label copied from the request grew `/metrics` and memory without bound.
/// `status` is hyper's, 100 to 999.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: MethodLabel,
    pub route: RouteLabel,
    pub status: u16,
}

/// The `method` label: the methods of the registry API, `other` for the rest.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum MethodLabel {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Other,
}

impl MethodLabel {
    pub fn of(m: &http::Method) -> MethodLabel {
        match *m {
            http::Method::GET => MethodLabel::Get,
            http::Method::HEAD => MethodLabel::Head,
            http::Method::POST => MethodLabel::Post,
            http::Method::PUT => MethodLabel::Put,
            http::Method::PATCH => MethodLabel::Patch,
            http::Method::DELETE => MethodLabel::Delete,
            http::Method::OPTIONS => MethodLabel::Options,
            _ => MethodLabel::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MethodLabel::Get => "GET",
            MethodLabel::Head => "HEAD",
            MethodLabel::Post => "POST",
            MethodLabel::Put => "PUT",
            MethodLabel::Patch => "PATCH",
            MethodLabel::Delete => "DELETE",
            MethodLabel::Options => "OPTIONS",
            MethodLabel::Other => "other",
        }
    }
}

impl EncodeLabelValue for MethodLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// The `route` label: the proxy's route classes, and `refused`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RouteLabel {
    Base,
    ManifestTag,
    ManifestDigest,
    Blob,
    Refused,
}

impl RouteLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Base => "base",
            RouteLabel::ManifestTag => "manifest_tag",
            RouteLabel::ManifestDigest => "manifest_digest",
            RouteLabel::Blob => "blob",
            RouteLabel::Refused => "refused",
        }
    }
}

impl std::fmt::Display for RouteLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: SourceLabel,
}

/// Where the bytes of a response came from (#11 adds `peer`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SourceLabel {
    Upstream,
    Cache,
    Peer,
}

impl SourceLabel {
    pub const ALL: [SourceLabel; 3] =
        [SourceLabel::Upstream, SourceLabel::Cache, SourceLabel::Peer];
    pub fn as_str(self) -> &'static str {
        match self {
            SourceLabel::Upstream => "upstream",
            SourceLabel::Cache => "cache",
            SourceLabel::Peer => "peer",
        }
    }
}

impl EncodeLabelValue for SourceLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerResultLabels {
    pub result: PeerResult,
}

/// How one request to a peer for a blob ended (#11).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PeerResult {
    /// The whole blob arrived and verified.
    Served,
    /// The peer answered with something other than 200 and a usable length.
    Refused,
    /// No connection, or no response head and no answer to the liveness
    /// probe, within the peer deadlines: the peer is marked down.
    Timeout,
    /// Alive (it answered the probe), but no response head before the
    /// peer phase's deadline: its upstream is slow. Not marked down (#18).
    Slow,
    /// The connection failed, or the body broke off or stalled.
    Failed,
    /// The body did not match its digest or length.
    Corrupt,
}

impl PeerResult {
    pub const ALL: [PeerResult; 6] = [
        PeerResult::Served,
        PeerResult::Refused,
        PeerResult::Timeout,
        PeerResult::Slow,
        PeerResult::Failed,
        PeerResult::Corrupt,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            PeerResult::Served => "served",
            PeerResult::Refused => "refused",
            PeerResult::Timeout => "timeout",
            PeerResult::Slow => "slow",
            PeerResult::Failed => "failed",
            PeerResult::Corrupt => "corrupt",
        }
    }
}

impl EncodeLabelValue for PeerResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerRoleLabels {
    pub role: PeerRole,
}

/// What this node was to a peer it served a blob to (#23): the blob's
/// owner (asked first, or directly), or a relay the owner named.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PeerRole {
    Owner,
    Relay,
}

impl PeerRole {
    pub const ALL: [PeerRole; 2] = [PeerRole::Owner, PeerRole::Relay];
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Owner => "owner",
            PeerRole::Relay => "relay",
        }
    }
}

impl EncodeLabelValue for PeerRole {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AliasLabels {
    /// The alias itself (`host[:port]`), never display text (#12).
    pub alias: String,
    pub state: HostState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AliasOnly {
    pub alias: String,
}

/// Host configuration state of one alias, as a metric label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HostState {
    Applied,
    Drifted,
    Error,
    /// A mirrored upstream left to an administrator's hosts.toml (#20).
    Conflict,
}

impl HostState {
    pub const ALL: [HostState; 4] = [
        HostState::Applied,
        HostState::Drifted,
        HostState::Error,
        HostState::Conflict,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Applied => "applied",
            HostState::Drifted => "drifted",
            HostState::Error => "error",
            HostState::Conflict => "conflict",
        }
    }
}

impl EncodeLabelValue for HostState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

pub type FGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// 2xx answers of the proxy port, whatever the route: the canary's
    /// proof that its pull went through the proxy (#18 point 11).
    pub proxy_ok: Counter,
    pub bytes: Family<SourceLabels, Counter>,
    pub upstream_latency: Histogram,
    pub in_flight: Gauge,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_size: Gauge,
    pub cache_evictions: Counter,
    pub last_pull: FGauge,
    pub hostconfig: Family<AliasLabels, Gauge>,
    pub hostconfig_errors: Family<AliasOnly, Counter>,
    pub ca_rotations: Counter,
    pub config_path_covered: Gauge,
    pub ca_expiry: FGauge,
    pub build_info: Family<BuildLabels, Gauge>,
    pub digest_mismatches: Counter,
    pub canary_pull: Histogram,
    pub canary_last_success: FGauge,
    pub peer_requests: Family<PeerResultLabels, Counter>,
    pub coalesced: Counter,
    pub peers: Gauge,
    pub peer_self_listed: Gauge,
    pub peer_served_bytes: Family<PeerRoleLabels, Counter>,
    pub peer_children: Gauge,
    pub peer_depth: Histogram,
    pub peer_relays_named: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("slipway");
        let requests = Family::<RequestLabels, Counter>::default();
        r.register(
            "proxy_requests",
            "Proxy requests by method, route class and status",
            requests.clone(),
        );
        let proxy_ok = Counter::default();
        r.register(
            "proxy_successful_responses",
            "Proxy responses with a 2xx status; each canary pull must add one",
            proxy_ok.clone(),
        );
        let bytes = Family::<SourceLabels, Counter>::default();
        r.register(
            "proxy_bytes",
            "Response body bytes served, by source (upstream, cache or peer)",
            bytes.clone(),
        );
        let upstream_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        r.register(
            "upstream_response_seconds",
            "Time from sending a request upstream to its response headers",
            upstream_latency.clone(),
        );
        let in_flight = Gauge::default();
        r.register(
            "proxy_in_flight_requests",
            "Proxy requests whose response is not finished",
            in_flight.clone(),
        );
        let cache_hits = Counter::default();
        r.register(
            "cache_hits",
            "Requests served from the node blob cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        r.register(
            "cache_misses",
            "Cacheable requests not found in the node blob cache",
            cache_misses.clone(),
        );
        let cache_size = Gauge::default();
        r.register(
            "cache_size_bytes",
            "Bytes held in the node blob cache",
            cache_size.clone(),
        );
        let cache_evictions = Counter::default();
        r.register(
            "cache_evictions",
            "Blobs evicted from the node blob cache (least recently used)",
            cache_evictions.clone(),
        );
        let last_pull = FGauge::default();
        r.register(
            "last_successful_pull_timestamp_seconds",
            "Unix time of the last manifest or blob served completely",
            last_pull.clone(),
        );
        let hostconfig = Family::<AliasLabels, Gauge>::default();
        r.register(
            "hostconfig_state",
            "Host configuration state per alias: 1 for the current state (applied, drifted, error)",
            hostconfig.clone(),
        );
        let hostconfig_errors = Family::<AliasOnly, Counter>::default();
        r.register(
            "hostconfig_errors",
            "Node passes that left an alias's host configuration in error",
            hostconfig_errors.clone(),
        );
        let ca_rotations = Counter::default();
        r.register(
            "ca_rotations",
            "Times the registry CA file changed to a new valid bundle and was rolled out",
            ca_rotations.clone(),
        );
        let config_path_covered = Gauge::default();
        r.register(
            "containerd_config_path_covered",
            "1 if containerd's config_path includes the directory slipway writes, else 0",
            config_path_covered.clone(),
        );
        let ca_expiry = FGauge::default();
        r.register(
            "ca_expiry_timestamp_seconds",
            "Unix time the registry CA bundle expires (earliest)",
            ca_expiry.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        r.register(
            "build_info",
            "slipway build information",
            build_info.clone(),
        );
        let digest_mismatches = Counter::default();
        r.register(
            "proxy_digest_mismatches",
            "Responses for a digest whose content or length did not match; the client connection was aborted",
            digest_mismatches.clone(),
        );
        // A canary pull is a whole image pull through containerd: 50 ms up
        // to its deadline range (about 100 s).
        let canary_pull = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        r.register(
            "canary_pull_seconds",
            "Duration of each canary pull through CRI PullImage, failed ones included",
            canary_pull.clone(),
        );
        let canary_last_success = FGauge::default();
        r.register(
            "canary_last_success_timestamp_seconds",
            "Unix time the last canary pull through CRI succeeded (0: never)",
            canary_last_success.clone(),
        );
        let peer_requests = Family::<PeerResultLabels, Counter>::default();
        r.register(
            "peer_requests",
            "Requests to peer nodes for a blob, by result",
            peer_requests.clone(),
        );
        let coalesced = Counter::default();
        r.register(
            "coalesced_requests",
            "Blob requests served from a download already in progress instead of a fetch of their own",
            coalesced.clone(),
        );
        let peers = Gauge::default();
        r.register(
            "peers",
            "Peer nodes in the current peer set, this node not counted",
            peers.clone(),
        );
        let peer_self_listed = Gauge::default();
        r.register(
            "peer_self_listed",
            "1 when this node's own peer address is in the peer set (the peer Service lists it once the agent is ready)",
            peer_self_listed.clone(),
        );
        let peer_served_bytes = Family::<PeerRoleLabels, Counter>::default();
        r.register(
            "peer_served_bytes",
            "Blob bytes this node sent to other nodes on its peer port, by role (owner: asked first or directly; relay: named by the owner, #23)",
            peer_served_bytes.clone(),
        );
        let peer_children = Gauge::default();
        r.register(
            "peer_children",
            "Blob transfers this node is sending to other nodes on its peer port now",
            peer_children.clone(),
        );
        let peer_depth = Histogram::new(linear_buckets(1.0, 1.0, 8));
        r.register(
            "peer_depth",
            "Hops from the node that fetched it upstream at which this node got each blob from a peer (1: from that node itself)",
            peer_depth.clone(),
        );
        let peer_relays_named = Counter::default();
        r.register(
            "peer_relays_named",
            "Askers this node, as a blob's owner, sent to another node that downloads or holds the blob (#23)",
            peer_relays_named.clone(),
        );
        // Families print their HELP only once they have a series; create
        // the known ones so a fresh agent's /metrics lists every metric.
        for source in SourceLabel::ALL {
            let _ = bytes.get_or_create(&SourceLabels { source });
        }
        for result in PeerResult::ALL {
            let _ = peer_requests.get_or_create(&PeerResultLabels { result });
        }
        for role in PeerRole::ALL {
            let _ = peer_served_bytes.get_or_create(&PeerRoleLabels { role });
        }
        let _ = requests.get_or_create(&RequestLabels {
            method: MethodLabel::Get,
            route: RouteLabel::Base,
            status: 200,
        });
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        Metrics {
            registry: r,
            requests,
            proxy_ok,
            bytes,
            upstream_latency,
            in_flight,
            cache_hits,
            cache_misses,
            cache_size,
            cache_evictions,
            last_pull,
            hostconfig,
            hostconfig_errors,
            ca_rotations,
            config_path_covered,
            ca_expiry,
            build_info,
            digest_mismatches,
            canary_pull,
            canary_last_success,
            peer_requests,
            coalesced,
            peers,
            peer_self_listed,
            peer_served_bytes,
            peer_children,
            peer_depth,
            peer_relays_named,
        }
    }

    /// The counter of bytes sent to peers in one role.
    pub fn peer_served(&self, role: PeerRole) -> Counter {
        self.peer_served_bytes
            .get_or_create(&PeerRoleLabels { role })
            .clone()
    }

    /// The bytes counter of one source.
    pub fn bytes_from(&self, source: SourceLabel) -> Counter {
        self.bytes.get_or_create(&SourceLabels { source }).clone()
    }

    /// Count one request to a peer.
    pub fn peer_request(&self, result: PeerResult) {
        self.peer_requests
            .get_or_create(&PeerResultLabels { result })
            .inc();
    }

    /// Set the state of one alias (1 for `state`, 0 for the others).
    pub fn set_alias_state(&self, alias: &str, state: HostState) {
        for s in HostState::ALL {
            self.hostconfig
                .get_or_create(&AliasLabels {
                    alias: alias.to_string(),
                    state: s,
                })
                .set(i64::from(s == state));
        }
    }

    /// Drop every series of an alias no longer configured (#12: they
    /// stayed, as `applied`, after the reload that removed the alias).
    pub fn remove_alias(&self, alias: &str) {
        for state in HostState::ALL {
            self.hostconfig.remove(&AliasLabels {
                alias: alias.to_string(),
                state,
            });
        }
        self.hostconfig_errors.remove(&AliasOnly {
            alias: alias.to_string(),
        });
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_the_output_is_openmetrics() {
        let m = Metrics::new();
        m.set_alias_state("registry.shared-services:5000", HostState::Applied);
        m.hostconfig_errors
            .get_or_create(&AliasOnly {
                alias: "other:5000".into(),
            })
            .inc();
        m.requests
            .get_or_create(&RequestLabels {
                method: MethodLabel::Get,
                route: RouteLabel::Blob,
                status: 200,
            })
            .inc();
        let t = m.encode();
        for name in [
            "slipway_proxy_requests",
            "slipway_proxy_bytes",
            "slipway_upstream_response_seconds",
            "slipway_proxy_in_flight_requests",
            "slipway_cache_hits",
            "slipway_cache_misses",
            "slipway_cache_size_bytes",
            "slipway_cache_evictions",
            "slipway_last_successful_pull_timestamp_seconds",
            "slipway_hostconfig_state",
            "slipway_hostconfig_errors",
            "slipway_ca_rotations",
            "slipway_containerd_config_path_covered",
            "slipway_ca_expiry_timestamp_seconds",
            "slipway_build_info",
            "slipway_proxy_digest_mismatches",
            "slipway_canary_pull_seconds",
            "slipway_canary_last_success_timestamp_seconds",
            "slipway_peer_requests",
            "slipway_coalesced_requests",
            "slipway_peers",
            "slipway_peer_self_listed",
            "slipway_peer_served_bytes",
            "slipway_peer_children",
            "slipway_peer_depth",
            "slipway_peer_relays_named",
        ] {
            assert!(
                t.contains(&format!("# HELP {name} ")),
                "{name} has no HELP:\n{t}"
            );
        }
        assert!(t.contains("slipway_hostconfig_state{alias=\"registry.shared-services:5000\",state=\"applied\"} 1"), "{t}");
        assert!(t.ends_with("# EOF\n"));
        for source in SourceLabel::ALL {
            let series = format!(
                "slipway_proxy_bytes_total{{source=\"{}\"}} 0",
                source.as_str()
            );
            assert!(t.contains(&series), "{series} missing:\n{t}");
        }
        for result in PeerResult::ALL {
            let series = format!(
                "slipway_peer_requests_total{{result=\"{}\"}} 0",
                result.as_str()
            );
            assert!(t.contains(&series), "{series} missing:\n{t}");
        }
        assert!(
            t.contains(
                "slipway_proxy_requests_total{method=\"GET\",route=\"blob\",status=\"200\"} 1"
            ),
            "{t}"
        );
    }

    #[test]
    fn made_up_methods_share_one_series() {
        let m = Metrics::new();
        for i in 0..2000 {
            let method = http::Method::from_bytes(format!("M{i:08}").as_bytes()).unwrap();
            m.requests
                .get_or_create(&RequestLabels {
                    method: MethodLabel::of(&method),
                    route: RouteLabel::Refused,
                    status: 405,
                })
                .inc();
        }
        let t = m.encode();
        assert!(
            t.contains("slipway_proxy_requests_total{method=\"other\",route=\"refused\",status=\"405\"} 2000"),
            "{t}"
        );
        assert_eq!(MethodLabel::of(&http::Method::HEAD).as_str(), "HEAD");
    }
}
