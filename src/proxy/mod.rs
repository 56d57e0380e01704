//! The node-local pull-through proxy (hyper 1, plain HTTP on loopback).
//!
//! Endpoints, on `proxy.listen` (127.0.0.1 unless explicitly allowed
//! otherwise): `GET`/`HEAD` `/v2/`, `/v2/<name>/manifests/<ref>`,
//! `/v2/<name>/blobs/<digest>` (see [`route`]). Everything else gets a
//! registry-style error and no upstream call.
//!
//! Forwards only to `registry.upstream` (optionally dialled at
//! `registry.dial`), over TLS verified with the cluster CA (rustls, no other
//! roots). The client's URI authority, `Host` header and query never choose
//! the destination; upstream redirects are followed only as [`redirect`]
//! allows. A whole response for a digest is hashed as it streams and its
//! last chunk held back until it matches (#13). Bodies stream with backpressure and are never buffered
//! whole; if the upstream fails mid-body the client connection is aborted
//! (hyper closes it without completing the response), because containerd
//! does not retry a truncated blob against the next host.
//!
//! A whole `GET` of an uncached blob goes through [`coalesce`]: one download
//! per digest however many clients ask, from the blob's owner among the
//! [`peers`] when node-to-node sharing is on, else from upstream. The peer
//! port ([`serve_peers`], `peers.listen`) serves `GET`/`HEAD` of blobs by
//! digest only, from the cache or upstream, never from another peer.

pub mod cache;
pub mod coalesce;
pub mod peers;
pub mod redirect;
pub mod route;
pub mod tree;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::admin::metrics::{
    MethodLabel, Metrics, PeerRole, RequestLabels, RouteLabel, SourceLabel,
};
use cache::Cache;
use route::{Digest, Refusal, Route};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("registry.ca_file: cannot build a TLS trust store: {0}")]
    Tls(String),
    #[error("proxy.redirect_ca_file {path}: {source}")]
    RedirectCaRead {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("proxy.redirect_ca_file {path}: cannot build a TLS trust store: {message}")]
    RedirectCa {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("proxy.redirect_hosts is set, proxy.redirect_ca_file is not, and the system has no root certificates to trust those hosts with")]
    NoSystemRoots,
    #[error("proxy.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// The one registry the proxy forwards to (`registry.upstream`).
pub struct Upstream {
    /// Normalised `https://host[:port]` with no path.
    pub url: String,
    /// `host[:port]` as in the URL; TLS is verified against `host`.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Where to connect instead of resolving `host`.
    pub dial: Option<SocketAddr>,
    /// Redirects to other origins (`proxy.redirect_hosts`, `proxy.redirect_ca_file`).
    pub redirects: redirect::RedirectPolicy,
}

/// Timeouts that make a hung upstream fail fast: containerd does not move
/// on from a mirror that accepts a connection and then hangs.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub body_idle: Duration,
    pub client_header: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            response: Duration::from_secs(15),
            body_idle: Duration::from_secs(30),
            client_header: Duration::from_secs(10),
        }
    }
}

pub(crate) type HttpsClient =
    Client<hyper_rustls::HttpsConnector<HttpConnector<DialResolver>>, Empty<Bytes>>;

/// Resolves every name to `dial` when set (TLS is still verified against
/// the upstream's name), else through getaddrinfo.
#[derive(Clone)]
pub struct DialResolver {
    dial: Option<SocketAddr>,
    gai: GaiResolver,
}

impl tower_service::Service<Name> for DialResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        if let Some(d) = self.dial {
            return Box::pin(async move { Ok(vec![d].into_iter()) });
        }
        let mut gai = self.gai.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = gai.call(name).await?.collect();
            Ok(addrs.into_iter())
        })
    }
}

/// The upstream registry as the proxy reaches it.
pub struct UpstreamClient {
    client: HttpsClient,
    /// For hosts in `proxy.redirect_hosts` (none when it is empty).
    redirect_client: Option<HttpsClient>,
    /// `https://host:port` used in request URIs (port of `dial` if set).
    base: String,
    host: String,
    /// The origins that are the upstream's own: as configured, and as
    /// dialled (the port of `registry.dial`).
    origins: Vec<redirect::Origin>,
    redirects: redirect::RedirectPolicy,
}

pub(crate) fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| e.to_string())?;
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificates".into());
    }
    Ok(roots)
}

