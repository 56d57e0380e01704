//! The mirror's fill path (#20): the gateway serves `GET`/`HEAD` of the
//! mirror repositories ([`crate::mirror`]) from the in-cluster registry,
//! and fills what it lacks from the upstream, once.
//!
//! Endpoints: `/v2/mirror/<upstream>/<name>/{manifests,blobs}/<ref>` and
//! `/v2/<name>/…?ns=<upstream>` (containerd's form for a mirror host), for
//! each upstream in `mirror.registries`. Everything else is the relay's.
//!
//! - **Blobs** are served from the registry; a miss is fetched from
//!   upstream once however many clients ask, streamed to the first client
//!   while it is uploaded into the registry, and verified against its
//!   digest by [`crate::proxy::cache::Writer`] before the last chunk
//!   reaches the client or the upload is committed (distribution checks the
//!   digest again). A fill outlives its client: the next pull finds it.
//! - **Manifests by digest** are served from the registry (stored as
//!   blobs), else fetched, verified and stored.
//! - **Tags**: a tag confirmed within `mirror.tag_ttl_secs` is served
//!   without asking anyone; after that a `HEAD` upstream revalidates it and
//!   a `GET` follows only when the digest moved. When upstream is
//!   unreachable, answers 429 or 5xx, the last digest known is served, with
//!   `slipway_mirror_stale_tags_served_total` and a warning line.
//!
//! Upstream authentication: anonymous, or the credentials of
//! `mirror.credentials`, presented to the registry's token service after a
//! `Bearer` challenge (the distribution token spec: Docker Hub, GHCR,
//! Quay; tokens kept for their `expires_in`), or to the registry itself
//! after a `Basic` one (distribution's htpasswd auth).
//!
//! Failures: the client gets a registry-style error that names the
//! upstream and what it answered, also as the status line's reason, which
//! containerd prints in its error; a 429 stays a 429. Every wait has a
//! deadline: the upstream's response head (`upstream_response_timeout_secs`),
//! each body read (`body_idle_timeout_secs`), and a client waiting for
//! another's fill ([`FILL_WAIT`]). At most [`MAX_FILLS`] fills run at once;
//! more answer 503 with `Retry-After`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::metrics::{GatewayMetrics, MirrorKind, MirrorLabels, UpstreamLabels};
use super::relay::{BoxError, GatewayBody};
use crate::idle::Idle;
use crate::mirror::{
    self, manifest_media_type, tag_plan, Mirrors, TagPlan, TagRecord, Upstream, UpstreamFailure,
    MANIFEST_ACCEPT, MAX_MANIFEST_BYTES,
};
use crate::proxy::cache::Writer;
use crate::proxy::route::{Digest, Reference, Refusal, Route};
use crate::proxy::{HttpsClient, Timeouts};

/// Fills running at once; a cold rollout of one image needs a few.
pub const MAX_FILLS: usize = 64;
/// How long a client waits for another client's fill of the same blob.
pub const FILL_WAIT: Duration = Duration::from_secs(600);
/// The pause before a blob GET that the registry answered with a 5xx is
/// asked again, once.
const LOCAL_RETRY: Duration = Duration::from_millis(250);
/// Chunks buffered between the upstream and each of its two readers.
const CHANNEL_CHUNKS: usize = 8;
/// Redirects followed for one blob (Docker Hub sends blobs to a CDN).
const MAX_REDIRECTS: usize = 3;
/// A token service's answer is small.
const MAX_TOKEN_BYTES: usize = 64 * 1024;

type LocalClient = Client<HttpConnector, GatewayBody>;

/// Why the mirror could not start.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("mirror.ca_file {path}: {source}")]
    CaRead {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("mirror.ca_file {path}: {message}")]
    Ca {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("mirror: upstream TLS: {0}")]
    Tls(String),
}

/// A mirror request, once mapped.
pub struct MirrorRequest<'a> {
    pub upstream: &'a Upstream,
    /// The name upstream: `library/alpine`.
    pub name: String,
    pub route: Route,
}

impl MirrorRequest<'_> {
    /// The repository in the in-cluster registry: `mirror/docker.io/library/alpine`.
    fn repo(&self) -> String {
        format!("{}/{}", self.upstream.repo_prefix(), self.name)
    }
}

