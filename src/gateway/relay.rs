//! The gateway's TLS server and its relay to the upstream registry (the
//! thin async shell around [`super::guard`]).
//!
//! Endpoint: every path on `gateway.listen`, over TLS from
//! [`super::tls::CertStore`]. `GET`/`HEAD` pulls are relayed as they come;
//! any other method (and the `/v2/` ping, see [`super::guard`]) first needs
//! Basic credentials that [`Verifier`] accepts, else `401` with
//! [`CHALLENGE`] and a registry-style JSON error.
//!
//! Bodies stream both ways through hyper with backpressure, so a chunked
//! `PATCH`, a monolithic `PUT` and a cross-repository mount
//! (`POST …/blobs/uploads/?mount=…&from=…`) hold at most a few buffers of a
//! layer, never the whole of it. The hardening is the agent proxy's
//! ([`crate::proxy`]): header size and read-time limits, a TLS handshake
//! deadline, bodies that stall for `body_idle_timeout_secs` are aborted,
//! absolute-form requests are refused, and the destination is always
//! `gateway.upstream`: the client's URI, `Host` and query never choose it.
//!
//! Failures: an upstream that refuses or breaks the connection is `503`
//! (`slipway_gateway_upstream_errors_total`); one that sends no response
//! head within `upstream_response_timeout_secs` of the request's end is
//! `504` (`slipway_gateway_upstream_timeouts_total`). Refused writes are
//! logged at most once per client, kind and interval ([`RefusalLog`]),
//! their paths cut short; the metrics count every one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::config::Upstream;
use super::guard::{self, MethodClass, Outcome, Verdict, CHALLENGE};
use super::htpasswd::{Check, Verifier};
use super::metrics::GatewayMetrics;
use crate::idle::Idle;
use crate::proxy::route::Refusal;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type GatewayBody = BoxBody<Bytes, BoxError>;
type UpstreamClient = Client<HttpConnector, Idle<Incoming>>;

/// The same limit as the agent proxy's: registry clients send well under
/// 4 KiB of headers.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Shared state of the relay.
pub struct Relay {
    upstream: Upstream,
    client: UpstreamClient,
    verifier: Arc<Verifier>,
    metrics: Arc<GatewayMetrics>,
    body_idle: Duration,
    /// From the end of the request body to the response head.
    response_head: Duration,
    /// Which refusals get a log line.
    refusals: RefusalLog,
    /// The upstream answered at least once (readiness).
    pub upstream_seen: AtomicBool,
    /// The mirror's fill path (#20), when `mirror.registries` is set.
    pub mirror: Option<Arc<super::fill::Mirror>>,
    /// Garbage collection (#21): the write fence and the pull records.
    pub gc: Arc<super::gc::Collector>,
}

impl Relay {
    pub fn new(
        upstream: Upstream,
        verifier: Arc<Verifier>,
        metrics: Arc<GatewayMetrics>,
        body_idle: Duration,
        response_head: Duration,
    ) -> Relay {
        let client = local_client();
        let gc = Arc::new(super::gc::Collector::new(
            super::gc::Storage::None,
            &upstream.authority,
            metrics.clone(),
        ));
        Relay {
            gc,
            upstream,
            client,
            verifier,
            metrics,
            body_idle,
            response_head,
            refusals: RefusalLog::default(),
            upstream_seen: AtomicBool::new(false),
            mirror: None,
        }
    }

    pub fn with_mirror(mut self, mirror: Option<Arc<super::fill::Mirror>>) -> Relay {
        self.mirror = mirror;
        self
    }

    pub fn with_gc(mut self, gc: Arc<super::gc::Collector>) -> Relay {
        self.gc = gc;
        self
    }

    /// [`PROBE_PATH`] once: `Ok` if the upstream answered with anything but
    /// a 5xx within 5 s, else what it answered or why nothing came.
    pub async fn probe(&self) -> Result<(), String> {
        let Ok(uri) = format!("http://{}{PROBE_PATH}", self.upstream.authority).parse::<Uri>()
        else {
            return Err(format!(
                "{}: not a valid authority",
                self.upstream.authority
            ));
        };
        let req = Request::get(uri)
            .body(Idle::empty(self.body_idle))
            .expect("valid request");
        let verdict = match tokio::time::timeout(Duration::from_secs(5), self.client.request(req))
            .await
        {
            // #22: a store that refuses connections makes distribution's
            // storage health check fail, and distribution then answers every
            // request 503; a store that accepts and never answers does not
            // (the check has no deadline), but the listing below hangs. So
            // a 5xx or no answer is "not ready": the Service then sends
            // pushes and cold pulls to the replicas that can serve them. The
            // pod is not restarted: that is the liveness probe's business.
            Ok(Ok(r)) if r.status().is_server_error() => Err(format!(
                "GET http://{}{PROBE_PATH} answered {} (distribution cannot reach its storage)",
                self.upstream.authority,
                r.status()
            )),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "GET http://{}{PROBE_PATH}: {e}",
                self.upstream.authority
            )),
            Err(_) => Err(format!(
                "GET http://{}{PROBE_PATH} got no answer within 5s (distribution or its storage hangs)",
                self.upstream.authority
            )),
        };
        if verdict.is_ok() {
            self.upstream_seen.store(true, Ordering::Relaxed);
        }
        verdict
    }
}