pub(crate) fn tls_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Trust for redirect targets: `proxy.redirect_ca_file` when set, else the
/// system roots, never both and never the cluster CA by default (#13): the
/// cluster CA says who the registry is, not who its storage is.
fn redirect_tls(policy: &redirect::RedirectPolicy) -> Result<rustls::ClientConfig, ProxyError> {
    let roots = match &policy.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| ProxyError::RedirectCaRead {
                path: path.clone(),
                source,
            })?;
            roots_from_pem(&pem).map_err(|message| ProxyError::RedirectCa {
                path: path.clone(),
                message,
            })?
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(ProxyError::NoSystemRoots);
            }
            roots
        }
    };
    tls_config(roots).map_err(|message| match &policy.ca_file {
        Some(path) => ProxyError::RedirectCa {
            path: path.clone(),
            message,
        },
        None => ProxyError::Tls(message),
    })
}

pub(crate) fn https_client(
    tls: rustls::ClientConfig,
    dial: Option<SocketAddr>,
    t: &Timeouts,
) -> HttpsClient {
    let mut http = HttpConnector::new_with_resolver(DialResolver {
        dial,
        gai: GaiResolver::new(),
    });
    http.enforce_http(false);
    http.set_connect_timeout(Some(t.connect));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        // Bodies stream through; a read buffer larger than a few TLS
        // records only costs memory per connection (64 pulls at once).
        .http1_max_buf_size(64 * 1024)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(16)
        .pool_timer(TokioTimer::new())
        .build(https)
}

impl UpstreamClient {
    pub fn new(up: &Upstream, ca_pem: &[u8], t: &Timeouts) -> Result<Self, ProxyError> {
        let tls = roots_from_pem(ca_pem)
            .and_then(tls_config)
            .map_err(ProxyError::Tls)?;
        let client = https_client(tls, up.dial, t);
        let redirect_client = if up.redirects.hosts.is_empty() {
            None
        } else {
            Some(https_client(redirect_tls(&up.redirects)?, None, t))
        };
        let host_in_uri = if up.host.contains(':') {
            format!("[{}]", up.host)
        } else {
            up.host.clone()
        };
        let port = up.dial.map(|d| d.port()).unwrap_or(up.port);
        let base = format!("https://{host_in_uri}:{port}");
        let origins = [format!("https://{host_in_uri}:{}", up.port), base.clone()]
            .iter()
            .filter_map(|u| url::Url::parse(u).ok())
            .map(|u| redirect::Origin::of(&u))
            .collect();
        Ok(UpstreamClient {
            client,
            redirect_client,
            base,
            host: up.host.clone(),
            origins,
            redirects: up.redirects.clone(),
        })
    }
}

impl UpstreamClient {
    /// `GET /v2/` once; true if the upstream answered with any HTTP status
    /// (401 with a challenge counts: it is there).
    pub async fn probe(&self) -> bool {
        let Ok(uri) = format!("{}/v2/", self.base).parse::<Uri>() else {
            return false;
        };
        let req = Request::get(uri).body(Empty::new()).expect("valid request");
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.client.request(req)).await,
            Ok(Ok(_))
        )
    }
}

/// Shared, reloadable state of the proxy.
pub struct ProxyState {
    pub upstream: RwLock<Arc<UpstreamClient>>,
    pub aliases: RwLock<Vec<String>>,
    /// Mirrored upstreams (#20) and their repository prefixes: a request
    /// with `?ns=docker.io` is for `mirror/docker.io/<name>` upstream.
    pub mirrors: RwLock<Vec<(String, String)>>,
    pub cache: Option<Arc<Cache>>,
    pub metrics: Arc<Metrics>,
    /// Reloadable on SIGHUP (#12); read once per request or connection.
    pub timeouts: RwLock<Timeouts>,
    /// The upstream answered at least once (any HTTP response).
    pub upstream_seen: Arc<AtomicBool>,
    /// Blob downloads in progress, shared by every client (#11).
    pub downloads: coalesce::Downloads,
    /// Node-to-node sharing (`peers.*`), when configured (#11).
    pub peers: Option<Arc<peers::Peers>>,
}

impl ProxyState {
    /// The timeouts in force now.
    pub fn timeouts(&self) -> Timeouts {
        *self.timeouts.read().expect("timeouts lock")
    }
}

const REQUEST_HEADERS: [header::HeaderName; 5] = [
    header::ACCEPT,
    header::AUTHORIZATION,
    header::RANGE,
    header::IF_NONE_MATCH,
    header::USER_AGENT,
];

