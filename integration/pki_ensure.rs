//! `slipway pki ensure` against kube-rs's tower-test mock client.
//!
//! [`ApiServer`] answers the mock like the Kubernetes API server does for
//! Secrets and ConfigMaps in one namespace: objects come back with
//! `metadata.resourceVersion` (and uid, creationTimestamp); a missing object
//! is a 404 `Status` (reason NotFound); a create of an existing one is a 409
//! (AlreadyExists); a replace with a stale resourceVersion is a 409
//! (Conflict); a Secret's type cannot change (422 Invalid). Every request is
//! recorded, and each scenario asserts the exact sequence (method, path,
//! query) and the essentials of each body. No network: requests never leave
//! the process.

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use slipway::pki::ensure::{ensure, Change, EnsureError, Report, MAX_ATTEMPTS};
use slipway::pki::plan::{Names, Wanted, Why};
use slipway::pki::{self, Reissue};
use time::{Duration, OffsetDateTime};
use tower_test::mock::{self, Handle};

type MockHandle = Handle<Request<Body>, Response<Body>>;

const NS: &str = "shared-services";
const SECRETS: &str = "/api/v1/namespaces/shared-services/secrets";

/// One request as the API server saw it, and the status it answered.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: Option<String>,
    body: Option<Value>,
    status: u16,
}

impl Seen {
    /// `METHOD PATH[?QUERY] STATUS`, the query as the API server decodes it
    /// (kube 5 sends `?&fieldManager=slipway`; the empty pair means nothing).
    fn line(&self) -> String {
        let pairs: Vec<String> =
            url::form_urlencoded::parse(self.query.as_deref().unwrap_or("").as_bytes())
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
        if pairs.is_empty() {
            format!("{} {} {}", self.method, self.path, self.status)
        } else {
            format!(
                "{} {}?{} {}",
                self.method,
                self.path,
                pairs.join("&"),
                self.status
            )
        }
    }
}

/// Stored objects by (resource, name).
type Objects = BTreeMap<(String, String), Value>;
/// Hook called after a GET with the object's name, the store and the
/// resourceVersion counter.
type AfterGet = Box<dyn FnMut(&str, &mut Objects, &mut u64) + Send>;

/// An in-memory API server for the `secrets` and `configmaps` of one
/// namespace.
#[derive(Default)]
struct ApiServer {
    objects: Objects,
    rv: u64,
    seen: Vec<Seen>,
    /// Called after each GET of a Secret or ConfigMap, with its name: lets a
    /// scenario play another writer between our read and our write.
    after_get: Option<AfterGet>,
}

fn status(code: u16, reason: &str, message: String, resource: &str, name: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": resource},
        "code": code,
    })
}

impl ApiServer {
    fn next_rv(rv: &mut u64) -> String {
        *rv += 1;
        rv.to_string()
    }

