//! The startup taint's removal (#8 point 6) against kube-rs's tower-test
//! mock client.
//!
//! [`ApiServer`] answers like the Kubernetes API server does for one Node:
//! the object carries `metadata.resourceVersion`, which moves on every
//! write; a JSON patch is applied op by op and a failed `test` op fails the
//! whole patch with a 422 `Status` (reason Invalid) and changes nothing.
//! Every request is recorded, and each scenario asserts the exact sequence
//! (method, path and query, content type, body). No network.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use slipway::node::taint::{remove_startup_taint, Outcome, TaintError, MAX_ATTEMPTS};
use tower_test::mock::{self, Handle};

type MockHandle = Handle<Request<Body>, Response<Body>>;

const NODE: &str = "worker-1";
const KEY: &str = "slipway.dev/registry-unready";
const PATH: &str = "/api/v1/nodes/worker-1";

#[derive(Debug, Clone)]
struct Seen {
    /// `METHOD PATH[?QUERY] STATUS`
    line: String,
    content_type: Option<String>,
    body: Option<Value>,
}

/// Hook run after each GET: plays another writer between our read and our
/// write.
type AfterGet = Box<dyn FnMut(&mut Value) + Send>;

struct ApiServer {
    node: Value,
    seen: Vec<Seen>,
    after_get: Option<AfterGet>,
    /// Answer the next this-many PATCHes with 409 Conflict, as an API server
    /// does when its storage update races (optimistic concurrency on etcd).
    conflicts: usize,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason,
        "details": {"name": NODE, "kind": "nodes"}, "code": code,
    })
}

fn bump(node: &mut Value) {
    let rv: u64 = node["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    node["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
}

impl ApiServer {
    fn new(taints: Value) -> Self {
        ApiServer {
            node: json!({
                "kind": "Node",
                "apiVersion": "v1",
                "metadata": {"name": NODE, "uid": "0b7c", "resourceVersion": "100"},
                "spec": {"taints": taints},
            }),
            seen: Vec::new(),
            after_get: None,
            conflicts: 0,
        }
    }

    fn taints(&self) -> &Value {
        &self.node["spec"]["taints"]
    }

    fn handle(&mut self, method: &Method, body: Option<&Value>) -> (u16, Value) {
        match *method {
            Method::GET => {
                let out = (200, self.node.clone());
                if let Some(hook) = self.after_get.as_mut() {
                    hook(&mut self.node);
                    bump(&mut self.node);
                }
                out
            }
            Method::PATCH => {
                if self.conflicts > 0 {
                    self.conflicts -= 1;
                    return (
                        409,
                        status(
                            409,
                            "Conflict",
                            "Operation cannot be fulfilled on nodes \"worker-1\": the object has been modified; please apply your changes to the latest version and try again",
                        ),
                    );
                }
                let mut next = self.node.clone();
                for op in body
                    .expect("patch body")
                    .as_array()
                    .expect("a JSON patch is a list")
                {
                    let path = op["path"].as_str().unwrap();
                    let target = next.pointer_mut(path).expect("patch path exists");
                    match op["op"].as_str().unwrap() {
                        "test" if *target == op["value"] => {}
                        "test" => return (
                            422,
                            status(
                                422,
                                "Invalid",
                                "the server rejected our request due to an error in our request",
                            ),
                        ),
                        "replace" => *target = op["value"].clone(),
                        other => panic!("unexpected op {other}"),
                    }
                }
                bump(&mut next);
                self.node = next;
                (200, self.node.clone())
            }
            ref m => panic!("unexpected method {m}"),
        }
    }

    async fn serve(&mut self, h: &mut MockHandle) {
        while let Some((req, send)) = h.next_request().await {
            let (parts, body) = req.into_parts();
            assert_eq!(parts.uri.path(), PATH, "only our own Node");
            let bytes = body.collect_bytes().await.expect("request body");
            let body: Option<Value> =
                (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).expect("JSON body"));
            let (code, reply) = self.handle(&parts.method, body.as_ref());
            let query = parts
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            self.seen.push(Seen {
                line: format!("{} {}{} {}", parts.method, PATH, query, code),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_string()),
                body,
            });
            send.send_response(
                Response::builder()
                    .status(StatusCode::from_u16(code).unwrap())
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    }

    async fn remove(&mut self) -> Result<Outcome, TaintError> {
        let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let task = tokio::spawn(async move { remove_startup_taint(&client, NODE, KEY).await });
        tokio::time::timeout(Duration::from_secs(30), self.serve(&mut h))
            .await
            .expect("removal hung");
        task.await.expect("removal panicked")
    }

    fn lines(&self) -> Vec<&str> {
        self.seen.iter().map(|s| s.line.as_str()).collect()
    }
}

fn ours() -> Value {
    json!({"key": KEY, "effect": "NoSchedule"})
}

fn unreachable() -> Value {
    json!({"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-12-01T10:00:00Z"})
}

fn patch_line() -> String {
    format!("PATCH {PATH}?fieldManager=slipway 200")
}

#[tokio::test]
async fn present_taint_is_removed_with_a_guarded_json_patch() {
    let mut api = ApiServer::new(json!([ours(), unreachable()]));
    assert_eq!(
        api.remove().await.unwrap(),
        Outcome::Removed { attempts: 1 }
    );
    assert_eq!(
        api.lines(),
        [format!("GET {PATH} 200").as_str(), patch_line().as_str()]
    );
    let patch = &api.seen[1];
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/json-patch+json")
    );
    assert_eq!(
        patch.body.as_ref().unwrap(),
        &json!([
            {"op": "test", "path": "/spec/taints", "value": [ours(), unreachable()]},
            {"op": "replace", "path": "/spec/taints", "value": [unreachable()]},
        ])
    );
    assert_eq!(api.taints(), &json!([unreachable()]));
    assert_eq!(api.node["metadata"]["resourceVersion"], "101");
}