const RESPONSE_HEADERS: [&str; 9] = [
    "content-length",
    "content-type",
    "docker-content-digest",
    "www-authenticate",
    "content-range",
    "accept-ranges",
    "etag",
    "docker-distribution-api-version",
    "last-modified",
];

fn refusal_response(r: &Refusal) -> Response<ProxyBody> {
    let mut resp = Response::new(full(r.body()));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn full(s: String) -> ProxyBody {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed()
}

fn unavailable(msg: String) -> Response<ProxyBody> {
    refusal_response(&Refusal {
        status: 503,
        code: "UNAVAILABLE",
        message: msg,
    })
}

/// Counts a request as in flight until its response body is finished.
struct InFlight(Arc<Metrics>);
impl InFlight {
    fn new(m: &Arc<Metrics>) -> Self {
        m.in_flight.inc();
        InFlight(m.clone())
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// containerd's requests carry well under 4 KiB of headers; anything much
/// larger is hostile or broken and is refused before any upstream call.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Handle one client request.
pub async fn handle(
    state: Arc<ProxyState>,
    client: Option<IpAddr>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let head_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let verdict = if head_bytes > MAX_HEADER_BYTES {
        Err(Refusal {
            status: 431,
            code: "UNSUPPORTED",
            message: format!(
                "request headers are {head_bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"
            ),
        })
    } else {
        classify(&state, &req)
    };
    let (resp, class) = match verdict {
        Err(r) => (refusal_response(&r), RouteLabel::Refused),
        Ok(route) => {
            let class = route.class();
            (
                forward(&state, &method, route, req.headers(), false, client).await,
                class,
            )
        }
    };
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method: MethodLabel::of(&method),
            route: class,
            status: resp.status().as_u16(),
        })
        .inc();
    if resp.status().is_success() {
        state.metrics.proxy_ok.inc();
    }
    debug!(%method, %path, route = %class, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "proxied");
    Ok(resp)
}

/// Handle one request on the peer port (#11): `GET`/`HEAD` of a blob by
/// digest, served from the cache or from upstream, never relayed to
/// another peer; everything else is 404.
pub async fn handle_peer(
    state: Arc<ProxyState>,
    client: Option<IpAddr>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let method = req.method().clone();
    let route = if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        None
    } else {
        route::classify(method.as_str(), req.uri().path(), None, &[])
            .ok()
            .filter(|r| matches!(r, Route::Blob { .. }))
    };
    let (resp, class) = match route {
        None => (
            refusal_response(&Refusal {
                status: 404,
                code: "NOT_FOUND",
                message: "the peer port serves only GET and HEAD of blobs by digest".into(),
            }),
            RouteLabel::Refused,
        ),
        Some(route) => {
            let class = route.class();
            // Never the caller's credentials (#18 point 5): anyone who
            // reaches this port (every node IP) could otherwise guess
            // registry passwords through it, or, with one valid
            // credential, put a private blob into the node's cache. What a
            // peer fetches upstream is what the registry serves
            // anonymously.
            let mut headers = req.headers().clone();
            headers.remove(header::AUTHORIZATION);
            let hop = peers::Hop::of(&headers);
            let resp = match peer_admission(&state, client, &route, &headers, hop).await {
                Err(refused) => refused,
                Ok(()) => {
                    let digest = route.digest().cloned();
                    let resp = serve_peer(&state, &method, route, &headers, hop, client).await;
                    if let (Some(peers), Some(d), StatusCode::NOT_FOUND, false) = (
                        &state.peers,
                        digest,
                        resp.status(),
                        hop == peers::Hop::Relay,
                    ) {
                        peers.guard.remember_missing(&d, Instant::now());
                    }
                    resp
                }
            };
            (resp, class)
        }
    };
    debug!(%method, path = %req.uri().path(), route = %class, status = resp.status().as_u16(), "served a peer");
    Ok(resp)
}