    fn handle(&mut self, method: &Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let rest = path
            .strip_prefix(&format!("/api/v1/namespaces/{NS}/"))
            .unwrap_or_else(|| panic!("request outside namespace {NS}: {path}"));
        let (resource, name) = match rest.split_once('/') {
            Some((r, n)) => (r.to_string(), Some(n.to_string())),
            None => (rest.to_string(), None),
        };
        assert!(
            resource == "secrets" || resource == "configmaps",
            "unexpected resource {resource}"
        );
        let kind = if resource == "secrets" {
            "Secret"
        } else {
            "ConfigMap"
        };
        match (method.clone(), name) {
            (Method::GET, Some(name)) => {
                let key = (resource.clone(), name.clone());
                let out = match self.objects.get(&key) {
                    Some(o) => (200, o.clone()),
                    None => (
                        404,
                        status(
                            404,
                            "NotFound",
                            format!("{resource} \"{name}\" not found"),
                            &resource,
                            &name,
                        ),
                    ),
                };
                if let Some(hook) = self.after_get.as_mut() {
                    hook(&name, &mut self.objects, &mut self.rv);
                }
                out
            }
            (Method::POST, None) => {
                let mut obj = body.expect("create without a body").clone();
                assert_eq!(obj["kind"], kind);
                assert_eq!(obj["apiVersion"], "v1");
                let name = obj["metadata"]["name"].as_str().expect("name").to_string();
                let key = (resource.clone(), name.clone());
                if self.objects.contains_key(&key) {
                    return (
                        409,
                        status(
                            409,
                            "AlreadyExists",
                            format!("{resource} \"{name}\" already exists"),
                            &resource,
                            &name,
                        ),
                    );
                }
                let meta = &mut obj["metadata"];
                meta["namespace"] = json!(NS);
                meta["resourceVersion"] = json!(Self::next_rv(&mut self.rv));
                meta["uid"] = json!(format!("uid-{}", self.rv));
                meta["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
                self.objects.insert(key, obj.clone());
                (201, obj)
            }
            (Method::PUT, Some(name)) => {
                let mut obj = body.expect("replace without a body").clone();
                let key = (resource.clone(), name.clone());
                let Some(stored) = self.objects.get(&key) else {
                    return (
                        404,
                        status(
                            404,
                            "NotFound",
                            format!("{resource} \"{name}\" not found"),
                            &resource,
                            &name,
                        ),
                    );
                };
                if obj["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
                    return (
                        409,
                        status(
                            409,
                            "Conflict",
                            format!(
                                "Operation cannot be fulfilled on {resource} \"{name}\": the object \
                                 has been modified; please apply your changes to the latest \
                                 version and try again"
                            ),
                            &resource,
                            &name,
                        ),
                    );
                }
                if resource == "secrets" && obj["type"] != stored["type"] {
                    return (
                        422,
                        status(
                            422,
                            "Invalid",
                            format!(
                                "Secret \"{name}\" is invalid: type: Invalid value: {}: field is \
                                 immutable",
                                obj["type"]
                            ),
                            &resource,
                            &name,
                        ),
                    );
                }
                let uid = stored["metadata"]["uid"].clone();
                let meta = &mut obj["metadata"];
                meta["uid"] = uid;
                meta["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
                meta["resourceVersion"] = json!(Self::next_rv(&mut self.rv));
                self.objects.insert(key, obj.clone());
                (200, obj)
            }
            (m, n) => panic!("unexpected {m} {path} ({n:?})"),
        }
    }

    /// Answer and record one request.
    fn request(
        &mut self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        body: &[u8],
    ) -> (u16, Value) {
        let body: Option<Value> =
            (!body.is_empty()).then(|| serde_json::from_slice(body).expect("JSON body"));
        let (code, reply) = self.handle(method, path, body.as_ref());
        self.seen.push(Seen {
            method: method.clone(),
            path: path.to_string(),
            query: query.map(str::to_string),
            body,
            status: code,
        });
        (code, reply)
    }

    /// Answer one request on `h`; false once the client is gone.
    async fn serve_one(&mut self, h: &mut MockHandle) -> bool {
        let Some((req, send)) = h.next_request().await else {
            return false;
        };
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        let (code, reply) =
            self.request(&parts.method, parts.uri.path(), parts.uri.query(), &bytes);
        send.send_response(
            Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        true
    }

    /// Serve `h` until its client is dropped.
    async fn serve(&mut self, h: &mut MockHandle) {
        while self.serve_one(h).await {}
    }

    /// One ensure, start to end, against this server. Returns the result and
    /// the requests it made.
    async fn ensure(
        &mut self,
        wanted: &Wanted,
        now: OffsetDateTime,
    ) -> (Result<Report, EnsureError>, Vec<Seen>) {
        let before = self.seen.len();
        let (task, mut h) = spawn_ensure(wanted, now);
        tokio::time::timeout(StdDuration::from_secs(60), self.serve(&mut h))
            .await
            .expect("ensure hung");
        let result = task.await.expect("ensure panicked");
        (result, self.seen[before..].to_vec())
    }

    fn get(&self, resource: &str, name: &str) -> &Value {
        &self.objects[&(resource.to_string(), name.to_string())]
    }

    fn rv(&self, resource: &str, name: &str) -> String {
        self.get(resource, name)["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

fn spawn_ensure(
    wanted: &Wanted,
    now: OffsetDateTime,
) -> (
    tokio::task::JoinHandle<Result<Report, EnsureError>>,
    MockHandle,
) {
    let (svc, h) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let wanted = wanted.clone();
    (
        tokio::spawn(async move { ensure(client, &wanted, now).await }),
        h,
    )
}

fn wanted() -> Wanted {
    Wanted::new(Names::in_namespace(NS).unwrap(), &[], &[]).unwrap()
}

fn lines(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(Seen::line).collect()
}

/// The reads of one round: the CA Secret, the TLS Secret, the CA
/// ConfigMap, the push Secret (#10), the http Secret (#22).
const READS: usize = 5;
const GETS_404: [&str; READS] = [
    "GET /api/v1/namespaces/shared-services/secrets/registry-ca 404",
    "GET /api/v1/namespaces/shared-services/secrets/registry-tls 404",
    "GET /api/v1/namespaces/shared-services/configmaps/registry-ca 404",
    "GET /api/v1/namespaces/shared-services/secrets/registry-push 404",
    "GET /api/v1/namespaces/shared-services/secrets/registry-http-secret 404",
];
const GETS_200: [&str; READS] = [
    "GET /api/v1/namespaces/shared-services/secrets/registry-ca 200",
    "GET /api/v1/namespaces/shared-services/secrets/registry-tls 200",
    "GET /api/v1/namespaces/shared-services/configmaps/registry-ca 200",
    "GET /api/v1/namespaces/shared-services/secrets/registry-push 200",
    "GET /api/v1/namespaces/shared-services/secrets/registry-http-secret 200",
];
const POST_SECRET: &str =
    "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 201";
const PUT_PUSH: &str =
    "PUT /api/v1/namespaces/shared-services/secrets/registry-push?fieldManager=slipway 200";

fn concat(parts: &[&[&str]]) -> Vec<String> {
    parts
        .iter()
        .flat_map(|p| p.iter().map(|s| s.to_string()))
        .collect()
}

/// A Secret's data value, decoded (Secret data is base64 in JSON).
fn secret_value(obj: &Value, key: &str) -> String {
    let b64 = obj["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no data.{key} in {}", obj["metadata"]["name"]));
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

fn data_keys(obj: &Value) -> Vec<String> {
    obj["data"].as_object().unwrap().keys().cloned().collect()
}

/// sha256 of the PEM's DER, computed here, independently of slipway.
fn fingerprint(pem: &str) -> String {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    format!("sha256:{}", hex::encode(Sha256::digest(der.as_ref())))
}

fn changes(r: &Report) -> Vec<(String, Change)> {
    r.outcomes
        .iter()
        .map(|o| (format!("{} {}", o.kind, o.name), o.change.clone()))
        .collect()
}

/// Asserts the three objects hold one consistent PKI for `sans` and returns
/// the CA PEM.
fn assert_consistent(api: &ApiServer, sans: &pki::Sans) -> String {
    let ca_secret = api.get("secrets", "registry-ca");
    assert_eq!(ca_secret["type"], "Opaque");
    assert_eq!(data_keys(ca_secret), ["ca.crt", "ca.key"]);
    let ca_pem = secret_value(ca_secret, "ca.crt");
    let ca = pki::inspect("ca", &ca_pem).unwrap();
    assert!(ca.is_ca && ca.path_len == Some(0) && ca.ecdsa_p256);
    assert!(ca.matches_key(&secret_value(ca_secret, "ca.key")));

    let tls_secret = api.get("secrets", "registry-tls");
    assert_eq!(tls_secret["type"], "kubernetes.io/tls");
    assert_eq!(data_keys(tls_secret), ["ca.crt", "tls.crt", "tls.key"]);
    let tls = pki::inspect("tls", &secret_value(tls_secret, "tls.crt")).unwrap();
    assert!(
        tls.signed_by(&ca),
        "registry-tls is not signed by registry-ca"
    );
    assert!(tls.server_auth && !tls.is_ca && tls.ecdsa_p256);
    assert_eq!(&tls.sans, sans);
    assert!(tls.matches_key(&secret_value(tls_secret, "tls.key")));
    assert_eq!(secret_value(tls_secret, "ca.crt"), ca_pem);

    let cm = api.get("configmaps", "registry-ca");
    assert_eq!(cm["data"], json!({"ca.crt": ca_pem}));
    assert!(cm.get("binaryData").is_none());

    assert_push_secret(api, &pki::push::registries(sans, 5000));
    ca_pem
}

/// The push Secret holds a password, an htpasswd line whose bcrypt hash
/// verifies it (checked here with the bcrypt crate, not slipway's code),
/// and a config.json whose `auth` for each registry decodes to
/// `user:password`. Returns the password.
fn assert_push_secret(api: &ApiServer, registries: &[String]) -> String {
    let push = api.get("secrets", "registry-push");
    assert_eq!(push["type"], "Opaque");
    assert_eq!(
        data_keys(push),
        ["config.json", "htpasswd", "password", "username"]
    );
    let user = secret_value(push, "username");
    let password = secret_value(push, "password");
    assert_eq!(user, "slipway-push");
    assert!(password.len() >= 32, "{}", password.len());
    let htpasswd = secret_value(push, "htpasswd");
    let (u, hash) = htpasswd.trim_end().split_once(':').unwrap();
    assert_eq!(u, user);
    assert!(bcrypt::verify(&password, hash).unwrap());
    let config: Value = serde_json::from_str(&secret_value(push, "config.json")).unwrap();
    let auths = config["auths"].as_object().unwrap();
    assert_eq!(
        auths.keys().collect::<Vec<_>>(),
        registries.iter().collect::<Vec<_>>()
    );
    for a in auths.values() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a["auth"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            format!("{user}:{password}")
        );
    }
    password
}

/// An empty namespace: three GETs answer 404, then the CA Secret, the TLS
/// Secret and the ConfigMap are created, in that order, with
/// fieldManager=slipway, and the report names the certificates by the
/// fingerprints of what was sent.
#[tokio::test]
async fn first_ensure_creates_everything() {
    let mut api = ApiServer::default();
    let w = wanted();
    let (r, seen) = api.ensure(&w, OffsetDateTime::now_utc()).await;
    let r = r.unwrap();
    assert_eq!(
        lines(&seen),
        concat(&[
            &GETS_404,
            &[
                "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 201",
                "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 201",
                "POST /api/v1/namespaces/shared-services/configmaps?fieldManager=slipway 201",
                POST_SECRET,
                POST_SECRET,
            ],
        ])
    );
    for s in &seen[..READS] {
        assert!(s.body.is_none() && s.query.is_none());
    }
    // Bodies as sent.
    let ca = seen[READS].body.as_ref().unwrap();
    assert_eq!(ca["kind"], "Secret");
    assert_eq!(ca["metadata"]["name"], "registry-ca");
    assert_eq!(ca["metadata"]["namespace"], NS);
    assert_eq!(
        ca["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "slipway"
    );
    assert!(ca["metadata"].get("resourceVersion").is_none());
    assert_eq!(ca["type"], "Opaque");
    let tls = seen[READS + 1].body.as_ref().unwrap();
    assert_eq!(tls["metadata"]["name"], "registry-tls");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    let cm = seen[READS + 2].body.as_ref().unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "registry-ca");
    assert!(!cm.to_string().contains("PRIVATE KEY"));

    let ca_pem = assert_consistent(&api, &w.sans);
    assert_eq!(ca_pem, secret_value(ca, "ca.crt"));
    assert_eq!(
        w.sans.dns.iter().collect::<Vec<_>>(),
        pki::DEFAULT_DNS.iter().collect::<Vec<_>>()
    );
    assert_eq!(r.ca.fingerprint(), fingerprint(&ca_pem));
    assert_eq!(
        r.tls.fingerprint(),
        fingerprint(&secret_value(tls, "tls.crt"))
    );
    assert_eq!(r.attempts, 1);
    assert_eq!(
        changes(&r),
        [
            ("secret registry-ca".into(), Change::Created(Why::Absent)),
            ("secret registry-tls".into(), Change::Created(Why::Absent)),
            ("configmap registry-ca".into(), Change::Created(Why::Absent)),
            ("secret registry-push".into(), Change::Created(Why::Absent)),
            (
                "secret registry-http-secret".into(),
                Change::Created(Why::Absent)
            ),
        ]
    );
    let http = seen[READS + 4].body.as_ref().unwrap();
    assert_eq!(http["metadata"]["name"], "registry-http-secret");
    assert_eq!(secret_value(http, "secret").len(), 43);
    let push = seen[READS + 3].body.as_ref().unwrap();
    assert_eq!(push["metadata"]["name"], "registry-push");
    assert_eq!(
        push["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "slipway"
    );
    assert_eq!(
        r.registries,
        [
            "registry.shared-services.svc.cluster.local:5000",
            "registry.shared-services.svc:5000",
            "registry.shared-services:5000",
            "registry:5000",
        ]
    );
}

/// Everything in place: three GETs, no write, the same certificates.
#[tokio::test]
async fn second_ensure_only_reads() {
    let mut api = ApiServer::default();
    let w = wanted();
    let now = OffsetDateTime::now_utc();
    let first = api.ensure(&w, now).await.0.unwrap();
    let objects = api.objects.clone();
    let (r, seen) = api.ensure(&w, now + Duration::days(1)).await;
    let r = r.unwrap();
    assert_eq!(lines(&seen), concat(&[&GETS_200]));
    assert_eq!(api.objects, objects);
    assert_eq!(r.ca.fingerprint(), first.ca.fingerprint());
    assert_eq!(r.tls.fingerprint(), first.tls.fingerprint());
    assert!(r.outcomes.iter().all(|o| o.change == Change::Unchanged));
}

/// 250 days into a 365-day certificate (less than a third left) the TLS
/// Secret is replaced, conditional on the resourceVersion read, with a new
/// certificate from the same CA; 200 days in (more than a third left) it is
/// not.
#[tokio::test]
async fn renewal_near_expiry_replaces_the_tls_secret() {
    let mut api = ApiServer::default();
    let w = wanted();
    let t0 = OffsetDateTime::now_utc();
    let first = api.ensure(&w, t0).await.0.unwrap();

    let (r, seen) = api.ensure(&w, t0 + Duration::days(200)).await;
    assert_eq!(lines(&seen), concat(&[&GETS_200]));
    assert_eq!(r.unwrap().tls.fingerprint(), first.tls.fingerprint());

    let ca_rv = api.rv("secrets", "registry-ca");
    let cm_rv = api.rv("configmaps", "registry-ca");
    let tls_rv = api.rv("secrets", "registry-tls");
    let t1 = t0 + Duration::days(250);
    let (r, seen) = api.ensure(&w, t1).await;
    let r = r.unwrap();
    assert_eq!(
        lines(&seen),
        concat(&[
            &GETS_200,
            &["PUT /api/v1/namespaces/shared-services/secrets/registry-tls?fieldManager=slipway 200"],
        ])
    );
    let put = seen[READS].body.as_ref().unwrap();
    assert_eq!(put["metadata"]["resourceVersion"], json!(tls_rv));
    assert_eq!(put["metadata"]["name"], "registry-tls");
    assert_eq!(put["type"], "kubernetes.io/tls");
    // CA Secret and ConfigMap untouched.
    assert_eq!(api.rv("secrets", "registry-ca"), ca_rv);
    assert_eq!(api.rv("configmaps", "registry-ca"), cm_rv);
    assert_consistent(&api, &w.sans);
    let new = pki::inspect("tls", &secret_value(put, "tls.crt")).unwrap();
    assert_ne!(new.fingerprint(), first.tls.fingerprint());
    assert!((new.not_before - (t1.unix_timestamp() - 300)).abs() <= 1);
    assert_eq!(r.ca.fingerprint(), first.ca.fingerprint());
    assert!(matches!(
        r.outcomes[1].change,
        Change::Replaced(Why::Reissue(Reissue::NearExpiry { remaining_secs }))
            if remaining_secs / 86_400 == 115
    ));
}

/// A LoadBalancer IP and a DNS name added to the configuration: the TLS
/// Secret is replaced with a certificate that names them, from the same CA.
#[tokio::test]
async fn san_change_reissues_from_the_same_ca() {
    let mut api = ApiServer::default();
    let t = OffsetDateTime::now_utc();
    let first = api.ensure(&wanted(), t).await.0.unwrap();
    let tls_rv = api.rv("secrets", "registry-tls");

    let w = Wanted::new(
        Names::in_namespace(NS).unwrap(),
        &["registry.example.com".into()],
        &["203.0.113.7".into()],
    )
    .unwrap();
    let password = assert_push_secret(&api, &wanted().registries);
    let (r, seen) = api.ensure(&w, t).await;
    let r = r.unwrap();
    assert_eq!(
        lines(&seen),
        concat(&[
            &GETS_200,
            &["PUT /api/v1/namespaces/shared-services/secrets/registry-tls?fieldManager=slipway 200"],
            &[PUT_PUSH],
        ])
    );
    assert_eq!(
        seen[READS].body.as_ref().unwrap()["metadata"]["resourceVersion"],
        json!(tls_rv)
    );
    assert_consistent(&api, &w.sans);
    // The new names reach config.json; the password running pushes use
    // stays.
    assert!(w.registries.contains(&"203.0.113.7:5000".to_string()));
    assert!(w
        .registries
        .contains(&"registry.example.com:5000".to_string()));
    assert_eq!(assert_push_secret(&api, &w.registries), password);
    assert_eq!(
        r.outcomes[3].change,
        Change::Replaced(Why::Push(pki::push::PushWhy::StaleDockerConfig))
    );
    assert!(r.tls.sans.dns.contains("registry.example.com"));
    assert!(r.tls.sans.ips.contains(&"203.0.113.7".parse().unwrap()));
    assert_eq!(r.ca.fingerprint(), first.ca.fingerprint());
    assert_eq!(
        r.outcomes[1].change,
        Change::Replaced(Why::Reissue(Reissue::SansChanged))
    );
    // And the next run is quiet again.
    let (_, seen) = api.ensure(&w, t).await;
    assert_eq!(lines(&seen), concat(&[&GETS_200]));
}

/// Another ensure creates the CA Secret between our read and our create:
/// the create answers 409 AlreadyExists, we read again, and sign with, and
/// publish, the other CA. One CA in the end.
#[tokio::test]
async fn create_conflict_rereads_and_uses_the_other_ca() {
    let mut api = ApiServer::default();
    let w = wanted();
    let t = OffsetDateTime::now_utc();
    let other = pki::issue_ca(t).unwrap();
    let (task, mut h) = spawn_ensure(&w, t);
    for _ in 0..READS {
        assert!(api.serve_one(&mut h).await);
    }
    api.objects.insert(
        ("secrets".into(), "registry-ca".into()),
        foreign_ca_secret(&other),
    );
    api.serve(&mut h).await;
    let r = task.await.unwrap().unwrap();
    assert_eq!(
        lines(&api.seen),
        concat(&[
            &GETS_404,
            &[
                "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 409",
                "GET /api/v1/namespaces/shared-services/secrets/registry-ca 200",
                "GET /api/v1/namespaces/shared-services/secrets/registry-tls 404",
                "GET /api/v1/namespaces/shared-services/configmaps/registry-ca 404",
                "GET /api/v1/namespaces/shared-services/secrets/registry-push 404",
                "GET /api/v1/namespaces/shared-services/secrets/registry-http-secret 404",
                "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 201",
                "POST /api/v1/namespaces/shared-services/configmaps?fieldManager=slipway 201",
                POST_SECRET,
                POST_SECRET,
            ],
        ])
    );
    assert_eq!(
        api.seen[READS].body.as_ref().unwrap()["metadata"]["name"],
        "registry-ca"
    );
    assert_eq!(
        api.seen[2 * READS + 1].body.as_ref().unwrap()["metadata"]["name"],
        "registry-tls"
    );
    let ca_pem = assert_consistent(&api, &w.sans);
    assert_eq!(ca_pem, other.cert_pem);
    assert_eq!(
        api.get("secrets", "registry-ca")["metadata"]["uid"],
        "other"
    );
    assert_eq!(r.ca.fingerprint(), fingerprint(&other.cert_pem));
    assert_eq!(r.attempts, 2);
    assert_eq!(r.outcomes[0].change, Change::Unchanged);
}

/// A CA Secret as another writer would have stored it.
fn foreign_ca_secret(ca: &pki::Pair) -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"name": "registry-ca", "namespace": NS, "resourceVersion": "77", "uid": "other"},
        "type": "Opaque",
        "data": {"ca.crt": b64(&ca.cert_pem), "ca.key": b64(&ca.key_pem)},
    })
}

/// Two real ensures race over an empty namespace: both read (all 404), A
/// writes everything, then B's create of its own CA answers 409
/// AlreadyExists; B reads again, finds A's CA, certificate and ConfigMap
/// right, and writes nothing. Both report the same CA.
#[tokio::test]
async fn two_racing_ensures_end_with_one_ca() {
    let mut api = ApiServer::default();
    let w = wanted();
    let t = OffsetDateTime::now_utc();
    let (task_a, mut a) = spawn_ensure(&w, t);
    let (task_b, mut b) = spawn_ensure(&w, t);
    for _ in 0..READS {
        assert!(api.serve_one(&mut a).await);
    }
    for _ in 0..READS {
        assert!(api.serve_one(&mut b).await);
    }
    api.serve(&mut a).await;
    let seen_a = api.seen.len();
    api.serve(&mut b).await;
    let ra = task_a.await.unwrap().unwrap();
    let rb = task_b.await.unwrap().unwrap();

    assert_eq!(lines(&api.seen[..READS]), concat(&[&GETS_404]), "A reads");
    assert_eq!(
        lines(&api.seen[READS..2 * READS]),
        concat(&[&GETS_404]),
        "B reads"
    );
    assert_eq!(
        lines(&api.seen[2 * READS..seen_a]),
        [
            "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 201",
            "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 201",
            "POST /api/v1/namespaces/shared-services/configmaps?fieldManager=slipway 201",
            POST_SECRET,
            POST_SECRET,
        ],
        "A writes"
    );
    assert_eq!(
        lines(&api.seen[seen_a..]),
        concat(&[
            &["POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 409"],
            &GETS_200,
        ]),
        "B loses the race over registry-ca, reads again, writes nothing"
    );
    // B had made its own CA; it never reached the cluster.
    let b_ca = secret_value(api.seen[seen_a].body.as_ref().unwrap(), "ca.crt");
    let ca_pem = assert_consistent(&api, &w.sans);
    assert_ne!(b_ca, ca_pem);
    assert_eq!(ra.ca.fingerprint(), fingerprint(&ca_pem));
    assert_eq!(rb.ca.fingerprint(), ra.ca.fingerprint());
    assert_eq!(rb.tls.fingerprint(), ra.tls.fingerprint());
    assert_eq!((ra.attempts, rb.attempts), (1, 2));
    assert!(rb.outcomes.iter().all(|o| o.change == Change::Unchanged));
}

/// Our CA create succeeds, then another ensure that read our CA creates
/// registry-tls first: our create of it answers 409, we read again, keep the
/// other's certificate (signed by our CA), create the ConfigMap, and the
/// report still says we created the CA.
#[tokio::test]
async fn conflict_after_a_successful_write_keeps_its_outcome() {
    let mut api = ApiServer::default();
    let w = wanted();
    let t = OffsetDateTime::now_utc();
    let (task, mut h) = spawn_ensure(&w, t);
    for _ in 0..READS + 1 {
        assert!(api.serve_one(&mut h).await);
    }
    let ca_secret = api.get("secrets", "registry-ca").clone();
    let ca = pki::Pair {
        cert_pem: secret_value(&ca_secret, "ca.crt"),
        key_pem: secret_value(&ca_secret, "ca.key"),
    };
    let theirs = pki::issue_server(&ca, &w.sans, t).unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.objects.insert(
        ("secrets".into(), "registry-tls".into()),
        json!({
            "kind": "Secret",
            "apiVersion": "v1",
            "metadata": {"name": "registry-tls", "namespace": NS, "resourceVersion": "50"},
            "type": "kubernetes.io/tls",
            "data": {
                "tls.crt": b64(&theirs.cert_pem),
                "tls.key": b64(&theirs.key_pem),
                "ca.crt": b64(&ca.cert_pem),
            },
        }),
    );
    api.serve(&mut h).await;
    let r = task.await.unwrap().unwrap();
    assert_eq!(
        lines(&api.seen),
        concat(&[
            &GETS_404,
            &[
                "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 201",
                "POST /api/v1/namespaces/shared-services/secrets?fieldManager=slipway 409",
                "GET /api/v1/namespaces/shared-services/secrets/registry-ca 200",
                "GET /api/v1/namespaces/shared-services/secrets/registry-tls 200",
                "GET /api/v1/namespaces/shared-services/configmaps/registry-ca 404",
                "GET /api/v1/namespaces/shared-services/secrets/registry-push 404",
                "GET /api/v1/namespaces/shared-services/secrets/registry-http-secret 404",
                "POST /api/v1/namespaces/shared-services/configmaps?fieldManager=slipway 201",
                POST_SECRET,
                POST_SECRET,
            ],
        ])
    );
    assert_consistent(&api, &w.sans);
    assert_eq!(r.tls.fingerprint(), fingerprint(&theirs.cert_pem));
    assert_eq!(
        changes(&r),
        [
            ("secret registry-ca".into(), Change::Created(Why::Absent)),
            ("secret registry-tls".into(), Change::Unchanged),
            ("configmap registry-ca".into(), Change::Created(Why::Absent)),
            ("secret registry-push".into(), Change::Created(Why::Absent)),
            (
                "secret registry-http-secret".into(),
                Change::Created(Why::Absent)
            ),
        ]
    );
    assert_eq!(r.attempts, 2);
}

/// Two ensures with a new SAN: the other one replaces registry-tls between
/// our read and our replace, so ours answers 409 Conflict (stale
/// resourceVersion); we read again and find the certificate already right.
#[tokio::test]
async fn replace_conflict_rereads_and_replans() {
    let mut api = ApiServer::default();
    let t = OffsetDateTime::now_utc();
    api.ensure(&wanted(), t).await.0.unwrap();
    let old_rv = api.rv("secrets", "registry-tls");
    let w = Wanted::new(
        Names::in_namespace(NS).unwrap(),
        &[],
        &["203.0.113.7".into()],
    )
    .unwrap();

    let (task, mut h) = spawn_ensure(&w, t);
    for _ in 0..READS {
        assert!(api.serve_one(&mut h).await);
    }
    let start_other = api.seen.len();
    let (other, _) = api.ensure(&w, t).await;
    let other = other.unwrap();
    let start_ours = api.seen.len();
    api.serve(&mut h).await;
    let r = task.await.unwrap().unwrap();

    assert_eq!(
        lines(&api.seen[start_other..start_ours])[READS],
        "PUT /api/v1/namespaces/shared-services/secrets/registry-tls?fieldManager=slipway 200"
    );
    assert_eq!(
        lines(&api.seen[start_ours..]),
        concat(&[
            &["PUT /api/v1/namespaces/shared-services/secrets/registry-tls?fieldManager=slipway 409"],
            &GETS_200,
        ])
    );
    // Our losing replace was conditional on the version we had read.
    assert_eq!(
        api.seen[start_ours].body.as_ref().unwrap()["metadata"]["resourceVersion"],
        json!(old_rv)
    );
    assert_consistent(&api, &w.sans);
    assert_eq!(r.tls.fingerprint(), other.tls.fingerprint());
    assert_eq!(r.attempts, 2);
}

/// An object that changes after every read: every replace conflicts, and
/// ensure gives up after MAX_ATTEMPTS rounds with an error that names it.
#[tokio::test]
async fn endless_conflicts_give_up_after_bounded_attempts() {
    let mut api = ApiServer::default();
    let t = OffsetDateTime::now_utc();
    api.ensure(&wanted(), t).await.0.unwrap();
    api.after_get = Some(Box::new(|name, objects, rv| {
        if name == "registry-tls" {
            let o = objects
                .get_mut(&("secrets".to_string(), "registry-tls".to_string()))
                .unwrap();
            o["metadata"]["resourceVersion"] = json!(ApiServer::next_rv(rv));
        }
    }));
    let w = Wanted::new(
        Names::in_namespace(NS).unwrap(),
        &[],
        &["203.0.113.7".into()],
    )
    .unwrap();
    let (r, seen) = api.ensure(&w, t).await;
    let e = r.unwrap_err();
    assert!(matches!(
        e,
        EnsureError::Contended {
            attempts: MAX_ATTEMPTS,
            ..
        }
    ));
    assert_eq!(e.exit_code(), 1);
    assert_eq!(
        e.to_string(),
        format!(
            "secret shared-services/registry-tls kept changing while slipway wrote it: gave up \
             after {MAX_ATTEMPTS} attempts; run again"
        )
    );
    let round = concat(&[
        &GETS_200,
        &["PUT /api/v1/namespaces/shared-services/secrets/registry-tls?fieldManager=slipway 409"],
    ]);
    let expected: Vec<String> = (0..MAX_ATTEMPTS).flat_map(|_| round.clone()).collect();
    assert_eq!(lines(&seen), expected);
}

/// RBAC missing: the first GET answers 403 and ensure stops there, naming
/// the object; nothing is written.
#[tokio::test]
async fn forbidden_read_fails_without_writing() {
    let (task, mut h) = spawn_ensure(&wanted(), OffsetDateTime::now_utc());
    let (req, send) = h.next_request().await.unwrap();
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), format!("{SECRETS}/registry-ca"));
    let body = status(
        403,
        "Forbidden",
        r#"secrets "registry-ca" is forbidden: User "system:serviceaccount:shared-services:default" cannot get resource "secrets" in API group "" in the namespace "shared-services""#
            .into(),
        "secrets",
        "registry-ca",
    );
    send.send_response(
        Response::builder()
            .status(403)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    let e = task.await.unwrap().unwrap_err();
    assert!(h.next_request().await.is_none(), "no request after the 403");
    assert_eq!(e.exit_code(), 1);
    let msg = e.to_string();
    assert!(
        msg.starts_with("get secret shared-services/registry-ca: "),
        "{msg}"
    );
    assert!(msg.contains("forbidden"), "{msg}");
}

/// A CA Secret without its key: an error for the operator, only GETs, the
/// CA is never replaced.
#[tokio::test]
async fn unusable_ca_is_reported_not_replaced() {
    let mut api = ApiServer::default();
    let t = OffsetDateTime::now_utc();
    api.ensure(&wanted(), t).await.0.unwrap();
    let objects = {
        let o = api
            .objects
            .get_mut(&("secrets".to_string(), "registry-ca".to_string()))
            .unwrap();
        o["data"].as_object_mut().unwrap().remove("ca.key");
        api.objects.clone()
    };
    let (r, seen) = api.ensure(&wanted(), t).await;
    let e = r.unwrap_err();
    assert_eq!(lines(&seen), concat(&[&GETS_200]));
    assert_eq!(api.objects, objects);
    assert!(
        e.to_string()
            .starts_with("secret shared-services/registry-ca: no ca.key"),
        "{e}"
    );
}

/// Another namespace: the SANs follow it, and every request stays in it.
#[tokio::test]
async fn another_namespace_derives_its_names() {
    let names = Names::in_namespace("builds").unwrap();
    let w = Wanted::new(names, &[], &[]).unwrap();
    let (task, mut h) = spawn_ensure(&w, OffsetDateTime::now_utc());
    let mut paths = Vec::new();
    while let Some((req, send)) = h.next_request().await {
        paths.push(format!("{} {}", req.method(), req.uri().path()));
        let (code, body) = if req.method() == Method::GET {
            (404, status(404, "NotFound", "not found".into(), "x", "x"))
        } else {
            let b = req.into_body().collect_bytes().await.unwrap();
            let mut v: Value = serde_json::from_slice(&b).unwrap();
            v["metadata"]["resourceVersion"] = json!("1");
            (201, v)
        };
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }
    let r = task.await.unwrap().unwrap();
    assert!(
        paths
            .iter()
            .all(|p| p.contains("/api/v1/namespaces/builds/")),
        "{paths:?}"
    );
    assert_eq!(
        r.tls.sans.dns.iter().collect::<Vec<_>>(),
        [
            "registry",
            "registry.builds",
            "registry.builds.svc",
            "registry.builds.svc.cluster.local"
        ]
    );
}

/// Logs at every level, through a whole create, a race and a renewal: the
/// objects and fingerprints are there, key material is not (neither as PEM
/// nor as the base64 the API carries it in).
#[tokio::test]
async fn logs_name_objects_and_fingerprints_never_keys() {
    use std::sync::{Arc, Mutex, OnceLock};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Global, not a thread-local default: tracing caches per-callsite
    // interest process-wide, and tests on other threads would otherwise race
    // it. Other tests' logs land here too, and must be as clean.
    static LOGS: OnceLock<Buf> = OnceLock::new();
    let buf = LOGS.get_or_init(|| {
        let buf = Buf::default();
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buf
    });

    let mut api = ApiServer::default();
    let t = OffsetDateTime::now_utc();
    let first = api.ensure(&wanted(), t).await.0.unwrap();
    let (task, mut h) = spawn_ensure(&wanted(), t + Duration::days(300));
    for _ in 0..READS {
        assert!(api.serve_one(&mut h).await);
    }
    // Someone else touches registry-tls: our replace conflicts.
    let o = api
        .objects
        .get_mut(&("secrets".to_string(), "registry-tls".to_string()))
        .unwrap();
    o["metadata"]["resourceVersion"] = json!("9999");
    api.serve(&mut h).await;
    let renewed = task.await.unwrap().unwrap();
    assert_eq!(renewed.attempts, 2);

    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains(&first.ca.fingerprint()), "{logs}");
    assert!(logs.contains(&renewed.tls.fingerprint()), "{logs}");
    assert!(logs.contains("registry-tls"), "{logs}");
    assert!(logs.contains("409 Conflict"), "{logs}");
    let password = assert_push_secret(&api, &wanted().registries);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    assert!(!logs.contains(&password), "logs contain the push password");
    assert!(
        !logs.contains(&b64(&password)),
        "logs contain the push password"
    );
    assert!(
        !logs.contains(&b64(&format!("slipway-push:{password}"))),
        "logs contain the push auth"
    );
    assert!(!logs.contains("$2b$"), "logs contain the bcrypt hash");
    for bad in [
        "PRIVATE KEY",
        "BEGIN",
        // base64 of "-----BEGIN PRIVATE KEY-----", as in Secret JSON
        "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0t",
        "LS0tLS1CRUdJTi",
    ] {
        assert!(!logs.contains(bad), "logs contain {bad:?}");
    }
}

