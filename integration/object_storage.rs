//! #22: the registry scaled out on an object store. Real components only:
//! SeaweedFS's S3 gateway ([`Seaweed`]), Debian's distribution 2.8 with its
//! s3 driver as the replicas (each with its own `slipway gateway`, as in the
//! registry pod of `daemonset/overlays/object-storage`), curl and skopeo as
//! clients, and a node agent with containerd for the node cache.
//!
//! The replicas are configured as the overlay configures them: the same
//! bucket, the same `http.secret` (`REGISTRY_HTTP_SECRET`), no blob
//! descriptor cache, redirects off, and distribution's storage health check
//! on (it makes every answer 503 while the store is unreachable, which the
//! gateway's /readyz reports).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gateway::{curl, gateway_pki, htpasswd, sha, skopeo_push, Gateway, PASSWORD, USER};
use crate::harness::*;
use crate::ALIAS;

/// What `slipway pki ensure` puts into Secret registry-http-secret; every
/// replica gets the same.
const HTTP_SECRET: &str = "test-http-secret-shared-by-every-replica";

/// The overlay's health check settings (daemonset/overlays/object-storage).
const HEALTH_INTERVAL_SECS: u64 = 5;

/// One registry pod: distribution on the bucket, and its gateway.
pub(crate) struct Replica {
    pub(crate) registry: Registry,
    pub(crate) gw: Gateway,
}

impl Replica {
    fn start(dir: &Path, store: &Seaweed, pki: &Pki, i: usize) -> Replica {
        Replica::start_at(dir, store, pki, i, "/")
    }

    /// With the registry's tree at `root` in the bucket.
    pub(crate) fn start_at(
        dir: &Path,
        store: &Seaweed,
        pki: &Pki,
        i: usize,
        root: &str,
    ) -> Replica {
        let dir = dir.join(format!("replica-{i}"));
        fs::create_dir_all(&dir).unwrap();
        let driver = store.storage_yaml_at(root);
        let interval = format!("{HEALTH_INTERVAL_SECS}s");
        let registry = Registry::start_opts(
            &dir,
            "127.0.0.1:0",
            None,
            None,
            RegistryOpts {
                driver: Some(&driver),
                env: &[
                    ("REGISTRY_HTTP_SECRET", HTTP_SECRET),
                    ("REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR", "disabled"),
                    ("REGISTRY_STORAGE_REDIRECT_DISABLE", "true"),
                    ("REGISTRY_HEALTH_STORAGEDRIVER_ENABLED", "true"),
                    ("REGISTRY_HEALTH_STORAGEDRIVER_INTERVAL", &interval),
                    ("REGISTRY_HEALTH_STORAGEDRIVER_THRESHOLD", "1"),
                ],
                ..RegistryOpts::default()
            },
        );
        let pw = htpasswd(&dir);
        // As the overlay sets it: the bucket, for `slipway gc` and the
        // write fence the replicas share through it.
        let credentials = dir.join("storage-credentials");
        fs::write(
            &credentials,
            format!("[default]\naws_access_key_id = {S3_ACCESS_KEY}\naws_secret_access_key = {S3_SECRET_KEY}\n"),
        )
        .unwrap();
        let gw = Gateway::start_env(
            &dir,
            &registry.addr,
            pki,
            &pw,
            &[
                ("SLIPWAY_GATEWAY_S3_BUCKET", S3_BUCKET),
                ("SLIPWAY_GATEWAY_S3_ENDPOINT", &store.endpoint),
                ("SLIPWAY_GATEWAY_S3_REGION", "us-east-1"),
                ("SLIPWAY_GATEWAY_S3_ROOT_DIRECTORY", root),
                (
                    "SLIPWAY_GATEWAY_S3_CREDENTIALS_FILE",
                    credentials.to_str().unwrap(),
                ),
            ],
        );
        let r = Replica { registry, gw };
        // Writes are taken once the gateway has read the shared fence.
        let started = Instant::now();
        while r.ready() != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "replica {i} not ready after 30 s:\n{}",
                r.gw.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        r
    }

    /// SIGKILL of both containers: a node lost, an OOM kill.
    fn kill(&mut self) {
        for p in [&mut self.gw.proc, &mut self.registry.proc] {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    fn ready(&self) -> Option<u16> {
        http(&self.gw.admin, "GET", "/readyz", &[])
            .ok()
            .map(|r| r.status)
    }
}

/// The Service in front of the replicas, as kube-proxy makes it: each new
/// TCP connection goes to the next backend, and the bytes are copied both
/// ways. Listens on 127.0.0.1:0; stopped on drop.
pub(crate) struct Balancer {
    pub(crate) addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Balancer {
    pub(crate) fn start(backends: Vec<String>) -> Balancer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut next = 0usize;
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let backend = backends[next % backends.len()].clone();
                next += 1;
                std::thread::spawn(move || {
                    let Ok(server) = std::net::TcpStream::connect(&backend) else {
                        return;
                    };
                    let (mut c2, mut s2) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let up = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut s2);
                        let _ = s2.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut c, mut s) = (client, server);
                    let _ = std::io::copy(&mut s, &mut c);
                    let _ = c.shutdown(std::net::Shutdown::Write);
                    let _ = up.join();
                });
            }
        });
        Balancer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept.
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn replicas(dir: &Path, store: &Seaweed, pki: &Pki, n: usize) -> Vec<Replica> {
    (0..n).map(|i| Replica::start(dir, store, pki, i)).collect()
}

