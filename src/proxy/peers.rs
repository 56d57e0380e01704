//! Node-to-node blob sharing (#11).
//!
//! Owns the peer set and the choice of which node is asked for a blob.
//! The set comes from `peers.static` (`host:port` entries) and `peers.dns`
//! (`name:port`, a headless Service whose A/AAAA records are the agents'
//! node IPs), resolved at start and every `peers.refresh_secs`. This node is
//! in the set too (an address whose IP is local and whose port is that of
//! `peers.listen`): for each blob digest, rendezvous (highest-random-weight)
//! hashing over the set orders the nodes, and the first is the blob's
//! owner. A node that is not the owner asks the owner on its peer port; the
//! owner serves from its cache or fetches from upstream once (coalesced,
//! see [`super::coalesce`]). When this node comes first it is the owner and
//! goes upstream itself.
//!
//! A peer that refuses a connection, misses the connect deadline
//! ([`PEER_CONNECT_TIMEOUT`]), or has sent no response head after
//! [`PEER_RESPONSE_TIMEOUT`] and then does not answer a liveness probe
//! ([`PEER_PROBE_TIMEOUT`]) is down: skipped for [`PEER_DOWN_FOR`], and the
//! next node in the order is asked. With rendezvous hashing, skipping a
//! node gives exactly the order without it, so every node that skips the
//! same peer agrees on the next owner. A peer whose body does not verify
//! is skipped for that blob from then on.
//!
//! Slow is not down (#18 point 2). An owner whose own upstream is slow
//! answers the probe at once but sends its blob's head only when the
//! registry has sent its own. It is waited on, not marked down, because
//! going upstream ourselves would meet the same slow registry and cost a
//! second upstream GET; before, the 3 s head deadline marked such owners
//! down, and 8 clients on two nodes made 6 upstream GETs. One deadline
//! covers the whole peer phase ([`phase_deadline`]: the connect deadline
//! plus `proxy.response_timeout_secs`, the registry's own head time), and
//! at most [`PEERS_PER_BLOB`] peers are asked; then upstream. Before, every
//! peer ranked ahead was tried in turn: 4 dead peers cost a cold pull 4.2 s
//! (SYN dropped) or 12.2 s (accepted, never answered), against 0.13 s.
//! A request to a peer carries no credentials (the port is plain HTTP):
//! against a registry that wants them for pulls the owner is refused, and
//! the asking node goes upstream with containerd's, as without sharing.
//!
//! The fan-out tree (#23). A node asks with its own peer address
//! ([`PEER_HEADER`]). An owner that serves a blob to `peers.fanout` nodes
//! already answers the next asker `307` naming a relay ([`RELAY_HEADER`]):
//! a node that downloads or holds the blob, chosen by [`super::tree`]. The
//! asker then asks the relay ([`Hop::Relay`]), which serves what it holds
//! or is downloading, as it arrives, and fetches nothing for it; if the
//! relay fails it, the asker asks the owner again ([`Hop::Direct`], which
//! the owner always serves) and names the relay ([`FAILED_HEADER`]), which
//! the owner names no more for that blob. A download whose relay or owner
//! breaks off resumes from the bytes it has: with a `Range` to the owner
//! ([`Peers::resume`]), then upstream (see [`super::coalesce`]). Every
//! answer carries the serving node's depth ([`DEPTH_HEADER`]), so a node
//! knows how many hops from the registry it got a blob.
//!
//! Endpoint, on `peers.listen` (plain HTTP; any address, because it serves
//! nothing but blobs by digest, as the registry would, and every node
//! verifies what it gets): `GET` and `HEAD` `/v2/<name>/blobs/<digest>`.
//! Everything else gets 404. A request that arrives on the peer port is
//! served from the cache, a download in progress, or upstream, never
//! fetched from another peer for it; a relay serves only what it has.
//!
//! Writes no files.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::Digest as _;
use tracing::{debug, info, warn};

use crate::admin::metrics::{Metrics, PeerResult};
use crate::proxy::route::{Digest, Route};
use crate::proxy::tree::Tracker;

/// Request header: the asking node's own peer address, which the owner
/// may name to later askers (#23). Believed only for a member of the
/// owner's peer set whose IP is the connection's.
pub const PEER_HEADER: &str = "slipway-peer";
/// Request header: how the node asks ([`Hop`]); absent on a first ask.
pub const HOP_HEADER: &str = "slipway-hop";
/// Request header of a [`Hop::Direct`] ask: the relay that failed it.
pub const FAILED_HEADER: &str = "slipway-failed-relay";
/// Response header of the owner's `307`: the node to ask instead.
pub const RELAY_HEADER: &str = "slipway-relay";
/// Response header: the depth of the serving node's copy (0: it fetched
/// the blob upstream, or holds it whole).
pub const DEPTH_HEADER: &str = "slipway-depth";

