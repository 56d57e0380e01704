//! `slipway gateway` (#10) in front of the real distribution registry
//! (plain http on loopback, as in the registry pod), serving TLS with a
//! `slipway pki init` certificate: skopeo pushes without, with wrong and
//! with right credentials; reads without any; explicit chunked `PATCH`,
//! monolithic `PUT` and cross-repository mount with curl; certificate
//! renewal without a restart; a CRI pull by digest through the node agent;
//! and the exit code for bad input files.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::harness::*;
use crate::ALIAS;

pub(crate) const USER: &str = "push";
pub(crate) const PASSWORD: &str = "correct horse battery staple";

/// `slipway gateway` on 127.0.0.1:0 (TLS) with its admin on 127.0.0.1:0;
/// killed on drop.
pub(crate) struct Gateway {
    pub proc: Proc,
    pub addr: String,
    pub admin: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The resolver of its own name resolution ([`Gateway::start_resolving`]).
    _dns: Option<NxDns>,
}

/// An htpasswd file with one bcrypt entry for [`USER`]/[`PASSWORD`], in
/// the `$2y$` form `htpasswd -B` writes.
pub(crate) fn htpasswd(dir: &Path) -> PathBuf {
    let p = dir.join("htpasswd");
    let h = bcrypt::hash(PASSWORD, 6)
        .unwrap()
        .replacen("$2b$", "$2y$", 1);
    fs::write(&p, format!("{USER}:{h}\n")).unwrap();
    p
}

impl Gateway {
    pub(crate) fn start(dir: &Path, upstream: &str, pki: &Pki) -> Gateway {
        let pw = htpasswd(dir);
        Gateway::start_with(dir, upstream, pki, &pw)
    }

    /// With the push accounts in the htpasswd file `pw`.
    pub(crate) fn start_with(dir: &Path, upstream: &str, pki: &Pki, pw: &Path) -> Gateway {
        Gateway::start_env(dir, upstream, pki, pw, &[])
    }

    /// With extra environment (`SLIPWAY_GATEWAY_…` settings).
    pub(crate) fn start_env(
        dir: &Path,
        upstream: &str,
        pki: &Pki,
        pw: &Path,
        env: &[(&str, &str)],
    ) -> Gateway {
        Gateway::start_full(dir, upstream, pki, pw, env, None)
    }

    /// #20: with its own name resolution, as a pod has through CoreDNS:
    /// `hosts` is its /etc/hosts (`IP NAME…` lines, e.g. a stand-in for
    /// registry-1.docker.io), and every other name is NXDOMAIN, so no
    /// lookup leaves the machine.
    pub(crate) fn start_resolving(
        dir: &Path,
        upstream: &str,
        pki: &Pki,
        env: &[(&str, &str)],
        hosts: &str,
    ) -> Gateway {
        let pw = htpasswd(dir);
        let etc = dir.join(format!("gateway-etc-{}", unique()));
        fs::create_dir_all(&etc).unwrap();
        let dns = NxDns::start();
        fs::write(etc.join("hosts"), format!("127.0.0.1 localhost\n{hosts}\n")).unwrap();
        fs::write(etc.join("nsswitch.conf"), "hosts: files dns\n").unwrap();
        fs::write(
            etc.join("resolv.conf"),
            format!("nameserver {}\noptions timeout:1 attempts:1\n", dns.ip),
        )
        .unwrap();
        let mut g = Gateway::start_full(dir, upstream, pki, &pw, env, Some(&etc));
        g._dns = Some(dns);
        g
    }