/// The path and query of an upload's `Location`, which distribution makes
/// absolute with the host the client asked: the next request may go to
/// another replica.
fn location(r: &HttpResponse) -> String {
    let loc = r
        .header("location")
        .unwrap_or_else(|| panic!("no Location: {:?}", r.headers));
    match loc.find("/v2/") {
        Some(i) => loc[i..].to_string(),
        None => panic!("Location {loc} is not a registry path"),
    }
}

fn creds() -> String {
    format!("{USER}:{PASSWORD}")
}

/// `bytes` of incompressible data in a file.
fn random_file(dir: &Path, name: &str, bytes: usize) -> (PathBuf, String) {
    let p = dir.join(name);
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("head -c {bytes} /dev/urandom > {}", p.display())),
    );
    let d = sha(&fs::read(&p).unwrap());
    (p, d)
}

/// `curl` on `gw` (TLS, the push account) with the request body `body`.
fn send(
    pki: &Pki,
    gw: &Gateway,
    method: &str,
    path: &str,
    body: Option<&Path>,
    extra: &[&str],
) -> HttpResponse {
    let url = format!("https://{}{path}", gw.addr);
    let cred = creds();
    let mut args = vec!["-X", method, "-u", &cred];
    if !extra.iter().any(|a| a.starts_with("Content-Type:")) {
        args.extend(["-H", "Content-Type: application/octet-stream"]);
    }
    let at;
    if let Some(b) = body {
        at = format!("@{}", b.display());
        args.extend(["--data-binary", &at]);
    }
    args.extend(extra);
    args.push(&url);
    curl(pki, &args)
}

/// One blob upload through the registry API, whose requests may go to any
/// replica: `POST` begins it, each `PATCH` sends the next bytes of `data`
/// with their `Content-Range`, `PUT` commits it under its digest. Every
/// answer's `Location` is where the next request goes.
struct Upload<'a> {
    pki: &'a Pki,
    repo: String,
    data: &'a [u8],
    dir: &'a Path,
    /// Path and query of the upload.
    at: String,
    /// Bytes the registry has acknowledged.
    offset: usize,
}

impl<'a> Upload<'a> {
    fn begin(pki: &'a Pki, gw: &Gateway, repo: &str, data: &'a [u8], dir: &'a Path) -> Upload<'a> {
        let r = send(
            pki,
            gw,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            None,
            &[],
        );
        assert_eq!(r.status, 202, "POST: {}", String::from_utf8_lossy(&r.body));
        Upload {
            pki,
            repo: repo.into(),
            data,
            dir,
            at: location(&r),
            offset: 0,
        }
    }

    /// The next `len` bytes (fewer at the end) as their own file, and the
    /// `Content-Range` header for them.
    fn next_part(&self, len: usize) -> (PathBuf, String) {
        let end = (self.offset + len).min(self.data.len());
        let part = self.dir.join(format!("part-{}", unique()));
        fs::write(&part, &self.data[self.offset..end]).unwrap();
        (part, format!("Content-Range: {}-{}", self.offset, end - 1))
    }

    /// `PATCH` of the next `len` bytes through `gw`; the registry must
    /// acknowledge everything sent so far (`Range: 0-<end>`).
    fn patch(&mut self, gw: &Gateway, len: usize) -> Result<(), String> {
        let (part, range) = self.next_part(len);
        let r = send(
            self.pki,
            gw,
            "PATCH",
            &self.at,
            Some(&part),
            &["-H", &range],
        );
        let _ = fs::remove_file(&part);
        let end = (self.offset + len).min(self.data.len());
        if r.status != 202 || r.header("range") != Some(format!("0-{}", end - 1).as_str()) {
            return Err(format!(
                "PATCH of {} on {}: {} {:?} {}",
                &range[15..],
                gw.addr,
                r.status,
                r.header("range"),
                String::from_utf8_lossy(&r.body)
            ));
        }
        self.at = location(&r);
        self.offset = end;
        Ok(())
    }

    /// Ask `gw` where the upload stands (`GET`): on 204, go on from the
    /// offset it reports; false if the upload is unknown there.
    fn resume(&mut self, gw: &Gateway) -> bool {
        let r = send(self.pki, gw, "GET", &self.at, None, &[]);
        if r.status != 204 {
            return false;
        }
        let end: usize = r
            .header("range")
            .and_then(|v| v.split('-').nth(1))
            .and_then(|e| e.parse().ok())
            .unwrap_or_else(|| panic!("upload status without a Range: {:?}", r.headers));
        self.at = location(&r);
        self.offset = end + 1;
        true
    }

    /// `PUT` under `digest` through `gw`.
    fn commit(&self, gw: &Gateway, digest: &str) -> Result<(), String> {
        let sep = if self.at.contains('?') { '&' } else { '?' };
        let r = send(
            self.pki,
            gw,
            "PUT",
            &format!("{}{sep}digest={digest}", self.at),
            None,
            &[],
        );
        if r.status == 201 {
            Ok(())
        } else {
            Err(format!(
                "PUT of {}@{digest} on {}: {} {}",
                self.repo,
                gw.addr,
                r.status,
                String::from_utf8_lossy(&r.body)
            ))
        }
    }
}

/// GET the blob through `gw` into a file; its digest.
fn pull_blob(
    pki: &Pki,
    gw: &Gateway,
    repo: &str,
    digest: &str,
    out: &Path,
) -> Result<String, String> {
    let o = run(Command::new("curl")
        .args(["-sS", "-f", "--max-time", "120", "--cacert"])
        .arg(pki.ca())
        .arg("-o")
        .arg(out)
        .arg(format!("https://{}/v2/{repo}/blobs/{digest}", gw.addr)));
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).to_string());
    }
    let d = sha(&fs::read(out).map_err(|e| e.to_string())?);
    let _ = fs::remove_file(out);
    Ok(d)
}