/// How a node asks a peer for a blob (#23).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// The blob's owner, asked first: it serves, or names a relay.
    First,
    /// A node the owner named: it serves what it holds or downloads, and
    /// fetches nothing for the asker.
    Relay,
    /// The owner, asked to serve itself: a relay failed the asker, or the
    /// asker resumes from an offset.
    Direct,
}

impl Hop {
    pub fn as_str(self) -> &'static str {
        match self {
            Hop::First => "first",
            Hop::Relay => "relay",
            Hop::Direct => "direct",
        }
    }

    /// The hop of a request on the peer port; anything unknown is a first
    /// ask.
    pub fn of(headers: &HeaderMap) -> Hop {
        match headers.get(HOP_HEADER).and_then(|v| v.to_str().ok()) {
            Some("relay") => Hop::Relay,
            Some("direct") => Hop::Direct,
            _ => Hop::First,
        }
    }
}

/// A peer that has not connected by then is skipped: a node that is gone
/// must cost a pull far less than containerd's own timeouts.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// From the request to the response head before the peer is probed. The
/// owner answers once its own download has a response head, one upstream
/// round trip; a peer that has not answered by then is asked whether it is
/// there at all.
pub const PEER_RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// The liveness probe: any HTTP answer on the peer port (a 404 will do)
/// within this shows the peer's server is running, so its silence is its
/// upstream's.
pub const PEER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The path of the probe; the peer port answers it 404, as everything but
/// a blob.
pub const PROBE_PATH: &str = "/slipway/peer-alive";
/// Peers asked for one blob at most; then upstream.
pub const PEERS_PER_BLOB: usize = 2;