/// What readiness asks distribution: the first repository name, which
/// distribution can only answer by listing its storage (`/v2/` alone it
/// answers from memory, even with the store hanging; #22).
pub const PROBE_PATH: &str = "/v2/_catalog?n=1";

fn json_error(status: StatusCode, code: &'static str, message: String) -> Response<GatewayBody> {
    let body = Refusal {
        status: status.as_u16(),
        code,
        message,
    }
    .body();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn full(s: String) -> GatewayBody {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed()
}

fn unauthorized(outcome: Outcome) -> Response<GatewayBody> {
    let mut r = Response::new(full(guard::unauthorized_body(outcome)));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(CHALLENGE),
    );
    // As distribution answers: clients check it before they believe the
    // challenge is a registry's.
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and are never relayed.
fn hop_by_hop(name: &HeaderName, connection: &HeaderMap) -> bool {
    const HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    HOP.contains(&name.as_str())
        || connection
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
}

/// At most one refusal line per client this often (#18 point 9): each
/// refused write logged a line with its full path, 1.5 MiB/s of log from
/// one client (28 MiB/s with 12 KB paths). The metrics count every one.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Clients remembered for that; past it, refusals from new clients are
/// counted but not logged until entries age out.
const REFUSAL_LOG_CLIENTS: usize = 4096;
/// A logged path is cut to this many bytes.
const LOGGED_PATH_BYTES: usize = 128;

/// Which refused requests get a log line: the first of each kind
/// (unauthenticated, denied) from a client, then one per
/// [`REFUSAL_LOG_INTERVAL`], saying how many were left out.
#[derive(Default)]
pub struct RefusalLog {
    seen: Mutex<HashMap<(IpAddr, Outcome), (Instant, u64)>>,
}

impl RefusalLog {
    /// `Some(left_out)`: log this refusal, noting how many from the same
    /// client were not logged before it; `None`: count it only.
    pub fn admit(&self, client: Option<IpAddr>, kind: Outcome, now: Instant) -> Option<u64> {
        let key = (client.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), kind);
        let mut seen = self.seen.lock().expect("refusal log lock");
        if !seen.contains_key(&key) && seen.len() >= REFUSAL_LOG_CLIENTS {
            seen.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
            if seen.len() >= REFUSAL_LOG_CLIENTS {
                return None;
            }
        }
        match seen.get_mut(&key) {
            Some((at, left_out)) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                seen.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// A request path as logged: at most [`LOGGED_PATH_BYTES`], cut on a
/// character boundary, with "…" where it was cut.
pub fn logged_path(path: &str) -> String {
    if path.len() <= LOGGED_PATH_BYTES {
        return path.to_string();
    }
    let mut end = LOGGED_PATH_BYTES;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

/// How long a refusal for wrong credentials is held before it is sent
/// (#18 point 7). Failures are remembered, so without it a client repeating
/// one guess gets thousands of answers a second, each costing us a TLS
/// record and a log decision; with it, 64 guessers get about 128.
pub const DENIED_PAUSE: Duration = Duration::from_millis(500);

/// Handle one client request from `client`.
/// The HTTP client to distribution on the pod's loopback, for the relay
/// and the mirror's fill path alike.
pub(crate) fn local_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http1_max_buf_size(64 * 1024)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(32)
        .pool_timer(TokioTimer::new())
        .build(http)
}

pub async fn handle(
    relay: Arc<Relay>,
    client: Option<IpAddr>,
    req: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    let method = req.method().clone();
    let class = MethodClass::of(&method);
    let head_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if head_bytes > MAX_HEADER_BYTES {
        return Ok(json_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "UNSUPPORTED",
            format!(
                "request headers are {head_bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"
            ),
        ));
    }
    // An absolute-form request line is how clients use an open forward
    // proxy; the gateway relays to its one upstream only.
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return Ok(json_error(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            "absolute-form requests are not served: this is not a forward proxy".into(),
        ));
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match guard::decide(&method, req.uri().path(), auth) {
        Verdict::Pass => {}
        Verdict::Unauthenticated => {
            relay.metrics.count(class, Outcome::Unauthenticated);
            // The ping without credentials is every client's first request,
            // not an attempt worth a log line.
            if class == MethodClass::Write {
                if let Some(left_out) =
                    relay
                        .refusals
                        .admit(client, Outcome::Unauthenticated, Instant::now())
                {
                    info!(%method, path = logged_path(req.uri().path()), client = ?client, left_out, "gateway: write without credentials refused");
                }
            }
            return Ok(unauthorized(Outcome::Unauthenticated));
        }
        Verdict::Check(creds) => match relay.verifier.verify(&creds).await {
            Check::Verified => {}
            Check::Denied => {
                relay.metrics.count(class, Outcome::Denied);
                // The user name only: the password is never logged (#10).
                if let Some(left_out) =
                    relay
                        .refusals
                        .admit(client, Outcome::Denied, Instant::now())
                {
                    warn!(%method, path = logged_path(req.uri().path()), user = %logged_path(&creds.user), client = ?client, left_out, "gateway: wrong credentials refused");
                }
                // A guess answered from memory costs us microseconds; the
                // pause makes each one cost the guesser as much time as an
                // honest check would, at the price of a sleeping task.
                tokio::time::sleep(DENIED_PAUSE).await;
                return Ok(unauthorized(Outcome::Denied));
            }
            Check::Busy => {
                relay.metrics.count(class, Outcome::Busy);
                if let Some(left_out) = relay.refusals.admit(client, Outcome::Busy, Instant::now())
                {
                    warn!(%method, client = ?client, left_out, "gateway: too many password checks waiting; answered 503");
                }
                let mut r = json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "too many password checks are waiting; retry shortly".into(),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Ok(r);
            }
        },
    }
    relay.metrics.count(class, Outcome::Allowed);
    if req.uri().path() == crate::gc::GC_PATH {
        return Ok(gc_endpoint(&relay, req).await);
    }
    let pull = (method == Method::GET && req.uri().path().contains("/manifests/")).then(|| {
        let ns = req.uri().query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ns")
                .map(|(_, v)| v.into_owned())
        });
        (req.uri().path().to_string(), ns)
    });
    let resp = 'resp: {
        if let Some(m) = &relay.mirror {
            if let Some(resp) = mirror(m, &relay.gc.fence, &relay.metrics, &req).await {
                break 'resp resp;
            }
        }
        // #21: no write reaches distribution while gc sweeps its storage,
        // and no push asks whether a blob is there (its answer could be
        // deleted before the push names the blob in its manifest).
        let check = method == Method::HEAD && super::gc::blob_path(req.uri().path()).is_some();
        let _write = if class == MethodClass::Write || check {
            match relay.gc.fence.enter() {
                Ok(g) => Some(g),
                Err(r) => {
                    relay.metrics.gc_writes_refused.inc();
                    return Ok(fenced(r));
                }
            }
        } else {
            None
        };
        let path = check.then(|| req.uri().path().to_string());
        let resp = forward(&relay, req).await;
        if let Some(p) = path {
            // Recorded while still counted in, so a sweep that waits for
            // the requests in flight sees it.
            if resp.status().is_success() {
                relay.gc.record_check(&p);
            }
        }
        resp
    };
    if let Some((path, ns)) = pull {
        if resp.status().is_success() {
            if let Some(d) = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
            {
                relay.gc.record_pull(&path, ns.as_deref(), d);
            }
        }
    }
    Ok(resp)
}

