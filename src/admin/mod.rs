//! The admin server, separate from the proxy.
//!
//! Endpoints on `admin.listen`: `/metrics` (OpenMetrics text from
//! [`crate::admin::metrics`]), `/healthz` (the process is alive) and `/readyz`
//! (ready only when the host configuration is applied, containerd's
//! `config_path` covers our directory, the proxy is bound, and the upstream
//! has answered at least once). Probes are not access-logged.
//!
//! The gateway (#10) serves the same endpoints with its own metrics and
//! checks: [`serve`] takes any [`Exposition`] and [`ReadyCheck`] set.
//!
//! [`listen`] is the accept loop the agent's proxy and peer ports and the
//! gateway share, beside the admin server's [`AcceptBackoff`].

pub(crate) mod listen;
pub mod metrics;
pub mod readiness;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::admin::metrics::Metrics;
pub use crate::admin::readiness::{Check, Readiness, ReadyCheck};

/// What `/metrics` prints: a program's OpenMetrics text.
pub trait Exposition: Send + Sync + 'static {
    fn encode(&self) -> String;
}

impl Exposition for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

pub fn respond<C: ReadyCheck>(
    path: &str,
    metrics: &impl Exposition,
    ready: &Readiness<C>,
) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => match ready.report() {
            (true, body) => text(StatusCode::OK, body, "text/plain"),
            (false, body) => text(StatusCode::SERVICE_UNAVAILABLE, body, "text/plain"),
        },
        "/metrics" => text(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// The pause after a failed `accept`. At the fd limit (EMFILE) accept
/// fails at once, again and again; retrying without a pause spun a core at
/// 124% (#12, #13). Doubles from 10 ms to 1 s, and resets on success.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        AcceptBackoff { next: Self::MIN }
    }
    /// How long to wait after a failure.
    pub fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
    pub fn succeeded(&mut self) {
        self.next = Self::MIN;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Where connections come from: a [`TcpListener`], or a test's stand-in.
pub trait Accept {
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<TcpStream>> + Send;
}

impl Accept for TcpListener {
    async fn accept(&self) -> std::io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Serve until the task is dropped.
pub async fn serve<C: ReadyCheck>(
    listener: impl Accept,
    metrics: Arc<impl Exposition>,
    ready: Arc<Readiness<C>>,
) {
    let mut backoff = AcceptBackoff::new();
    loop {
        let stream = match listener.accept().await {
            Ok(s) => {
                backoff.succeeded();
                s
            }
            Err(e) => {
                let pause = backoff.failed();
                tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "admin: accept failed");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let (m, r) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = respond(req.uri().path(), &*m, &r);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn readyz_names_what_is_missing() {
        let m = Metrics::new();
        let r: Readiness = Readiness::default();
        let resp = respond("/readyz", &m, &r);
        assert_eq!(resp.status(), 503);
        r.set(Check::HostconfigApplied, Ok(()));
        r.set(Check::ConfigPathCovered, Ok(()));
        r.set(Check::ProxyBound, Ok(()));
        r.set(Check::Canary, Ok(()));
        let failing: Vec<Check> = r.failing().into_iter().map(|(c, _)| c).collect();
        assert_eq!(failing, vec![Check::UpstreamAnswered]);
        r.set(Check::UpstreamAnswered, Ok(()));
        assert_eq!(respond("/readyz", &m, &r).status(), 200);
        assert_eq!(respond("/healthz", &m, &r).status(), 200);
        assert_eq!(respond("/metrics", &m, &r).status(), 200);
        assert_eq!(respond("/other", &m, &r).status(), 404);
    }

    /// A listener at the fd limit: every accept fails at once.
    struct Emfile(Arc<AtomicUsize>);
    impl Accept for Emfile {
        async fn accept(&self) -> std::io::Result<TcpStream> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Err(std::io::Error::from_raw_os_error(nix::libc::EMFILE))
        }
    }

    /// #12/#13: the admin loop retried a failed accept with no pause.
    #[tokio::test]
    async fn accept_errors_back_off() {
        let calls = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(
            Emfile(calls.clone()),
            Arc::new(Metrics::new()),
            Arc::new(Readiness::<Check>::default()),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        task.abort();
        let n = calls.load(Ordering::Relaxed);
        // 10 + 20 + 40 + 80 + 160 + 320 ms: at most 6 or 7 tries in 0.5 s.
        assert!((2..=8).contains(&n), "{n} accepts in 0.5 s");
    }
}
