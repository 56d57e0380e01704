//! `slipway build`, `builds` and `logs` against kube-rs's tower-test mock:
//! each test plays the API server, asserts every request slipway makes
//! (method, path and query, and the body where there is one), and replies
//! as the API server would (objects, watch event streams, logs, and Status
//! objects with the right codes and reasons for errors).
//!
//! Covered: success (text and JSON output), every failure class with its
//! exit code, Ctrl-C (a Job delete with propagationPolicy Foreground),
//! --detach (with the CA copied into another namespace), a Job controller
//! that cannot create the pod, `slipway builds` and `slipway logs`.

use std::path::PathBuf;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use slipway::builds::job;
use slipway::builds::run::{self, Outcome, PlainProgress, RunOptions, Timing};
use slipway::builds::{BuildArgs, BuildError, OutputFormat, Plan, Settings};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;
type Send = mock::SendResponse<Response<Body>>;

const ID: &str = "flow000001";
const JOB: &str = "build-app-flow000001";
const POD: &str = "build-app-flow000001-x7k2p";
const NS: &str = "shared-services";
const COMMIT: &str = "3f786850e387550fdab836ed7e6dc881de23001b";
const DIGEST: &str = "sha256:6f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const IMAGE: &str = "registry.shared-services:5000/app";
const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

const SA_URI: &str = "/api/v1/namespaces/shared-services/serviceaccounts/slipway-build";
const CA_URI: &str = "/api/v1/namespaces/shared-services/configmaps/registry-ca";
const TEAM_A_SA_URI: &str = "/api/v1/namespaces/team-a/serviceaccounts/slipway-build";
const TEAM_A_CA_URI: &str = "/api/v1/namespaces/team-a/configmaps/registry-ca";
const TEAM_A_CA_CREATE_URI: &str = "/api/v1/namespaces/team-a/configmaps?&fieldManager=slipway";
const TEAM_A_CA_UPDATE_URI: &str =
    "/api/v1/namespaces/team-a/configmaps/registry-ca?&fieldManager=slipway";

fn plan_with(f: impl FnOnce(&mut BuildArgs)) -> Plan {
    let mut a = BuildArgs {
        git: "https://github.com/example/app.git".into(),
        rev: "main".into(),
        repo: "app".into(),
        dockerfile: "Dockerfile".into(),
        build_id: Some(ID.into()),
        settings: Settings {
            config: Some(PathBuf::from("/dev/null")),
            namespace: None,
        },
        // The flows here are about the Job, the CA and the follower; the
        // push Secret's preflight (on by default, #10) has its own tests.
        no_push_secret: true,
        // And the mirror's (#20) has its own tests below.
        no_mirror: true,
        ..Default::default()
    };
    f(&mut a);
    a.plan().unwrap()
}

fn plan() -> Plan {
    plan_with(|_| {})
}

fn opts(output: OutputFormat) -> RunOptions {
    RunOptions {
        detach: false,
        output,
        timing: Timing {
            quiet: Duration::from_secs(30),
            log_retry: Duration::from_millis(5),
            log_retries: 5,
        },
    }
}

/// One request as the API server sees it.
struct Req {
    method: Method,
    uri: String,
    accept: String,
    body: Vec<u8>,
    send: Send,
}

impl Req {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn next(h: &mut Handle) -> Req {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
        .await
        .expect("slipway made no further request")
        .expect("the client is gone");
    let (parts, body) = req.into_parts();
    Req {
        method: parts.method,
        uri: parts.uri.to_string(),
        accept: parts
            .headers
            .get("accept")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default(),
        body: body.collect_bytes().await.unwrap().to_vec(),
        send,
    }
}

/// Takes the next request and checks its method and URI exactly.
async fn expect(h: &mut Handle, method: Method, uri: &str) -> Req {
    let r = next(h).await;
    assert_eq!(
        (r.method.clone(), r.uri.as_str()),
        (method, uri),
        "unexpected request"
    );
    r
}

/// Takes the next request, checks its method and URI, and answers it.
async fn answer(h: &mut Handle, method: Method, uri: &str, code: u16, body: Value) {
    let r = expect(h, method, uri).await;
    reply(r.send, code, body);
}

/// A client whose API server is the returned handle.
fn mock_api() -> (Client, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

fn reply(send: Send, code: u16, body: Value) {
    send.send_response(
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

fn reply_text(send: Send, text: &str) {
    send.send_response(
        Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .body(Body::from(text.as_bytes().to_vec()))
            .unwrap(),
    );
}

/// A watch response: one JSON event per line, then the server closes it.
fn reply_events(send: Send, events: &[(&str, Value)]) {
    let mut body = String::new();
    for (t, o) in events {
        body.push_str(&json!({ "type": t, "object": o }).to_string());
        body.push('\n');
    }
    reply_text(send, &body);
}

/// A `metav1.Status` failure, as the API server sends it.
fn status(code: u16, reason: &str, message: &str, details: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    })
}

fn not_found(kind: &str, name: &str) -> Value {
    status(
        404,
        "NotFound",
        &format!("{kind} \"{name}\" not found"),
        json!({ "name": name, "kind": kind }),
    )
}

// ---- objects -------------------------------------------------------------

fn service_account(ns: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": { "name": "slipway-build", "namespace": ns, "resourceVersion": "10" },
        "automountServiceAccountToken": false
    })
}

fn ca_configmap(ns: &str, pem: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "registry-ca", "namespace": ns, "resourceVersion": "11" },
        "data": { "ca.crt": pem }
    })
}