/// A write refused while gc sweeps: `503`, `Retry-After`.
fn fenced(r: super::gc::Refused) -> Response<GatewayBody> {
    let mut resp = json_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", r.message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(r.retry_after));
    resp
}

/// `POST /slipway/v1/gc` (#21), with the push account already checked.
async fn gc_endpoint(relay: &Arc<Relay>, req: Request<Incoming>) -> Response<GatewayBody> {
    if req.method() != Method::POST {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{} takes POST", crate::gc::GC_PATH),
        );
    }
    let body = http_body_util::Limited::new(req.into_body(), super::gc::MAX_REQUEST);
    let bytes = match tokio::time::timeout(relay.body_idle, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                format!("gc request body: {e}"),
            )
        }
        Err(_) => {
            return json_error(
                StatusCode::REQUEST_TIMEOUT,
                "UNSUPPORTED",
                "gc request body did not arrive in time".into(),
            )
        }
    };
    let gc_req: crate::gc::GcRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                format!("gc request does not parse: {e}"),
            )
        }
    };
    // On a task of its own: a client that goes away (the command's
    // deadline, a killed Job pod) drops this handler, and a collection
    // cut off there would leave the fence up and, on a bucket, renewed.
    let gc = relay.gc.clone();
    let (status, body) = match tokio::spawn(async move { gc.run(gc_req).await }).await {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNAVAILABLE",
                format!("gc task: {e}"),
            )
        }
    };
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A request for a mirror repository (#20), served by [`super::fill`];
/// `None` for every other request, which the relay forwards.
async fn mirror(
    m: &Arc<super::fill::Mirror>,
    fence: &super::gc::Fence,
    metrics: &GatewayMetrics,
    req: &Request<Incoming>,
) -> Option<Response<GatewayBody>> {
    let path = req.uri().path();
    let ns = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    let method = req.method();
    if method != Method::GET && method != Method::HEAD {
        // Only the fill writes there: a push would put content under an
        // upstream's name that the upstream never served.
        let name = path.strip_prefix("/v2/")?;
        let under = m.cfg.registries.iter().any(|u| {
            name.strip_prefix(&u.repo_prefix())
                .is_some_and(|r| r.starts_with('/'))
        });
        return under.then(|| {
            json_error(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!(
                    "{}: mirror repositories are filled from their upstream only; push elsewhere",
                    logged_path(path)
                ),
            )
        });
    }
    let route = crate::proxy::route::classify(method.as_str(), path, None, &[]).ok()?;
    let request = m.map(&route, ns.as_deref())?;
    // A mirror request may fill, which writes: refused while gc sweeps
    // (#21); containerd then tries the next host of its hosts.toml.
    let _write = match fence.enter() {
        Ok(g) => g,
        Err(r) => {
            metrics.gc_writes_refused.inc();
            return Some(fenced(r));
        }
    };
    Some(m.serve(request, method, req.headers()).await)
}

async fn forward(relay: &Relay, req: Request<Incoming>) -> Response<GatewayBody> {
    let (parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: Uri = match format!("http://{}{pq}", relay.upstream.authority).parse() {
        Ok(u) => u,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                format!("bad request target: {e}"),
            )
        }
    };
    let mut b = Request::builder().method(parts.method.clone()).uri(uri);
    for (name, value) in &parts.headers {
        if hop_by_hop(name, &parts.headers)
            || name == header::AUTHORIZATION
            || name == header::EXPECT
            || name == header::FORWARDED
            || name.as_str().starts_with("x-forwarded-")
        {
            continue;
        }
        b = b.header(name, value);
    }
    // distribution builds the absolute `Location` of an upload from these
    // (registry/api/v2/urls.go), so the client's next PATCH/PUT comes back
    // to the gateway over https, not to 127.0.0.1:5001.
    b = b.header("x-forwarded-proto", "https");
    if let Some(h) = parts.headers.get(header::HOST) {
        b = b.header("x-forwarded-host", h);
    }
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(false);
    let upstream_req = match b.body(Idle::new(body, relay.body_idle).on_end(sent_tx)) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                format!("bad request: {e}"),
            )
        }
    };
    // The response-head deadline runs once the request body is all sent
    // (at once for GET and HEAD): a hung distribution answers nothing, and
    // without it every client waited for as long as it would (#18 point 8).
    let head_deadline = async {
        // Err: the body was dropped, which hyper does once it is sent.
        let _ = sent_rx.wait_for(|sent| *sent).await;
        tokio::time::sleep(relay.response_head).await;
    };
    let answer = tokio::select! {
        r = relay.client.request(upstream_req) => r,
        _ = head_deadline => {
            relay.metrics.upstream_timeouts.inc();
            warn!(method = %parts.method, path = parts.uri.path(), deadline_secs = relay.response_head.as_secs_f64(), "gateway: upstream sent no response head in time; 504");
            return json_error(
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                format!(
                    "upstream registry {} did not answer within {:?}",
                    relay.upstream.authority, relay.response_head
                ),
            );
        }
    };
    let resp = match answer {
        Ok(r) => r,
        Err(e) => {
            relay.metrics.upstream_errors.inc();
            warn!(method = %parts.method, path = parts.uri.path(), error = %e, "gateway: upstream request failed");
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("upstream registry: {e}"),
            );
        }
    };
    relay.upstream_seen.store(true, Ordering::Relaxed);
    let (rparts, rbody) = resp.into_parts();
    debug!(method = %parts.method, path = parts.uri.path(), status = rparts.status.as_u16(), "gateway: relayed");
    let mut out = Response::builder().status(rparts.status);
    for (name, value) in &rparts.headers {
        if !hop_by_hop(name, &rparts.headers) {
            out = out.header(name, value);
        }
    }
    out.body(Idle::new(rbody, relay.body_idle).boxed())
        .unwrap_or_else(|_| {
            json_error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                "bad upstream response".into(),
            )
        })
}