/// The same API server over HTTPS on 127.0.0.1, one request per connection.
/// Returns the port and the Authorization headers seen.
fn serve_https(
    api: std::sync::Arc<std::sync::Mutex<ApiServer>>,
    cert: &pki::Pair,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};

    let certs = rustls_pemfile::certs(&mut cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut cert.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let auth = Arc::new(Mutex::new(Vec::new()));
    let auth_seen = auth.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { break };
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
            let mut line = String::new();
            if tls.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            let mut words = line.split_whitespace();
            let method: Method = words.next().unwrap().parse().unwrap();
            let uri: http::Uri = words.next().unwrap().parse().unwrap();
            let mut len = 0;
            loop {
                let mut h = String::new();
                tls.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (name, value) = h.split_once(':').unwrap();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => len = value.trim().parse().unwrap(),
                    "authorization" => auth_seen.lock().unwrap().push(value.trim().to_string()),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            tls.read_exact(&mut body).unwrap();
            let (code, reply) =
                api.lock()
                    .unwrap()
                    .request(&method, uri.path(), uri.query(), &body);
            let reply = serde_json::to_vec(&reply).unwrap();
            let mut out = tls.into_inner();
            write!(
                out,
                "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                StatusCode::from_u16(code).unwrap().canonical_reason().unwrap_or(""),
                reply.len()
            )
            .unwrap();
            out.write_all(&reply).unwrap();
            out.conn.send_close_notify();
            out.flush().unwrap();
        }
    });
    (port, auth)
}

