//! The canary pull: readiness proven by a pull (#8, point 4).
//!
//! Owns the `canary` readiness check and the `slipway_canary_pull_seconds`
//! and `slipway_canary_last_success_timestamp_seconds` metrics. When
//! `containerd.socket` and `agent.canary_image` are both set, the daemon
//! asks for a canary after its first pass, after every pass that changed
//! something (or followed a reload), and every `agent.canary_interval_secs`.
//! Each canary is CRI `ImageService/PullImage` on containerd's socket, the
//! call kubelet makes, so it goes through the CRI plugin's own pull path
//! (the transfer service on 2.1, containerd#12415), `config_path`, our
//! hosts.toml and the proxy; then `RemoveImage`, so the next canary pulls
//! again instead of finding the image in containerd's store.
//!
//! A pull that succeeds is not yet proof of the proxy: containerd tries the
//! hosts of hosts.toml in order and falls back to the next (the upstream)
//! when the proxy refuses or fails (#18 point 11: the canary passed with
//! the proxy dead). So the proxy's count of 2xx answers
//! (`slipway_proxy_successful_responses_total`) must move during the pull,
//! or the canary fails, naming the proxy.
//!
//! The CRI client sits behind [`Cri`] so the scheduling is tested with a
//! fake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::admin::metrics::Metrics;
use crate::admin::readiness::{Check, Readiness};

/// How long one canary pull may take. The canary is a few hundred bytes;
/// a node that needs longer cannot start a workload in time either, and a
/// hanging mirror must show up as not ready rather than a stuck check.
pub const PULL_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("containerd.socket {path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("CRI PullImage {image}: {}", source.message())]
    Pull {
        image: String,
        source: tonic::Status,
    },
    #[error("CRI {call} {image}: no answer within {} s", deadline.as_secs_f64())]
    Deadline {
        call: &'static str,
        image: String,
        deadline: Duration,
    },
    #[error("CRI PullImage {image} succeeded, but not through the proxy {proxy}: it answered no request with success during the pull, so containerd used the next host in hosts.toml")]
    NotThroughProxy { image: String, proxy: String },
    #[error("CRI RemoveImage {image}: {}", source.message())]
    Remove {
        image: String,
        source: tonic::Status,
    },
}

/// The two CRI image calls the canary makes.
pub trait Cri: Send + Sync {
    /// `PullImage`; the image ref containerd reports.
    fn pull<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<String, CanaryError>>;
    /// `RemoveImage`.
    fn remove<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), CanaryError>>;
}

/// CRI over containerd's unix socket, connected per call: containerd may
/// restart between canaries and its socket is created anew.
pub struct CriSocket {
    /// Where the socket is reachable from this process (under host_root).
    pub local: PathBuf,
    /// As the host names it (`containerd.socket`), for messages.
    pub shown: PathBuf,
}

impl CriSocket {
    async fn channel(&self) -> Result<tonic::transport::Channel, CanaryError> {
        let path = self.local.clone();
        // The URI is required by tonic and unused: the connector dials the
        // socket.
        tonic::transport::Endpoint::from_static("http://[::1]:50051")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| CanaryError::Connect {
                path: self.shown.clone(),
                source,
            })
    }
}

fn spec(image: &str) -> Option<k8s_cri::v1::ImageSpec> {
    Some(k8s_cri::v1::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

impl Cri for CriSocket {
    fn pull<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<String, CanaryError>> {
        Box::pin(async move {
            use k8s_cri::v1::image_service_client::ImageServiceClient;
            let mut c = ImageServiceClient::new(self.channel().await?);
            let req = k8s_cri::v1::PullImageRequest {
                image: spec(image),
                ..Default::default()
            };
            let r = c
                .pull_image(req)
                .await
                .map_err(|source| CanaryError::Pull {
                    image: image.to_string(),
                    source,
                })?;
            Ok(r.into_inner().image_ref)
        })
    }

    fn remove<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), CanaryError>> {
        Box::pin(async move {
            use k8s_cri::v1::image_service_client::ImageServiceClient;
            let mut c = ImageServiceClient::new(self.channel().await?);
            c.remove_image(k8s_cri::v1::RemoveImageRequest { image: spec(image) })
                .await
                .map_err(|source| CanaryError::Remove {
                    image: image.to_string(),
                    source,
                })?;
            Ok(())
        })
    }
}

/// Why a canary runs (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// After the agent's first pass.
    Start,
    /// A pass changed host files or containerd's config.
    Changed,
    /// A pass after SIGHUP.
    Reload,
    /// `agent.canary_interval_secs` since the last canary.
    Interval,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Changed => "change",
            Reason::Reload => "reload",
            Reason::Interval => "interval",
        }
    }
}

