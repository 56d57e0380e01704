//! The admin server, separate from the proxy.
//!
//! Endpoints on `admin.listen`: `/metrics` (OpenMetrics text from
//! [`crate::admin::metrics`]), `/healthz` (the process is alive) and `/readyz`
//! (ready only when the host configuration is applied, containerd's
//! `config_path` covers our directory, the proxy is bound, and the upstream
//! has answered at least once). Probes are not access-logged.

pub mod metrics;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::admin::metrics::Metrics;

/// What `/readyz` checks; each flag is set by the part that knows.
#[derive(Default)]
pub struct Readiness {
    pub hostconfig_applied: AtomicBool,
    pub config_path_covered: AtomicBool,
    pub proxy_bound: AtomicBool,
    pub upstream_seen: Arc<AtomicBool>,
}

impl Readiness {
    /// The names of the checks that fail.
    pub fn failing(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (ok, name) in [
            (&self.hostconfig_applied, "hostconfig_applied"),
            (
                &self.config_path_covered,
                "containerd_config_path_covers_certs_dir",
            ),
            (&self.proxy_bound, "proxy_bound"),
            (self.upstream_seen.as_ref(), "upstream_answered"),
        ] {
            if !ok.load(Ordering::Relaxed) {
                v.push(name);
            }
        }
        v
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

pub fn respond(path: &str, metrics: &Metrics, ready: &Readiness) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => match ready.failing() {
            f if f.is_empty() => text(StatusCode::OK, "ready\n".into(), "text/plain"),
            f => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", f.join(", ")),
                "text/plain",
            ),
        },
        "/metrics" => text(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// Serve until the listener is dropped with the task.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: Arc<Readiness>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (m, r) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = respond(req.uri().path(), &m, &r);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_names_what_is_missing() {
        let m = Metrics::new();
        let r = Readiness::default();
        let resp = respond("/readyz", &m, &r);
        assert_eq!(resp.status(), 503);
        r.hostconfig_applied.store(true, Ordering::Relaxed);
        r.config_path_covered.store(true, Ordering::Relaxed);
        r.proxy_bound.store(true, Ordering::Relaxed);
        assert_eq!(r.failing(), vec!["upstream_answered"]);
        r.upstream_seen.store(true, Ordering::Relaxed);
        assert_eq!(respond("/readyz", &m, &r).status(), 200);
        assert_eq!(respond("/healthz", &m, &r).status(), 200);
        assert_eq!(respond("/metrics", &m, &r).status(), 200);
        assert_eq!(respond("/other", &m, &r).status(), 404);
    }
}
