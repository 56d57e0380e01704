//! The startup taint (#8 point 6): once the node is ready, canary included,
//! the agent removes `agent.startup_taint` (effect `NoSchedule`) from its own
//! Node, so pods that pull from the registry land only on nodes that can.
//!
//! Owns the pure decision ([`removal`]: a Node as read → the JSON patch, or
//! none) and the API shell ([`remove_startup_taint`]) over an injected
//! [`kube::Client`]. Requests, and only these (RBAC: get and patch on nodes):
//!
//! | request | when |
//! | --- | --- |
//! | `GET /api/v1/nodes/NAME` | every attempt |
//! | `PATCH /api/v1/nodes/NAME?fieldManager=slipway` (`application/json-patch+json`) | the taint is present |
//!
//! The patch is a `test` op on `/spec/taints` with the list as read, then a
//! `replace` with our taint left out. The API server applies JSON patch ops
//! in order and fails the whole patch with 422 if the `test` fails, so a
//! taint another controller added or removed meanwhile (the node lifecycle
//! controller's NoExecute taints, a cordon) is never overwritten. On 409 or
//! 422 the Node is read again and the patch rebuilt, at most
//! [`MAX_ATTEMPTS`] times.
//!
//! The daemon runs [`when_ready`]: it waits until every `/readyz` check
//! passes, the canary included, then removes the taint once.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tracing::{info, warn};

use crate::admin::Readiness;
use crate::k8s::{api_code, FIELD_MANAGER};
use crate::node::config::StartupTaint;

/// Rounds of read → patch before giving up on a contended Node.
pub const MAX_ATTEMPTS: usize = 5;
/// Pause between rounds: long enough for the other writer to finish.
pub const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// The only effect slipway removes: a NoExecute or PreferNoSchedule taint
/// with the same key is someone else's and stays.
pub const EFFECT: &str = "NoSchedule";

#[derive(Debug, thiserror::Error)]
pub enum TaintError {
    #[error("get node {node}")]
    Get {
        node: String,
        #[source]
        error: kube::Error,
    },
    #[error("patch node {node} to remove taint {key}:{EFFECT}")]
    Patch {
        node: String,
        key: String,
        #[source]
        error: kube::Error,
    },
    #[error("node {node}: taint {key}:{EFFECT} still contended after {attempts} attempts (last answer {last})")]
    Contended {
        node: String,
        key: String,
        attempts: usize,
        last: u16,
    },
    #[error("cannot build the request for node {node}")]
    Request {
        node: String,
        #[source]
        error: http::Error,
    },
}

/// What [`remove_startup_taint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The taint was there and is gone; `attempts` patches were sent.
    Removed { attempts: usize },
    /// The taint was not on the Node (already removed, or never put there):
    /// nothing was written.
    Absent,
}

fn is_ours(taint: &Value, key: &str) -> bool {
    taint.get("key").and_then(Value::as_str) == Some(key)
        && taint.get("effect").and_then(Value::as_str) == Some(EFFECT)
}

/// The JSON patch that removes taint `key` with effect `NoSchedule` from
/// `node` (the Node's JSON exactly as the API server sent it), or `None`
/// when it is not there.
///
/// Takes the raw JSON, not a typed `Node`: the `test` op compares with the
/// server's own serialization, and a round trip through typed structs could
/// reformat a taint's `timeAdded` or drop a field this version does not know,
/// making the test fail forever.
pub fn removal(node: &Value, key: &str) -> Option<Value> {
    let taints = node.pointer("/spec/taints")?.as_array()?;
    if !taints.iter().any(|t| is_ours(t, key)) {
        return None;
    }
    let kept: Vec<Value> = taints
        .iter()
        .filter(|t| !is_ours(t, key))
        .cloned()
        .collect();
    Some(json!([
        {"op": "test", "path": "/spec/taints", "value": taints},
        {"op": "replace", "path": "/spec/taints", "value": kept},
    ]))
}

fn node_path(node: &str) -> String {
    format!("/api/v1/nodes/{node}")
}

async fn get(client: &kube::Client, node: &str) -> Result<Value, TaintError> {
    let req = http::Request::get(node_path(node))
        .body(Vec::new())
        .map_err(|error| TaintError::Request {
            node: node.into(),
            error,
        })?;
    client
        .request::<Value>(req)
        .await
        .map_err(|error| TaintError::Get {
            node: node.into(),
            error,
        })
}