    fn start_full(
        dir: &Path,
        upstream: &str,
        pki: &Pki,
        pw: &Path,
        env: &[(&str, &str)],
        etc: Option<&Path>,
    ) -> Gateway {
        // Copies, so a test can replace them without touching the Pki.
        let tls = dir.join("gateway-tls");
        fs::create_dir_all(&tls).unwrap();
        let (cert, key) = (tls.join("tls.crt"), tls.join("tls.key"));
        fs::copy(pki.dir.join("tls.crt"), &cert).unwrap();
        fs::copy(pki.dir.join("tls.key"), &key).unwrap();
        let mut cmd = match etc {
            None => Command::new(slipway_bin()),
            Some(etc) => {
                let mut c = Command::new("unshare");
                let binds: Vec<String> = ["hosts", "nsswitch.conf", "resolv.conf"]
                    .iter()
                    .map(|f| format!("mount --bind {}/{f} /etc/{f}", etc.display()))
                    .collect();
                c.args([
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    &format!("{} && exec \"$0\" \"$@\"", binds.join(" && ")),
                    &slipway_bin(),
                ]);
                c
            }
        };
        cmd.arg("gateway")
            .args(["--gateway-listen", "127.0.0.1:0"])
            .args(["--gateway-admin-listen", "127.0.0.1:0"])
            .args(["--gateway-upstream", &format!("http://{upstream}")])
            .arg("--gateway-tls-cert")
            .arg(&cert)
            .arg("--gateway-tls-key")
            .arg(&key)
            .arg("--gateway-push-htpasswd")
            .arg(pw)
            .env("SLIPWAY_LOG", "info,slipway=debug")
            .env("SLIPWAY_LOG_FORMAT", "text")
            .envs(env.iter().copied());
        let mut proc = Proc::spawn("slipway-gateway", cmd, dir.join("gateway.log"));
        let started = Instant::now();
        let (addr, admin) = loop {
            let log = proc.log_text();
            let a = addr_from_log(&log, "slipway gateway starting", " listen=");
            let m = addr_from_log(&log, "slipway gateway starting", " admin=");
            if let (Some(a), Some(m)) = (a, m) {
                break (a, m);
            }
            let exited = proc.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(10),
                "gateway not listening after {:?} (exit: {exited:?}):\n{log}",
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Gateway {
            proc,
            addr,
            admin,
            cert,
            key,
            _dns: None,
        }
    }

    pub(crate) fn metrics(&self) -> String {
        http(&self.admin, "GET", "/metrics", &[])
            .map(|r| String::from_utf8_lossy(&r.body).to_string())
            .unwrap_or_default()
    }

    pub(crate) fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    pub(crate) fn port(&self) -> &str {
        self.addr.rsplit_once(':').unwrap().1
    }
}

/// Write requests in the registry's access log: what reached it.
fn registry_writes(r: &Registry) -> Vec<String> {
    r.proc
        .log_text()
        .lines()
        .filter(|l| {
            ["\"PUT ", "\"POST ", "\"PATCH ", "\"DELETE "]
                .iter()
                .any(|m| l.contains(m))
        })
        .map(str::to_string)
        .collect()
}

pub(crate) fn skopeo_push(
    layout: &Path,
    gw: &Gateway,
    pki: &Pki,
    repo_tag: &str,
    creds: Option<&str>,
) -> Output {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--retry-times", "0", "--dest-cert-dir"])
        .arg(pki.trust_dir());
    if let Some(c) = creds {
        cmd.args(["--dest-creds", c]);
    }
    cmd.arg(format!("oci:{}:app", layout.display()))
        .arg(format!("docker://{}/{repo_tag}", gw.addr));
    run(&mut cmd)
}

/// curl over TLS to the gateway, verifying it with the CA; status, headers
/// and body.
pub(crate) fn curl(pki: &Pki, args: &[&str]) -> HttpResponse {
    let out = run(Command::new("curl")
        .args(["-sS", "-i", "--max-time", "60", "--cacert"])
        .arg(pki.ca())
        .args(args));
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // -i prints every response; a 100 Continue comes first.
    let mut buf = out.stdout.as_slice();
    while buf.starts_with(b"HTTP/1.1 100") {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        buf = &buf[end + 4..];
    }
    parse_response(buf).unwrap()
}

fn url(gw: &Gateway, path: &str) -> String {
    format!("https://{}{path}", gw.addr)
}

pub(crate) fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

pub(crate) fn gateway_pki(dir: &Path) -> Pki {
    Pki::new(
        &dir.join("pki"),
        &["registry.shared-services", "localhost"],
        &["127.0.0.1"],
    )
}

/// The gateway's certificate and the plain-HTTP registry behind it, as in
/// the registry pod.
fn pki_and_registry(dir: &Path) -> (Pki, Registry) {
    let pki = gateway_pki(dir);
    let registry = Registry::start(dir, "127.0.0.1:0", None, None);
    (pki, registry)
}

/// #18 point 8: with distribution stopped (SIGSTOP: it accepts, and never
/// answers), a pull through the gateway gets 504 once
/// gateway.upstream_response_timeout_secs has passed, and it is counted.
/// Before, the client got no answer for as long as it waited, and nothing
/// counted it.
#[test]
fn the_gateway_answers_504_when_the_registry_hangs() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, registry) = pki_and_registry(dir);
    let gw = Gateway::start_env(
        dir,
        &registry.addr,
        &pki,
        &htpasswd(dir),
        &[("SLIPWAY_GATEWAY_UPSTREAM_RESPONSE_TIMEOUT_SECS", "2")],
    );
    assert_eq!(curl(&pki, &[&url(&gw, "/v2/app/tags/list")]).status, 404);
    let pid = nix::unistd::Pid::from_raw(registry.proc.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    let r = curl(&pki, &[&url(&gw, "/v2/app/manifests/v1")]);
    let took = t0.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "answered after {took:?}"
    );
    assert!(String::from_utf8_lossy(&r.body).contains("did not answer within"));
    assert_eq!(gw.metric("slipway_gateway_upstream_timeouts_total"), 1.0);
    // distribution running again: pulls are answered again.
    assert_eq!(curl(&pki, &[&url(&gw, "/v2/app/tags/list")]).status, 404);
}