/// The real binary: kubeconfig, its HTTPS client (rustls with ring, the CA
/// from the kubeconfig), its exit codes and its stdout report, against the
/// API server on 127.0.0.1 with a certificate from `slipway pki`.
#[test]
fn binary_ensures_over_https_with_a_kubeconfig() {
    use std::process::Command;
    use std::sync::{Arc, Mutex};

    let now = OffsetDateTime::now_utc();
    let server_ca = pki::issue_ca(now).unwrap();
    let server_sans = pki::Sans::new(&[], &["127.0.0.1".parse().unwrap()]).unwrap();
    let server_cert = pki::issue_server(&server_ca, &server_sans, now).unwrap();
    let api = Arc::new(Mutex::new(ApiServer::default()));
    let (port, auth) = serve_https(api.clone(), &server_cert);

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&server_ca.cert_pem);
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: loopback
    cluster:
      server: https://127.0.0.1:{port}
      certificate-authority-data: {b64}
users:
  - name: pki-job
    user:
      token: test-token
contexts:
  - name: loopback
    context: {{cluster: loopback, user: pki-job, namespace: default}}
current-context: loopback
"
        ),
    )
    .unwrap();
    let run = |extra: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_slipway"));
        c.args(["pki", "ensure", "--namespace", NS])
            .env("KUBECONFIG", &kubeconfig)
            .env("SLIPWAY_LOG_FORMAT", "json")
            .env("SLIPWAY_LOG", "debug")
            .env("NO_PROXY", "127.0.0.1")
            .env_remove("SLIPWAY_PKI_DNS")
            .env_remove("SLIPWAY_PKI_IPS");
        for v in [
            "KUBERNETES_SERVICE_HOST",
            "KUBERNETES_SERVICE_PORT",
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            c.env_remove(v);
        }
        for (k, v) in extra {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        for bad in ["PRIVATE KEY", "LS0tLS1CRUdJTi"] {
            assert!(
                !stderr.contains(bad) && !stdout.contains(bad),
                "{bad} in output"
            );
        }
        (out.status.code(), stdout, stderr)
    };

    let (code, stdout, stderr) = run(&[]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let out: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        out[..3],
        [
            "secret shared-services/registry-ca: created (absent)",
            "secret shared-services/registry-tls: created (absent)",
            "configmap shared-services/registry-ca: created (absent)",
        ]
    );
    assert_eq!(
        out[3..5],
        [
            "secret shared-services/registry-push: created (absent)",
            "secret shared-services/registry-http-secret: created (absent)",
        ]
    );
    let out = &out[2..];
    let ca_pem = assert_consistent(&api.lock().unwrap(), &wanted().sans);
    assert!(
        out[3].starts_with(&format!("ca {} ", fingerprint(&ca_pem))),
        "{stdout}"
    );
    assert!(out[4].starts_with("tls sha256:"), "{stdout}");
    assert!(
        out[4].ends_with(
            "for registry, registry.shared-services, registry.shared-services.svc, \
         registry.shared-services.svc.cluster.local"
        ),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some(
            "push shared-services/registry-push user slipway-push for \
             registry.shared-services.svc.cluster.local:5000, registry.shared-services.svc:5000, \
             registry.shared-services:5000, registry:5000"
        )
    );
    assert_eq!(api.lock().unwrap().seen.len(), 2 * READS);

    // Again: only reads.
    let (code, stdout, _) = run(&[]);
    assert_eq!(code, Some(0));
    assert_eq!(
        stdout.lines().take(4).collect::<Vec<_>>(),
        [
            "secret shared-services/registry-ca: unchanged",
            "secret shared-services/registry-tls: unchanged",
            "configmap shared-services/registry-ca: unchanged",
            "secret shared-services/registry-push: unchanged",
        ]
    );
    let seen = api.lock().unwrap().seen.clone();
    assert_eq!(lines(&seen[2 * READS..]), concat(&[&GETS_200]));

    // A LoadBalancer IP through the environment.
    let (code, stdout, _) = run(&[("SLIPWAY_PKI_IPS", "203.0.113.7")]);
    assert_eq!(code, Some(0));
    assert_eq!(
        stdout.lines().nth(1),
        Some("secret shared-services/registry-tls: replaced (its SAN list differs from the wanted one)")
    );
    assert_eq!(
        stdout.lines().nth(3),
        Some("secret shared-services/registry-push: replaced (config.json does not name the registry's current addresses)")
    );
    assert!(stdout.contains(", 203.0.113.7\n"), "{stdout}");
    assert!(stdout.trim_end().ends_with(", registry:5000"), "{stdout}");

    // The service account token went with every request.
    let auth = auth.lock().unwrap();
    assert_eq!(auth.len(), api.lock().unwrap().seen.len());
    assert!(auth.iter().all(|a| a == "Bearer test-token"), "{auth:?}");
}