pub struct Mirror {
    pub cfg: Mirrors,
    upstream: HttpsClient,
    local: LocalClient,
    local_authority: String,
    metrics: Arc<GatewayMetrics>,
    response_head: Duration,
    body_idle: Duration,
    /// `(realm, service, scope)` → token and when it expires.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Blob fills in progress, by repository and digest; the sender is
    /// dropped when the fill ends.
    fills: Mutex<HashMap<String, watch::Receiver<()>>>,
    /// One manifest resolution at a time per `repo:tag` or `repo@digest`,
    /// so that two nodes rolling out together cause one upstream HEAD and
    /// one manifest GET (#20: Docker Hub counts manifest GETs), not two.
    manifest_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error(status: StatusCode, code: &'static str, message: String) -> Response<GatewayBody> {
    let body = Refusal {
        status: status.as_u16(),
        code,
        message: message.clone(),
    }
    .body();
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // containerd prints the status line of a failed request, not its body:
    // the reason carries the message to `kubectl describe pod`.
    if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(message.replace(['\r', '\n'], " ")) {
        r.extensions_mut().insert(reason);
    }
    r
}

/// 503 with `Retry-After`: a bound was reached or a wait ran out; the
/// client's retry finds the work done or the slot free.
fn retry_later(message: String, secs: &'static str) -> Response<GatewayBody> {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
    r
}

fn full(b: Bytes) -> GatewayBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn empty() -> GatewayBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Read a whole (small) body, at most `limit` bytes.
async fn read_limited(body: Incoming, limit: usize, idle: Duration) -> Result<Bytes, String> {
    let mut body = Idle::new(body, idle);
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(d) = frame.into_data() {
            if out.len() + d.len() > limit {
                return Err(format!("more than {limit} bytes"));
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(Bytes::from(out))
}

/// One challenge parameter of `Bearer realm="…",service="…",scope="…"`.
fn challenge_param(challenge: &str, key: &str) -> Option<String> {
    let rest = challenge
        .strip_prefix("Bearer ")
        .or_else(|| challenge.strip_prefix("bearer "))?;
    for part in rest.split(',') {
        if let Some((k, v)) = part.trim().split_once('=') {
            if k.trim() == key {
                return Some(v.trim().trim_matches('"').to_string());
            }
        }
    }
    None
}

/// `user:pass` in base64, for an `Authorization: Basic` header.
fn basic_credentials(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// `username` and `password` files in a credentials directory.
fn read_credentials(dir: &Path) -> Result<(String, String), String> {
    let read = |f: &str| {
        super::read_input(&dir.join(f))
            .map_err(|e| format!("{}: {e}", dir.join(f).display()))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .trim_end_matches(['\n', '\r'])
                    .to_string()
            })
    };
    Ok((read("username")?, read("password")?))
}

impl Mirror {
    pub fn new(
        cfg: Mirrors,
        local_authority: &str,
        metrics: Arc<GatewayMetrics>,
        response_head: Duration,
        body_idle: Duration,
    ) -> Result<Mirror, FillError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|source| FillError::CaRead {
                path: path.clone(),
                source,
            })?;
            let extra = crate::proxy::roots_from_pem(&pem).map_err(|message| FillError::Ca {
                path: path.clone(),
                message,
            })?;
            roots.extend(extra.roots);
        }
        let tls = crate::proxy::tls_config(roots).map_err(FillError::Tls)?;
        let t = Timeouts {
            response: response_head,
            body_idle,
            ..Timeouts::default()
        };
        let upstream = crate::proxy::https_client(tls, None, &t);
        let local = super::relay::local_client();
        for u in &cfg.registries {
            let label = u.label();
            for kind in MirrorKind::ALL {
                let _ = metrics.mirror_hits.get_or_create(&MirrorLabels {
                    upstream: label.clone(),
                    kind,
                });
                let _ = metrics.mirror_misses.get_or_create(&MirrorLabels {
                    upstream: label.clone(),
                    kind,
                });
            }
            let _ = metrics.mirror_stale_tags.get_or_create(&UpstreamLabels {
                upstream: label.clone(),
            });
            let _ = metrics
                .mirror_bytes
                .get_or_create(&UpstreamLabels { upstream: label });
        }
        Ok(Mirror {
            cfg,
            upstream,
            local,
            local_authority: local_authority.to_string(),
            metrics,
            response_head,
            body_idle,
            tokens: Mutex::new(HashMap::new()),
            fills: Mutex::new(HashMap::new()),
            manifest_turns: Mutex::new(HashMap::new()),
        })
    }

    /// The mirror request `route` is, if any (`ns` is containerd's `?ns=`).
    pub fn map<'a>(&'a self, route: &Route, ns: Option<&str>) -> Option<MirrorRequest<'a>> {
        let name = match route {
            Route::Base => return None,
            Route::Manifest { name, .. } | Route::Blob { name, .. } => name,
        };
        let (upstream, upstream_name) = self.cfg.route(name, ns)?;
        let route = match route.clone() {
            Route::Manifest { reference, .. } => Route::Manifest {
                name: upstream_name.clone(),
                reference,
            },
            Route::Blob { digest, .. } => Route::Blob {
                name: upstream_name.clone(),
                digest,
            },
            Route::Base => return None,
        };
        Some(MirrorRequest {
            upstream,
            name: upstream_name,
            route,
        })
    }

    fn count(&self, hit: bool, u: &Upstream, kind: MirrorKind) {
        let l = MirrorLabels {
            upstream: u.label(),
            kind,
        };
        if hit {
            self.metrics.mirror_hits.get_or_create(&l).inc();
        } else {
            self.metrics.mirror_misses.get_or_create(&l).inc();
        }
    }

    /// Serve one mirror request.
    pub async fn serve(
        self: &Arc<Self>,
        req: MirrorRequest<'_>,
        method: &Method,
        headers: &HeaderMap,
    ) -> Response<GatewayBody> {
        let head = method == Method::HEAD;
        let repo = req.repo();
        match &req.route {
            Route::Manifest {
                reference: Reference::Tag(tag),
                ..
            } => {
                let key = format!("{repo}:{tag}");
                self.in_turn(&key, self.manifest_by_tag(&req, &repo, tag, head))
                    .await
            }
            Route::Manifest {
                reference: Reference::Digest(d),
                ..
            } => {
                let key = format!("{repo}@{d}");
                self.in_turn(&key, self.manifest_by_digest(&req, &repo, d, head))
                    .await
            }
            Route::Blob { digest, .. } => self.blob(&req, &repo, digest, head, headers).await,
            Route::Base => error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "not a mirror path".into(),
            ),
        }
    }

    /// Run `work` once the requests ahead of it for the same manifest have
    /// finished: the second one then finds the first one's record or copy
    /// in the registry. A wait is bounded by [`FILL_WAIT`], the turns by
    /// [`MAX_FILLS`].
    async fn in_turn(
        &self,
        key: &str,
        work: impl std::future::Future<Output = Response<GatewayBody>>,
    ) -> Response<GatewayBody> {
        let turn = {
            let mut turns = self.manifest_turns.lock().expect("turns lock");
            if !turns.contains_key(key) && turns.len() >= MAX_FILLS {
                return retry_later(
                    format!("{MAX_FILLS} mirror manifest lookups are running; retry shortly"),
                    "2",
                );
            }
            turns.entry(key.to_string()).or_default().clone()
        };
        // Whatever happens, even a client that goes away mid-wait, the turn
        // leaves the map once nobody else holds it.
        struct Leave<'m>(
            &'m Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
            String,
            Arc<tokio::sync::Mutex<()>>,
        );
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                let mut turns = self.0.lock().expect("turns lock");
                // Only the map and this request hold it: nobody waits.
                if Arc::strong_count(&self.2) == 2 {
                    turns.remove(&self.1);
                }
            }
        }
        // Declared after `leave`, so dropped first, also when cancelled.
        let leave = Leave(&self.manifest_turns, key.to_string(), turn);
        let turn = leave.2.clone();
        let out = match tokio::time::timeout(FILL_WAIT, turn.lock()).await {
            Ok(_held) => work.await,
            Err(_) => retry_later(
                format!("the mirror's lookup of {key} did not complete; retry"),
                "2",
            ),
        };
        drop(turn);
        drop(leave);
        out
    }

    // ------------------------------------------------------------ local

    async fn local(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(header::HeaderName, String)],
        body: GatewayBody,
    ) -> Result<Response<Incoming>, String> {
        let uri: Uri = format!("http://{}{path_and_query}", self.local_authority)
            .parse()
            .map_err(|e| format!("{path_and_query}: {e}"))?;
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(k, v);
        }
        let req = b.body(body).map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.response_head, self.local.request(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(format!("registry {}: {e}", self.local_authority)),
            Err(_) => Err(format!(
                "registry {} did not answer within {:?}",
                self.local_authority, self.response_head
            )),
        }
    }

    /// The registry's answer for a blob, asked again once after
    /// [`LOCAL_RETRY`] if it was a 5xx: another writer (a client's push, the
    /// fill of another replica) may be rewriting the blob's link in place,
    /// which distribution 2.8's filesystem driver does non-atomically.
    async fn local_blob(
        &self,
        method: Method,
        path: &str,
        pass: &[(HeaderName, String)],
    ) -> Result<Response<Incoming>, String> {
        let r = self.local(method.clone(), path, pass, empty()).await?;
        if !r.status().is_server_error() {
            return Ok(r);
        }
        tokio::time::sleep(LOCAL_RETRY).await;
        self.local(method, path, pass, empty()).await
    }

    /// A blob of `repo` read whole (manifests and records are small).
    async fn local_small_blob(&self, repo: &str, digest: &str) -> Result<Option<Bytes>, String> {
        let r = self
            .local(
                Method::GET,
                &format!("/v2/{repo}/blobs/{digest}"),
                &[],
                empty(),
            )
            .await?;
        match r.status() {
            StatusCode::OK => read_limited(r.into_body(), MAX_MANIFEST_BYTES, self.body_idle)
                .await
                .map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(format!("registry answered {s} for {repo}@{digest}")),
        }
    }

    /// Upload `body` as blob `digest` of `repo` (POST, then one PUT).
    async fn local_put_blob(
        &self,
        repo: &str,
        digest: &str,
        body: GatewayBody,
    ) -> Result<(), String> {
        let r = self
            .local(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                empty(),
            )
            .await?;
        if r.status() != StatusCode::ACCEPTED {
            return Err(format!(
                "registry answered {} to an upload of {repo}",
                r.status()
            ));
        }
        let location = r
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| url::Url::parse("http://registry/").ok()?.join(l).ok())
            .ok_or_else(|| format!("registry sent no upload location for {repo}"))?;
        let sep = if location.query().is_some() { '&' } else { '?' };
        let pq = format!(
            "{}{}{}{sep}digest={digest}",
            location.path(),
            location.query().map(|_| "?").unwrap_or(""),
            location.query().unwrap_or("")
        );
        let r = self
            .local(
                Method::PUT,
                &pq,
                &[(header::CONTENT_TYPE, "application/octet-stream".into())],
                body,
            )
            .await?;
        if r.status() != StatusCode::CREATED {
            return Err(self
                .refusal(r, &format!("the upload of {repo}@{digest}"))
                .await);
        }
        Ok(())
    }

    /// The registry's answer to a write it did not accept, with the start
    /// of its error body.
    async fn refusal(&self, r: Response<Incoming>, what: &str) -> String {
        let status = r.status();
        let text = read_limited(r.into_body(), 4096, self.body_idle)
            .await
            .unwrap_or_default();
        format!(
            "registry answered {status} to {what}: {}",
            String::from_utf8_lossy(&text).trim()
        )
    }

    async fn read_record(&self, repo: &str, tag: &str) -> Result<Option<TagRecord>, String> {
        let r = self
            .local(
                Method::GET,
                &format!("/v2/{repo}/manifests/{tag}"),
                &[(
                    header::ACCEPT,
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                empty(),
            )
            .await?;
        match r.status() {
            StatusCode::OK => {
                let b = read_limited(r.into_body(), MAX_MANIFEST_BYTES, self.body_idle).await?;
                Ok(TagRecord::from_manifest(&b))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(format!("registry answered {s} for {repo}:{tag}")),
        }
    }

    async fn write_record(&self, repo: &str, tag: &str, rec: &TagRecord) -> Result<(), String> {
        let config = format!("sha256:{}", mirror::sha256_hex(mirror::RECORD_CONFIG));
        self.local_put_blob(
            repo,
            &config,
            full(Bytes::from_static(mirror::RECORD_CONFIG)),
        )
        .await?;
        let r = self
            .local(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{tag}"),
                &[(
                    header::CONTENT_TYPE,
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                full(Bytes::from(rec.to_manifest())),
            )
            .await?;
        if r.status() != StatusCode::CREATED {
            return Err(self
                .refusal(r, &format!("the tag record {repo}:{tag}"))
                .await);
        }
        Ok(())
    }

    // ------------------------------------------------------------ upstream

    /// Send one request upstream, answering a `Bearer` challenge once and
    /// following redirects for `GET`s of blobs.
    async fn upstream(
        &self,
        u: &Upstream,
        method: Method,
        path: &str,
        accept: Option<&str>,
        scope: &str,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        let mut url = format!("{}{path}", u.endpoint);
        let mut token = self.cached_token(u, scope);
        // A registry with `Basic` auth (distribution's htpasswd, many
        // private registries) takes the credentials on every request.
        let mut basic: Option<String> = None;
        let mut challenged = false;
        let mut redirects = 0;
        loop {
            let same_origin = url.starts_with(&format!("{}/", u.endpoint));
            let uri: Uri = url
                .parse()
                .map_err(|e| UpstreamFailure::Unreachable(format!("{url}: {e}")))?;
            let mut b = Request::builder().method(method.clone()).uri(uri);
            if let Some(a) = accept {
                b = b.header(header::ACCEPT, a);
            }
            match (&basic, &token, same_origin) {
                (Some(b64), _, true) => b = b.header(header::AUTHORIZATION, format!("Basic {b64}")),
                (None, Some(t), true) => b = b.header(header::AUTHORIZATION, format!("Bearer {t}")),
                _ => {}
            }
            let req = b
                .body(Empty::new())
                .map_err(|e| UpstreamFailure::Unreachable(e.to_string()))?;
            let resp =
                match tokio::time::timeout(self.response_head, self.upstream.request(req)).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        let f = UpstreamFailure::Unreachable(crate::report(&e));
                        self.count_upstream(u, &f.label());
                        return Err(f);
                    }
                    Err(_) => {
                        let f = UpstreamFailure::Unreachable(format!(
                            "no answer within {:?}",
                            self.response_head
                        ));
                        self.count_upstream(u, &f.label());
                        return Err(f);
                    }
                };
            let status = resp.status();
            self.count_upstream(u, status.as_str());
            if status == StatusCode::UNAUTHORIZED && !challenged && same_origin {
                challenged = true;
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                if challenge
                    .get(..6)
                    .is_some_and(|s| s.eq_ignore_ascii_case("basic "))
                {
                    let Some(dir) = &u.credentials else {
                        return Err(UpstreamFailure::Status(401));
                    };
                    match read_credentials(dir) {
                        Ok((user, pass)) => {
                            basic = Some(basic_credentials(&user, &pass));
                            continue;
                        }
                        Err(e) => {
                            warn!(upstream = %u.label(), error = %e, "mirror: cannot read the upstream's credentials");
                            return Err(UpstreamFailure::Status(401));
                        }
                    }
                }
                match self.fetch_token(u, &challenge, scope).await {
                    Ok(t) => {
                        token = Some(t);
                        continue;
                    }
                    Err(e) => {
                        warn!(upstream = %u.label(), error = %e, "mirror: no token from the upstream's token service");
                        return Err(UpstreamFailure::Status(401));
                    }
                }
            }
            if status.is_redirection() && method == Method::GET && redirects < MAX_REDIRECTS {
                if let Some(next) = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| url::Url::parse(&url).ok()?.join(l).ok())
                {
                    if next.scheme() == "https" {
                        redirects += 1;
                        url = next.to_string();
                        continue;
                    }
                }
            }
            if status.is_success() {
                return Ok(resp);
            }
            return Err(UpstreamFailure::Status(status.as_u16()));
        }
    }

    fn count_upstream(&self, u: &Upstream, status: &str) {
        self.metrics
            .mirror_upstream_requests
            .get_or_create(&super::metrics::UpstreamStatusLabels {
                upstream: u.label(),
                status: status.to_string(),
            })
            .inc();
    }

    fn cached_token(&self, u: &Upstream, scope: &str) -> Option<String> {
        let key = format!("{}\n{scope}", u.label());
        let tokens = self.tokens.lock().expect("tokens lock");
        tokens
            .get(&key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| t.clone())
    }

    async fn fetch_token(
        &self,
        u: &Upstream,
        challenge: &str,
        scope: &str,
    ) -> Result<String, String> {
        let realm = challenge_param(challenge, "realm")
            .ok_or_else(|| format!("no Bearer realm in the challenge {challenge:?}"))?;
        let mut url = url::Url::parse(&realm).map_err(|e| format!("realm {realm:?}: {e}"))?;
        if url.scheme() != "https" {
            return Err(format!("realm {realm:?} is not https"));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = challenge_param(challenge, "service") {
                q.append_pair("service", &s);
            }
            q.append_pair(
                "scope",
                &challenge_param(challenge, "scope").unwrap_or_else(|| scope.to_string()),
            );
        }
        let uri: Uri = url.as_str().parse().map_err(|e| format!("{e}"))?;
        let mut b = Request::get(uri);
        if let Some(dir) = &u.credentials {
            let (user, pass) = read_credentials(dir)?;
            b = b.header(
                header::AUTHORIZATION,
                format!("Basic {}", basic_credentials(&user, &pass)),
            );
        }
        let req = b.body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(self.response_head, self.upstream.request(req))
            .await
            .map_err(|_| format!("{realm}: no answer within {:?}", self.response_head))?
            .map_err(|e| format!("{realm}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{realm} answered {}", resp.status()));
        }
        let body = read_limited(resp.into_body(), MAX_TOKEN_BYTES, self.body_idle).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("{realm}: {e}"))?;
        let token = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .ok_or_else(|| format!("{realm}: no token in the answer"))?
            .to_string();
        // The spec's default lifetime is 60 s; keep a margin.
        let secs = v["expires_in"]
            .as_u64()
            .unwrap_or(60)
            .saturating_sub(10)
            .max(10);
        let mut tokens = self.tokens.lock().expect("tokens lock");
        if tokens.len() > 1024 {
            tokens.retain(|_, (_, until)| *until > Instant::now());
        }
        tokens.insert(
            format!("{}\n{scope}", u.label()),
            (token.clone(), Instant::now() + Duration::from_secs(secs)),
        );
        Ok(token)
    }

    fn failure_response(
        &self,
        req: &MirrorRequest<'_>,
        what: &str,
        f: &UpstreamFailure,
        cached: &str,
    ) -> Response<GatewayBody> {
        let msg = format!("upstream {} {f} for {what}{cached}", req.upstream.label());
        match f {
            UpstreamFailure::Status(404) => error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", msg),
            UpstreamFailure::Status(429) => {
                error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", msg)
            }
            _ => error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", msg),
        }
    }

    // ------------------------------------------------------------ manifests

    fn manifest_response(
        &self,
        bytes: Bytes,
        digest: &str,
        media_type: &str,
        head: bool,
    ) -> Response<GatewayBody> {
        let mut r = Response::new(if head { empty() } else { full(bytes.clone()) });
        let h = r.headers_mut();
        if let Ok(v) = HeaderValue::from_str(media_type) {
            h.insert(header::CONTENT_TYPE, v);
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        if let Ok(v) = HeaderValue::from_str(digest) {
            h.insert("docker-content-digest", v);
        }
        r
    }

    /// Fetch a manifest by digest upstream, verify and store it.
    async fn fill_manifest(
        &self,
        req: &MirrorRequest<'_>,
        repo: &str,
        digest: &Digest,
    ) -> Result<(Bytes, String), Response<GatewayBody>> {
        let scope = format!("repository:{}:pull", req.name);
        let path = format!("/v2/{}/manifests/{digest}", req.name);
        let resp = self
            .upstream(
                req.upstream,
                Method::GET,
                &path,
                Some(MANIFEST_ACCEPT),
                &scope,
            )
            .await
            .map_err(|f| self.failure_response(req, &format!("{}@{digest}", req.name), &f, ""))?;
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = read_limited(resp.into_body(), MAX_MANIFEST_BYTES, self.body_idle)
            .await
            .map_err(|e| {
                error(
                    StatusCode::BAD_GATEWAY,
                    "UNAVAILABLE",
                    format!("upstream {}: manifest {digest}: {e}", req.upstream.label()),
                )
            })?;
        let mut w = Writer::unbacked(digest, None);
        w.write(&bytes);
        if let Err(e) = w.check() {
            return Err(error(
                StatusCode::BAD_GATEWAY,
                "DIGEST_INVALID",
                format!("upstream {}: {e}", req.upstream.label()),
            ));
        }
        self.metrics
            .mirror_bytes
            .get_or_create(&UpstreamLabels {
                upstream: req.upstream.label(),
            })
            .inc_by(bytes.len() as u64);
        let media_type = manifest_media_type(&bytes).or(ct).ok_or_else(|| {
            error(
                StatusCode::BAD_GATEWAY,
                "MANIFEST_INVALID",
                format!(
                    "upstream {}: {digest} is not a schema 2 or OCI manifest",
                    req.upstream.label()
                ),
            )
        })?;
        if let Err(e) = self
            .local_put_blob(repo, &digest.to_string(), full(bytes.clone()))
            .await
        {
            // The client still gets the verified manifest; the next pull
            // asks upstream again.
            warn!(repo, %digest, error = %e, "mirror: could not store a manifest");
        }
        Ok((bytes, media_type))
    }

    async fn manifest_by_digest(
        &self,
        req: &MirrorRequest<'_>,
        repo: &str,
        digest: &Digest,
        head: bool,
    ) -> Response<GatewayBody> {
        let d = digest.to_string();
        match self.local_small_blob(repo, &d).await {
            Ok(Some(bytes)) => {
                if let Some(mt) = manifest_media_type(&bytes) {
                    self.count(true, req.upstream, MirrorKind::Manifest);
                    return self.manifest_response(bytes, &d, &mt, head);
                }
            }
            Ok(None) => {}
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", e),
        }
        self.count(false, req.upstream, MirrorKind::Manifest);
        match self.fill_manifest(req, repo, digest).await {
            Ok((bytes, mt)) => self.manifest_response(bytes, &d, &mt, head),
            Err(r) => r,
        }
    }

    async fn manifest_by_tag(
        &self,
        req: &MirrorRequest<'_>,
        repo: &str,
        tag: &str,
        head: bool,
    ) -> Response<GatewayBody> {
        let record = match self.read_record(repo, tag).await {
            Ok(r) => r,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", e),
        };
        let now = now_unix();
        let source = format!("{}/{}:{tag}", req.upstream.label(), req.name);
        // The record and the manifest it names, if both are here.
        let cached = match &record {
            Some(r) => match self.local_small_blob(repo, &r.digest).await {
                Ok(Some(b)) => Some((r.clone(), b)),
                Ok(None) => None,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", e),
            },
            None => None,
        };
        if let Some((r, b)) = &cached {
            if tag_plan(Some(r), now, self.cfg.tag_ttl) == TagPlan::Fresh {
                self.count(true, req.upstream, MirrorKind::Tag);
                return self.manifest_response(b.clone(), &r.digest, &r.media_type, head);
            }
        }
        let scope = format!("repository:{}:pull", req.name);
        let path = format!("/v2/{}/manifests/{tag}", req.name);
        let answer = self
            .upstream(
                req.upstream,
                Method::HEAD,
                &path,
                Some(MANIFEST_ACCEPT),
                &scope,
            )
            .await;
        let digest = match answer {
            Ok(resp) => resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(Digest::parse),
            Err(f) => {
                if let (true, Some((r, b))) = (f.serve_stale(), &cached) {
                    self.metrics
                        .mirror_stale_tags
                        .get_or_create(&UpstreamLabels {
                            upstream: req.upstream.label(),
                        })
                        .inc();
                    warn!(upstream = %req.upstream.label(), tag = %source, digest = %r.digest, confirmed_secs_ago = now.saturating_sub(r.resolved_at), "mirror: upstream {f}; serving the last digest known for the tag");
                    return self.manifest_response(b.clone(), &r.digest, &r.media_type, head);
                }
                let note = if f.serve_stale() {
                    ", and the mirror has no copy of that tag"
                } else {
                    ""
                };
                return self.failure_response(req, &format!("{}:{tag}", req.name), &f, note);
            }
        };
        let Some(digest) = digest else {
            return error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                format!(
                    "upstream {} sent no Docker-Content-Digest for {}:{tag}",
                    req.upstream.label(),
                    req.name
                ),
            );
        };
        let confirmed = TagRecord {
            digest: digest.to_string(),
            media_type: String::new(),
            size: 0,
            resolved_at: now,
            source,
        };
        let (bytes, rec) = match &cached {
            Some((r, b)) if r.digest == confirmed.digest => {
                self.count(true, req.upstream, MirrorKind::Tag);
                (
                    b.clone(),
                    TagRecord {
                        media_type: r.media_type.clone(),
                        size: r.size,
                        ..confirmed
                    },
                )
            }
            _ => {
                self.count(false, req.upstream, MirrorKind::Tag);
                let stored = match self.local_small_blob(repo, &confirmed.digest).await {
                    Ok(Some(b)) => manifest_media_type(&b).map(|mt| (b, mt)),
                    _ => None,
                };
                let (b, mt) = match stored {
                    Some(v) => v,
                    None => match self.fill_manifest(req, repo, &digest).await {
                        Ok(v) => v,
                        Err(r) => return r,
                    },
                };
                let size = b.len() as u64;
                (
                    b,
                    TagRecord {
                        media_type: mt,
                        size,
                        ..confirmed
                    },
                )
            }
        };
        if let Err(e) = self.write_record(repo, tag, &rec).await {
            warn!(repo, tag, error = %e, "mirror: could not record the tag; it is asked upstream again next time");
        } else if record.as_ref().map(|r| &r.digest) != Some(&rec.digest) {
            info!(tag = %rec.source, digest = %rec.digest, "mirror: tag resolved");
        }
        self.manifest_response(bytes, &rec.digest, &rec.media_type, head)
    }

    // ------------------------------------------------------------ blobs

    async fn blob(
        self: &Arc<Self>,
        req: &MirrorRequest<'_>,
        repo: &str,
        digest: &Digest,
        head: bool,
        headers: &HeaderMap,
    ) -> Response<GatewayBody> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let mut pass = vec![];
        if let Some(r) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            pass.push((header::RANGE, r.to_string()));
        }
        let method = if head { Method::HEAD } else { Method::GET };
        let key = format!("{repo}@{digest}");
        // A fill of this blob in flight here is waited for before the
        // registry is asked: distribution 2.8's filesystem driver writes a
        // blob's link in place (PutContent truncates, then writes; 3.x
        // writes a temporary file and renames it), so a GET while the fill
        // commits can read an empty link and answer 500. Seen in CI as a 503
        // to the second of two nodes pulling at once.
        let in_flight = self.fills.lock().expect("fills lock").get(&key).cloned();
        if let Some(mut rx) = in_flight {
            let _ = tokio::time::timeout(FILL_WAIT, rx.changed()).await;
        }
        // Twice at most: once before a fill, once after waiting for another's.
        for attempt in 0..2 {
            match self.local_blob(method.clone(), &path, &pass).await {
                Ok(r) if r.status().is_success() => {
                    self.count(true, req.upstream, MirrorKind::Blob);
                    return relay_local(r, self.body_idle);
                }
                Ok(r) if r.status() == StatusCode::NOT_FOUND => {}
                Ok(r) => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        format!("registry answered {} for {repo}@{digest}", r.status()),
                    )
                }
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", e),
            }
            if head {
                // A HEAD starts no fill: ask upstream what it has.
                let scope = format!("repository:{}:pull", req.name);
                return match self
                    .upstream(
                        req.upstream,
                        Method::HEAD,
                        &format!("/v2/{}/blobs/{digest}", req.name),
                        None,
                        &scope,
                    )
                    .await
                {
                    Ok(r) => {
                        let mut out = Response::new(empty());
                        for h in [header::CONTENT_LENGTH, header::CONTENT_TYPE] {
                            if let Some(v) = r.headers().get(&h) {
                                out.headers_mut().insert(h, v.clone());
                            }
                        }
                        if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
                            out.headers_mut().insert("docker-content-digest", v);
                        }
                        out
                    }
                    Err(f) => self.failure_response(req, &format!("blob {digest}"), &f, ""),
                };
            }
            let key = key.clone();
            let waiting = {
                let fills = self.fills.lock().expect("fills lock");
                match fills.get(&key) {
                    Some(rx) => Some(rx.clone()),
                    None if fills.len() >= MAX_FILLS => {
                        drop(fills);
                        return retry_later(
                            format!("{MAX_FILLS} mirror fills are running; retry shortly"),
                            "2",
                        );
                    }
                    None => None,
                }
            };
            match waiting {
                Some(mut rx) if attempt == 0 => {
                    // Err: the filler dropped its sender, so the fill ended.
                    let _ = tokio::time::timeout(FILL_WAIT, rx.changed()).await;
                    continue;
                }
                Some(_) => break,
                None => {
                    self.count(false, req.upstream, MirrorKind::Blob);
                    return self.fill_blob(req, repo, digest, key).await;
                }
            }
        }
        retry_later(
            format!(
                "the mirror's fill of {digest} from {} did not complete; retry",
                req.upstream.label()
            ),
            "2",
        )
    }

    async fn fill_blob(
        self: &Arc<Self>,
        req: &MirrorRequest<'_>,
        repo: &str,
        digest: &Digest,
        key: String,
    ) -> Response<GatewayBody> {
        let (done_tx, done_rx) = watch::channel(());
        {
            let mut fills = self.fills.lock().expect("fills lock");
            if fills.contains_key(&key) {
                return retry_later(format!("{digest} is being filled; retry"), "1");
            }
            fills.insert(key.clone(), done_rx);
        }
        // Whatever happens below, the entry goes and waiters wake.
        struct Done(Arc<Mirror>, String, Option<watch::Sender<()>>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.fills.lock().expect("fills lock").remove(&self.1);
                drop(self.2.take());
            }
        }
        let done = Done(self.clone(), key, Some(done_tx));
        let scope = format!("repository:{}:pull", req.name);
        let resp = match self
            .upstream(
                req.upstream,
                Method::GET,
                &format!("/v2/{}/blobs/{digest}", req.name),
                None,
                &scope,
            )
            .await
        {
            Ok(r) => r,
            Err(f) => {
                let mut r = self.failure_response(req, &format!("blob {digest}"), &f, "");
                if f == UpstreamFailure::Status(404) {
                    r = error(
                        StatusCode::NOT_FOUND,
                        "BLOB_UNKNOWN",
                        format!(
                            "upstream {} has no blob {digest} in {}",
                            req.upstream.label(),
                            req.name
                        ),
                    );
                }
                return r;
            }
        };
        let len = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let (local_tx, local_rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(CHANNEL_CHUNKS);
        let (client_tx, client_rx) =
            mpsc::channel::<Result<Frame<Bytes>, BoxError>>(CHANNEL_CHUNKS);
        let this = self.clone();
        let (repo, digest, label) = (repo.to_string(), digest.clone(), req.upstream.label());
        let upload = {
            let (this, repo, d) = (self.clone(), repo.clone(), digest.to_string());
            tokio::spawn(
                async move { this.local_put_blob(&repo, &d, channel_body(local_rx)).await },
            )
        };
        tokio::spawn(async move {
            let _done = done;
            let mut body = Idle::new(resp.into_body(), this.body_idle);
            let mut w = Writer::unbacked(&digest, len);
            let mut held: Option<Bytes> = None;
            let mut client = Some(client_tx);
            let mut local = Some(local_tx);
            let mut broke: Option<String> = None;
            while let Some(frame) = body.frame().await {
                let chunk = match frame {
                    Ok(f) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                    Err(e) => {
                        broke = Some(format!("upstream body: {e}"));
                        break;
                    }
                };
                w.write(&chunk);
                this.metrics
                    .mirror_bytes
                    .get_or_create(&UpstreamLabels {
                        upstream: label.clone(),
                    })
                    .inc_by(chunk.len() as u64);
                if let Some(tx) = &local {
                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                        // The upload broke; its result says why.
                        local = None;
                    }
                }
                // The last chunk waits for the digest (#13: a 200 is never
                // ended as if complete with wrong bytes).
                if let Some(prev) = held.replace(chunk) {
                    if let Some(tx) = &client {
                        if tx.send(Ok(Frame::data(prev))).await.is_err() {
                            client = None;
                        }
                    }
                }
                if client.is_none() && local.is_none() {
                    broke = Some("both the client and the upload went away".into());
                    break;
                }
            }
            let verdict = match broke {
                Some(b) => Err(b),
                None => w.check().map_err(|e| e.to_string()),
            };
            match &verdict {
                Ok(()) => {
                    if let (Some(tx), Some(last)) = (&client, held.take()) {
                        let _ = tx.send(Ok(Frame::data(last))).await;
                    }
                    drop(local.take());
                }
                Err(e) => {
                    let err = || -> BoxError { e.clone().into() };
                    if let Some(tx) = &local {
                        let _ = tx.send(Err(err())).await;
                    }
                    if let Some(tx) = &client {
                        let _ = tx.send(Err(err())).await;
                    }
                }
            }
            drop(client);
            drop(local);
            let stored = upload.await.map_err(|e| e.to_string()).and_then(|r| r);
            match (verdict, stored) {
                (Ok(()), Ok(())) => info!(repo, %digest, bytes = w.len(), "mirror: blob filled"),
                (Err(e), _) => {
                    warn!(repo, %digest, error = %e, "mirror: blob fill failed; nothing stored")
                }
                (Ok(()), Err(e)) => {
                    warn!(repo, %digest, error = %e, "mirror: blob verified but not stored")
                }
            }
        });
        let mut r = Response::new(channel_body(client_rx));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Some(l) = len {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(l));
        }
        if let Ok(v) = HeaderValue::from_str(&req_digest(&req.route)) {
            h.insert("docker-content-digest", v);
        }
        r
    }
}