/// The Job as the API server returns it from the create.
fn created_job(plan: &Plan) -> Value {
    let mut j = serde_json::to_value(job::job(&plan.spec)).unwrap();
    j["apiVersion"] = json!("batch/v1");
    j["kind"] = json!("Job");
    j["metadata"]["uid"] = json!("0b9a6c52-1d5e-4c3e-9a51-2f1f2f9a0c11");
    j["metadata"]["resourceVersion"] = json!("90");
    j["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    j
}

/// The created Job with one condition of type `kind` in its status.
fn job_with_condition(kind: &str, reason: &str, message: &str) -> Value {
    let mut j = created_job(&plan());
    j["status"] = json!({ "conditions": [{
        "type": kind, "status": "True", "reason": reason, "message": message
    }]});
    j
}

/// The Job after a failed pod used up its retries.
fn backoff_limit_job() -> Value {
    job_with_condition(
        "Failed",
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    )
}

/// The Job once its Foreground delete has been accepted at `at`.
fn job_being_deleted(at: &str) -> Value {
    let mut j = created_job(&plan());
    j["metadata"]["deletionTimestamp"] = json!(at);
    j["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
    j
}

/// A 409 on the `registry-ca` ConfigMap.
fn ca_conflict(reason: &str, message: &str) -> Value {
    status(
        409,
        reason,
        message,
        json!({ "name": "registry-ca", "kind": "configmaps" }),
    )
}

fn job_uri() -> String {
    format!("/apis/batch/v1/namespaces/{NS}/jobs/{JOB}")
}

fn cs(name: &str, image: &str, state: Value) -> Value {
    json!({
        "name": name, "image": image, "imageID": "", "ready": false,
        "restartCount": 0, "started": false, "state": state
    })
}

fn waiting(reason: &str, message: &str) -> Value {
    json!({ "waiting": { "reason": reason, "message": message } })
}

fn running() -> Value {
    json!({ "running": { "startedAt": "2025-01-01T00:00:05Z" } })
}

fn terminated(code: i32, reason: &str, message: &str, finished: &str) -> Value {
    json!({ "terminated": {
        "exitCode": code, "reason": reason, "message": message,
        "startedAt": "2025-01-01T00:00:05Z", "finishedAt": finished
    }})
}

fn git_ok() -> Value {
    terminated(
        0,
        "Completed",
        &format!("slipway-git ok\ncommit {COMMIT}\nref refs/heads/main\n"),
        "2025-01-01T00:00:20Z",
    )
}

/// The build pod at resourceVersion `rv`, with the git and (if given) the
/// Kaniko container states.
fn pod(rv: u32, phase: &str, git: Value, kaniko: Option<Value>) -> Value {
    let plan = plan();
    let j = serde_json::to_value(job::job(&plan.spec)).unwrap();
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": POD, "namespace": NS, "resourceVersion": rv.to_string(),
            "labels": j["spec"]["template"]["metadata"]["labels"].clone(),
            "creationTimestamp": "2025-01-01T00:00:01Z"
        },
        "spec": j["spec"]["template"]["spec"].clone(),
        "status": {
            "phase": phase,
            "conditions": [{ "type": "PodScheduled", "status": "True" }],
            "initContainerStatuses": [cs("git", "docker.io/alpine/git:2.47.2", git)],
        }
    });
    let kaniko = kaniko.unwrap_or_else(|| waiting("PodInitializing", ""));
    p["status"]["containerStatuses"] = json!([cs(
        "kaniko",
        "ghcr.io/osscontainertools/kaniko:v1.27.6-debug",
        kaniko
    )]);
    p
}

fn pending_pod(rv: u32) -> Value {
    let mut p = pod(rv, "Pending", waiting("PodInitializing", ""), None);
    p["status"]["initContainerStatuses"][0]["state"] = waiting("PodInitializing", "");
    p
}

fn watch_uri(ns: &str, rv: &str) -> String {
    format!(
        "/api/v1/namespaces/{ns}/pods?&watch=true&timeoutSeconds=290&labelSelector=slipway.dev%2Fbuild-id%3D{ID}&allowWatchBookmarks=true&resourceVersion={rv}"
    )
}

fn log_uri(container: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods/{POD}/log?&container={container}&follow=true")
}

const GIT_LOG: &str = "slipway: main is commit 3f786850e387550fdab836ed7e6dc881de23001b\n";