/// What the daemon needs to run canaries.
pub struct Canary {
    pub cri: Arc<dyn Cri>,
    pub image: String,
    /// The proxy's URL in hosts.toml, for messages.
    pub proxy: String,
    pub interval: Duration,
    pub deadline: Duration,
    pub ready: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
}

impl Canary {
    /// One CRI call with the deadline. Every call has it: a containerd
    /// that hung in RemoveImage held the canary loop for ever, so no canary
    /// ran again and readiness kept the last "ok" (#18 point 10).
    async fn within<T>(
        &self,
        call: &'static str,
        f: impl std::future::Future<Output = Result<T, CanaryError>>,
    ) -> Result<T, CanaryError> {
        tokio::time::timeout(self.deadline, f)
            .await
            .unwrap_or_else(|_| {
                Err(CanaryError::Deadline {
                    call,
                    image: self.image.clone(),
                    deadline: self.deadline,
                })
            })
    }

    /// One canary: pull with the deadline, record, then remove.
    pub async fn once(&self, reason: Reason) -> Result<(), CanaryError> {
        let started = Instant::now();
        let proxied_before = self.metrics.proxy_ok.get();
        let pulled = self
            .within("PullImage", self.cri.pull(&self.image))
            .await
            .and_then(|image_ref| {
                if self.metrics.proxy_ok.get() == proxied_before {
                    Err(CanaryError::NotThroughProxy {
                        image: self.image.clone(),
                        proxy: self.proxy.clone(),
                    })
                } else {
                    Ok(image_ref)
                }
            });
        let took = started.elapsed();
        self.metrics.canary_pull.observe(took.as_secs_f64());
        match pulled {
            Ok(image_ref) => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                self.metrics.canary_last_success.set(now.as_secs_f64());
                self.ready.set(Check::Canary, Ok(()));
                info!(image = %self.image, %image_ref, reason = reason.as_str(), secs = took.as_secs_f64(), "canary pulled through CRI");
                if let Err(e) = self
                    .within("RemoveImage", self.cri.remove(&self.image))
                    .await
                {
                    // The pull is what readiness is about; a canary left in
                    // containerd's store only makes the next pull cheaper,
                    // and a containerd that hangs fails the next pull.
                    warn!("{e}; the next canary may find the image present");
                }
                Ok(())
            }
            Err(e) => {
                self.ready.set(Check::Canary, Err(e.to_string()));
                warn!(reason = reason.as_str(), "canary pull failed: {e}");
                Err(e)
            }
        }
    }

    /// Run canaries as the daemon asks, and every interval, until the
    /// sender is dropped. Waits for the first request: before the first
    /// pass there is no hosts.toml to prove.
    pub async fn run(self, mut rx: mpsc::Receiver<Reason>) {
        let Some(mut reason) = rx.recv().await else {
            return;
        };
        loop {
            let _ = self.once(reason).await;
            // Requests that arrived during the pull are answered by it.
            while rx.try_recv().is_ok() {}
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => reason = r,
                    None => return,
                },
                _ = tokio::time::sleep(self.interval) => reason = Reason::Interval,
            }
        }
    }
}

/// The daemon's handle: asks for a canary without waiting for it. One
/// request waiting is enough, so a full queue drops the new one.
#[derive(Clone)]
pub struct Trigger(pub mpsc::Sender<Reason>);