/// Serve TLS until `shutdown` resolves, then stop accepting and let
/// in-flight transfers finish for up to `grace`. Returns whether all did.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    relay: Arc<Relay>,
    client_header: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> bool {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    crate::admin::listen::serve_connections(
        listener,
        "gateway",
        shutdown,
        grace,
        |stream, watcher| {
            let (acceptor, relay) = (acceptor.clone(), relay.clone());
            let client = stream.peer_addr().ok().map(|a| a.ip());
            tokio::spawn(async move {
                // A client that never finishes its handshake is cut off like one
                // that trickles its request head (slowloris).
                let tls = match tokio::time::timeout(client_header, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(error = %e, "gateway: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!("gateway: TLS handshake timed out");
                        return;
                    }
                };
                let conn = crate::admin::listen::http1_builder(client_header).serve_connection(
                    TokioIo::new(tls),
                    hyper::service::service_fn(move |req| handle(relay.clone(), client, req)),
                );
                if let Err(e) = watcher.watch(conn).await {
                    debug!(error = %e, "gateway: client connection ended with an error");
                }
            });
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_per_client_per_interval_with_a_count() {
        let log = RefusalLog::default();
        let (a, b) = (
            Some("10.0.0.1".parse().unwrap()),
            Some("10.0.0.2".parse().unwrap()),
        );
        let t = Instant::now();
        let u = Outcome::Unauthenticated;
        assert_eq!(log.admit(a, u, t), Some(0));
        for i in 1..=500 {
            assert_eq!(log.admit(a, u, t + Duration::from_millis(i)), None);
        }
        // Another client, or a wrong password, is not held back by them.
        assert_eq!(log.admit(b, u, t), Some(0));
        assert_eq!(log.admit(a, Outcome::Denied, t), Some(0));
        assert_eq!(log.admit(a, u, t + REFUSAL_LOG_INTERVAL), Some(500));
        assert_eq!(log.admit(a, u, t + REFUSAL_LOG_INTERVAL), None);
    }

    #[test]
    fn the_client_table_is_bounded() {
        let log = RefusalLog::default();
        let t = Instant::now();
        for i in 0..REFUSAL_LOG_CLIENTS as u32 {
            assert!(log
                .admit(Some(IpAddr::from(i.to_be_bytes())), Outcome::Denied, t)
                .is_some());
        }
        let new = Some("203.0.113.9".parse().unwrap());
        assert_eq!(
            log.admit(new, Outcome::Denied, t),
            None,
            "a full table took a new client"
        );
        assert_eq!(log.seen.lock().unwrap().len(), REFUSAL_LOG_CLIENTS);
        // Once the others age out, the new client is logged again.
        assert_eq!(
            log.admit(new, Outcome::Denied, t + REFUSAL_LOG_INTERVAL),
            Some(0)
        );
        assert_eq!(log.seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn logged_paths_are_cut_on_a_character_boundary() {
        assert_eq!(logged_path("/v2/a/blobs/uploads/"), "/v2/a/blobs/uploads/");
        let long = format!("/v2/{}/blobs/uploads/", "é".repeat(6000));
        let cut = logged_path(&long);
        assert!(cut.len() <= LOGGED_PATH_BYTES + "…".len(), "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        for n in ["transfer-encoding", "connection", "x-secret", "upgrade"] {
            assert!(hop_by_hop(&HeaderName::from_static(n), &h), "{n}");
        }
        for n in [
            "content-length",
            "content-type",
            "docker-content-digest",
            "range",
        ] {
            assert!(!hop_by_hop(&HeaderName::from_static(n), &h), "{n}");
        }
    }

    #[test]
    fn a_refused_write_carries_the_challenge() {
        let r = unauthorized(Outcome::Denied);
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Basic realm=\"slipway-registry\""
        );
    }
}