const KANIKO_LOG: &str = "\u{1b}[36mINFO\u{1b}[0m[0000] Resolved base name golang:1.22 to builder
FROM golang:1.22 AS builder
STREAM golang:1.22
RUN apk add git
RUN go build ./...
FROM alpine:3.20
COPY --from=builder /go/bin/app /app
PUSH [registry.shared-services:5000/app:3f78685]
\u{1b}[36mINFO\u{1b}[0m[0001] Building stage 'golang:1.22' [idx: '0', base-idx: '-1']
\u{1b}[36mINFO\u{1b}[0m[0001] Using caching version of cmd: RUN apk add git
\u{1b}[36mINFO\u{1b}[0m[0001] No cached layer found for cmd RUN go build ./...
\u{1b}[36mINFO\u{1b}[0m[0002] RUN apk add git
\u{1b}[36mINFO\u{1b}[0m[0002] Found cached layer, extracting to filesystem
\u{1b}[36mINFO\u{1b}[0m[0002] RUN go build ./...
\u{1b}[36mINFO\u{1b}[0m[0009] Building stage 'alpine:3.20' [idx: '1', base-idx: '-1']
\u{1b}[36mINFO\u{1b}[0m[0010] COPY --from=builder /go/bin/app /app
\u{1b}[33mWARN\u{1b}[0m[0011] Error uploading layer to cache: failed to push to destination registry.shared-services:5000/cache/app:9f2c: PUT https://registry.shared-services:5000/v2/cache/app/manifests/9f2c: MANIFEST_INVALID
\u{1b}[36mINFO\u{1b}[0m[0011] Pushing image to registry.shared-services:5000/app:3f78685
\u{1b}[36mINFO\u{1b}[0m[0012] Pushed registry.shared-services:5000/app@sha256:6f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9
";

fn kaniko_ok() -> Value {
    terminated(
        0,
        "Completed",
        &format!("{DIGEST}\n{IMAGE}@{DIGEST}\n"),
        "2025-01-01T00:01:30Z",
    )
}

// ---- shared steps ----------------------------------------------------------

/// Preflight in shared-services: the ServiceAccount and the CA ConfigMap.
async fn preflight_in_place(h: &mut Handle) {
    answer(h, Method::GET, SA_URI, 200, service_account(NS)).await;
    answer(h, Method::GET, CA_URI, 200, ca_configmap(NS, CA)).await;
}

async fn team_a_service_account_found(h: &mut Handle) {
    let sa = service_account("team-a");
    answer(h, Method::GET, TEAM_A_SA_URI, 200, sa).await;
}

/// Preflight in team-a up to the CA copy: the ServiceAccount, then the
/// source ConfigMap in shared-services.
async fn preflight_team_a_until_ca_copy(h: &mut Handle) {
    team_a_service_account_found(h).await;
    answer(h, Method::GET, CA_URI, 200, ca_configmap(NS, CA)).await;
}

/// The ServiceAccount is not found in `ns`; the next request, returned
/// unanswered, looks the namespace up.
async fn service_account_not_found(h: &mut Handle, ns: &str) -> Req {
    answer(
        h,
        Method::GET,
        &format!("/api/v1/namespaces/{ns}/serviceaccounts/slipway-build"),
        404,
        not_found("serviceaccounts", "slipway-build"),
    )
    .await;
    expect(h, Method::GET, &format!("/api/v1/namespaces/{ns}")).await
}

/// The CA copy's create in team-a: the body is exactly the copied
/// ConfigMap. Returned unanswered.
async fn expect_ca_copy_create(h: &mut Handle) -> Req {
    let r = expect(h, Method::POST, TEAM_A_CA_CREATE_URI).await;
    assert_eq!(
        r.json(),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "registry-ca", "namespace": "team-a",
                "labels": {
                    "app.kubernetes.io/managed-by": "slipway",
                    "app.kubernetes.io/part-of": "slipway"
                },
                "annotations": { "slipway.dev/copied-from": "shared-services/registry-ca" }
            },
            "data": { "ca.crt": CA }
        })
    );
    r
}

/// The conditional PUT of a stale CA copy in team-a: at resourceVersion
/// `rv`, with `data`, still marked as a copy. The server takes it.
async fn ca_copy_updated(h: &mut Handle, rv: &str, data: Value) {
    let r = expect(h, Method::PUT, TEAM_A_CA_UPDATE_URI).await;
    let body = r.json();
    assert_eq!(body["data"], data);
    assert_eq!(
        body["metadata"]["resourceVersion"], rv,
        "optimistic concurrency"
    );
    assert_eq!(
        body["metadata"]["annotations"]["slipway.dev/copied-from"],
        "shared-services/registry-ca"
    );
    reply(r.send, 200, body);
}

/// The Job create: the body is exactly the planned Job.
async fn create_job(h: &mut Handle, plan: &Plan) {
    let r = expect(
        h,
        Method::POST,
        &format!("/apis/batch/v1/namespaces/{}/jobs?", plan.spec.namespace),
    )
    .await;
    assert_eq!(
        r.json(),
        serde_json::to_value(job::job(&plan.spec)).unwrap()
    );
    let mut created = created_job(plan);
    created["metadata"]["namespace"] = json!(plan.spec.namespace);
    reply(r.send, 201, created);
}

/// A real kubelet reports git done and Kaniko running in one status
/// update (#19, seen in the test cluster): slipway streams Kaniko's log at
/// once, without waiting for another event (before, it waited for the next
/// one, Kaniko's end, and the whole log came at once).
#[tokio::test]
async fn kaniko_running_in_the_event_that_ends_git_is_followed_at_once() {
    let r = drive(plan(), opts(OutputFormat::Text), |mut h| async move {
        start_build(&mut h).await;
        let r = expect(&mut h, Method::GET, &watch_uri(NS, "101")).await;
        reply_events(
            r.send,
            &[("MODIFIED", pod(102, "Running", git_ok(), Some(running())))],
        );
        label_commit(&mut h).await;
        // The log, with no watch request before it.
        let r = expect(&mut h, Method::GET, &log_uri("kaniko")).await;
        reply_text(r.send, KANIKO_LOG);
        let r = expect(&mut h, Method::GET, &watch_uri(NS, "102")).await;
        reply_events(
            r.send,
            &[(
                "MODIFIED",
                pod(103, "Succeeded", git_ok(), Some(kaniko_ok())),
            )],
        );
        no_more(&mut h).await;
    })
    .await;
    assert_eq!(exit_code(&r), 0, "{:?}\n{}", r.result, r.stderr);
}

/// Up to a running git container and its log.
async fn until_git_log(h: &mut Handle) {
    let r = expect(h, Method::GET, &watch_uri(NS, "0")).await;
    reply_events(
        r.send,
        &[
            ("ADDED", pending_pod(100)),
            ("MODIFIED", pod(101, "Pending", running(), None)),
        ],
    );
    let r = expect(h, Method::GET, &log_uri("git")).await;
    reply_text(r.send, GIT_LOG);
}

/// A build in shared-services, from the preflight to git's log.
async fn start_build(h: &mut Handle) {
    preflight_in_place(h).await;
    create_job(h, &plan()).await;
    until_git_log(h).await;
}

/// The commit label, once git has reported it.
async fn label_commit(h: &mut Handle) {
    let r = expect(
        h,
        Method::PATCH,
        &format!("/apis/batch/v1/namespaces/{NS}/jobs/{JOB}?"),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({ "metadata": { "labels": { "slipway.dev/commit": COMMIT } } })
    );
    reply(r.send, 200, created_job(&plan()));
}

/// From git's log to a running Kaniko container and its log.
async fn until_kaniko_log(h: &mut Handle, kaniko_log: &str) {
    let r = expect(h, Method::GET, &watch_uri(NS, "101")).await;
    reply_events(
        r.send,
        &[
            ("MODIFIED", pod(102, "Pending", git_ok(), None)),
            ("MODIFIED", pod(103, "Running", git_ok(), Some(running()))),
        ],
    );
    label_commit(h).await;
    // The kubelet may still report the container as waiting: slipway
    // retries until it has started.
    let r = expect(h, Method::GET, &log_uri("kaniko")).await;
    reply(
        r.send,
        400,
        status(
            400,
            "BadRequest",
            &format!("container \"kaniko\" in pod \"{POD}\" is waiting to start: PodInitializing"),
            json!(null),
        ),
    );
    let r = expect(h, Method::GET, &log_uri("kaniko")).await;
    reply_text(r.send, kaniko_log);
}

/// A build whose Kaniko container streams `log`, until the watch sees the
/// pod `ended`; then, if given, the Job slipway reads to learn why it
/// failed.
async fn kaniko_streams_until(
    mut h: Handle,
    log: &'static str,
    ended: Value,
    then_job: Option<Value>,
) {
    start_build(&mut h).await;
    until_kaniko_log(&mut h, log).await;
    let r = expect(&mut h, Method::GET, &watch_uri(NS, "103")).await;
    reply_events(r.send, &[("MODIFIED", ended)]);
    if let Some(j) = then_job {
        answer(&mut h, Method::GET, &job_uri(), 200, j).await;
    }
    no_more(&mut h).await;
}

/// A build whose Kaniko container streams `log` and ends with `kaniko`;
/// then, if given, the Job slipway reads to learn why it failed.
async fn kaniko_streams(h: Handle, log: &'static str, kaniko: Value, then_job: Option<Value>) {
    let phase = if then_job.is_some() || kaniko["terminated"]["exitCode"] != 0 {
        "Failed"
    } else {
        "Succeeded"
    };
    let ended = pod(104, phase, git_ok(), Some(kaniko));
    kaniko_streams_until(h, log, ended, then_job).await;
}

/// The Job delete that stops a build: Foreground, so that its pod goes
/// too. Returned unanswered.
async fn expect_foreground_delete(h: &mut Handle) -> Req {
    let r = expect(
        h,
        Method::DELETE,
        &format!("/apis/batch/v1/namespaces/{NS}/jobs/{JOB}?"),
    )
    .await;
    assert_eq!(r.json(), json!({ "propagationPolicy": "Foreground" }));
    r
}

/// After the result: no further request (the client is dropped when `run`
/// returns, which closes the mock).
async fn no_more(h: &mut Handle) {
    let r = tokio::time::timeout(Duration::from_secs(5), h.next_request())
        .await
        .expect("client still alive");
    if let Some((req, _)) = r {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

struct Ran {
    result: Result<Outcome, BuildError>,
    stdout: String,
    stderr: String,
}

/// Runs a build against a scripted API server.
async fn drive<F, Fut>(plan: Plan, opts: RunOptions, server: F) -> Ran
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (client, handle) = mock_api();
    let mut out = Vec::new();
    let mut progress = PlainProgress { w: Vec::new() };
    let (result, ()) = tokio::join!(
        async {
            let r = run::run(
                client,
                &plan,
                &opts,
                futures::future::pending::<()>(),
                &mut out,
                &mut progress,
            )
            .await;
            r
        },
        server(handle)
    );
    Ran {
        result,
        stdout: String::from_utf8(out).unwrap(),
        stderr: String::from_utf8(progress.w).unwrap(),
    }
}

/// A detached build in team-a: the preflight reads the ServiceAccount and
/// the source CA, `copy` plays the CA copy's requests, then the Job is
/// created and nothing follows.
async fn detached_build_in_team_a<F, Fut>(copy: F) -> Ran
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Handle>,
{
    let plan = plan_with(|a| a.settings.namespace = Some("team-a".into()));
    let mut o = opts(OutputFormat::Text);
    o.detach = true;
    let p2 = plan.clone();
    drive(plan, o, |mut h| async move {
        preflight_team_a_until_ca_copy(&mut h).await;
        let mut h = copy(h).await;
        create_job(&mut h, &p2).await;
        no_more(&mut h).await;
    })
    .await
}

fn detached_to_team_a() -> Outcome {
    Outcome::Detached {
        build: JOB.into(),
        namespace: "team-a".into(),
    }
}

fn exit_code(r: &Ran) -> i32 {
    match &r.result {
        Ok(_) => 0,
        Err(e) => e.exit_code(),
    }
}

/// The build failed with exit code `code`: its error message.
fn failed_with(r: &Ran, code: i32) -> String {
    assert_eq!(exit_code(r), code, "{:?}", r.result);
    r.result.as_ref().unwrap_err().to_string()
}

// ---- success ---------------------------------------------------------------

/// `slipway build` with `output` against a server whose Kaniko streams
/// `log` and ends with `kaniko` (see `kaniko_streams`).
async fn build_with_kaniko(
    output: OutputFormat,
    log: &'static str,
    kaniko: Value,
    then_job: Option<Value>,
) -> Ran {
    drive(plan(), opts(output), |h| {
        kaniko_streams(h, log, kaniko, then_job)
    })
    .await
}

#[tokio::test]
async fn success_prints_the_pullable_digest_last() {
    let r = build_with_kaniko(OutputFormat::Text, KANIKO_LOG, kaniko_ok(), None).await;
    let Ok(Outcome::Built(report)) = &r.result else {
        panic!("{:?}\n{}", r.result, r.stderr);
    };
    assert_eq!(
        r.stdout.lines().last(),
        Some(format!("{IMAGE}@{DIGEST}").as_str())
    );
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    assert_eq!(report.commit, COMMIT);
    assert_eq!(report.tag, "3f78685");
    // Hit: RUN apk add git (`Found cached layer`); ran: RUN go build,
    // COPY --from.
    assert_eq!((report.cache.hits, report.cache.rebuilt), (1, 2));
    assert_eq!(report.duration_seconds, 90.0);
    // Logs streamed live, the cache upload failure surfaced, and the hint.
    assert!(
        r.stderr.contains("[git] slipway: main is commit"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("[kaniko] INFO[0002] RUN go build ./..."),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.lines().any(|l| l
            .starts_with("warning: kaniko could not upload a layer to the cache")
            && l.contains("Error uploading layer to cache")),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("run it: kubectl run app --image={IMAGE}@{DIGEST}")),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn success_as_json() {
    let r = build_with_kaniko(OutputFormat::Json, KANIKO_LOG, kaniko_ok(), None).await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert_eq!(r.stdout.lines().count(), 1);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["image"], format!("{IMAGE}@{DIGEST}"));
    assert_eq!(v["digest"], DIGEST);
    assert_eq!(v["commit"], COMMIT);
    assert_eq!(v["duration_seconds"], 90.0);
    assert_eq!(
        v["cache"],
        json!({ "hits": 1, "rebuilt": 2, "uploads_failed": 1 })
    );
    assert_eq!(v["build"], JOB);
    assert_eq!(v["warnings"].as_array().unwrap().len(), 1);
}

// ---- failures --------------------------------------------------------------

/// `slipway build` with `output` where the git container fails with
/// `code` and `message`.
async fn build_where_git_fails(output: OutputFormat, code: i32, message: &'static str) -> Ran {
    drive(plan(), opts(output), |mut h| async move {
        start_build(&mut h).await;
        let r = expect(&mut h, Method::GET, &watch_uri(NS, "101")).await;
        let git = terminated(code, "Error", message, "2025-01-01T00:00:09Z");
        reply_events(r.send, &[("MODIFIED", pod(102, "Failed", git, None))]);
        no_more(&mut h).await;
    })
    .await
}

#[tokio::test]
async fn git_auth_failed() {
    let r = build_where_git_fails(
        OutputFormat::Text,
        10,
        "slipway-git git-auth-failed\nfatal: Authentication failed for 'https://github.com/example/app.git/'\n",
    )
    .await;
    let msg = failed_with(&r, 10);
    assert!(
        msg.starts_with("git auth failed for https://github.com/example/app.git"),
        "{msg}"
    );
    assert!(r.stdout.is_empty());
}

#[tokio::test]
async fn revision_not_found() {
    let r = build_where_git_fails(
        OutputFormat::Text,
        11,
        "slipway-git revision-not-found\nno branch or tag named main in https://github.com/example/app.git\n",
    )
    .await;
    let msg = failed_with(&r, 11);
    assert!(
        msg.starts_with("revision not found: no branch or tag named main"),
        "{msg}"
    );
}

#[tokio::test]
async fn dockerfile_not_found() {
    let r = build_where_git_fails(
        OutputFormat::Json,
        12,
        "slipway-git dockerfile-not-found\nDockerfile does not exist at commit 3f786850e387550fdab836ed7e6dc881de23001b\n",
    )
    .await;
    assert_eq!(exit_code(&r), 12, "{:?}", r.result);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["error"], "dockerfile-not-found");
    assert_eq!(v["exit_code"], 12);
}

/// `slipway build` where Kaniko fails after its first log line; its
/// termination message is what the kubelet put there (the log tail:
/// FallbackToLogsOnError).
async fn build_where_kaniko_fails(kaniko: Value, then_job: Option<Value>) -> Ran {
    let log = "\u{1b}[36mINFO\u{1b}[0m[0000] Resolved base name golang:1.22 to builder\n";
    build_with_kaniko(OutputFormat::Text, log, kaniko, then_job).await
}

#[tokio::test]
async fn push_denied() {
    let tail = "\u{1b}[31mERRO\u{1b}[0m[0000] Error: error checking push permissions -- make sure you entered the correct tag name, and that you are authenticated correctly, and try again: checking push permission for \"registry.shared-services:5000/app:3f78685\": POST https://registry.shared-services:5000/v2/app/blobs/uploads/: UNAUTHORIZED: authentication required; [map[Action:push Class: Name:app Type:repository]]\n";
    let r =
        build_where_kaniko_fails(terminated(1, "Error", tail, "2025-01-01T00:00:30Z"), None).await;
    let msg = failed_with(&r, 13);
    assert!(
        msg.starts_with("push denied by registry.shared-services:5000"),
        "{msg}"
    );
}

#[tokio::test]
async fn certificate_error() {
    let tail = "error building image: error checking push permissions: Get \"https://registry.shared-services:5000/v2/\": tls: failed to verify certificate: x509: certificate signed by unknown authority\n";
    let r =
        build_where_kaniko_fails(terminated(1, "Error", tail, "2025-01-01T00:00:30Z"), None).await;
    assert!(failed_with(&r, 14).contains("x509"));
}

#[tokio::test]
async fn oom_killed() {
    let r = build_where_kaniko_fails(
        terminated(137, "OOMKilled", "", "2025-01-01T00:00:40Z"),
        None,
    )
    .await;
    let msg = failed_with(&r, 15);
    assert!(
        msg.contains("OOMKilled at its memory limit 2Gi: raise --memory"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_failing_run_step_is_exit_1_and_not_the_deadline() {
    let tail = "error building image: error building stage: failed to execute command: waiting for process to exit: exit status 2\n";
    let r = build_where_kaniko_fails(
        terminated(1, "Error", tail, "2025-01-01T00:00:40Z"),
        Some(backoff_limit_job()),
    )
    .await;
    assert!(failed_with(&r, 1).contains("exit status 2"));
}

#[tokio::test]
async fn deadline_exceeded() {
    // The Job controller kills the pod at activeDeadlineSeconds: Kaniko
    // ends with SIGTERM (143) on a pod being deleted, and the Job says why.
    let j = job_with_condition(
        "FailureTarget",
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    );
    let mut p = pod(
        104,
        "Failed",
        git_ok(),
        Some(terminated(143, "Error", "", "2025-01-01T01:00:00Z")),
    );
    p["metadata"]["deletionTimestamp"] = json!("2025-01-01T01:00:00Z");
    p["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    let r = drive(plan(), opts(OutputFormat::Text), |h| {
        kaniko_streams_until(h, "", p, Some(j))
    })
    .await;
    assert!(failed_with(&r, 16).contains("--timeout 1h"));
}

#[tokio::test]
async fn evicted() {
    let mut p = pod(
        104,
        "Failed",
        git_ok(),
        Some(terminated(
            137,
            "ContainerStatusUnknown",
            "",
            "2025-01-01T00:00:50Z",
        )),
    );
    p["status"]["reason"] = json!("Evicted");
    p["status"]["message"] =
        json!("The node was low on resource: ephemeral-storage. Threshold quantity: 1Gi, available: 512Mi.");
    let r = drive(plan(), opts(OutputFormat::Text), |h| {
        kaniko_streams_until(h, "", p, None)
    })
    .await;
    assert!(failed_with(&r, 17).contains("low on resource: ephemeral-storage"));
}

#[tokio::test]
async fn executor_image_cannot_be_pulled() {
    let r = drive(plan(), opts(OutputFormat::Text), |mut h| async move {
        start_build(&mut h).await;
        let r = expect(&mut h, Method::GET, &watch_uri(NS, "101")).await;
        reply_events(
            r.send,
            &[
                (
                    "MODIFIED",
                    pod(102, "Pending", git_ok(), Some(waiting("ErrImagePull", "failed to pull"))),
                ),
                (
                    "MODIFIED",
                    pod(
                        103,
                        "Pending",
                        git_ok(),
                        Some(waiting(
                            "ImagePullBackOff",
                            "Back-off pulling image \"ghcr.io/osscontainertools/kaniko:v1.27.6-debug\"",
                        )),
                    ),
                ),
            ],
        );
        label_commit(&mut h).await;
        // Stuck until the deadline otherwise: slipway deletes the Job.
        let r = expect_foreground_delete(&mut h).await;
        reply(r.send, 200, job_being_deleted("2025-01-01T00:00:40Z"));
        no_more(&mut h).await;
    })
    .await;
    let msg = failed_with(&r, 18);
    assert!(
        msg.contains("cannot pull image ghcr.io/osscontainertools/kaniko:v1.27.6-debug for container kaniko: ImagePullBackOff"),
        "{msg}"
    );
}

#[tokio::test]
async fn namespace_missing() {
    let plan = plan_with(|a| a.settings.namespace = Some("team-x".into()));
    let r = drive(plan, opts(OutputFormat::Text), |mut h| async move {
        let r = service_account_not_found(&mut h, "team-x").await;
        reply(r.send, 404, not_found("namespaces", "team-x"));
        no_more(&mut h).await;
    })
    .await;
    assert!(failed_with(&r, 19).starts_with("namespace team-x does not exist"));
}

#[tokio::test]
async fn service_account_missing() {
    let plan = plan_with(|a| a.settings.namespace = Some("team-a".into()));
    let r = drive(plan, opts(OutputFormat::Text), |mut h| async move {
        let r = service_account_not_found(&mut h, "team-a").await;
        reply(
            r.send,
            200,
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "team-a" } }),
        );
        no_more(&mut h).await;
    })
    .await;
    let msg = failed_with(&r, 19);
    assert!(
        msg.starts_with("ServiceAccount slipway-build not found in namespace team-a"),
        "{msg}"
    );
    assert!(
        msg.contains("kubectl -n team-a create serviceaccount slipway-build"),
        "{msg}"
    );
}

/// #10: by default a build pushes with `registry-push`. In a namespace that
/// has no copy of it the build stops before creating anything, instead of
/// leaving a pod in ContainerCreating, and says how to get one.
#[tokio::test]
async fn a_missing_push_secret_stops_the_build_with_how_to_copy_it() {
    let plan = plan_with(|a| {
        a.settings.namespace = Some("team-a".into());
        a.no_push_secret = false;
    });
    let r = drive(plan, opts(OutputFormat::Text), |mut h| async move {
        team_a_service_account_found(&mut h).await;
        let r = expect(
            &mut h,
            Method::GET,
            "/api/v1/namespaces/team-a/secrets/registry-push",
        )
        .await;
        reply(r.send, 404, not_found("secrets", "registry-push"));
        no_more(&mut h).await;
    })
    .await;
    let msg = failed_with(&r, 19);
    assert!(
        msg.starts_with("Secret registry-push (--push-secret) not found in namespace team-a"),
        "{msg}"
    );
    assert!(msg.contains("Pushing from another namespace"), "{msg}");
    assert!(msg.contains("--no-push-secret"), "{msg}");
}

#[tokio::test]
async fn the_job_controller_cannot_create_the_pod() {
    // The ServiceAccount check was not allowed (403), and the pod never
    // appears: the Job's events say why, and the Job is deleted.
    let mut o = opts(OutputFormat::Text);
    o.timing.quiet = Duration::from_millis(200);
    let r = drive(plan(), o, |mut h| async move {
        answer(
            &mut h,
            Method::GET,
            SA_URI,
            403,
            status(
                403,
                "Forbidden",
                "serviceaccounts \"slipway-build\" is forbidden: User \"dev\" cannot get resource \"serviceaccounts\" in API group \"\" in the namespace \"shared-services\"",
                json!({ "name": "slipway-build", "kind": "serviceaccounts" }),
            ),
        )
        .await;
        answer(&mut h, Method::GET, CA_URI, 200, ca_configmap(NS, CA)).await;
        create_job(&mut h, &plan()).await;
        // The watch gets no event; slipway looks at the Job's events.
        let _held = expect(&mut h, Method::GET, &watch_uri(NS, "0")).await;
        answer(
            &mut h,
            Method::GET,
            &format!("/api/v1/namespaces/{NS}/events?&fieldSelector=involvedObject.kind%3DJob%2CinvolvedObject.name%3D{JOB}"),
            200,
            json!({
                "apiVersion": "v1", "kind": "EventList", "metadata": { "resourceVersion": "120" },
                "items": [{
                    "metadata": { "name": format!("{JOB}.1"), "namespace": NS },
                    "involvedObject": { "kind": "Job", "name": JOB, "namespace": NS, "apiVersion": "batch/v1" },
                    "reason": "FailedCreate", "type": "Warning",
                    "message": format!("Error creating: pods \"{JOB}-\" is forbidden: error looking up service account {NS}/slipway-build: serviceaccount \"slipway-build\" not found"),
                    "source": { "component": "job-controller" }
                }]
            }),
        )
        .await;
        let r = expect_foreground_delete(&mut h).await;
        reply(r.send, 200, created_job(&plan()));
        no_more(&mut h).await;
    })
    .await;
    assert_eq!(exit_code(&r), 19, "{:?}", r.result);
    assert!(r
        .stderr
        .contains("cannot check ServiceAccount shared-services/slipway-build (forbidden)"));
}

// ---- cancel and detach -------------------------------------------------------

#[tokio::test]
async fn ctrl_c_deletes_the_job_and_its_pod() {
    let plan = plan();
    let (client, mut h) = mock_api();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut out = Vec::new();
    let mut progress = PlainProgress { w: Vec::new() };
    let o = opts(OutputFormat::Text);
    let (result, ()) = tokio::join!(
        run::run(
            client,
            &plan,
            &o,
            async {
                let _ = rx.await;
            },
            &mut out,
            &mut progress,
        ),
        async {
            start_build(&mut h).await;
            // The build goes on; the user presses Ctrl-C while slipway waits.
            let held = expect(&mut h, Method::GET, &watch_uri(NS, "101")).await;
            tx.send(()).unwrap();
            let r = expect_foreground_delete(&mut h).await;
            reply(r.send, 200, job_being_deleted("2025-01-01T00:00:30Z"));
            drop(held);
            no_more(&mut h).await;
        }
    );
    let e = result.unwrap_err();
    assert_eq!(e.exit_code(), 130);
    assert_eq!(
        e.to_string(),
        format!("interrupted: deleted job {NS}/{JOB} and its pod")
    );
    assert!(out.is_empty());
}

#[tokio::test]
async fn detach_prints_the_build_name_after_copying_the_ca() {
    // In team-a: the CA is copied from shared-services, the push Secret is
    // checked (metadata only), and no watch follows the create.
    let plan = plan_with(|a| {
        a.settings.namespace = Some("team-a".into());
        a.push_secret = Some("regcred".into());
        a.no_push_secret = false;
        a.detach = true;
    });
    let mut o = opts(OutputFormat::Text);
    o.detach = true;
    let p2 = plan.clone();
    let r = drive(plan, o, |mut h| async move {
        team_a_service_account_found(&mut h).await;
        let r = expect(
            &mut h,
            Method::GET,
            "/api/v1/namespaces/team-a/secrets/regcred",
        )
        .await;
        assert!(
            r.accept.contains("as=PartialObjectMetadata"),
            "{}",
            r.accept
        );
        reply(
            r.send,
            200,
            json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": { "name": "regcred", "namespace": "team-a" }
            }),
        );
        answer(&mut h, Method::GET, CA_URI, 200, ca_configmap(NS, CA)).await;
        let copy_missing = not_found("configmaps", "registry-ca");
        answer(&mut h, Method::GET, TEAM_A_CA_URI, 404, copy_missing).await;
        let r = expect_ca_copy_create(&mut h).await;
        let mut cm = r.json();
        cm["metadata"]["resourceVersion"] = json!("300");
        reply(r.send, 201, cm);
        create_job(&mut h, &p2).await;
        no_more(&mut h).await;
    })
    .await;
    assert_eq!(r.result.unwrap(), detached_to_team_a());
    assert_eq!(r.stdout, format!("{JOB}\n"));
}

#[tokio::test]
async fn a_stale_ca_copy_is_updated() {
    let r = detached_build_in_team_a(|mut h| async move {
        let mut old = ca_configmap(
            "team-a",
            "-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----\n",
        );
        old["data"]["other"] = json!("kept");
        answer(&mut h, Method::GET, TEAM_A_CA_URI, 200, old).await;
        ca_copy_updated(&mut h, "11", json!({ "ca.crt": CA, "other": "kept" })).await;
        h
    })
    .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
}

/// Issue #12, point 5: two builds start at once in a namespace that has no
/// CA copy yet. Both read 404; the other build's POST lands first, so ours
/// gets 409 AlreadyExists. The copy goes through the PKI planner: read
/// again, find the CA it wanted already there, write nothing, and build.
#[tokio::test]
async fn two_builds_racing_to_copy_the_ca_both_succeed() {
    let r = detached_build_in_team_a(|mut h| async move {
        let copy_missing = not_found("configmaps", "registry-ca");
        answer(&mut h, Method::GET, TEAM_A_CA_URI, 404, copy_missing).await;
        let r = expect_ca_copy_create(&mut h).await;
        let exists = "configmaps \"registry-ca\" already exists";
        reply(r.send, 409, ca_conflict("AlreadyExists", exists));
        // The winner's copy: the same CA. Nothing left to write.
        let mut theirs = ca_configmap("team-a", CA);
        theirs["metadata"]["resourceVersion"] = json!("400");
        answer(&mut h, Method::GET, TEAM_A_CA_URI, 200, theirs).await;
        h
    })
    .await;
    assert_eq!(r.result.unwrap(), detached_to_team_a());
    assert!(
        !r.stderr.contains("copied the registry CA"),
        "the other build made the copy: {}",
        r.stderr
    );
}

/// A stale copy that changes between our read and our conditional PUT
/// (409 Conflict on the resourceVersion) is read again and replaced with
/// the new resourceVersion; what the other writer added is kept.
#[tokio::test]
async fn a_ca_copy_replaced_under_us_is_read_again() {
    let old = "-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----\n";
    let r = detached_build_in_team_a(|mut h| async move {
        answer(&mut h, Method::GET, TEAM_A_CA_URI, 200, ca_configmap("team-a", old)).await;
        let r = expect(&mut h, Method::PUT, TEAM_A_CA_UPDATE_URI).await;
        assert_eq!(r.json()["metadata"]["resourceVersion"], "11");
        let modified = "Operation cannot be fulfilled on configmaps \"registry-ca\": the object has been modified";
        reply(r.send, 409, ca_conflict("Conflict", modified));
        let mut moved = ca_configmap("team-a", old);
        moved["metadata"]["resourceVersion"] = json!("12");
        moved["data"]["note"] = json!("added meanwhile");
        answer(&mut h, Method::GET, TEAM_A_CA_URI, 200, moved).await;
        let data = json!({ "ca.crt": CA, "note": "added meanwhile" });
        ca_copy_updated(&mut h, "12", data).await;
        h
    })
    .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert!(
        r.stderr
            .contains("updated the registry CA in ConfigMap team-a/registry-ca"),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn a_missing_registry_ca_is_reported_before_the_job() {
    let r = drive(plan(), opts(OutputFormat::Text), |mut h| async move {
        answer(&mut h, Method::GET, SA_URI, 200, service_account(NS)).await;
        let ca_missing = not_found("configmaps", "registry-ca");
        answer(&mut h, Method::GET, CA_URI, 404, ca_missing).await;
        no_more(&mut h).await;
    })
    .await;
    assert!(failed_with(&r, 19).contains("published by slipway pki"));
}

// ---- builds and logs -------------------------------------------------------

#[tokio::test]
async fn builds_lists_status_commit_digest_and_age() {
    let (client, mut h) = mock_api();
    let now: Timestamp = "2025-01-01T00:10:00Z".parse().unwrap();
    let (rows, ()) = tokio::join!(run::list_builds(client, NS, now), async {
        let sel = "app.kubernetes.io%2Fmanaged-by%3Dslipway%2Cslipway.dev%2Fbuild-id";
        let r = expect(
            &mut h,
            Method::GET,
            &format!("/apis/batch/v1/namespaces/{NS}/jobs?&labelSelector={sel}"),
        )
        .await;
        let mut done = created_job(&plan());
        done["status"] =
            json!({ "conditions": [{ "type": "Complete", "status": "True" }], "succeeded": 1 });
        reply(
            r.send,
            200,
            json!({ "apiVersion": "batch/v1", "kind": "JobList", "metadata": { "resourceVersion": "500" }, "items": [done] }),
        );
        let r = expect(
            &mut h,
            Method::GET,
            &format!("/api/v1/namespaces/{NS}/pods?&labelSelector={sel}"),
        )
        .await;
        reply(
            r.send,
            200,
            json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": { "resourceVersion": "500" },
                "items": [pod(104, "Succeeded", git_ok(), Some(kaniko_ok()))]
            }),
        );
    });
    let rows = rows.unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.name, JOB);
    assert_eq!(row.status, "Succeeded");
    assert_eq!(row.commit, COMMIT);
    assert_eq!(row.digest, DIGEST);
    assert_eq!(row.revision, "main");
    assert_eq!(row.age, "10m");
    let table = slipway::builds::status::format_table(&rows);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("build-app-flow000001   Succeeded   app    main       3f786850e387   sha256:6f1b2c3d4e5f   10m"), "{table}");
}

#[tokio::test]
async fn logs_shows_a_finished_build() {
    let (client, mut h) = mock_api();
    let mut out = Vec::new();
    let timing = opts(OutputFormat::Text).timing;
    let (r, ()) = tokio::join!(run::show_logs(client, NS, JOB, &timing, &mut out), async {
        answer(&mut h, Method::GET, &job_uri(), 200, created_job(&plan())).await;
        let r = expect(
            &mut h,
            Method::GET,
            &format!("/api/v1/namespaces/{NS}/pods?&labelSelector=slipway.dev%2Fbuild-id%3D{ID}"),
        )
        .await;
        let done = pod(104, "Succeeded", git_ok(), Some(kaniko_ok()));
        reply(
            r.send,
            200,
            json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [done.clone()] }),
        );
        let r = expect(&mut h, Method::GET, &log_uri("git")).await;
        reply_text(r.send, GIT_LOG);
        let pod_uri = format!("/api/v1/namespaces/{NS}/pods/{POD}");
        answer(&mut h, Method::GET, &pod_uri, 200, done).await;
        let r = expect(&mut h, Method::GET, &log_uri("kaniko")).await;
        reply_text(r.send, KANIKO_LOG);
    });
    r.unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("[git] slipway: main is commit"), "{out}");
    assert!(
        out.contains("[kaniko] INFO[0012] Pushed registry.shared-services:5000/app@sha256:"),
        "{out}"
    );
}

#[tokio::test]
async fn logs_of_an_unknown_build() {
    let (client, mut h) = mock_api();
    let mut out = Vec::new();
    let timing = Timing::default();
    let (r, ()) = tokio::join!(
        run::show_logs(client, NS, "nope", &timing, &mut out),
        async {
            let uri = format!("/apis/batch/v1/namespaces/{NS}/jobs/nope");
            answer(
                &mut h,
                Method::GET,
                &uri,
                404,
                not_found("jobs.batch", "nope"),
            )
            .await;
        }
    );
    let e = r.unwrap_err();
    assert!(e
        .to_string()
        .starts_with("build nope not found in namespace shared-services"));
}

// ---- real Kaniko v1.27.6 output (#9) -----------------------------------------

const FIXTURE_RUN_FAIL: &str = include_str!("fixtures/kaniko-v1.27.6/fail-run-exit1.kaniko.log");
const FIXTURE_PUSH_FAIL: &str = include_str!("fixtures/kaniko-v1.27.6/fail-push.kaniko.log");
const FIXTURE_CACHE_FAIL: &str =
    include_str!("fixtures/kaniko-v1.27.6/fail-cache-upload.kaniko.log");

/// What a kubelet puts in the termination message with
/// `FallbackToLogsOnError` when the container left it empty: the last 80
/// lines of the log, at most 2048 bytes of them.
fn kubelet_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let mut tail = lines[lines.len().saturating_sub(80)..].join("\n");
    while tail.len() > 2048 {
        match tail.find('\n') {
            Some(i) => tail = tail[i + 1..].to_string(),
            None => break,
        }
    }
    tail
}

#[tokio::test]
async fn real_kaniko_run_step_failure_names_the_step_and_its_exit_code() {
    let tail = kubelet_tail(FIXTURE_RUN_FAIL);
    let r = build_with_kaniko(
        OutputFormat::Json,
        FIXTURE_RUN_FAIL,
        terminated(1, "Error", &tail, "2025-01-01T00:00:40Z"),
        Some(backoff_limit_job()),
    )
    .await;
    println!("{}", r.stderr);
    assert_eq!(exit_code(&r), 1, "{:?}", r.result);
    // The fixture's last line: `error building image: error building stage:
    // failed to execute command: waiting for process to exit: exit status 1`,
    // while `RUN echo "about to fail" && exit 1` ran.
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["error"], "step-failed");
    assert_eq!(
        v["message"],
        "build build-app-flow000001 failed at step RUN echo \"about to fail\" && exit 1 (exit code 1): error building image: error building stage: failed to execute command: waiting for process to exit: exit status 1"
    );
}

/// On a real kubelet a RUN that fails at once ends the pod between two
/// watch events: the first event after git's log already has git done and
/// Kaniko failed (#19, `fail-run-exit1` in the test cluster). slipway still
/// reads Kaniko's log and names the step; before, it judged the pod with no
/// Kaniko log and said "failed at step (unknown)".
#[tokio::test]
async fn a_kaniko_that_failed_before_slipway_looked_still_names_its_step() {
    let tail = kubelet_tail(FIXTURE_RUN_FAIL);
    let r = drive(plan(), opts(OutputFormat::Text), |mut h| async move {
        start_build(&mut h).await;
        let r = expect(&mut h, Method::GET, &watch_uri(NS, "101")).await;
        let ended = |rv| {
            pod(
                rv,
                "Failed",
                git_ok(),
                Some(terminated(1, "Error", &tail, "2025-01-01T00:00:40Z")),
            )
        };
        reply_events(r.send, &[("MODIFIED", ended(102))]);
        label_commit(&mut h).await;
        let r = expect(&mut h, Method::GET, &log_uri("kaniko")).await;
        reply_text(r.send, FIXTURE_RUN_FAIL);
        answer(&mut h, Method::GET, &job_uri(), 200, backoff_limit_job()).await;
        no_more(&mut h).await;
    })
    .await;
    let m = failed_with(&r, 1);
    assert!(
        m.contains("failed at step RUN echo \"about to fail\" && exit 1 (exit code 1)"),
        "{m}\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("[kaniko] "),
        "the Kaniko log was not shown:\n{}",
        r.stderr
    );
}

#[tokio::test]
async fn real_kaniko_push_check_failure_is_a_push_failure() {
    let tail = kubelet_tail(FIXTURE_PUSH_FAIL);
    let r = build_with_kaniko(
        OutputFormat::Text,
        FIXTURE_PUSH_FAIL,
        terminated(1, "Error", &tail, "2025-01-01T00:00:05Z"),
        None,
    )
    .await;
    println!("{}", r.stderr);
    // `error checking push permissions: … POST …/v2/app/blobs/uploads/:
    // UNKNOWN: unknown error; …`: the registry failed, not the credentials.
    assert_eq!(exit_code(&r), 20, "{:?}", r.result);
    let e = r.result.unwrap_err();
    assert_eq!(e.kind(), "push-failed");
    assert!(
        e.to_string().starts_with(
            "push to registry.shared-services:5000 failed: error checking push permissions: "
        ),
        "{e}"
    );
}

#[tokio::test]
async fn real_kaniko_cache_upload_failures_are_warnings_with_retries() {
    let r = build_with_kaniko(OutputFormat::Json, FIXTURE_CACHE_FAIL, kaniko_ok(), None).await;
    println!("{}", r.stderr);
    assert!(r.result.is_ok(), "{:?}", r.result);
    // Six `Retrying operation after {1,2,4}s due to POST …/v2/cache/app/
    // blobs/uploads/`, two `Error uploading layer to cache`, 24 s each.
    let retries: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: kaniko is retrying POST https://registry.shared-services:5000/v2/cache/app/blobs/uploads/ (cache upload) in "))
        .collect();
    assert_eq!(retries.len(), 6, "{}", r.stderr);
    let failed: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: kaniko could not upload a layer to the cache (the build goes on; the next build rebuilds that step), after 3 retries and 24s: Error uploading layer to cache: failed to push to destination registry.shared-services:5000/cache/app:"))
        .collect();
    assert_eq!(failed.len(), 2, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    // Hits RUN mkdir, RUN dd, RUN echo; ran COPY, RUN cat, COPY --from, RUN ls.
    assert_eq!(
        v["cache"],
        json!({ "hits": 3, "rebuilt": 4, "uploads_failed": 2 })
    );
    assert_eq!(v["retries"].as_array().unwrap().len(), 6);
    assert_eq!(v["retries"][0]["after"], "1s");
    assert_eq!(v["retries"][0]["cache"], true);
}

// ---- the mirror (#20) ------------------------------------------------------

const MIRROR_URI: &str = "/api/v1/namespaces/shared-services/configmaps/slipway-mirror";

/// A detached build with the mirror on: the preflight, then ConfigMap
/// slipway-mirror answered with `code` and `body`; the Kaniko args of the
/// Job it creates, if it creates one.
async fn mirror_flow(code: u16, body: Value, job_expected: bool) -> (Ran, Option<Vec<String>>) {
    let plan = plan_with(|a| a.no_mirror = false);
    let mut o = opts(OutputFormat::Text);
    o.detach = true;
    let args = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = args.clone();
    let r = drive(plan.clone(), o, |mut h| async move {
        preflight_in_place(&mut h).await;
        answer(&mut h, Method::GET, MIRROR_URI, code, body).await;
        if !job_expected {
            no_more(&mut h).await;
            return;
        }
        let r = expect(
            &mut h,
            Method::POST,
            &format!("/apis/batch/v1/namespaces/{NS}/jobs?"),
        )
        .await;
        {
            let job = r.json();
            let a: Vec<String> = serde_json::from_value(
                job["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
            )
            .unwrap();
            *seen.lock().unwrap() = Some(a);
            let mut created = created_job(&plan);
            created["metadata"]["namespace"] = json!(NS);
            reply(r.send, 201, created);
        }
        no_more(&mut h).await;
    })
    .await;
    let a = args.lock().unwrap().take();
    (r, a)
}

fn mirror_configmap(toml: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "slipway-mirror", "namespace": NS },
        "data": { "mirror.toml": toml }
    })
}

fn maps(args: &[String]) -> Vec<&str> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--registry-map="))
        .collect()
}

#[tokio::test]
async fn the_clusters_mirror_maps_every_upstream_for_kaniko() {
    let (r, args) = mirror_flow(
        200,
        mirror_configmap("[mirror]\nregistries = [\"docker.io\", \"ghcr.io\"]\n"),
        true,
    )
    .await;
    assert_eq!(exit_code(&r), 0, "{:?}\n{}", r.result, r.stderr);
    let args = args.expect("a Job was created");
    assert_eq!(
        maps(&args),
        [
            "index.docker.io=registry.shared-services:5000/mirror/docker.io",
            "ghcr.io=registry.shared-services:5000/mirror/ghcr.io",
        ],
        "{args:?}"
    );
    assert!(r.stderr.contains("FROM through the mirror"), "{}", r.stderr);
}

#[tokio::test]
async fn without_a_mirror_configmap_from_images_come_from_their_registries() {
    let (r, args) = mirror_flow(404, not_found("configmaps", "slipway-mirror"), true).await;
    assert_eq!(exit_code(&r), 0, "{:?}\n{}", r.result, r.stderr);
    assert!(maps(&args.unwrap()).is_empty());
}

#[tokio::test]
async fn a_forbidden_mirror_configmap_warns_and_builds_without_it() {
    let (r, args) = mirror_flow(
        403,
        status(
            403,
            "Forbidden",
            "configmaps \"slipway-mirror\" is forbidden",
            json!({}),
        ),
        true,
    )
    .await;
    assert_eq!(exit_code(&r), 0, "{:?}\n{}", r.result, r.stderr);
    assert!(maps(&args.unwrap()).is_empty());
    assert!(
        r.stderr
            .contains("cannot read ConfigMap shared-services/slipway-mirror (forbidden)"),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn a_bad_mirror_configmap_is_a_configuration_error_naming_it() {
    let (r, args) = mirror_flow(
        200,
        mirror_configmap("[mirror]\nregistries = [\"https://docker.io\"]\n"),
        false,
    )
    .await;
    assert!(args.is_none(), "no Job");
    let msg = failed_with(&r, 64);
    assert!(
        msg.contains("ConfigMap shared-services/slipway-mirror key mirror.toml")
            || msg.contains("mirror.registries[0]"),
        "{msg}"
    );
}