/// Serve a blob on the peer port as its owner or as a relay (#23). As the
/// owner of a blob already served to `peers.fanout` nodes, answer a first
/// ask with `307` naming a relay ([`tree::Tracker`]); as a relay, serve
/// only what is held or being downloaded here. Bytes sent are counted by
/// role, and a direct child is the owner's until its body is dropped.
async fn serve_peer(
    state: &Arc<ProxyState>,
    method: &Method,
    route: Route,
    headers: &HeaderMap,
    hop: peers::Hop,
    client: Option<IpAddr>,
) -> Response<ProxyBody> {
    let (Some(peers), Some(digest)) = (state.peers.clone(), route.digest().cloned()) else {
        return forward(state, method, route, headers, true, client).await;
    };
    let mut tracked = None;
    if let (Some(asker), true, false) = (
        peers.asker(headers, client),
        *method == Method::GET,
        hop == peers::Hop::Relay,
    ) {
        let failed = headers
            .get(peers::FAILED_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let answer = peers.tracker.lock().expect("tracker lock").ask(
            &digest,
            asker,
            hop == peers::Hop::Direct,
            failed,
            Instant::now(),
        );
        match answer {
            tree::Answer::Relay(relay) => {
                state.metrics.peer_relays_named.inc();
                debug!(%digest, %asker, %relay, "owner names a relay");
                let mut r = Response::new(full(String::new()));
                *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                let h = r.headers_mut();
                if let Ok(v) = HeaderValue::from_str(&relay.to_string()) {
                    h.insert(peers::RELAY_HEADER, v);
                }
                if let Ok(v) =
                    HeaderValue::from_str(&format!("http://{relay}{}", route.upstream_path()))
                {
                    h.insert(header::LOCATION, v);
                }
                return r;
            }
            tree::Answer::Serve => tracked = Some(asker),
        }
    }
    let (role, resp) = if hop == peers::Hop::Relay {
        (PeerRole::Relay, held(state, method, &route, headers).await)
    } else {
        (
            PeerRole::Owner,
            forward(state, method, route, headers, true, client).await,
        )
    };
    if !resp.status().is_success() {
        if let Some(asker) = tracked {
            peers
                .tracker
                .lock()
                .expect("tracker lock")
                .not_served(&digest, asker);
        }
        return resp;
    }
    /// Counts a peer transfer while its body lives.
    struct Sending {
        state: Arc<ProxyState>,
        peers: Arc<peers::Peers>,
        tracked: Option<Digest>,
    }
    impl Drop for Sending {
        fn drop(&mut self) {
            self.state.metrics.peer_children.dec();
            if let Some(d) = &self.tracked {
                self.peers.tracker.lock().expect("tracker lock").done(d);
            }
        }
    }
    state.metrics.peer_children.inc();
    let sending = Sending {
        state: state.clone(),
        peers,
        tracked: tracked.map(|_| digest),
    };
    let counter = state.metrics.peer_served(role);
    resp.map(move |b| {
        b.map_frame(move |f| {
            let _ = &sending;
            if let Some(d) = f.data_ref() {
                counter.inc_by(d.len() as u64);
            }
            f
        })
        .boxed()
    })
}

/// A relay's answer (#23): the blob from the cache or from the download
/// in progress here, never fetched for the asker; 404 when neither.
async fn held(
    state: &Arc<ProxyState>,
    method: &Method,
    route: &Route,
    headers: &HeaderMap,
) -> Response<ProxyBody> {
    let head = method == Method::HEAD;
    let range = headers.get(header::RANGE);
    if let (Some(cache), Some(digest)) = (&state.cache, route.digest()) {
        if let Some(entry) = cache.get(digest) {
            if let Some(resp) = serve_cached(state, &entry, digest, head, range).await {
                state.metrics.cache_hits.inc();
                return resp;
            }
        } else if !head {
            if let Some(resp) = coalesce::serve_held(state, digest, range).await {
                return resp;
            }
        }
    }
    refusal_response(&Refusal {
        status: 404,
        code: "BLOB_UNKNOWN",
        message: "this node neither holds nor downloads that blob".into(),
    })
}

/// What a request on the peer port may cost this node (#18 points 5 and
/// 6), decided before anything is fetched:
/// - a digest upstream had no blob for within [`peers::MISSING_FOR`] is
///   answered 404 at once;
/// - a blob that is cached, or being downloaded, and was fetched without
///   credentials costs upstream nothing and is served;
/// - a relay ask (#23) for a blob neither cached nor being downloaded is
///   answered 404 by [`held`] and costs nothing;
/// - anything else costs an upstream request, and takes one from the
///   client's allowance (`peers.client_misses_per_sec`; past it, 429);
/// - a blob fetched with a client's credentials is served only once an
///   anonymous `HEAD` shows that the registry serves it to anyone;
///   otherwise 404, and the asking node goes upstream with its own.
async fn peer_admission(
    state: &Arc<ProxyState>,
    client: Option<IpAddr>,
    route: &Route,
    anonymous: &HeaderMap,
    hop: peers::Hop,
) -> Result<(), Response<ProxyBody>> {
    let (Some(peers), Some(digest)) = (&state.peers, route.digest()) else {
        return Ok(());
    };
    let now = Instant::now();
    let not_found = |message: &str| {
        refusal_response(&Refusal {
            status: 404,
            code: "BLOB_UNKNOWN",
            message: message.into(),
        })
    };
    if peers.guard.is_missing(digest, now) {
        return Err(not_found("upstream had no such blob moments ago"));
    }
    let known = state
        .cache
        .as_ref()
        .and_then(|c| c.credentialed(digest))
        .or_else(|| state.downloads.credentialed(digest));
    if known == Some(false) {
        return Ok(());
    }
    // A relay ask (#23) for a blob neither cached nor downloading here is
    // answered 404 without fetching anything: it costs no allowance.
    if known.is_none() && hop == peers::Hop::Relay {
        return Ok(());
    }
    let ip = client.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    if !peers
        .guard
        .take(ip, peers.config.client_misses_per_sec, now)
    {
        let mut r = refusal_response(&Refusal {
            status: 429,
            code: "TOOMANYREQUESTS",
            message: format!(
                "this client's requests that go upstream are past peers.client_misses_per_sec ({})",
                peers.config.client_misses_per_sec
            ),
        });
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(r);
    }
    if known != Some(true) {
        return Ok(());
    }
    match upstream_response(state, &Method::HEAD, route, anonymous).await {
        Ok(r) if r.status() == StatusCode::OK => {
            if let Some(c) = &state.cache {
                c.clear_credentialed(digest);
            }
            Ok(())
        }
        Ok(r) if r.status() == StatusCode::NOT_FOUND => {
            peers.guard.remember_missing(digest, now);
            Err(not_found("upstream has no such blob"))
        }
        _ => Err(not_found(
            "this blob was fetched with a client's credentials, and the registry does not serve it without them",
        )),
    }
}

fn classify(state: &ProxyState, req: &Request<Incoming>) -> Result<Route, Refusal> {
    // An absolute-form request line (`GET http://elsewhere/... HTTP/1.1`) is
    // how clients use an open forward proxy; this is not one.
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return Err(Refusal {
            status: 400,
            code: "UNSUPPORTED",
            message: "absolute-form requests are not served: this is not a forward proxy".into(),
        });
    }
    // containerd sends `?ns=registry.shared-services%3A5000`.
    let ns = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    if let Some(ns) = ns.as_deref() {
        let mirrors = state.mirrors.read().expect("mirrors lock");
        if let Some((_, prefix)) = mirrors.iter().find(|(host, _)| host == ns) {
            return route::classify(req.method().as_str(), req.uri().path(), None, &[])
                .map(|r| r.under(prefix));
        }
    }
    let aliases = state.aliases.read().expect("aliases lock");
    route::classify(
        req.method().as_str(),
        req.uri().path(),
        ns.as_deref(),
        &aliases,
    )
}