/// #18 point 9: a flood of refused writes from one client gets one log
/// line per interval, with the path cut short, and every refusal is still
/// counted. Before, 500 refused POSTs with 12 KB paths wrote 500 lines of
/// 12 KB each.
#[test]
fn the_gateway_logs_a_flood_of_refusals_once() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, registry) = pki_and_registry(dir);
    let gw = Gateway::start(dir, &registry.addr, &pki);
    let before = gw.proc.log_text().len();
    let long = "a".repeat(12 * 1024);
    // curl's URL globbing: 500 requests on one connection.
    let out = run(Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "-X",
            "POST",
            "--cacert",
        ])
        .arg(pki.ca())
        .arg(format!(
            "https://{}/v2/{long}[1-500]/blobs/uploads/",
            gw.addr
        )));
    let codes = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        codes.lines().filter(|c| *c == "401").count(),
        500,
        "{codes}"
    );
    let log = gw.proc.log_text()[before..].to_string();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    assert_eq!(lines.len(), 1, "{} refusal lines", lines.len());
    assert!(lines[0].len() < 1024, "a {} byte line", lines[0].len());
    assert_eq!(
        gw.metric("slipway_gateway_requests_total{class=\"write\",result=\"unauthenticated\"}"),
        500.0
    );
}

/// curl processes that keep sending writes with a wrong password (each its
/// own, repeated: a guesser's loop), killed on drop.
struct Guessers(Vec<std::process::Child>);