/// The deadline of the whole peer phase of one blob: the peer connect
/// deadline plus the upstream's response deadline, so an owner waiting on
/// a slow registry is waited for as long as we would wait on the registry
/// ourselves.
pub fn phase_deadline(upstream_response: Duration) -> Duration {
    PEER_CONNECT_TIMEOUT + upstream_response
}
/// How long a peer that refused or timed out is left out.
pub const PEER_DOWN_FOR: Duration = Duration::from_secs(10);
/// The per-blob "this peer sent bad bytes" memory is dropped beyond this.
const MAX_BAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peers.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Where the peer set comes from (`peers.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    pub listen: SocketAddr,
    /// `host:port` entries, resolved like `dns` (an IP needs no lookup).
    pub static_peers: Vec<String>,
    /// `name:port` of a headless Service.
    pub dns: Option<String>,
    pub refresh: Duration,
    /// Send a blob from a peer to the clients only once all of it has
    /// verified (`peers.hold_until_verified`; see [`super::coalesce`]).
    pub hold_until_verified: bool,
    /// Requests one client of the peer port may make per second that cost
    /// an upstream request (`peers.client_misses_per_sec`, #18 point 6).
    pub client_misses_per_sec: f64,
    /// Nodes a blob's owner, and each relay it names, serves at once
    /// (`peers.fanout`, #23; 0: the owner serves every node).
    pub fanout: usize,
}

/// The default of `peers.client_misses_per_sec`. A node asking its owners
/// for the layers of a pull sends about as many misses as containerd pulls
/// layers at once (3 by default); 10 a second leaves room for several
/// pulls, and a client past it is answered 429, so the asking node goes to
/// the next peer or upstream.
pub const DEFAULT_CLIENT_MISSES_PER_SEC: f64 = 10.0;
/// How long the peer port remembers that upstream had no such blob.
pub const MISSING_FOR: Duration = Duration::from_secs(10);
/// Clients and missing digests remembered at most; past it, the oldest
/// memories are dropped first (a missing digest is then asked again; a
/// client's bucket starts full).
const MAX_REMEMBERED: usize = 4096;

/// What the peer port remembers to keep anyone who can reach it from
/// making this node fetch at will (#18 point 6: 50 anonymous GETs of
/// distinct digests made 50 upstream GETs and evicted a hot blob).
#[derive(Default)]
pub struct Guard {
    /// Per client address: tokens left and when they were counted.
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    /// Digests upstream answered 404 for, and when.
    missing: Mutex<HashMap<Digest, Instant>>,
}

impl Guard {
    /// Take one upstream request from `client`'s bucket (`rate` a second,
    /// at most `rate` saved up); whether there was one.
    pub fn take(&self, client: IpAddr, rate: f64, now: Instant) -> bool {
        let mut b = self.buckets.lock().expect("peer buckets lock");
        if !b.contains_key(&client) && b.len() >= MAX_REMEMBERED {
            // Full buckets are the same as forgotten ones.
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
            if b.len() >= MAX_REMEMBERED {
                return false;
            }
        }
        let (tokens, at) = b.entry(client).or_insert((rate.max(1.0), now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate.max(1.0));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether upstream answered 404 for `digest` within [`MISSING_FOR`].
    pub fn is_missing(&self, digest: &Digest, now: Instant) -> bool {
        let m = self.missing.lock().expect("peer missing lock");
        m.get(digest)
            .is_some_and(|at| now.duration_since(*at) < MISSING_FOR)
    }

    /// Upstream answered 404 for `digest`.
    pub fn remember_missing(&self, digest: &Digest, now: Instant) {
        let mut m = self.missing.lock().expect("peer missing lock");
        if m.len() >= MAX_REMEMBERED {
            m.retain(|_, at| now.duration_since(*at) < MISSING_FOR);
            if m.len() >= MAX_REMEMBERED {
                return;
            }
        }
        m.insert(digest.clone(), now);
    }
}

/// The weight of `peer` for `digest` in rendezvous hashing: the first 8
/// bytes of sha256 over both. A hash every node computes alike, whatever
/// its build, unlike std's `DefaultHasher`.
pub fn weight(peer: &SocketAddr, digest: &Digest) -> u64 {
    let mut h = sha2::Sha256::new();
    h.update(digest.to_string().as_bytes());
    h.update([0u8]);
    h.update(peer.to_string().as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
}

/// The peers ordered for `digest`: the owner first. Ties (never seen with
/// a 64-bit weight, but possible) break on the address, so the order is
/// the same on every node.
pub fn rank(peers: &[SocketAddr], digest: &Digest) -> Vec<SocketAddr> {
    let mut v: Vec<(u64, SocketAddr)> = peers.iter().map(|p| (weight(p, digest), *p)).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.dedup_by(|a, b| a.1 == b.1);
    v.into_iter().map(|(_, p)| p).collect()
}

/// The first retry while no other peer is known.
const EMPTY_RETRY: Duration = Duration::from_secs(1);
/// The longest wait while no other peer is known.
const EMPTY_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long to wait before resolving the peers again. With other peers
/// known and this node among them, `refresh` (`peers.refresh_secs`).
/// Otherwise 1 s, doubling up to 5 s (never above `refresh`): when every
/// agent starts at once (an install, a new cluster), none is ready yet, so
/// the headless Service slipway-peers has no records
/// (publishNotReadyAddresses: false) until the agents pass their readiness
/// probes, some 30 s later. Waiting the whole period then left the first
/// rollout after an install without sharing (seen on the real cluster,
/// #17). The same holds while the set lists the others but not this node
/// (it became ready after they did): this node would rank without itself
/// and ask another node for the blobs it owns, while that node, whose set
/// lists both, asks it for its own, so both fetch from the registry (seen
/// in CI: a node that was the owner got its layer from its peer). A node
/// that stays alone, or unlisted, costs one DNS query every 5 s.
pub fn next_refresh(
    others: usize,
    self_listed: bool,
    previous: Option<Duration>,
    refresh: Duration,
) -> Duration {
    if others > 0 && self_listed {
        return refresh;
    }
    let max = EMPTY_RETRY_MAX.min(refresh);
    match previous {
        Some(p) => (p * 2).min(max),
        None => EMPTY_RETRY.min(max),
    }
}

/// The peers to ask for a blob, in order: those ranked before this node,
/// without the skipped ones. Empty when this node is the owner (or every
/// node ranked before it is skipped): then it goes upstream.
pub fn candidates(
    ranked: &[SocketAddr],
    is_self: impl Fn(&SocketAddr) -> bool,
    skip: impl Fn(&SocketAddr) -> bool,
) -> Vec<SocketAddr> {
    ranked
        .iter()
        .take_while(|p| !is_self(p))
        .filter(|p| !skip(p))
        .copied()
        .collect()
}

/// Whether `addr` is this node's own peer address: its port is that of
/// `listen`, and its IP is `listen`'s or, for a wildcard `listen`, one of
/// this host's addresses.
pub fn is_own(addr: &SocketAddr, listen: &SocketAddr, local: impl Fn(IpAddr) -> bool) -> bool {
    addr.port() == listen.port()
        && (addr.ip() == listen.ip() || (listen.ip().is_unspecified() && local(addr.ip())))
}

/// An IP is this host's if a socket can be bound to it (EADDRNOTAVAIL
/// otherwise); no interface listing needed.
fn is_local_ip(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Parse `host:port` (a name, an IPv4 or a bracketed IPv6, and a port).
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: {port:?} is not a port from 1 to 65535"))?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', ' ', '@', '?', '#', '[', ']']) {
        return Err(format!("{s:?}: {host:?} is not a host name or IP address"));
    }
    if host.contains(':') && (!bracketed || host.parse::<std::net::Ipv6Addr>().is_err()) {
        return Err(format!("{s:?}: an IPv6 address is written [addr]:port"));
    }
    Ok((host.to_string(), port))
}

type PeerClient = Client<HttpConnector, Empty<Bytes>>;

/// The peer set in force and what was learnt about its members.
pub struct Peers {
    pub config: PeerConfig,
    /// Resolved members, this node included, each with "is it this node".
    members: RwLock<Arc<Vec<(SocketAddr, bool)>>>,
    down: Mutex<HashMap<SocketAddr, Instant>>,
    bad: Mutex<HashSet<(SocketAddr, Digest)>>,
    /// The peer port's limits on what its clients make this node fetch.
    pub guard: Guard,
    /// As a blob's owner: whom it serves and whom it names (#23).
    pub tracker: Mutex<Tracker>,
    client: PeerClient,
    metrics: Arc<Metrics>,
}

/// A peer's answer that can be streamed: 200 with a Content-Length, or
/// 206 from the offset asked for.
pub struct PeerBody {
    pub peer: SocketAddr,
    /// The whole blob's length.
    pub len: u64,
    pub response: Response<Incoming>,
    /// This node's depth with these bytes: the serving node's plus one.
    pub depth: u32,
    /// When `peer` is a relay: the owner that named it.
    pub owner: Option<SocketAddr>,
}

/// What a peer answered to an ask.
enum Asked {
    Body(PeerBody),
    /// The owner named a relay.
    Relay(SocketAddr),
}

/// How to ask: the hop, the relay that failed (with [`Hop::Direct`]), and
/// the offset to start from.
#[derive(Clone, Copy)]
struct Ask {
    hop: Hop,
    failed: Option<SocketAddr>,
    offset: u64,
}

impl Peers {
    pub fn new(config: PeerConfig, metrics: Arc<Metrics>) -> Peers {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(PEER_CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http1_max_buf_size(64 * 1024)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(8)
            .pool_timer(TokioTimer::new())
            .build(http);
        Peers {
            members: RwLock::new(Arc::new(Vec::new())),
            down: Mutex::new(HashMap::new()),
            bad: Mutex::new(HashSet::new()),
            guard: Guard::default(),
            tracker: Mutex::new(Tracker::new(config.fanout)),
            config,
            client,
            metrics,
        }
    }

    /// This node's own address in the peer set, if it is listed.
    pub fn own(&self) -> Option<SocketAddr> {
        let members = self.members.read().expect("peers lock").clone();
        members.iter().find(|(_, me)| *me).map(|(a, _)| *a)
    }

    /// Whether `addr` is another node of the peer set.
    fn is_other(&self, addr: &SocketAddr) -> bool {
        let members = self.members.read().expect("peers lock").clone();
        members.iter().any(|(a, me)| a == addr && !me)
    }

    /// The asking node's peer address ([`PEER_HEADER`]), if it is another
    /// member of the set and the connection comes from its IP: a node
    /// cannot make the owner name an address of its choosing.
    pub fn asker(&self, headers: &HeaderMap, client: Option<IpAddr>) -> Option<SocketAddr> {
        let addr: SocketAddr = headers.get(PEER_HEADER)?.to_str().ok()?.parse().ok()?;
        (Some(addr.ip()) == client && self.is_other(&addr)).then_some(addr)
    }

    /// Set the members (for tests and after a resolution); returns how
    /// many of them are other nodes.
    /// Replace the peer set; the number of other nodes in it, and whether
    /// this node is in it.
    pub fn set_members(&self, addrs: Vec<SocketAddr>) -> (usize, bool) {
        let listen = self.config.listen;
        let mut v: Vec<(SocketAddr, bool)> = addrs
            .into_iter()
            .map(|a| (a, is_own(&a, &listen, is_local_ip)))
            .collect();
        v.sort();
        v.dedup();
        let others = v.iter().filter(|(_, me)| !me).count();
        let listed = v.iter().any(|(_, me)| *me);
        self.metrics.peers.set(others as i64);
        self.metrics.peer_self_listed.set(i64::from(listed));
        let old = self.members.read().expect("peers lock").clone();
        if *old != v {
            info!(peers = ?v.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>(), "peer set changed");
        }
        *self.members.write().expect("peers lock") = Arc::new(v);
        (others, listed)
    }

    /// Resolve `peers.static` and `peers.dns` once. A name that does not
    /// resolve leaves the others in; the error is logged.
    pub async fn resolve(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for entry in self
            .config
            .static_peers
            .iter()
            .chain(self.config.dns.iter())
        {
            match tokio::net::lookup_host(entry.as_str()).await {
                Ok(addrs) => out.extend(addrs),
                Err(e) => warn!(peer = %entry, error = %e, "cannot resolve peer"),
            }
        }
        out
    }

    /// Re-resolve every `peers.refresh_secs`, for ever; sooner while no
    /// other peer is known (see [`next_refresh`]).
    pub async fn refresh_loop(self: Arc<Self>) {
        let mut wait = None;
        loop {
            let addrs = self.resolve().await;
            let (others, listed) = self.set_members(addrs);
            let next = next_refresh(others, listed, wait, self.config.refresh);
            wait = Some(next);
            tokio::time::sleep(next).await;
        }
    }

    /// The peers to ask for `digest`, best first.
    pub fn candidates(&self, digest: &Digest) -> Vec<SocketAddr> {
        let members = self.members.read().expect("peers lock").clone();
        let addrs: Vec<SocketAddr> = members.iter().map(|(a, _)| *a).collect();
        let own: HashSet<SocketAddr> = members
            .iter()
            .filter(|(_, me)| *me)
            .map(|(a, _)| *a)
            .collect();
        candidates(
            &rank(&addrs, digest),
            |p| own.contains(p),
            |p| self.skipped(p, digest),
        )
    }

    fn mark_down(&self, peer: SocketAddr) {
        let mut down = self.down.lock().expect("down lock");
        down.retain(|_, until| *until > Instant::now());
        down.insert(peer, Instant::now() + PEER_DOWN_FOR);
    }

    /// `peer` sent bytes for `digest` that did not verify: never ask it
    /// for that blob again (until the memory is full and starts over).
    pub fn mark_bad(&self, peer: SocketAddr, digest: &Digest) {
        let mut bad = self.bad.lock().expect("bad lock");
        if bad.len() >= MAX_BAD {
            bad.clear();
        }
        bad.insert((peer, digest.clone()));
    }

    /// Ask at most [`PEERS_PER_BLOB`] peers, in order, for a blob, all
    /// within `deadline`; the first usable answer. Every answer that is not
    /// usable is counted, and the peer skipped. An owner that names a relay
    /// (#23) is followed once; if the relay fails, the owner is asked to
    /// serve itself.
    pub async fn fetch(
        &self,
        route: &Route,
        headers: &HeaderMap,
        deadline: Duration,
    ) -> Option<PeerBody> {
        let digest = route.digest()?;
        let until = tokio::time::Instant::now() + deadline;
        let first = Ask {
            hop: Hop::First,
            failed: None,
            offset: 0,
        };
        for peer in self.candidates(digest).into_iter().take(PEERS_PER_BLOB) {
            if tokio::time::Instant::now() >= until {
                break;
            }
            match self.ask(peer, route, headers, until, first).await {
                Ok(Asked::Body(b)) => return Some(b),
                Ok(Asked::Relay(relay)) => {
                    if let Some(b) = self.via_relay(peer, relay, route, headers, until).await {
                        return Some(b);
                    }
                }
                Err((result, down)) => self.failed(peer, result, down),
            }
        }
        None
    }

    fn failed(&self, peer: SocketAddr, result: PeerResult, down: bool) {
        self.metrics.peer_request(result);
        if down {
            self.mark_down(peer);
        }
    }

    /// The owner named `relay`: ask it, and if it fails, the owner itself.
    async fn via_relay(
        &self,
        owner: SocketAddr,
        relay: SocketAddr,
        route: &Route,
        headers: &HeaderMap,
        until: tokio::time::Instant,
    ) -> Option<PeerBody> {
        let digest = route.digest()?;
        let usable = self.is_other(&relay) && !self.skipped(&relay, digest);
        if usable {
            let ask = Ask {
                hop: Hop::Relay,
                failed: None,
                offset: 0,
            };
            match self.ask(relay, route, headers, until, ask).await {
                Ok(Asked::Body(mut b)) => {
                    b.owner = Some(owner);
                    return Some(b);
                }
                Ok(Asked::Relay(_)) => self.failed(relay, PeerResult::Refused, false),
                Err((result, down)) => self.failed(relay, result, down),
            }
        } else {
            debug!(%owner, %relay, "the owner named a relay that is not a usable peer; asking the owner itself");
        }
        self.direct(owner, Some(relay), route, headers, 0, until)
            .await
    }

    /// Ask `owner` to serve the blob itself from `offset` ([`Hop::Direct`]),
    /// naming the relay that `failed`, if one did.
    async fn direct(
        &self,
        owner: SocketAddr,
        failed: Option<SocketAddr>,
        route: &Route,
        headers: &HeaderMap,
        offset: u64,
        until: tokio::time::Instant,
    ) -> Option<PeerBody> {
        let ask = Ask {
            hop: Hop::Direct,
            failed,
            offset,
        };
        match self.ask(owner, route, headers, until, ask).await {
            Ok(Asked::Body(b)) => Some(b),
            Ok(Asked::Relay(_)) => {
                self.failed(owner, PeerResult::Refused, false);
                None
            }
            Err((result, down)) => {
                self.failed(owner, result, down);
                None
            }
        }
    }

    /// Whether `peer` is left out for `digest` now (down, or sent bad
    /// bytes of it).
    fn skipped(&self, peer: &SocketAddr, digest: &Digest) -> bool {
        let down = self.down.lock().expect("down lock");
        let bad = self.bad.lock().expect("bad lock");
        down.get(peer).is_some_and(|until| *until > Instant::now())
            || bad.contains(&(*peer, digest.clone()))
    }

    /// Resume a blob at `offset` from `owner` (#23: the relay or owner it
    /// came from broke off): asked to serve itself, with a `Range` from
    /// the offset. `None` when it is skipped or does not answer with
    /// exactly that range within `deadline`.
    pub async fn resume(
        &self,
        owner: SocketAddr,
        failed: Option<SocketAddr>,
        route: &Route,
        headers: &HeaderMap,
        offset: u64,
        deadline: Duration,
    ) -> Option<PeerBody> {
        let digest = route.digest()?;
        if self.skipped(&owner, digest) {
            return None;
        }
        let until = tokio::time::Instant::now() + deadline;
        self.direct(owner, failed, route, headers, offset, until)
            .await
    }

    /// Whether `peer`'s server answers anything within
    /// [`PEER_PROBE_TIMEOUT`], on a connection of its own.
    async fn alive(&self, peer: SocketAddr) -> bool {
        let Ok(uri) = format!("http://{peer}{PROBE_PATH}").parse::<Uri>() else {
            return false;
        };
        let Ok(req) = Request::get(uri).body(Empty::new()) else {
            return false;
        };
        matches!(
            tokio::time::timeout(PEER_PROBE_TIMEOUT, self.client.request(req)).await,
            Ok(Ok(_))
        )
    }

    async fn ask(
        &self,
        peer: SocketAddr,
        route: &Route,
        headers: &HeaderMap,
        until: tokio::time::Instant,
        ask: Ask,
    ) -> Result<Asked, (PeerResult, bool)> {
        // `true`: the peer is not there (no connection, no answer), so it
        // is left out for a while; an HTTP answer is about this blob only.
        let uri: Uri = format!("http://{peer}{}", route.upstream_path())
            .parse()
            .map_err(|_| (PeerResult::Failed, false))?;
        let mut b = Request::get(uri);
        if let Some(ua) = headers.get(header::USER_AGENT) {
            b = b.header(header::USER_AGENT, ua);
        }
        if let Some(own) = self.own() {
            b = b.header(PEER_HEADER, own.to_string());
        }
        if ask.hop != Hop::First {
            b = b.header(HOP_HEADER, ask.hop.as_str());
        }
        if let Some(f) = ask.failed {
            b = b.header(FAILED_HEADER, f.to_string());
        }
        if ask.offset > 0 {
            b = b.header(header::RANGE, format!("bytes={}-", ask.offset));
        }
        let req = b
            .body(Empty::new())
            .map_err(|_| (PeerResult::Failed, false))?;
        let request = self.client.request(req);
        tokio::pin!(request);
        let probe_at = until.min(tokio::time::Instant::now() + PEER_RESPONSE_TIMEOUT);
        let answered = match tokio::time::timeout_at(probe_at, &mut request).await {
            Ok(r) => r,
            Err(_) if probe_at < until => {
                if !self.alive(peer).await {
                    warn!(%peer, "peer sent no response head within {PEER_RESPONSE_TIMEOUT:?} and does not answer a probe; skipped");
                    return Err((PeerResult::Timeout, true));
                }
                debug!(%peer, "peer is alive and waiting on its upstream; waiting for it");
                match tokio::time::timeout_at(until, &mut request).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(%peer, "peer is alive but sent no response head within the peer deadline; going upstream, the peer not marked down");
                        return Err((PeerResult::Slow, false));
                    }
                }
            }
            Err(_) => {
                warn!(%peer, "the peer deadline passed before the peer answered; going upstream");
                return Err((PeerResult::Slow, false));
            }
        };
        let resp = match answered {
            Err(e) => {
                let result = classify_error(&e);
                warn!(%peer, error = %e, "peer request failed; skipped");
                return Err((result, true));
            }
            Ok(r) => r,
        };
        let h = resp.headers();
        let text = |name| {
            h.get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
        };
        let len = text(header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok());
        // A copy deeper than any tree of a cluster is a lie; treated as 0.
        let depth = text(DEPTH_HEADER)
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|d| *d < 1024)
            .unwrap_or(0)
            + 1;
        let total = text(header::CONTENT_RANGE.as_str())
            .and_then(|v| super::coalesce::parse_content_range(v, ask.offset));
        let relay = text(RELAY_HEADER).and_then(|v| v.parse::<SocketAddr>().ok());
        let status = resp.status();
        let body = |len| {
            Ok(Asked::Body(PeerBody {
                peer,
                len,
                response: resp,
                depth,
                owner: None,
            }))
        };
        match status {
            StatusCode::OK if ask.offset == 0 && len.is_some() => {
                debug!(%peer, ?len, hop = ask.hop.as_str(), "peer serves the blob");
                body(len.unwrap_or_default())
            }
            StatusCode::PARTIAL_CONTENT if ask.offset > 0 && total.is_some() => {
                debug!(%peer, offset = ask.offset, "peer serves the rest of the blob");
                body(total.unwrap_or_default())
            }
            StatusCode::TEMPORARY_REDIRECT if ask.hop == Hop::First && relay.is_some() => {
                let relay = relay.unwrap_or(peer);
                debug!(%peer, %relay, "the owner named a relay");
                Ok(Asked::Relay(relay))
            }
            status => {
                debug!(%peer, %status, hop = ask.hop.as_str(), "peer refused the blob; skipped");
                Err((PeerResult::Refused, false))
            }
        }
    }
}

/// A connect timeout is a timeout, a refused connection a refusal; the
/// rest failed.
fn classify_error(e: &(dyn std::error::Error + 'static)) -> PeerResult {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    // Bounded: error chains are a handful deep.
    for _ in 0..16 {
        let Some(err) = cur else { break };
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::TimedOut => PeerResult::Timeout,
                std::io::ErrorKind::ConnectionRefused => PeerResult::Refused,
                _ => PeerResult::Failed,
            };
        }
        if err.to_string().contains("timed out") {
            return PeerResult::Timeout;
        }
        cur = err.source();
    }
    PeerResult::Failed
}

/// Bind the peer listener (any address: see the module header).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, PeerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| PeerError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u32) -> Digest {
        Digest::parse(&format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(i.to_be_bytes()))
        ))
        .unwrap()
    }

    fn nodes(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| format!("10.0.0.{i}:5052").parse().unwrap())
            .collect()
    }

    #[test]
    fn an_empty_peer_set_is_resolved_again_soon_then_less_often() {
        let r = Duration::from_secs(30);
        let mut waits = Vec::new();
        let mut prev = None;
        for _ in 0..7 {
            let w = next_refresh(0, true, prev, r);
            waits.push(w.as_secs());
            prev = Some(w);
        }
        assert_eq!(waits, [1, 2, 4, 5, 5, 5, 5]);
        // Once another peer is known: the configured period.
        assert_eq!(next_refresh(1, true, prev, r), r);
        assert_eq!(next_refresh(1, true, None, r), r);
        // Others known but not this node: soon again, as when alone.
        assert_eq!(next_refresh(1, false, None, r), Duration::from_secs(1));
        assert_eq!(
            next_refresh(1, false, Some(Duration::from_secs(4)), r),
            Duration::from_secs(5)
        );
        // A period shorter than the first retry is kept.
        assert_eq!(
            next_refresh(0, true, None, Duration::from_millis(200)),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn rank_is_a_permutation_independent_of_input_order() {
        let n = nodes(6);
        let mut rev = n.clone();
        rev.reverse();
        for i in 0..50 {
            let r = rank(&n, &d(i));
            assert_eq!(r, rank(&rev, &d(i)));
            let mut sorted = r.clone();
            sorted.sort();
            assert_eq!(sorted, n);
        }
    }

    /// HRW's property the design relies on: removing a node moves only the
    /// blobs it owned, each to the node ranked next (so skipping a failed
    /// peer gives every node the same next owner).
    #[test]
    fn removing_a_node_moves_only_its_blobs_to_the_next_in_rank() {
        let n = nodes(5);
        let gone = n[2];
        let rest: Vec<SocketAddr> = n.iter().copied().filter(|p| *p != gone).collect();
        for i in 0..200 {
            let full = rank(&n, &d(i));
            let without = rank(&rest, &d(i));
            let expect: Vec<SocketAddr> = full.iter().copied().filter(|p| *p != gone).collect();
            assert_eq!(without, expect, "blob {i}");
        }
    }

    /// Owners spread over the nodes: no node gets none of 600 blobs, none
    /// more than twice its share.
    #[test]
    fn owners_spread_over_the_nodes() {
        let n = nodes(6);
        let mut count: HashMap<SocketAddr, usize> = HashMap::new();
        let blobs = 600;
        for i in 0..blobs {
            *count.entry(rank(&n, &d(i))[0]).or_default() += 1;
        }
        let share = blobs as usize / n.len();
        for p in &n {
            let c = count.get(p).copied().unwrap_or(0);
            assert!(c > 0 && c < 2 * share, "{p}: {c} of {blobs}: {count:?}");
        }
    }

    #[test]
    fn candidates_stop_at_this_node_and_skip_failed_peers() {
        let n = nodes(4);
        let r = rank(&n, &d(7));
        // This node is ranked third: ask the first two.
        let me = r[2];
        assert_eq!(candidates(&r, |p| *p == me, |_| false), r[..2].to_vec());
        // The owner is skipped: the second is asked.
        let owner = r[0];
        assert_eq!(candidates(&r, |p| *p == me, |p| *p == owner), vec![r[1]]);
        // This node is the owner: nobody is asked.
        assert!(candidates(&r, |p| *p == r[0], |_| false).is_empty());
        // Not in the set at all (a node with no peers.listen of its own in
        // it): every peer is a candidate.
        assert_eq!(candidates(&r, |_| false, |_| false), r);
    }

    #[test]
    fn own_address_by_port_and_local_ip() {
        let listen: SocketAddr = "0.0.0.0:5052".parse().unwrap();
        let local = |ip: IpAddr| ip == "10.0.0.2".parse::<IpAddr>().unwrap();
        assert!(is_own(&"10.0.0.2:5052".parse().unwrap(), &listen, local));
        assert!(!is_own(&"10.0.0.3:5052".parse().unwrap(), &listen, local));
        assert!(!is_own(&"10.0.0.2:5053".parse().unwrap(), &listen, local));
        let fixed: SocketAddr = "10.0.0.3:5052".parse().unwrap();
        assert!(is_own(&fixed, &fixed, |_| false));
        // The real check: loopback is local, TEST-NET-3 is not.
        assert!(is_local_ip("127.0.0.1".parse().unwrap()));
        assert!(!is_local_ip("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("slipway-peers.kube-system.svc:5052"),
            Ok(("slipway-peers.kube-system.svc".into(), 5052))
        );
        assert_eq!(
            parse_host_port("[fd00::1]:5052"),
            Ok(("fd00::1".into(), 5052))
        );
        for bad in [
            "nohost",
            "host:0",
            "host:x",
            ":5052",
            "fd00::1:5052",
            "a/b:1",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_guard_allows_a_client_its_rate_and_remembers_missing_digests() {
        let g = Guard::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t = Instant::now();
        let granted = (0..50).filter(|_| g.take(a, 4.0, t)).count();
        assert_eq!(granted, 4, "a burst of one second's worth");
        assert!(g.take(b, 4.0, t), "per client");
        assert!(!g.take(a, 4.0, t + Duration::from_millis(200)));
        assert!(
            g.take(a, 4.0, t + Duration::from_millis(300)),
            "refilled at the rate"
        );
        let granted = (0..50)
            .filter(|_| g.take(a, 4.0, t + Duration::from_secs(60)))
            .count();
        assert_eq!(granted, 4, "saved up to one second's worth only");
        assert!(!g.is_missing(&d(1), t));
        g.remember_missing(&d(1), t);
        assert!(g.is_missing(&d(1), t + Duration::from_secs(9)));
        assert!(!g.is_missing(&d(1), t + MISSING_FOR));
    }

    /// `peers.dns` goes through the system resolver: `localhost` comes
    /// from /etc/hosts, without any network.
    #[tokio::test]
    async fn resolves_names_and_counts_peers_without_this_node() {
        let m = Arc::new(Metrics::new());
        let p = Peers::new(
            PeerConfig {
                listen: "127.0.0.1:5052".parse().unwrap(),
                static_peers: vec!["198.18.0.10:5052".into()],
                dns: Some("localhost:5052".into()),
                refresh: Duration::from_secs(30),
                hold_until_verified: false,
                client_misses_per_sec: DEFAULT_CLIENT_MISSES_PER_SEC,
                fanout: crate::proxy::tree::DEFAULT_FANOUT,
            },
            m.clone(),
        );
        let addrs = p.resolve().await;
        assert!(
            addrs.contains(&"198.18.0.10:5052".parse().unwrap()),
            "{addrs:?}"
        );
        assert!(
            addrs.contains(&"127.0.0.1:5052".parse().unwrap()),
            "{addrs:?}"
        );
        let others = addrs
            .iter()
            .filter(|a| **a != "127.0.0.1:5052".parse::<SocketAddr>().unwrap())
            .count();
        p.set_members(addrs);
        assert_eq!(m.peers.get(), others as i64);
    }
}