/// Remove taint `key` (effect `NoSchedule`) from Node `node`: read it, patch
/// it if the taint is there, and on 409 (Conflict) or 422 (the `test` op
/// failed: the taints changed since the read) read and patch again.
pub async fn remove_startup_taint(
    client: &kube::Client,
    node: &str,
    key: &str,
) -> Result<Outcome, TaintError> {
    let mut last = 0;
    for attempt in 1..=MAX_ATTEMPTS {
        let current = get(client, node).await?;
        let Some(patch) = removal(&current, key) else {
            return Ok(Outcome::Absent);
        };
        let req = http::Request::patch(format!("{}?fieldManager={FIELD_MANAGER}", node_path(node)))
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .header(http::header::ACCEPT, "application/json")
            .body(serde_json::to_vec(&patch).expect("a JSON value serializes"))
            .map_err(|error| TaintError::Request {
                node: node.into(),
                error,
            })?;
        match client.request::<Value>(req).await {
            Ok(_) => {
                info!(node, taint = key, attempt, "startup taint removed");
                return Ok(Outcome::Removed { attempts: attempt });
            }
            Err(error) => match api_code(&error) {
                Some(code @ (409 | 422)) => {
                    warn!(
                        node,
                        taint = key,
                        attempt,
                        code,
                        "node changed while removing the startup taint; reading it again"
                    );
                    last = code;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                _ => {
                    return Err(TaintError::Patch {
                        node: node.into(),
                        key: key.into(),
                        error,
                    })
                }
            },
        }
    }
    Err(TaintError::Contended {
        node: node.into(),
        key: key.into(),
        attempts: MAX_ATTEMPTS,
        last,
    })
}

/// How often [`when_ready`] looks at readiness.
const READY_POLL: Duration = Duration::from_secs(1);
/// The longest pause between failed removals.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// Wait until every readiness check passes (polled every second), then
/// remove the startup taint once. A failure (no API access yet, RBAC
/// missing, contention) is logged and retried with a pause doubling from
/// 1 s to 60 s: the node stays tainted, so no pod that needs the registry
/// is scheduled on it, which is the safe side. Readiness is not looked at
/// again after removal: a taint is a gate at startup, and a node that turns
/// unready later shows that in `/readyz` (re-tainting would need update
/// rights on nodes the agent does not ask for, #8).
pub(crate) async fn when_ready(taint: StartupTaint, ready: Arc<Readiness>) {
    when_ready_with(taint, ready, kube::Client::try_default).await
}

/// [`when_ready`] with the client made by `connect` (tests inject the mock).
async fn when_ready_with<F, Fut>(taint: StartupTaint, ready: Arc<Readiness>, connect: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = kube::Result<kube::Client>>,
{
    let mut waited = false;
    loop {
        let failing = ready.failing();
        if failing.is_empty() {
            break;
        }
        if !waited {
            let names: Vec<&str> = failing.iter().map(|(c, _)| c.name()).collect();
            info!(node = %taint.node, taint = %taint.key, failing = %names.join(", "), "startup taint stays until the node is ready");
            waited = true;
        }
        tokio::time::sleep(READY_POLL).await;
    }
    let mut pause = Duration::from_secs(1);
    loop {
        let result = match connect().await {
            Ok(client) => remove_startup_taint(&client, &taint.node, &taint.key)
                .await
                .map_err(|e| chain(&e)),
            Err(e) => Err(format!(
                "cannot configure a Kubernetes client (in-cluster service account): {}",
                chain(&e)
            )),
        };
        match result {
            Ok(Outcome::Removed { attempts }) => {
                info!(node = %taint.node, taint = %taint.key, attempts, "node ready: startup taint removed");
                return;
            }
            Ok(Outcome::Absent) => {
                info!(node = %taint.node, taint = %taint.key, "node ready: startup taint already absent");
                return;
            }
            Err(e) => {
                warn!(node = %taint.node, taint = %taint.key, retry_secs = pause.as_secs_f64(), error = %e, "cannot remove the startup taint; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "slipway.dev/registry-unready";

    fn node(taints: Value) -> Value {
        json!({"kind": "Node", "metadata": {"name": "n1"}, "spec": {"taints": taints}})
    }

    #[test]
    fn removes_only_our_no_schedule_taint() {
        let taints = json!([
            {"key": KEY, "effect": "NoSchedule"},
            {"key": KEY, "effect": "NoExecute"},
            {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-12-01T10:00:00Z"},
        ]);
        let patch = removal(&node(taints.clone()), KEY).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/spec/taints", "value": taints},
                {"op": "replace", "path": "/spec/taints", "value": [
                    {"key": KEY, "effect": "NoExecute"},
                    {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-12-01T10:00:00Z"},
                ]},
            ])
        );
    }

    #[test]
    fn last_taint_leaves_an_empty_list() {
        let taints = json!([{"key": KEY, "value": "", "effect": "NoSchedule"}]);
        let patch = removal(&node(taints), KEY).unwrap();
        assert_eq!(patch[1]["value"], json!([]));
    }

    /// Nothing is sent while a check fails; once all pass, one GET (and
    /// here, the taint being gone, nothing else).
    #[tokio::test]
    async fn waits_for_every_check_then_removes_once() {
        use crate::admin::Check;
        use http::{Request, Response};
        use kube::client::Body;

        let ready = Arc::new(Readiness::default());
        for c in Check::ALL {
            ready.set(c, Ok(()));
        }
        ready.set(Check::Canary, Err("no canary pull yet".into()));
        let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let taint = StartupTaint {
            key: KEY.into(),
            node: "n1".into(),
        };
        let task = tokio::spawn(when_ready_with(taint, ready.clone(), move || {
            let c = client.clone();
            async move { Ok(c) }
        }));
        let early = tokio::time::timeout(Duration::from_millis(2500), h.next_request()).await;
        assert!(early.is_err(), "a request before the canary passed");
        ready.set(Check::Canary, Ok(()));
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), h.next_request())
            .await
            .expect("no request once ready")
            .unwrap();
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(req.uri().path(), "/api/v1/nodes/n1");
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&node(json!([]))).unwrap()))
                .unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ends after the removal")
            .unwrap();
    }

    #[test]
    fn nothing_to_do_without_the_taint() {
        assert_eq!(removal(&json!({"spec": {}}), KEY), None);
        assert_eq!(removal(&node(json!([])), KEY), None);
        let other = json!([
            {"key": KEY, "effect": "PreferNoSchedule"},
            {"key": "other", "effect": "NoSchedule"},
        ]);
        assert_eq!(removal(&node(other), KEY), None);
    }
}