impl Guessers {
    fn start(n: usize, gw: &Gateway, pki: &Pki) -> Guessers {
        Guessers(
            (0..n)
                .map(|i| {
                    Command::new("curl")
                        .args(["-s", "-o", "/dev/null", "-X", "POST", "--cacert"])
                        .arg(pki.ca())
                        .args(["-u", &format!("{USER}:wrong-{i}")])
                        // curl's URL globbing: one request after another on
                        // one connection, for as long as the test lets it.
                        .arg(url(gw, "/v2/app/blobs/uploads/?n=[1-1000000]"))
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }
}

impl Drop for Guessers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// #18 point 7: 64 clients guessing the push password for 20 s, against
/// an htpasswd entry at bcrypt cost 10 (what `pki ensure` wrote before, and
/// what an operator's own file may hold). Before: 64 bcrypt checks at once
/// on the blocking pool, both cores at 100 %, an honest push 14–20 times
/// slower, a 1 MiB pull 200 times slower and `/healthz` at 4.56 s. Now a
/// repeated guess is answered from memory, one check runs at a time and a
/// refusal is held 500 ms (`DENIED_PAUSE`): the honest push within 2× its quiet
/// time, the pull median within 5×, `/healthz` under 1 s.
#[test]
fn password_guessers_cost_the_gateway_little_and_honest_clients_nothing() {
    if !prerequisites_with(&["curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, registry) = pki_and_registry(dir);
    let pw = dir.join("htpasswd-cost-10");
    fs::write(
        &pw,
        format!("{USER}:{}\n", bcrypt::hash(PASSWORD, 10).unwrap()),
    )
    .unwrap();
    let gw = Gateway::start_with(dir, &registry.addr, &pki, &pw);
    let creds = format!("{USER}:{PASSWORD}");
    let push = |repo: &str| {
        let t0 = Instant::now();
        let out = skopeo_push(oci_layout(), &gw, &pki, repo, Some(&creds));
        assert!(
            out.status.success(),
            "{repo}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t0.elapsed()
    };
    // A 1 MiB layer to pull anonymously.
    let layout = big_layout(1);
    let manifest = push_layout(&layout, &registry.addr, "pull/app:v1", None);
    let (layer, _) = layers(&gw.addr, "pull/app", &manifest, &pki).remove(0);
    let pull = || {
        let out = run(Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{time_total}",
                "--max-time",
                "60",
                "--cacert",
            ])
            .arg(pki.ca())
            .arg(url(&gw, &format!("/v2/pull/app/blobs/{layer}"))));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (code, secs) = text.split_once(' ').unwrap();
        assert_eq!(code, "200", "{text}");
        Duration::from_secs_f64(secs.parse().unwrap())
    };
    let healthz = || {
        let t0 = Instant::now();
        let r = http(&gw.admin, "GET", "/healthz", &[]).unwrap();
        assert_eq!(r.status, 200);
        t0.elapsed()
    };

    push("warm/app:v1");
    let quiet_push = median((0..3).map(|i| push(&format!("quiet{i}/app:v1"))).collect());
    let quiet_pull = median((0..9).map(|_| pull()).collect());

    let pid = gw.proc.child.id();
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let guessers = Guessers::start(64, &gw, &pki);
    // /healthz sampled all along, on its own thread.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let admin = gw.admin.clone();
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r = http(&admin, "GET", "/healthz", &[]).unwrap();
                assert_eq!(r.status, 200);
                worst = worst.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(200));
            }
            worst
        })
    };
    // Let each guesser's first check through (64 at cost 10, one at a time).
    std::thread::sleep(Duration::from_secs(6));
    let busy_push = median((0..3).map(|i| push(&format!("busy{i}/app:v1"))).collect());
    let busy_pull = median((0..9).map(|_| pull()).collect());
    while t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = cpu_secs(pid) - cpu0;
    let attack = t0.elapsed();
    drop(guessers);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst_healthz = sampler.join().unwrap().max(healthz());
    let denied = gw.metric("slipway_gateway_requests_total{class=\"write\",result=\"denied\"}");
    eprintln!(
        "guessers: {denied} refused in {attack:?}; gateway CPU {cpu:.2} s; push {quiet_push:?} quiet, {busy_push:?} busy; \
         1 MiB pull median {quiet_pull:?} quiet, {busy_pull:?} busy; /healthz worst {worst_healthz:?}"
    );
    assert!(denied >= 64.0, "the guessers were not refused: {denied}");
    assert!(
        busy_push <= quiet_push * 2,
        "honest push {busy_push:?} under attack, {quiet_push:?} quiet"
    );
    assert!(
        busy_pull <= quiet_pull * 5,
        "pull median {busy_pull:?} under attack, {quiet_pull:?} quiet"
    );
    assert!(
        worst_healthz < Duration::from_secs(1),
        "/healthz took {worst_healthz:?}"
    );
    assert!(
        cpu < attack.as_secs_f64() / 2.0,
        "the gateway used {cpu:.1} CPU seconds in {attack:?}"
    );
}