fn req_digest(route: &Route) -> String {
    route.digest().map(|d| d.to_string()).unwrap_or_default()
}

fn channel_body(rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>) -> GatewayBody {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    BoxBody::new(StreamBody::new(stream))
}

/// The registry's answer for a blob, streamed to the client.
fn relay_local(r: Response<Incoming>, idle: Duration) -> Response<GatewayBody> {
    let (parts, body) = r.into_parts();
    let mut out = Response::builder().status(parts.status);
    for h in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_RANGE,
        header::ACCEPT_RANGES,
        header::ETAG,
        HeaderName::from_static("docker-content-digest"),
    ] {
        if let Some(v) = parts.headers.get(&h) {
            out = out.header(h, v);
        }
    }
    out.body(Idle::new(body, idle).boxed()).unwrap_or_else(|_| {
        error(
            StatusCode::BAD_GATEWAY,
            "UNAVAILABLE",
            "bad registry response".into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_give_their_parameters() {
        let c = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            challenge_param(c, "realm").as_deref(),
            Some("https://auth.docker.io/token")
        );
        assert_eq!(
            challenge_param(c, "service").as_deref(),
            Some("registry.docker.io")
        );
        assert_eq!(
            challenge_param(c, "scope").as_deref(),
            Some("repository:library/alpine:pull")
        );
        assert_eq!(challenge_param("Basic realm=\"x\"", "realm"), None);
    }

    #[test]
    fn a_failure_names_the_upstream_in_the_reason() {
        let r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            "upstream docker.io answered 429 Too Many Requests for library/a:1".into(),
        );
        let reason = r.extensions().get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(
            reason.as_bytes(),
            b"upstream docker.io answered 429 Too Many Requests for library/a:1"
        );
    }
}