async fn forward(
    state: &Arc<ProxyState>,
    method: &Method,
    route: Route,
    headers: &HeaderMap,
    via_peer: bool,
    client: Option<IpAddr>,
) -> Response<ProxyBody> {
    let head = method == Method::HEAD;
    let range = headers.get(header::RANGE).cloned();
    // Content addressed by digest is immutable: serve it from the cache
    // without asking the upstream (and so also while it is down).
    if let (Some(cache), Some(digest)) = (&state.cache, route.digest()) {
        if let Some(entry) = cache.get(digest) {
            if let Some(resp) = serve_cached(state, &entry, digest, head, range.as_ref()).await {
                state.metrics.cache_hits.inc();
                return resp;
            }
        } else if digest.algorithm == "sha256" {
            state.metrics.cache_misses.inc();
            // #11: one download per blob, however many clients ask.
            if matches!(route, Route::Blob { .. }) && !head {
                match &range {
                    None => {
                        if let Some(resp) =
                            coalesce::serve(state, cache, &route, headers, via_peer, client).await
                        {
                            return resp;
                        }
                    }
                    Some(r) => {
                        if let Some(resp) = coalesce::serve_range(state, digest, r, via_peer) {
                            return resp;
                        }
                    }
                }
            }
        }
    }
    let resp = match upstream_response(state, method, &route, headers).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    relay(state, method, &route, range.as_ref(), headers, resp)
}