#[test]
fn writes_need_the_push_account_and_reads_need_nothing() {
    if !prerequisites_with(&["curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, registry) = pki_and_registry(dir);
    let gw = Gateway::start(dir, &registry.addr, &pki);
    let layout = oci_layout();

    // Anonymous, then with a wrong password: both refused with 401, and
    // not one write reaches the registry.
    let anon = skopeo_push(layout, &gw, &pki, "app:v1", None);
    let e = String::from_utf8_lossy(&anon.stderr).to_string();
    assert!(!anon.status.success(), "anonymous push succeeded");
    assert!(
        e.contains("401") || e.contains("authentication required"),
        "{e}"
    );
    let wrong = skopeo_push(layout, &gw, &pki, "app:v1", Some(&format!("{USER}:wrong")));
    let e = String::from_utf8_lossy(&wrong.stderr).to_string();
    assert!(
        !wrong.status.success(),
        "push with a wrong password succeeded"
    );
    assert!(
        e.contains("401") || e.contains("authentication required"),
        "{e}"
    );
    assert_eq!(
        registry_writes(&registry),
        Vec::<String>::new(),
        "a refused write reached the registry"
    );
    assert!(
        gw.metric("slipway_gateway_requests_total{class=\"write\",result=\"denied\"}") >= 1.0,
        "{}",
        gw.metrics()
    );
    assert!(
        gw.metric("slipway_gateway_requests_total{class=\"write\",result=\"unauthenticated\"}")
            >= 1.0,
        "{}",
        gw.metrics()
    );
    let log = gw.proc.log_text();
    assert!(
        log.contains("wrong credentials refused") && log.contains("user=push"),
        "{log}"
    );
    assert!(
        !log.contains("wrong\"") && !log.contains(PASSWORD),
        "a password reached the log:\n{log}"
    );

    // A raw refused write: the challenge and a registry-style error.
    let r = curl(&pki, &["-X", "POST", &url(&gw, "/v2/app/blobs/uploads/")]);
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Basic realm=\"slipway-registry\"")
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAUTHORIZED", "{v}");

    // The right credentials: the push succeeds.
    let ok = skopeo_push(
        layout,
        &gw,
        &pki,
        "app:v1",
        Some(&format!("{USER}:{PASSWORD}")),
    );
    assert!(
        ok.status.success(),
        "push failed: {}\n{}",
        String::from_utf8_lossy(&ok.stderr),
        gw.proc.log_text()
    );
    assert!(!registry_writes(&registry).is_empty());

    // Read back without credentials, byte-identical to the source layout.
    let back = dir.join("back");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-cert-dir"])
            .arg(pki.trust_dir())
            .arg(format!("docker://{}/app:v1", gw.addr))
            .arg(format!("oci:{}:app", back.display())),
    );
    let src_index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(layout.join("index.json")).unwrap()).unwrap();
    let back_index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(back.join("index.json")).unwrap()).unwrap();
    let digest = src_index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        back_index["manifests"][0]["digest"].as_str(),
        Some(digest.as_str())
    );
    let mut compared = 0;
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap().flatten() {
        let name = e.file_name();
        let theirs = back.join("blobs/sha256").join(&name);
        if theirs.exists() {
            assert_eq!(
                fs::read(e.path()).unwrap(),
                fs::read(&theirs).unwrap(),
                "{name:?} differs"
            );
            compared += 1;
        }
    }
    // Manifest, config and three layers.
    assert!(compared >= 5, "only {compared} blobs compared");
    // HEAD without credentials, by curl (distribution answers 404 for an
    // OCI manifest the client does not say it accepts).
    let r = curl(
        &pki,
        &[
            "-I",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &url(&gw, &format!("/v2/app/manifests/{digest}")),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(gw.metric("slipway_gateway_requests_total{class=\"read\",result=\"allowed\"}") >= 5.0);

    // Streams both ways, explicitly: a chunked PATCH then the closing PUT,
    // a monolithic PUT, and a cross-repository mount.
    let auth = format!("{USER}:{PASSWORD}");
    let blob: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let blob_path = dir.join("blob.bin");
    fs::write(&blob_path, &blob).unwrap();
    let digest_b = sha(&blob);
    let start = curl(
        &pki,
        &[
            "-u",
            &auth,
            "-X",
            "POST",
            &url(&gw, "/v2/chunked/blobs/uploads/"),
        ],
    );
    assert_eq!(start.status, 202, "{start:?}");
    let loc = start.header("location").unwrap().to_string();
    assert!(
        loc.starts_with(&format!("https://{}/", gw.addr)),
        "the upload Location must point back at the gateway: {loc}"
    );
    let patched = curl(
        &pki,
        &[
            "-u",
            &auth,
            "-X",
            "PATCH",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", blob_path.display()),
            &loc,
        ],
    );
    assert_eq!(patched.status, 202, "{patched:?}");
    let loc = patched.header("location").unwrap().to_string();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let done = curl(
        &pki,
        &[
            "-u",
            &auth,
            "-X",
            "PUT",
            "-H",
            "Content-Length: 0",
            &format!("{loc}{sep}digest={digest_b}"),
        ],
    );
    assert_eq!(done.status, 201, "{done:?}");

    let mono: Vec<u8> = blob.iter().rev().copied().collect();
    let mono_path = dir.join("mono.bin");
    fs::write(&mono_path, &mono).unwrap();
    let digest_m = sha(&mono);
    let start = curl(
        &pki,
        &[
            "-u",
            &auth,
            "-X",
            "POST",
            &url(&gw, "/v2/mono/blobs/uploads/"),
        ],
    );
    let loc = start.header("location").unwrap().to_string();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let put = curl(
        &pki,
        &[
            "-u",
            &auth,
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", mono_path.display()),
            &format!("{loc}{sep}digest={digest_m}"),
        ],
    );
    assert_eq!(put.status, 201, "{put:?}");

    let mount = curl(
        &pki,
        &[
            "-u",
            &auth,
            "-X",
            "POST",
            "-H",
            "Content-Length: 0",
            &url(
                &gw,
                &format!("/v2/other/blobs/uploads/?mount={digest_b}&from=chunked"),
            ),
        ],
    );
    assert_eq!(mount.status, 201, "cross-repository mount: {mount:?}");
    // Without credentials the mount is refused like any write.
    let writes_before = registry_writes(&registry).len();
    let anon_mount = curl(
        &pki,
        &[
            "-X",
            "POST",
            &url(
                &gw,
                &format!("/v2/evil/blobs/uploads/?mount={digest_b}&from=chunked"),
            ),
        ],
    );
    assert_eq!(anon_mount.status, 401);
    assert_eq!(registry_writes(&registry).len(), writes_before);

    // Every blob reads back byte-identical, anonymously.
    for (repo, d, want) in [
        ("chunked", &digest_b, &blob),
        ("mono", &digest_m, &mono),
        ("other", &digest_b, &blob),
    ] {
        let out = run(Command::new("curl")
            .args(["-sS", "-f", "--cacert"])
            .arg(pki.ca())
            .arg(url(&gw, &format!("/v2/{repo}/blobs/{d}"))));
        assert!(
            out.status.success(),
            "{repo}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == *want, "{repo}/{d} differs on read-back");
    }
}

/// The push Secret `slipway pki ensure` makes (#10, point 4), used as the
/// registry pod and a build pod use it: the gateway reads its `htpasswd`,
/// and a Docker-config client (skopeo `--authfile`, which reads the same
/// `auths` map Kaniko does) pushes with its `config.json`, found by the
/// registry's `host:port`. The Secret's data goes through `assess`, as a
/// rerun of ensure does once the registry's address is known.
#[test]
fn the_push_secret_from_pki_ensure_lets_a_docker_config_client_push() {
    use k8s_openapi::api::core::v1::Secret;
    use slipway::pki::push;

    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, registry) = pki_and_registry(dir);
    let data = push::new_data(&[]).unwrap();
    let key =
        |d: &std::collections::BTreeMap<String, k8s_openapi::ByteString>, k: &str| d[k].0.clone();
    let pw = dir.join("push-htpasswd");
    fs::write(&pw, key(&data, push::KEY_HTPASSWD)).unwrap();
    let gw = Gateway::start_with(dir, &registry.addr, &pki, &pw);

    let sans = slipway::pki::Sans::new(
        &["registry.shared-services".into(), "localhost".into()],
        &["127.0.0.1".parse().unwrap()],
    )
    .unwrap();
    let port: u16 = gw.port().parse().unwrap();
    let secret = |d| Secret {
        data: Some(d),
        ..Secret::default()
    };
    let (data, why) = push::assess(&secret(data), &push::registries(&sans, port))
        .unwrap()
        .expect("config.json names no registry yet");
    assert_eq!(why, push::PushWhy::StaleDockerConfig);
    let authfile = dir.join("config.json");
    fs::write(&authfile, key(&data, push::KEY_DOCKER_CONFIG)).unwrap();
    let config = fs::read_to_string(&authfile).unwrap();
    assert!(
        config.contains(&format!("\"127.0.0.1:{port}\"")),
        "{config}"
    );
    let password = String::from_utf8(key(&data, push::KEY_PASSWORD)).unwrap();

    let push_with = |authfile: &Path, tag: &str| {
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--retry-times", "0", "--dest-cert-dir"])
            .arg(pki.trust_dir())
            .arg("--dest-authfile")
            .arg(authfile)
            .arg(format!("oci:{}:app", oci_layout().display()))
            .arg(format!("docker://127.0.0.1:{port}/app:{tag}")))
    };
    let ok = push_with(&authfile, "from-secret");
    assert!(
        ok.status.success(),
        "push with the Secret's config.json failed: {}\n{}",
        String::from_utf8_lossy(&ok.stderr),
        gw.proc.log_text()
    );
    assert!(!registry_writes(&registry).is_empty());
    let log = gw.proc.log_text();
    assert!(
        !log.contains(&password),
        "the push password reached the log"
    );

    // A config.json for another port has no entry for this registry:
    // nothing is sent, and the push is refused.
    let other = dir.join("other-port.json");
    let wrong_port = if port == 5000 { 5001 } else { 5000 };
    fs::write(
        &other,
        push::docker_config(
            push::PUSH_USER,
            &password,
            &push::registries(&sans, wrong_port),
        ),
    )
    .unwrap();
    let writes = registry_writes(&registry).len();
    let refused = push_with(&other, "other-port");
    assert!(
        !refused.status.success(),
        "push without a matching entry succeeded"
    );
    assert_eq!(registry_writes(&registry).len(), writes);
}

