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
//! the destination. Bodies stream with backpressure and are never buffered
//! whole; if the upstream fails mid-body the client connection is aborted
//! (hyper closes it without completing the response), because containerd
//! does not retry a truncated blob against the next host.

pub mod cache;
pub mod route;

use std::convert::Infallible;
use std::net::SocketAddr;
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

use crate::admin::metrics::{Metrics, RequestLabels, SourceLabels};
use cache::Cache;
use route::{Refusal, Route};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("registry.ca_file: cannot build a TLS trust store: {0}")]
    Tls(String),
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

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector<DialResolver>>, Empty<Bytes>>;

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
    redirect_client: HttpsClient,
    /// `https://host:port` used in request URIs (port of `dial` if set).
    base: String,
    host: String,
}

fn tls_config(ca_pem: &[u8], extra_native_roots: bool) -> Result<rustls::ClientConfig, ProxyError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| ProxyError::Tls(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| ProxyError::Tls(e.to_string()))?;
    }
    if extra_native_roots {
        // Redirect targets (cloud storage behind the registry) use public
        // CAs; the registry itself is only ever trusted through the cluster CA.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
    }
    if roots.is_empty() {
        return Err(ProxyError::Tls("no certificates".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn https_client(tls: rustls::ClientConfig, dial: Option<SocketAddr>, t: &Timeouts) -> HttpsClient {
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
        let client = https_client(tls_config(ca_pem, false)?, up.dial, t);
        let redirect_client = https_client(tls_config(ca_pem, true)?, None, t);
        let host_in_uri = if up.host.contains(':') {
            format!("[{}]", up.host)
        } else {
            up.host.clone()
        };
        let port = up.dial.map(|d| d.port()).unwrap_or(up.port);
        Ok(UpstreamClient {
            client,
            redirect_client,
            base: format!("https://{host_in_uri}:{port}"),
            host: up.host.clone(),
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
    pub cache: Option<Arc<Cache>>,
    pub metrics: Arc<Metrics>,
    /// Reloadable on SIGHUP (#12); read once per request or connection.
    pub timeouts: RwLock<Timeouts>,
    /// The upstream answered at least once (any HTTP response).
    pub upstream_seen: Arc<AtomicBool>,
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
        Err(r) => (refusal_response(&r), "refused"),
        Ok(route) => {
            let class = route.class();
            (forward(&state, &method, route, req.headers()).await, class)
        }
    };
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.as_str().into(),
            route: class.into(),
            status: resp.status().as_u16(),
        })
        .inc();
    debug!(%method, %path, route = class, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "proxied");
    Ok(resp)
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
        }
    }

    let upstream = state.upstream.read().expect("upstream lock").clone();
    let mut uri: Uri = match format!("{}{}", upstream.base, route.upstream_path()).parse() {
        Ok(u) => u,
        Err(e) => return unavailable(format!("bad upstream uri: {e}")),
    };
    let mut auth = headers.get(header::AUTHORIZATION).cloned();
    let mut client = &upstream.client;
    let mut hops = 0;
    let resp = loop {
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
                return unavailable(format!("upstream {} did not answer in time", upstream.host));
            }
            Ok(Err(e)) => {
                warn!(%uri, error = %e, "upstream request failed");
                return unavailable(format!("upstream {}: {e}", upstream.host));
            }
            Ok(Ok(r)) => r,
        };
        if hops == 0 {
            state.upstream_seen.store(true, Ordering::Relaxed);
        }
        // Registries backed by object storage redirect blob GETs.
        if resp.status().is_redirection() && hops < 5 {
            if let Some(loc) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
            {
                let next: Uri = match loc.parse::<Uri>() {
                    Ok(u) if u.scheme().is_some() => u,
                    Ok(u) => match format!("{}{}", upstream.base, u).parse() {
                        Ok(u) => u,
                        Err(_) => break resp,
                    },
                    Err(_) => break resp,
                };
                if next.host() != uri.host() {
                    // Like Go's net/http: credentials stay with their host.
                    auth = None;
                    client = &upstream.redirect_client;
                }
                uri = next;
                hops += 1;
                continue;
            }
        }
        break resp;
    };

    let status = resp.status();
    let mut out = Response::builder().status(status);
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
    let writer = match (&state.cache, route.digest()) {
        (Some(c), Some(d)) if status == StatusCode::OK && range.is_none() => {
            c.writer(d, content_type)
        }
        _ => None,
    };
    let body = Streamed {
        inner: resp.into_body(),
        idle: state.timeouts().body_idle,
        sleep: Box::pin(tokio::time::sleep(state.timeouts().body_idle)),
        cache: writer,
        metrics: state.metrics.clone(),
        bytes: state
            .metrics
            .bytes
            .get_or_create(&SourceLabels { source: "upstream" })
            .clone(),
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
    let counter = state
        .metrics
        .bytes
        .get_or_create(&SourceLabels { source: "cache" })
        .clone();
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

/// An upstream body on its way to the client, teed into the cache.
struct Streamed {
    inner: Incoming,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    cache: Option<cache::Writer>,
    metrics: Arc<Metrics>,
    bytes: prometheus_client::metrics::counter::Counter,
    success: bool,
    _in_flight: InFlight,
}

impl Streamed {
    /// The whole body arrived: commit the cache entry and record the pull.
    fn finish(&mut self) {
        if let Some(w) = self.cache.take() {
            // Verifying, fsync and rename can take a while under I/O load;
            // keep them off the runtime's worker threads.
            tokio::task::spawn_blocking(move || w.finish());
        }
        if std::mem::take(&mut self.success) {
            mark_pull(&self.metrics);
        }
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if let Some(w) = this.cache.as_mut() {
                        w.write(d);
                    }
                    this.bytes.inc_by(d.len() as u64);
                }
                // hyper stops polling once the body reports its end (all of
                // Content-Length delivered), so finish here, not on `None`.
                if this.inner.is_end_stream() {
                    this.finish();
                }
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // Discard the partial blob; the error makes hyper abort the
                // client connection instead of ending the response.
                this.cache = None;
                warn!(error = %e, "upstream body failed mid-transfer; aborting the client connection");
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.sleep.as_mut().poll(cx).is_ready() {
                    this.cache = None;
                    warn!(
                        "upstream body stalled for {:?}; aborting the client connection",
                        this.idle
                    );
                    return Poll::Ready(Some(Err("upstream body stalled".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

/// Serve until `shutdown` resolves, then stop accepting and let in-flight
/// responses finish for up to `grace`. Returns whether all finished.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> bool {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // Built per connection: client_header is reloadable (#12).
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    // Slowloris: a client that trickles its request head is cut off.
                    .header_read_timeout(state.timeouts().client_header)
                    .max_buf_size(64 * 1024)
                    .keep_alive(true);
                let st = state.clone();
                let conn = builder.serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| handle(st.clone(), req)),
                );
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "client connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(grace) => false,
    }
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