/// Send `method` for `route` upstream, following redirects as
/// [`redirect`] allows; the upstream's response head, or the response for
/// the client when there is none.
async fn upstream_response(
    state: &Arc<ProxyState>,
    method: &Method,
    route: &Route,
    headers: &HeaderMap,
) -> Result<Response<Incoming>, Response<ProxyBody>> {
    let upstream = state.upstream.read().expect("upstream lock").clone();
    let mut current = match url::Url::parse(&format!("{}{}", upstream.base, route.upstream_path()))
    {
        Ok(u) => u,
        Err(e) => return Err(unavailable(format!("bad upstream uri: {e}"))),
    };
    let mut auth = headers.get(header::AUTHORIZATION).cloned();
    let mut client = &upstream.client;
    let mut hops = 0;
    let resp = loop {
        let uri: Uri = match current.as_str().parse() {
            Ok(u) => u,
            Err(e) => return Err(unavailable(format!("bad upstream uri: {e}"))),
        };
        let mut b = Request::builder().method(method.clone()).uri(uri.clone());
        for h in REQUEST_HEADERS.iter() {
            if h == header::AUTHORIZATION {
                if let Some(a) = &auth {
                    b = b.header(h, a);
                }
            } else if let Some(v) = headers.get(h) {
                b = b.header(h, v);
            }
        }
        let req = b.body(Empty::new()).expect("valid request");
        let t0 = Instant::now();
        let r = tokio::time::timeout(state.timeouts().response, client.request(req)).await;
        state
            .metrics
            .upstream_latency
            .observe(t0.elapsed().as_secs_f64());
        let resp = match r {
            Err(_) => {
                warn!(%uri, "upstream did not answer within {:?}", state.timeouts().response);
                return Err(unavailable(format!(
                    "upstream {} did not answer in time",
                    upstream.host
                )));
            }
            Ok(Err(e)) => {
                warn!(%uri, error = %e, "upstream request failed");
                return Err(unavailable(format!("upstream {}: {e}", upstream.host)));
            }
            Ok(Ok(r)) => r,
        };
        if hops == 0 {
            state.upstream_seen.store(true, Ordering::Relaxed);
        }
        // Registries backed by object storage redirect blob GETs.
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok());
        let Some(loc) = location.filter(|_| resp.status().is_redirection() && hops < 5) else {
            break resp;
        };
        let hop = match upstream
            .redirects
            .next_hop(&upstream.origins, &current, loc)
        {
            Ok(h) => h,
            Err(why) => {
                // 503, like an unreachable upstream: containerd tries its
                // next host instead of following the redirect itself.
                warn!(route = %route.class(), "{why}; not followed");
                return Err(unavailable(why.to_string()));
            }
        };
        if hop.same_origin {
            // Back on the upstream: its client, and its dial address.
            let mut u = hop.url;
            if let Ok(base) = url::Url::parse(&upstream.base) {
                let _ = u.set_port(base.port());
            }
            client = &upstream.client;
            current = u;
        } else {
            // Like Go's net/http, credentials stay with their origin; unlike
            // it, a change of port counts (#13).
            auth = None;
            client = match &upstream.redirect_client {
                Some(c) => c,
                None => return Err(unavailable("no client for redirect hosts".into())),
            };
            current = hop.url;
        }
        hops += 1;
    };
    Ok(resp)
}

/// Stream an upstream response to the client: teed into the cache and
/// verified when it is a whole response for a digest.
fn relay(
    state: &Arc<ProxyState>,
    method: &Method,
    route: &Route,
    range: Option<&HeaderValue>,
    request_headers: &HeaderMap,
    resp: Response<Incoming>,
) -> Response<ProxyBody> {
    let head = method == Method::HEAD;
    let status = resp.status();
    let mut out = Response::builder().status(status);
    // The gateway's mirror names the upstream and its answer in the reason
    // (#20); containerd prints the status line, not the body.
    if let Some(reason) = resp.extensions().get::<hyper::ext::ReasonPhrase>() {
        out = out.extension(reason.clone());
    }
    for name in RESPONSE_HEADERS {
        for v in resp.headers().get_all(name) {
            out = out.header(name, v);
        }
    }
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if head {
        if status.is_success() {
            mark_pull(&state.metrics);
        }
        return out
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .expect("response");
    }
    let whole_by_digest = status == StatusCode::OK && range.is_none();
    // A whole response for a digest is checked as it streams (#13), and
    // cached when there is a cache with room: one writer does both. A
    // Range response is a part and passes as it is.
    let stream = match route.digest() {
        Some(d) if whole_by_digest => {
            let len = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let cached = state.cache.as_ref().and_then(|c| {
                c.writer(
                    d,
                    cache::Meta {
                        content_type,
                        len,
                        credentialed: request_headers.contains_key(header::AUTHORIZATION),
                    },
                )
            });
            Some(cached.unwrap_or_else(|| cache::Writer::unbacked(d, len)))
        }
        _ => None,
    };
    let body = Streamed {
        inner: crate::idle::Idle::new(resp.into_body(), state.timeouts().body_idle),
        stream,
        held: None,
        tail: None,
        done: false,
        metrics: state.metrics.clone(),
        bytes: state.metrics.bytes_from(SourceLabel::Upstream),
        success: status.is_success(),
        _in_flight: InFlight::new(&state.metrics),
    };
    out.body(body.boxed()).expect("response")
}