#[test]
fn the_certificate_renews_without_a_restart_and_an_invalid_pair_is_kept_out() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, registry) = pki_and_registry(dir);
    let mut gw = Gateway::start(dir, &registry.addr, &pki);
    let pid = gw.proc.child.id();
    let first = served_serial(&gw, &pki).expect("first certificate");
    let expiry = gw.metric("slipway_gateway_certificate_expiry_timestamp_seconds");
    assert!(expiry > 1.7e9, "{}", gw.metrics());

    // A new pair from the same CA.
    let ca = slipway::pki::Pair {
        cert_pem: fs::read_to_string(pki.dir.join("ca.crt")).unwrap(),
        key_pem: fs::read_to_string(pki.dir.join("ca.key")).unwrap(),
    };
    let sans =
        slipway::pki::Sans::new(&["localhost".into()], &["127.0.0.1".parse().unwrap()]).unwrap();
    let new = slipway::pki::issue_server(&ca, &sans, time::OffsetDateTime::now_utc()).unwrap();
    fs::write(&gw.key, &new.key_pem).unwrap();
    fs::write(&gw.cert, &new.cert_pem).unwrap();
    let changed = Instant::now();
    let mut second = None;
    while changed.elapsed() < Duration::from_secs(5) {
        match served_serial(&gw, &pki) {
            Some(s) if s != first => {
                second = Some(s);
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let second = second.unwrap_or_else(|| {
        panic!(
            "still serving {first} 5 s after the files changed:\n{}",
            gw.proc.log_text()
        )
    });
    assert_eq!(gw.proc.child.id(), pid);
    assert!(
        gw.proc.child.try_wait().unwrap().is_none(),
        "the gateway restarted or exited"
    );
    assert!(gw.metric("slipway_gateway_certificate_reloads_total{result=\"applied\"}") >= 1.0);

    // An invalid pair (a certificate with another pair's key): the old one stays.
    let other = slipway::pki::issue_server(&ca, &sans, time::OffsetDateTime::now_utc()).unwrap();
    fs::write(&gw.cert, &other.cert_pem).unwrap();
    fs::write(&gw.key, &new.key_pem).unwrap();
    wait_for("the rejected reload", Duration::from_secs(5), || {
        gw.metric("slipway_gateway_certificate_reloads_total{result=\"rejected\"}") >= 1.0
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(served_serial(&gw, &pki).as_deref(), Some(second.as_str()));
    assert!(
        gw.proc.log_text().contains("not a valid pair"),
        "{}",
        gw.proc.log_text()
    );
}

/// The serial of the certificate a NEW connection gets, by openssl
/// s_client (verified with the CA), as `openssl x509 -serial` prints it.
fn served_serial(gw: &Gateway, pki: &Pki) -> Option<String> {
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "openssl s_client -connect {} -servername localhost -CAfile {} -verify_return_error </dev/null 2>/dev/null | openssl x509 -noout -serial",
        gw.addr,
        pki.ca().display()
    )));
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    s.strip_prefix("serial=").map(str::to_string)
}

#[test]
fn cri_pulls_by_digest_through_the_agent_without_credentials() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, registry) = pki_and_registry(dir);
    let gw = Gateway::start(dir, &registry.addr, &pki);
    let ok = skopeo_push(
        oci_layout(),
        &gw,
        &pki,
        "app:v1",
        Some(&format!("{USER}:{PASSWORD}")),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let digest = layout_digest(oci_layout());
    let ctd = Containerd::start(dir);
    // As in a cluster: the agent names the Service and dials the gateway.
    let _agent = Agent::start(
        dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        &format!("https://registry.shared-services:{}", gw.port()),
        Some(&gw.addr),
        &pki.ca(),
        "",
    );
    let writes = gw.metric("slipway_gateway_requests_total{class=\"write\",result=\"allowed\"}");
    let reads = gw.metric("slipway_gateway_requests_total{class=\"read\",result=\"allowed\"}");
    ctd.pull(&format!("{ALIAS}/app@{digest}")).unwrap();
    assert!(
        gw.metric("slipway_gateway_requests_total{class=\"read\",result=\"allowed\"}")
            >= reads + 4.0,
        "{}",
        gw.metrics()
    );
    assert_eq!(
        gw.metric("slipway_gateway_requests_total{class=\"write\",result=\"allowed\"}"),
        writes
    );
}