/// A manifest of one layer `layer` (`size` bytes) with a small config,
/// pushed through `gw`; the manifest's digest.
fn push_manifest(
    pki: &Pki,
    gw: &Gateway,
    dir: &Path,
    repo: &str,
    tag: &str,
    layer: &str,
    size: usize,
) -> String {
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
    let cfg_digest = sha(config);
    // distribution 2.8 has no single-POST upload: POST, then PUT.
    let mut up = Upload::begin(pki, gw, repo, config, dir);
    up.patch(gw, config.len()).unwrap();
    up.commit(gw, &cfg_digest).unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cfg_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{size}}}]}}"#,
        config.len()
    );
    let m_file = dir.join("manifest.json");
    fs::write(&m_file, &manifest).unwrap();
    let r = send(
        pki,
        gw,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        Some(&m_file),
        &[
            "-H",
            "Content-Type: application/vnd.oci.image.manifest.v1+json",
        ],
    );
    assert_eq!(
        r.status,
        201,
        "manifest: {}",
        String::from_utf8_lossy(&r.body)
    );
    sha(manifest.as_bytes())
}

/// skopeo copies `repo:tag` from `gw` to a directory: every blob and the
/// manifest verified by digest.
fn skopeo_pull(pki: &Pki, gw: &Gateway, dir: &Path, repo_tag: &str) -> Result<(), String> {
    let out = dir.join(format!("pulled-{}", unique()));
    let o = run(Command::new("skopeo")
        .args(["copy", "--quiet", "--retry-times", "0", "--src-cert-dir"])
        .arg(pki.trust_dir())
        .arg(format!("docker://{}/{repo_tag}", gw.addr))
        .arg(format!("dir:{}", out.display())));
    let _ = fs::remove_dir_all(&out);
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).to_string())
    }
}