fn mark_pull(m: &Metrics) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    m.last_pull.set(now);
}

/// Parse a single `bytes=a-b` / `bytes=a-` range against a length.
fn single_range(v: &HeaderValue, len: u64) -> Option<(u64, u64)> {
    let s = v.to_str().ok()?.strip_prefix("bytes=")?;
    if s.contains(',') {
        return None;
    }
    let (a, b) = s.split_once('-')?;
    let start: u64 = a.parse().ok()?;
    let end: u64 = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<u64>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

async fn serve_cached(
    state: &Arc<ProxyState>,
    entry: &cache::Entry,
    digest: &route::Digest,
    head: bool,
    range: Option<&HeaderValue>,
) -> Option<Response<ProxyBody>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let (status, start, len) = match range {
        None => (StatusCode::OK, 0, entry.len),
        // An unsupported range form goes upstream rather than being ignored.
        Some(r) => {
            let (a, b) = single_range(r, entry.len)?;
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
    };
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .header("docker-content-digest", digest.to_string())
        .header(header::ACCEPT_RANGES, "bytes");
    b = b.header(
        header::CONTENT_TYPE,
        entry
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into()),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", start + len - 1, entry.len),
        );
    }
    if head {
        mark_pull(&state.metrics);
        return b
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .ok();
    }
    let mut f = tokio::fs::File::open(&entry.path).await.ok()?;
    f.seek(std::io::SeekFrom::Start(start)).await.ok()?;
    let stream = tokio_util::io::ReaderStream::with_capacity(f.take(len), 64 * 1024);
    let metrics = state.metrics.clone();
    let in_flight = InFlight::new(&state.metrics);
    let counter = state.metrics.bytes_from(SourceLabel::Cache);
    let mut sent = 0u64;
    let body = StreamBody::new(futures_util::StreamExt::map(stream, move |r| {
        let _keep = &in_flight;
        r.map(|chunk| {
            counter.inc_by(chunk.len() as u64);
            sent += chunk.len() as u64;
            if sent == len {
                mark_pull(&metrics);
            }
            Frame::data(chunk)
        })
        .map_err(|e| Box::new(e) as BoxError)
    }));
    b.body(BodyExt::boxed(body)).ok()
}

/// An upstream body on its way to the client, teed into the cache and,
/// for a digest, verified before its last chunk goes out.
///
/// containerd verifies too, but only when it commits the content, after
/// the fetch from this host has succeeded: a clean 200 with wrong bytes
/// fails the pull instead of being retried. So the last chunk is held back
/// until the whole body matches its digest and length (#13).
struct Streamed {
    /// The upstream body, ended with a stall after `proxy.body_idle_timeout_secs`.
    inner: crate::idle::Idle<Incoming>,
    /// Verifies (and caches) a whole response for a digest.
    stream: Option<cache::Writer>,
    /// The chunk held back until the next one, or the verified end.
    held: Option<Bytes>,
    /// The verified last chunk, to send on the next poll.
    tail: Option<Bytes>,
    /// Everything has been handed to hyper.
    done: bool,
    metrics: Arc<Metrics>,
    bytes: prometheus_client::metrics::counter::Counter,
    success: bool,
    _in_flight: InFlight,
}

impl Streamed {
    /// The whole body arrived (and was verified): commit the cache entry
    /// and record the pull.
    fn finish(&mut self) {
        self.done = true;
        if let Some(w) = self.stream.take() {
            // fsync and rename can take a while under I/O load; keep them
            // off the runtime's worker threads.
            tokio::task::spawn_blocking(move || w.finish());
        }
        if std::mem::take(&mut self.success) {
            mark_pull(&self.metrics);
        }
    }