#[test]
fn a_bad_htpasswd_or_a_missing_key_file_exits_64_naming_the_file() {
    // Only the binary and `pki init`: no root, no registry.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"), &["localhost"], &[]);
    let good = htpasswd(dir);
    let bad = dir.join("bad-htpasswd");
    fs::write(&bad, "push:$apr1$xyz$notbcrypt\n").unwrap();
    let missing_key = dir.join("nope/tls.key");
    let cert = pki.dir.join("tls.crt");
    let key = pki.dir.join("tls.key");
    for (htp, key, names) in [
        (&bad, &key, &bad),
        (&good, &missing_key, &missing_key),
        (
            &dir.join("missing-htpasswd"),
            &key,
            &dir.join("missing-htpasswd"),
        ),
    ] {
        let out = run(Command::new(slipway_bin())
            .args([
                "gateway",
                "--gateway-listen",
                "127.0.0.1:0",
                "--gateway-admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--gateway-tls-cert")
            .arg(&cert)
            .arg("--gateway-tls-key")
            .arg(key)
            .arg("--gateway-push-htpasswd")
            .arg(htp)
            .env("SLIPWAY_LOG_FORMAT", "text"));
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(64), "{e}");
        assert!(
            e.contains(&names.display().to_string()),
            "does not name {}: {e}",
            names.display()
        );
    }
}