/// Done when 1: a 100 MiB layer pushed in 10 MiB chunks, each request on
/// the next replica (POST on 0, PATCH on 1, 2, 0, …, PUT on the next),
/// verifies, and pulls from every replica. This is the path that fails
/// without a shared `http.secret` (BLOB_UPLOAD_INVALID) and where s3
/// drivers trip over multipart listing on non-AWS stores (distribution#3062,
/// #1948): each replica resumes the multipart upload another began.
#[test]
fn a_layer_pushed_in_chunks_across_three_replicas_verifies_and_pulls_from_each() {
    if !prerequisites_with(&["weed", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = Seaweed::start(dir);
    let pki = gateway_pki(dir);
    let rs = replicas(dir, &store, &pki, 3);
    let chunk = 10 << 20;
    let (layer_file, layer) = random_file(dir, "layer", 100 << 20);
    let size = 100 << 20;
    let repo = "team/big";
    let data = fs::read(&layer_file).unwrap();
    let started = Instant::now();
    let mut up = Upload::begin(&pki, &rs[0].gw, repo, &data, dir);
    let mut turn = 1;
    while up.offset < size {
        up.patch(&rs[turn % 3].gw, chunk).unwrap();
        turn += 1;
    }
    up.commit(&rs[turn % 3].gw, &layer).unwrap();
    eprintln!(
        "object storage: 100 MiB in 10 chunks over 3 replicas in {:?}",
        started.elapsed()
    );
    // Every replica wrote: the upload really moved between them.
    for (i, r) in rs.iter().enumerate() {
        let patches = r
            .registry
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("\"PATCH /v2/team/big/blobs/uploads/"))
            .count();
        assert!(patches >= 3, "replica {i} served {patches} PATCHes");
    }
    push_manifest(&pki, &rs[0].gw, dir, repo, "v1", &layer, size);
    for (i, r) in rs.iter().enumerate() {
        let got = pull_blob(&pki, &r.gw, repo, &layer, &dir.join("pulled")).unwrap();
        assert_eq!(got, layer, "replica {i}: the layer's digest");
        skopeo_pull(&pki, &r.gw, dir, &format!("{repo}:v1"))
            .unwrap_or_else(|e| panic!("replica {i}: {e}"));
    }
    // And through a Service over the three: each connection to the next.
    let lb = Balancer::start(rs.iter().map(|r| r.gw.addr.clone()).collect());
    let o = run(Command::new("skopeo")
        .args(["copy", "--quiet", "--retry-times", "0", "--src-cert-dir"])
        .arg(pki.trust_dir())
        .arg(format!("docker://{}/{repo}:v1", lb.addr))
        .arg(format!("dir:{}", dir.join("via-service").display())));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Done when 2: SIGKILL of the replica that holds a chunked upload. The
/// client goes on through another replica: from the offset the registry
/// reports if the upload survived, else from the start. Meanwhile pulls of
/// an image pushed before go on against the other replicas (the Service
/// sends nothing to a pod that is not ready), and none fails.
#[test]
fn a_replica_killed_mid_push_costs_the_push_a_retry_and_no_pull_fails() {
    if !prerequisites_with(&["weed", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = Seaweed::start(dir);
    let pki = gateway_pki(dir);
    let mut rs = replicas(dir, &store, &pki, 3);
    // The image already there.
    let ok = skopeo_push(oci_layout(), &rs[1].gw, &pki, "team/app:v1", Some(&creds()));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let chunk = 10 << 20;
    let size = 60 << 20;
    let (layer_file, layer) = random_file(dir, "layer", size);
    let repo = "team/big";
    let data = fs::read(&layer_file).unwrap();
    // Two chunks through replica 0, then the third, slowed to 2 MiB/s, is
    // cut by the kill.
    let mut up = Upload::begin(&pki, &rs[0].gw, repo, &data, dir);
    for _ in 0..2 {
        up.patch(&rs[0].gw, chunk).unwrap();
    }
    let stop = AtomicBool::new(false);
    let (pulls, failures) = (
        AtomicUsize::new(0),
        std::sync::Mutex::new(Vec::<String>::new()),
    );
    let (first, rest) = rs.split_at_mut(1);
    let killed = &mut first[0];
    let survivors = [&rest[0], &rest[1]];
    let outcome = std::thread::scope(|s| {
        // Pulls of the image pushed before, on the replicas left, for as
        // long as the kill and the retry take.
        s.spawn(|| {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && i < 500 {
                let r = survivors[i % 2];
                if let Err(e) = skopeo_pull(&pki, &r.gw, dir, "team/app:v1") {
                    failures.lock().unwrap().push(e);
                }
                pulls.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        });
        let (part, range) = up.next_part(chunk);
        let url = format!("https://{}{}", killed.gw.addr, up.at);
        let mut cut = Command::new("curl");
        cut.args(["-sS", "--max-time", "60", "--limit-rate", "2M", "--cacert"])
            .arg(pki.ca())
            .args(["-X", "PATCH", "-u", &creds(), "-H", &range])
            .args(["-H", "Content-Type: application/octet-stream"])
            .arg("--data-binary")
            .arg(format!("@{}", part.display()))
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cut.spawn().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        killed.kill();
        let _ = child.wait();
        // Go on through a survivor: from where the upload stands if it
        // knows it, else from the start.
        let started = Instant::now();
        let how = if up.resume(&survivors[0].gw) {
            "resumed"
        } else {
            up = Upload::begin(&pki, &survivors[0].gw, repo, &data, dir);
            "restarted"
        };
        let resumed_at = up.offset;
        let mut turn = 1;
        let mut result = Ok(());
        while up.offset < size && result.is_ok() {
            result = up.patch(&survivors[turn % 2].gw, chunk);
            turn += 1;
        }
        if result.is_ok() {
            result = up.commit(&survivors[turn % 2].gw, &layer);
        }
        let result = result.map_err(|e| format!("after the kill ({how}): {e}"));
        eprintln!(
            "object storage: after the kill the push {how} at byte {resumed_at} of {size} and finished in {:?}",
            started.elapsed()
        );
        stop.store(true, Ordering::Relaxed);
        result
    });
    outcome.unwrap();
    let failed = failures.lock().unwrap();
    let n = pulls.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {n} pulls failed: {failed:#?}",
        failed.len()
    );
    assert!(n >= 2, "only {n} pulls ran during the kill");
    eprintln!("object storage: {n} pulls from the other replicas during the kill, none failed");
    for (i, r) in survivors.iter().enumerate() {
        let got = pull_blob(&pki, &r.gw, repo, &layer, &dir.join("pulled")).unwrap();
        assert_eq!(got, layer, "survivor {i}");
    }
}

/// Done when 3: with the store stopped, each replica's /readyz turns 503
/// within the health check's interval plus the gateway's probe period; a
/// node agent keeps serving the blobs it has cached; once the store is
/// back, every replica is ready again by itself. A store that hangs makes
/// them not ready too, and ready once it answers. Then a push and a CRI
/// pull work.
#[test]
fn with_the_store_down_replicas_are_not_ready_node_caches_serve_and_all_recovers() {
    if !prerequisites_with(&["weed", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut store = Seaweed::start(dir);
    let pki = gateway_pki(dir);
    let mut rs = replicas(dir, &store, &pki, 2);
    for (i, r) in rs.iter().enumerate() {
        wait_for(
            &format!("replica {i} ready"),
            Duration::from_secs(30),
            || r.ready() == Some(200),
        );
    }
    let ok = skopeo_push(oci_layout(), &rs[0].gw, &pki, "team/app:v1", Some(&creds()));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let digest = layout_digest(oci_layout());
    let ctd = Containerd::start(dir);
    let agent = Agent::start(
        dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        &format!("https://registry.shared-services:{}", rs[1].gw.port()),
        Some(&rs[1].gw.addr),
        &pki.ca(),
        &format!("[cache]\ndir = {:?}\n", dir.join("node-cache")),
    );
    ctd.pull(&format!("{ALIAS}/team/app@{digest}")).unwrap();
    let manifest = fs::read(
        oci_layout()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layers: Vec<String> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();

    store.kill();
    let down = Instant::now();
    // distribution checks every HEALTH_INTERVAL_SECS; the gateway probes
    // every 5 s: not ready within the sum, and a little for the checks.
    let limit = Duration::from_secs(HEALTH_INTERVAL_SECS + 5 + 3);
    for (i, r) in rs.iter().enumerate() {
        wait_for(
            &format!("replica {i} not ready with the store down"),
            limit,
            || r.ready() == Some(503),
        );
    }
    eprintln!(
        "object storage: both replicas not ready {:?} after the store stopped",
        down.elapsed()
    );
    let why = http(&rs[0].gw.admin, "GET", "/readyz", &[]).unwrap();
    let why = String::from_utf8_lossy(&why.body).to_string();
    assert!(why.contains("/v2/_catalog?n=1"), "{why}");
    // The node's cache serves every layer it holds, store or not.
    for l in &layers {
        let r = http(&agent.proxy, "GET", &format!("/v2/team/app/blobs/{l}"), &[]).unwrap();
        assert_eq!(
            r.status,
            200,
            "cached layer {l} with the store down: {}\n{}",
            String::from_utf8_lossy(&r.body),
            agent.proc.log_text()
        );
        assert_eq!(&sha(&r.body), l);
    }
    // Processes alive: not ready is not dead (no restart needed).
    for r in &mut rs {
        assert!(r.registry.proc.child.try_wait().unwrap().is_none());
        assert_eq!(
            http(&r.gw.admin, "GET", "/healthz", &[]).unwrap().status,
            200
        );
    }

    store.restart();
    let back = Instant::now();
    for (i, r) in rs.iter().enumerate() {
        wait_for(
            &format!("replica {i} ready again"),
            Duration::from_secs(60),
            || r.ready() == Some(200),
        );
    }
    eprintln!(
        "object storage: both replicas ready {:?} after the store restarted",
        back.elapsed()
    );
    // A store that hangs (SIGSTOP: connections accepted, nothing
    // answered): distribution's own health check has no deadline, so /v2/
    // stays 200; the gateway's probe lists the storage with one.
    store.freeze(true);
    let hung = Instant::now();
    let limit = Duration::from_secs(5 + 5 + 3);
    for (i, r) in rs.iter().enumerate() {
        wait_for(
            &format!("replica {i} not ready with the store hanging"),
            limit,
            || r.ready() == Some(503),
        );
    }
    eprintln!(
        "object storage: both replicas not ready {:?} after the store hung",
        hung.elapsed()
    );
    store.freeze(false);
    for (i, r) in rs.iter().enumerate() {
        wait_for(
            &format!("replica {i} ready after the hang"),
            Duration::from_secs(60),
            || r.ready() == Some(200),
        );
    }
    let layout = umoci_layout(&dir.join("image-v2"), &[1 << 20]);
    let ok = skopeo_push(&layout, &rs[1].gw, &pki, "team/app:v2", Some(&creds()));
    assert!(
        ok.status.success(),
        "push after recovery: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let d2 = layout_digest(&layout);
    ctd.pull(&format!("{ALIAS}/team/app@{d2}")).unwrap();
}

/// `curl --aws-sigv4` straight to the bucket (not slipway's S3 client):
/// the status of a `HEAD` of `key`.
fn bucket_status(store: &Seaweed, key: &str) -> u16 {
    let o = run_ok(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-I"])
            .args(["--max-time", "30", "--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["--user", &format!("{S3_ACCESS_KEY}:{S3_SECRET_KEY}")])
            .arg(format!("{}/{S3_BUCKET}/{key}", store.endpoint)),
    );
    o.trim().parse().unwrap()
}

fn blob_key(digest: &str) -> String {
    let h = &digest[7..];
    format!("docker/registry/v2/blobs/sha256/{}/{h}/data", &h[..2])
}

/// skopeo pushes the OCI layout `layout` as it is (`--preserve-digests`:
/// the manifest's digest is the one the test computed), no retries.
fn skopeo_exact(layout: &Path, gw: &Gateway, pki: &Pki, repo_tag: &str) -> std::process::Output {
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--retry-times",
            "0",
            "--preserve-digests",
        ])
        .arg("--dest-cert-dir")
        .arg(pki.trust_dir())
        .args(["--dest-creds", &creds()])
        .arg(format!("oci:{}:app", layout.display()))
        .arg(format!("docker://{}/{repo_tag}", gw.addr)))
}

/// `slipway gc` through `gw` (the push account, no cluster), with `args`;
/// the exit status, the JSON report and stderr.
fn slipway_gc(
    ca: &Path,
    addr: &str,
    dir: &Path,
    args: &[&str],
) -> (bool, serde_json::Value, String) {
    let o = run(Command::new(slipway_bin())
        .arg("gc")
        .args(["--registry", &format!("https://{addr}")])
        .arg("--ca-file")
        .arg(ca)
        .args(["--username", USER, "--no-cluster", "--json"])
        .arg("--termination-log")
        .arg(dir.join(format!("termination-log-{}", unique())))
        .args(args)
        .env("SLIPWAY_GC_PASSWORD", PASSWORD)
        .env_remove("SLIPWAY_GC_APPLY"));
    (
        o.status.success(),
        serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// #22 point 4: `slipway gc` on the bucket, through one replica, while
/// the others take pushes and pulls. The collector must stop every
/// replica's writes (the fence they share through the bucket), and keep
/// what every replica saw: a pull through another replica keeps its
/// image, and a blob another replica just told a push it has (a `HEAD`
/// answered 200, so the push skips the upload) is not deleted under it.
#[test]
fn gc_on_the_bucket_fences_every_replica_and_keeps_what_each_saw() {
    use crate::gc::{layout_of, rfc3339, Image, DAY};
    if !prerequisites_with(&["weed", "curl", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut store = Seaweed::start(dir);
    let pki = gateway_pki(dir);
    let rs = replicas(dir, &store, &pki, 2);
    let (r0, r1) = (&rs[0].gw, &rs[1].gw);
    let push = |gw: &Gateway, img: &Image, repo_tag: &str| -> std::process::Output {
        let layout = layout_of(dir, img);
        let o = skopeo_exact(&layout, gw, &pki, repo_tag);
        let _ = fs::remove_dir_all(&layout);
        o
    };
    const MIN_AGE: u64 = 10;
    let policy = [
        "--keep-builds",
        "1",
        "--keep-pulled-days",
        "1",
        "--min-age-secs",
        "10",
    ];

    // A, then B, then C, a second apart (revision times are whole
    // seconds in a bucket): each takes the tag the one before had, so A
    // and B end untagged. B is pulled by digest through replica 1 only;
    // C is the newest build. Everything through replica 0.
    let img = |s: &str| Image::new(&format!("{s}-{}", unique()), "amd64", &rfc3339(DAY), 40_000);
    let (a, b, c) = (img("a"), img("b"), img("c"));
    for (i, tag) in [(&a, "v1"), (&b, "v1"), (&c, "v1")] {
        let o = push(r0, i, &format!("team/app:{tag}"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::thread::sleep(Duration::from_millis(1100));
    }
    skopeo_pull(&pki, r1, dir, &format!("team/app@{}", b.digest)).unwrap();
    std::thread::sleep(Duration::from_secs(MIN_AGE + 2));

    let mut args = policy.to_vec();
    let (ok, dry, err) = slipway_gc(&pki.ca(), &r0.addr, dir, &args);
    assert!(ok, "dry run: {err}");
    args.push("--apply");
    let started = Instant::now();
    let (ok, applied, err) = slipway_gc(&pki.ca(), &r0.addr, dir, &args);
    let took = started.elapsed();
    assert!(ok, "apply: {err}\nreplica 0:\n{}", r0.proc.log_text());
    let freed = &applied["repositories"]["team/app"];
    assert_eq!(freed["manifests"], 1, "{applied}");
    assert_eq!(freed["blobs"], 3, "{applied}");
    assert_eq!(freed["bytes"], a.bytes(), "{applied}");
    assert_eq!(dry["total"], applied["total"], "the dry run saw the same");
    let reason = |d: &str| -> String {
        applied["kept"]["team/app"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["digest"] == d)
            .map(|k| k["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{d} not kept: {applied}"))
    };
    assert_eq!(reason(&b.digest), "pulled", "replica 1's pull");
    assert_eq!(reason(&c.digest), "recent-build");
    // Gone from the bucket (asked directly), and 404 through both.
    for d in [a.digest.clone(), sha(&a.layer), sha(&a.config)] {
        assert_eq!(bucket_status(&store, &blob_key(&d)), 404, "{d}");
    }
    for gw in [r0, r1] {
        let r = send(
            &pki,
            gw,
            "GET",
            &format!("/v2/team/app/manifests/{}", a.digest),
            None,
            &[],
        );
        assert_eq!(r.status, 404);
        let r = send(
            &pki,
            gw,
            "GET",
            &format!("/v2/team/app/blobs/{}", sha(&a.layer)),
            None,
            &[],
        );
        assert_eq!(r.status, 404);
        for d in [&b.digest, &c.digest] {
            skopeo_pull(&pki, gw, dir, &format!("team/app@{d}")).unwrap();
        }
    }
    for i in [&b, &c] {
        assert_eq!(bucket_status(&store, &blob_key(&sha(&i.layer))), 200);
    }
    eprintln!(
        "gc on the bucket: {} bytes freed; the apply took {took:?}",
        a.bytes()
    );

    // Races: per round, 6 old untagged images, which pushes through
    // replica 1 send again (skopeo finds their blobs present, skips the
    // upload and names them in the manifest) back to back for as long as
    // the collection through replica 0 runs.
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 6;
    let (mut completed, mut refused, mut raced) = (0, 0, 0);
    for round in 0..ROUNDS {
        let imgs: Vec<Image> = (0..PER_ROUND)
            .map(|k| img(&format!("race-{round}-{k}")))
            .collect();
        for i in &imgs {
            let o = push(r0, i, "race/app:tmp");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        // And one more on top, so that all of them are untagged.
        let o = push(r0, &img("filler"), "race/app:tmp");
        assert!(o.status.success());
        std::thread::sleep(Duration::from_secs(MIN_AGE + 2));
        let layouts: Vec<PathBuf> = imgs.iter().map(|i| layout_of(dir, i)).collect();
        let done = Arc::new(AtomicBool::new(false));
        let gc = {
            let (ca, dir, done) = (pki.ca(), dir.to_path_buf(), done.clone());
            let gw_addr = r0.addr.clone();
            let mut a = policy.to_vec();
            a.push("--apply");
            std::thread::spawn(move || {
                let r = slipway_gc(&ca, &gw_addr, &dir, &a);
                done.store(true, Ordering::SeqCst);
                r
            })
        };
        let refused_before = refused;
        let mut pushed = [false; PER_ROUND];
        let mut attempts = 0;
        let mut last_error = String::new();
        let round_started = Instant::now();
        // Until the collection ended and every image went up once.
        while !(done.load(Ordering::SeqCst) && pushed.iter().all(|p| *p)) {
            let k = attempts % PER_ROUND;
            attempts += 1;
            if attempts >= 2000 {
                let tail = |g: &Gateway| {
                    let l = g.proc.log_text();
                    let lines: Vec<&str> = l.lines().collect();
                    lines[lines.len().saturating_sub(60)..].join("\n")
                };
                let reg = rs[1].registry.proc.log_text();
                let reg: Vec<&str> = reg.lines().collect();
                panic!(
                    "round {round}: pushes never completed in {:?} (collection done: {}); last error: {last_error}\nreplica 0:\n{}\nreplica 1:\n{}\nregistry 1:\n{}\n{}",
                    round_started.elapsed(),
                    done.load(Ordering::SeqCst),
                    tail(r0),
                    tail(r1),
                    reg[reg.len().saturating_sub(30)..].join("\n"),
                    store.log_tail(40)
                );
            }
            let tag = format!("race/app:r{round}-{k}");
            let o = skopeo_exact(&layouts[k], r1, &pki, &tag);
            if o.status.success() {
                completed += 1;
                pushed[k] = true;
                skopeo_pull(&pki, r1, dir, &tag).unwrap_or_else(|e| {
                    panic!("round {round}: {tag} pushed but does not pull: {e}")
                });
            } else {
                let e = String::from_utf8_lossy(&o.stderr).to_string();
                assert!(
                    e.contains("503"),
                    "round {round}: push of {tag} failed otherwise than with 503: {e}"
                );
                refused += 1;
                last_error = e;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let (ok, _, err) = gc.join().unwrap();
        assert!(ok, "round {round}: gc: {err}");
        if refused > refused_before {
            raced += 1;
        }
        for k in 0..PER_ROUND {
            let tag = format!("race/app:r{round}-{k}");
            skopeo_pull(&pki, r0, dir, &tag)
                .unwrap_or_else(|e| panic!("round {round}: {tag} broken after the sweep: {e}"));
        }
    }
    let fenced = r1.metric("slipway_gc_writes_refused_total");
    eprintln!(
        "gc on the bucket, races: {ROUNDS} sweeps through replica 0, {raced} met by a push through replica 1 that was refused; {completed} pushes completed, {refused} refused with 503 and retried; replica 1 refused {fenced} requests"
    );
    assert!(
        r1.proc
            .log_text()
            .contains("writes refused: garbage collection on another gateway"),
        "replica 1 never saw the shared fence"
    );
    assert!(
        raced >= 1 && fenced >= 1.0,
        "no push met the fence on replica 1"
    );

    // Replicas that went away do not hold up a collection (seen in the
    // cluster after a drain: the evicted replicas' heartbeats were still
    // young). One stopped as a drain stops it (SIGTERM: it removes its
    // heartbeat once its relay has stopped), one SIGKILLed (its heartbeat
    // ages out of MEMBER_TTL while the collector waits).
    let mut stopped = Replica::start(dir, &store, &pki, 2);
    let mut killed = Replica::start(dir, &store, &pki, 3);
    stopped.gw.proc.stop();
    assert!(
        stopped
            .gw
            .proc
            .log_text()
            .contains("heartbeat removed from the bucket"),
        "{}",
        stopped.gw.proc.log_text()
    );
    stopped.registry.proc.stop();
    let mut args = policy.to_vec();
    args.push("--apply");
    let t = Instant::now();
    let (ok, _, err) = slipway_gc(&pki.ca(), &r0.addr, dir, &args);
    let after_stop = t.elapsed();
    assert!(ok, "gc after a replica stopped: {err}");
    killed.kill();
    let t = Instant::now();
    let (ok, _, err) = slipway_gc(&pki.ca(), &r0.addr, dir, &args);
    let after_kill = t.elapsed();
    assert!(ok, "gc after a replica was killed: {err}");
    eprintln!(
        "gc on the bucket: with a replica stopped {after_stop:?}, with one SIGKILLed {after_kill:?}"
    );
    assert!(after_stop < Duration::from_secs(15), "{after_stop:?}");
    assert!(after_kill < Duration::from_secs(60), "{after_kill:?}");
}

/// slipway's own S3 client against the real store: a listing longer than
/// one page (SeaweedFS answers at most 1,000 keys a page) comes back whole,
/// each key once, in as many requests as pages.
#[test]
fn the_bucket_client_lists_every_page_of_a_real_store() {
    if !prerequisites_with(&["weed"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = Seaweed::start(dir);
    let credentials = dir.join("credentials");
    fs::write(
        &credentials,
        format!("[default]\naws_access_key_id = {S3_ACCESS_KEY}\naws_secret_access_key = {S3_SECRET_KEY}\n"),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = slipway::s3::bucket::Bucket::new(&slipway::s3::bucket::BucketConfig {
        endpoint: store.endpoint.clone(),
        bucket: S3_BUCKET.into(),
        region: "us-east-1".into(),
        root: "paged".into(),
        credentials_file: credentials,
        profile: "default".into(),
    })
    .unwrap();
    const N: usize = 2_345;
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        let bucket = Arc::new(bucket);
        for i in 0..N {
            let b = bucket.clone();
            tasks.spawn(async move {
                b.put(
                    &b.key(&format!("dir/{}/k{i:05}", i % 7)),
                    bytes::Bytes::from(vec![b'x'; i % 13]),
                )
                .await
                .unwrap()
            });
            while tasks.len() >= 16 {
                tasks.join_next().await.unwrap().unwrap();
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let started = Instant::now();
        let l = bucket
            .list(&bucket.key("dir/"), false, 1_000_000)
            .await
            .unwrap();
        let mut keys: Vec<&str> = l.objects.iter().map(|o| o.key.as_str()).collect();
        eprintln!("listed {} keys in {:?}", keys.len(), started.elapsed());
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), N);
        assert_eq!(l.objects.len(), N, "a key came twice");
        let l = bucket
            .list(&bucket.key("dir/"), true, 1_000_000)
            .await
            .unwrap();
        assert_eq!(l.prefixes.len(), 7, "{:?}", l.prefixes);
        assert!(l.objects.is_empty());
    });
}