/// Bad flags and environment exit 64 before any request; no cluster
/// configuration exits 1 and says so.
#[test]
fn binary_bad_input_exits_64_and_missing_cluster_exits_1() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_slipway"));
        c.args(["pki", "ensure"])
            .args(args)
            .env("KUBECONFIG", dir.path().join("absent"))
            .env("HOME", dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("SLIPWAY_PKI_DNS")
            .env_remove("SLIPWAY_PKI_IPS");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (out.status.code(), String::from_utf8(out.stderr).unwrap())
    };
    for (args, env, expect) in [
        (
            &["--namespace", "Shared_Services"][..],
            &[][..],
            "invalid namespace \"Shared_Services\"",
        ),
        (
            &["--ip", "203.0.113.300"],
            &[],
            "invalid SAN \"203.0.113.300\": not an IP address",
        ),
        (
            &[],
            &[("SLIPWAY_PKI_IPS", "203.0.113.7,nope")],
            "invalid SAN \"nope\"",
        ),
        (
            &["--dns", "bad name"],
            &[],
            "invalid SAN \"bad name\": not a DNS name",
        ),
        (
            &["--tls-secret", "registry-ca"],
            &[],
            "need different names",
        ),
    ] {
        let (code, stderr) = run(args, env);
        assert_eq!(code, Some(64), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
    let (code, stderr) = run(&[], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot configure a Kubernetes client"),
        "{stderr}"
    );
}