#[tokio::test]
async fn changed_taints_fail_the_test_op_and_are_read_again() {
    let mut api = ApiServer::new(json!([ours()]));
    // Between our first read and our patch the node lifecycle controller
    // adds a NoExecute taint: the `test` op fails (422) and the new taint
    // must survive our second, rebuilt patch.
    let mut once = true;
    api.after_get = Some(Box::new(move |node| {
        if std::mem::take(&mut once) {
            node["spec"]["taints"]
                .as_array_mut()
                .unwrap()
                .push(unreachable());
        }
    }));
    assert_eq!(
        api.remove().await.unwrap(),
        Outcome::Removed { attempts: 2 }
    );
    assert_eq!(
        api.lines(),
        [
            format!("GET {PATH} 200").as_str(),
            format!("PATCH {PATH}?fieldManager=slipway 422").as_str(),
            format!("GET {PATH} 200").as_str(),
            patch_line().as_str(),
        ]
    );
    assert_eq!(
        api.seen[1].body.as_ref().unwrap()[0]["value"],
        json!([ours()])
    );
    assert_eq!(
        api.seen[3].body.as_ref().unwrap(),
        &json!([
            {"op": "test", "path": "/spec/taints", "value": [ours(), unreachable()]},
            {"op": "replace", "path": "/spec/taints", "value": [unreachable()]},
        ])
    );
    assert_eq!(api.taints(), &json!([unreachable()]));
}

#[tokio::test]
async fn a_409_is_read_again_and_retried() {
    let mut api = ApiServer::new(json!([ours()]));
    api.conflicts = 1;
    assert_eq!(
        api.remove().await.unwrap(),
        Outcome::Removed { attempts: 2 }
    );
    assert_eq!(
        api.lines(),
        [
            format!("GET {PATH} 200").as_str(),
            format!("PATCH {PATH}?fieldManager=slipway 409").as_str(),
            format!("GET {PATH} 200").as_str(),
            patch_line().as_str(),
        ]
    );
    assert_eq!(api.taints(), &json!([]));
}

#[tokio::test]
async fn absent_taint_is_a_get_and_no_patch() {
    let mut api = ApiServer::new(json!([unreachable()]));
    assert_eq!(api.remove().await.unwrap(), Outcome::Absent);
    assert_eq!(api.lines(), [format!("GET {PATH} 200").as_str()]);
    assert_eq!(api.node["metadata"]["resourceVersion"], "100");
}

#[tokio::test]
async fn endless_conflicts_give_up_after_max_attempts() {
    let mut api = ApiServer::new(json!([ours()]));
    api.conflicts = usize::MAX;
    let err = api.remove().await.unwrap_err();
    assert!(
        matches!(err, TaintError::Contended { last: 409, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("node {NODE}: taint {KEY}:NoSchedule still contended after 5 attempts (last answer 409)")
    );
    assert_eq!(api.seen.len(), 2 * MAX_ATTEMPTS);
}

#[tokio::test]
async fn a_403_is_an_error_naming_the_node_and_key() {
    // No RBAC for patch: not retried, the error names node and taint and
    // keeps kube's error as its source.
    let mut api = ApiServer::new(json!([ours()]));
    let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let task = tokio::spawn(async move { remove_startup_taint(&client, NODE, KEY).await });
    let (req, send) = h.next_request().await.unwrap();
    assert_eq!(req.method(), Method::GET);
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&api.node).unwrap()))
            .unwrap(),
    );
    let (req, send) = h.next_request().await.unwrap();
    assert_eq!(req.method(), Method::PATCH);
    send.send_response(
        Response::builder()
            .status(403)
            .body(Body::from(
                serde_json::to_vec(&status(403, "Forbidden", "nodes \"worker-1\" is forbidden"))
                    .unwrap(),
            ))
            .unwrap(),
    );
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("patch node {NODE} to remove taint {KEY}:NoSchedule")
    );
    assert!(std::error::Error::source(&err).is_some());
    api.seen.clear();
}