    fn send(&mut self, chunk: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.bytes.inc_by(chunk.len() as u64);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    /// The upstream body ended: check it; the chunk still to send, if any.
    fn end(&mut self) -> Result<Option<Bytes>, BoxError> {
        let tail = match self.stream.as_ref().map(cache::Writer::check) {
            None => None,
            Some(Ok(())) => self.held.take(),
            Some(Err(e)) => {
                // The error makes hyper abort the client connection; the
                // writer is dropped, so nothing lands in the cache either.
                self.stream = None;
                self.held = None;
                self.done = true;
                self.metrics.digest_mismatches.inc();
                warn!(error = %e, "digest mismatch; aborting the client connection");
                return Err(Box::new(e));
            }
        };
        self.finish();
        Ok(tail.filter(|t| !t.is_empty()))
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(t) = this.tail.take() {
            return this.send(t);
        }
        if this.done {
            return Poll::Ready(None);
        }
        // Bounded: each turn consumes one upstream frame; it only repeats
        // for a frame that is held back or empty.
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    let out = match this.stream.as_mut() {
                        Some(w) => {
                            w.write(&data);
                            this.held.replace(data)
                        }
                        None => Some(data),
                    };
                    let out = out.filter(|c| !c.is_empty());
                    // hyper stops polling once the body reports its end (all
                    // of Content-Length delivered), so end here, not on `None`.
                    if this.inner.is_end_stream() {
                        let tail = match this.end() {
                            Ok(t) => t,
                            Err(e) => return Poll::Ready(Some(Err(e))),
                        };
                        return match (out, tail) {
                            (Some(c), t) => {
                                this.tail = t;
                                this.send(c)
                            }
                            (None, Some(t)) => this.send(t),
                            (None, None) => Poll::Ready(None),
                        };
                    }
                    match out {
                        Some(chunk) => return this.send(chunk),
                        None => continue,
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    // Discard the partial blob; the error makes hyper abort the
                    // client connection instead of ending the response.
                    this.stream = None;
                    this.held = None;
                    if crate::idle::is_stall(e.as_ref()) {
                        warn!(error = %e, "upstream body stalled; aborting the client connection");
                    } else {
                        warn!(error = %e, "upstream body failed mid-transfer; aborting the client connection");
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    return match this.end() {
                        Ok(Some(t)) => this.send(t),
                        Ok(None) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.tail.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serve until `shutdown` resolves, then stop accepting and let in-flight
/// responses finish for up to `grace`. Returns whether all finished.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> bool {
    serve_port(listener, state, shutdown, grace, false).await
}

/// Serve the peer port ([`peers`]) like [`serve`]: blobs by digest only.
pub async fn serve_peers(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> bool {
    serve_port(listener, state, shutdown, grace, true).await
}

async fn serve_port(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
    peer_port: bool,
) -> bool {
    let server = if peer_port { "peers" } else { "proxy" };
    crate::admin::listen::serve_connections(listener, server, shutdown, grace, |stream, watcher| {
        // Built per connection: client_header is reloadable (#12).
        let builder = crate::admin::listen::http1_builder(state.timeouts().client_header);
        let st = state.clone();
        let client = stream.peer_addr().ok().map(|a| a.ip());
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move {
                    if peer_port {
                        handle_peer(st, client, req).await
                    } else {
                        handle(st, client, req).await
                    }
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = watcher.watch(conn).await {
                debug!(error = %e, "client connection ended with an error");
            }
        });
    })
    .await
}

/// Bind the proxy listener, refusing non-loopback addresses unless allowed:
/// the proxy serves the registry without authentication of its own.
pub async fn bind(addr: SocketAddr, allow_non_loopback: bool) -> Result<TcpListener, ProxyError> {
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(ProxyError::Bind {
            addr,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a loopback address (pass --allow-non-loopback-proxy to override)",
            ),
        });
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(single_range(&v("bytes=0-9"), 100), Some((0, 9)));
        assert_eq!(single_range(&v("bytes=90-"), 100), Some((90, 99)));
        assert_eq!(single_range(&v("bytes=90-500"), 100), Some((90, 99)));
        assert_eq!(single_range(&v("bytes=0-1,5-6"), 100), None);
        assert_eq!(single_range(&v("bytes=200-"), 100), None);
    }
}