impl Trigger {
    pub fn channel() -> (Trigger, mpsc::Receiver<Reason>) {
        let (tx, rx) = mpsc::channel(1);
        (Trigger(tx), rx)
    }
    pub fn ask(&self, reason: Reason) {
        let _ = self.0.try_send(reason);
    }
}

/// The CRI socket as this process reaches it.
pub fn socket(host_root: &Path, socket: &Path) -> CriSocket {
    CriSocket {
        local: crate::node::config::join_under(host_root, socket),
        shown: socket.to_path_buf(),
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::sync::Mutex;

    /// Answers from a script; records every call.
    #[derive(Default)]
    pub struct FakeCri {
        /// `None`: pull succeeds; `Some(msg)`: fails with that message.
        pub fail: Mutex<Option<String>>,
        pub hang: Mutex<bool>,
        /// RemoveImage never answers.
        pub hang_remove: Mutex<bool>,
        /// The proxy's success counter, moved by each successful pull as
        /// the real proxy's is; `None`: containerd fell back past it.
        pub proxy: Mutex<Option<prometheus_client::metrics::counter::Counter>>,
        pub calls: Mutex<Vec<String>>,
    }

    impl Cri for FakeCri {
        fn pull<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<String, CanaryError>> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(format!("pull {image}"));
                if *self.hang.lock().unwrap() {
                    std::future::pending::<()>().await;
                }
                match self.fail.lock().unwrap().clone() {
                    None => {
                        if let Some(c) = &*self.proxy.lock().unwrap() {
                            c.inc();
                        }
                        Ok("sha256:abc".into())
                    }
                    Some(m) => Err(CanaryError::Pull {
                        image: image.to_string(),
                        source: tonic::Status::unknown(m),
                    }),
                }
            })
        }
        fn remove<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), CanaryError>> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(format!("remove {image}"));
                if *self.hang_remove.lock().unwrap() {
                    std::future::pending::<()>().await;
                }
                Ok(())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeCri;
    use super::*;

    const IMG: &str = "registry.shared-services:5000/slipway/canary@sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn canary(cri: Arc<FakeCri>, interval: Duration) -> (Canary, Arc<Readiness>, Arc<Metrics>) {
        let ready = Arc::new(Readiness::default());
        let metrics = Arc::new(Metrics::new());
        *cri.proxy.lock().unwrap() = Some(metrics.proxy_ok.clone());
        (
            Canary {
                cri,
                image: IMG.into(),
                proxy: "http://127.0.0.1:5050".into(),
                interval,
                deadline: Duration::from_millis(200),
                ready: ready.clone(),
                metrics: metrics.clone(),
            },
            ready,
            metrics,
        )
    }

    fn canary_reason(r: &Readiness) -> Option<String> {
        r.failing()
            .into_iter()
            .find(|(c, _)| *c == Check::Canary)
            .map(|(_, m)| m)
    }

    #[tokio::test]
    async fn a_failed_pull_fails_the_check_with_the_cri_error_and_a_success_passes_it() {
        let cri = Arc::new(FakeCri::default());
        *cri.fail.lock().unwrap() = Some("failed to resolve reference: not found".into());
        let (c, ready, m) = canary(cri.clone(), Duration::from_secs(300));
        assert!(c.once(Reason::Start).await.is_err());
        assert_eq!(
            canary_reason(&ready).unwrap(),
            format!("CRI PullImage {IMG}: failed to resolve reference: not found")
        );
        let (_, body) = ready.report();
        assert!(
            body.contains(&format!("canary: CRI PullImage {IMG}: failed to resolve")),
            "{body}"
        );
        let t = m.encode();
        assert!(t.contains("slipway_canary_pull_seconds_count 1"), "{t}");
        assert!(
            t.contains("slipway_canary_last_success_timestamp_seconds 0.0"),
            "{t}"
        );
        // No remove after a failed pull.
        assert_eq!(*cri.calls.lock().unwrap(), vec![format!("pull {IMG}")]);

        *cri.fail.lock().unwrap() = None;
        c.once(Reason::Changed).await.unwrap();
        assert_eq!(canary_reason(&ready), None);
        assert!(m.canary_last_success.get() > 1.7e9);
        assert_eq!(
            *cri.calls.lock().unwrap(),
            vec![
                format!("pull {IMG}"),
                format!("pull {IMG}"),
                format!("remove {IMG}")
            ]
        );
        // A later failure fails the check again: only the latest counts.
        *cri.fail.lock().unwrap() = Some("no such host".into());
        assert!(c.once(Reason::Interval).await.is_err());
        assert!(canary_reason(&ready).unwrap().ends_with("no such host"));
    }

    /// #18 point 11: containerd pulled, but past the proxy (it fell back
    /// to the next host in hosts.toml): the canary fails, naming the proxy.
    #[tokio::test]
    async fn a_pull_that_bypassed_the_proxy_fails_the_check() {
        let cri = Arc::new(FakeCri::default());
        let (c, ready, m) = canary(cri.clone(), Duration::from_secs(300));
        *cri.proxy.lock().unwrap() = None;
        assert!(c.once(Reason::Start).await.is_err());
        assert_eq!(
            canary_reason(&ready).unwrap(),
            format!("CRI PullImage {IMG} succeeded, but not through the proxy http://127.0.0.1:5050: it answered no request with success during the pull, so containerd used the next host in hosts.toml")
        );
        assert_eq!(m.canary_last_success.get(), 0.0);
        *cri.proxy.lock().unwrap() = Some(m.proxy_ok.clone());
        c.once(Reason::Changed).await.unwrap();
        assert_eq!(canary_reason(&ready), None);
    }

    #[tokio::test]
    async fn a_hanging_pull_fails_at_the_deadline() {
        let cri = Arc::new(FakeCri::default());
        *cri.hang.lock().unwrap() = true;
        let (c, ready, _) = canary(cri, Duration::from_secs(300));
        let t = Instant::now();
        assert!(c.once(Reason::Start).await.is_err());
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(
            canary_reason(&ready).unwrap(),
            format!("CRI PullImage {IMG}: no answer within 0.2 s")
        );
    }

    /// #18 point 10: a RemoveImage that never answers ends at the
    /// deadline, and the next canaries still run.
    #[tokio::test]
    async fn a_hanging_remove_ends_at_the_deadline_and_canaries_go_on() {
        let cri = Arc::new(FakeCri::default());
        *cri.hang_remove.lock().unwrap() = true;
        let (c, ready, _) = canary(cri.clone(), Duration::from_millis(300));
        let t = Instant::now();
        c.once(Reason::Start).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(canary_reason(&ready), None);
        let (trigger, rx) = Trigger::channel();
        let task = tokio::spawn(c.run(rx));
        trigger.ask(Reason::Start);
        // Two canaries within 2 s: pull, hung remove (0.2 s), 0.3 s wait.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pulls = cri
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("pull "))
            .count();
        assert!(
            pulls >= 3,
            "canaries stopped after a hung RemoveImage: {pulls} pulls"
        );
        drop(trigger);
        task.abort();
    }

    #[tokio::test]
    async fn run_waits_for_the_first_request_then_repeats_every_interval() {
        let cri = Arc::new(FakeCri::default());
        let (c, _, _) = canary(cri.clone(), Duration::from_millis(300));
        let (trigger, rx) = Trigger::channel();
        let task = tokio::spawn(c.run(rx));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            cri.calls.lock().unwrap().is_empty(),
            "pulled before the first pass"
        );
        trigger.ask(Reason::Start);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(cri.calls.lock().unwrap().len(), 2);
        trigger.ask(Reason::Changed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(cri.calls.lock().unwrap().len(), 4);
        // 300 ms later without a request: the interval canary.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(cri.calls.lock().unwrap().len(), 6);
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("run ends when the daemon drops its trigger")
            .unwrap();
    }
}
