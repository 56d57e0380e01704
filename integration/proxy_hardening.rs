//! Issue #13, the proxy side, against the real agent binary: exact cache
//! accounting (with the real registry), bounded metric labels,
//! digest-verified responses and redirects only where expected (with
//! stand-in TLS upstreams: small rustls servers in this file).
//!
//! The agent listens on port 0 for both servers and the test reads the
//! bound addresses from its start-up log, so no port is released and then
//! guessed. Every stand-in server is stopped when its guard drops.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use sha2::{Digest as _, Sha256};

use crate::harness::*;
use crate::{tls_setup, ALIAS};

// ------------------------------------------------------------ stand-in upstream

/// One request as a stand-in server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a stand-in answers.
pub enum Reply {
    Body {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    Redirect(String),
}

impl Reply {
    fn ok(body: impl Into<Bytes>) -> Reply {
        Reply::Body {
            status: 200,
            headers: vec![("content-type", "application/octet-stream".into())],
            body: body.into(),
        }
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A TLS server on 127.0.0.1 (port 0, kept) with a certificate from
/// `slipway pki init`; stopped, with every connection, on drop.
pub struct StandIn {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl StandIn {
    pub fn start(pki: &Pki, handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> StandIn {
        let handler: Handler = Arc::new(handler);
        let tls = tls_server_config(pki);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = rt()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = rt().spawn(async move {
            // Dropping the set (when this task is aborted) aborts every
            // connection task with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (acceptor, handler, seen) = (acceptor.clone(), handler.clone(), seen2.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let s = Seen {
                                method: req.method().to_string(),
                                target: req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into(),
                                        )
                                    })
                                    .collect(),
                            };
                            let reply = handler(&s);
                            seen.lock().unwrap().push(s);
                            let resp = match reply {
                                Reply::Body {
                                    status,
                                    headers,
                                    body,
                                } => {
                                    let mut b = http::Response::builder().status(status);
                                    for (k, v) in headers {
                                        b = b.header(k, v);
                                    }
                                    b.body(Full::new(body)).unwrap()
                                }
                                Reply::Redirect(loc) => http::Response::builder()
                                    .status(307)
                                    .header("location", loc)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            };
                            async move { Ok::<_, std::convert::Infallible>(resp) }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
                // Reap finished connections so the set stays small.
                while conns.try_join_next().is_some() {}
            }
        });
        StandIn {
            addr,
            seen,
            task: Some(task),
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = rt().block_on(t);
        }
    }
}

// ------------------------------------------------------------ agent on port 0

/// `slipway agent` with both listeners on port 0, no containerd needed:
/// certs_dir and a containerd config whose `config_path` covers it live in
/// `dir`. `proxy_extra` goes into `[proxy]`, `extra` after everything.
fn start_agent(
    dir: &Path,
    upstream: &str,
    dial: Option<&str>,
    ca: &Path,
    proxy_extra: &str,
    extra: &str,
) -> Agent {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let home = dir.join(format!("agent13-{n}"));
    fs::create_dir_all(&home).unwrap();
    let certs_dir = home.join("certs.d");
    let containerd = home.join("containerd.toml");
    fs::write(
        &containerd,
        format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = {:?}\n",
            certs_dir.display().to_string()
        ),
    )
    .unwrap();
    let dial = dial.map(|d| format!("dial = {d:?}\n")).unwrap_or_default();
    let config = home.join("agent.toml");
    fs::write(
        &config,
        format!(
            "[registry]\naliases = [{ALIAS:?}]\nupstream = {upstream:?}\n{dial}ca_file = {:?}\n\n[containerd]\ncerts_dir = {:?}\nconfig_file = {:?}\n\n[proxy]\nlisten = \"127.0.0.1:0\"\nbody_idle_timeout_secs = 5\n{proxy_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}",
            ca.display().to_string(),
            certs_dir.display().to_string(),
            containerd.display().to_string(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(slipway_bin());
    cmd.args(["agent", "--config"])
        .arg(&config)
        .env("SLIPWAY_LOG", "info,slipway=debug")
        .env("SLIPWAY_LOG_FORMAT", "text");
    let proc = Proc::spawn("slipway-agent", cmd, home.join("agent.log"));
    let mut addrs = None;
    wait_for("agent start-up line", Duration::from_secs(10), || {
        addrs = proc
            .log_text()
            .lines()
            .find(|l| l.contains("slipway agent starting"))
            .and_then(|l| Some((field(l, "proxy")?, field(l, "admin")?)));
        addrs.is_some()
    });
    let (proxy, admin) = addrs.unwrap();
    let a = Agent {
        proc,
        config,
        proxy,
        admin,
        netns: None,
    };
    wait_for("agent /healthz", Duration::from_secs(10), || {
        http(&a.admin, "GET", "/healthz", &[])
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    a
}

/// `key=value` from a tracing text line.
fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_matches('"').to_string())
}

fn pki(dir: &Path) -> Pki {
    Pki::new(
        &dir.join("pki"),
        &["registry.test", "localhost"],
        &["127.0.0.1"],
    )
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Pseudo-random, incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(2)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// How a raw GET ended: the status, the declared length, the body bytes
/// received, and whether the stream ended with an error instead of EOF.
struct Outcome {
    status: u16,
    content_length: Option<u64>,
    body: Vec<u8>,
    error: Option<std::io::Error>,
}

impl Outcome {
    /// A complete response: every declared byte, then a clean close.
    fn complete(&self) -> bool {
        self.error.is_none() && self.content_length == Some(self.body.len() as u64)
    }
}

fn get(addr: &str, target: &str, headers: &[(&str, &str)]) -> Outcome {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    s.write_all(raw.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let error = loop {
        match s.read(&mut chunk) {
            Ok(0) => break None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => break Some(e),
        }
    };
    // An abort before the first body byte may close the connection before
    // hyper wrote the head: that is status 0 here, never complete.
    let Ok(r) = parse_response(&buf) else {
        return Outcome {
            status: 0,
            content_length: None,
            body: buf,
            error,
        };
    };
    let content_length = r.header("content-length").and_then(|v| v.parse().ok());
    Outcome {
        status: r.status,
        content_length,
        body: r.body,
        error,
    }
}

fn content_bytes_on_disk(cache: &Path) -> u64 {
    fs::read_dir(cache.join("sha256"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_none())
                .map(|e| e.metadata().unwrap().len())
                .sum()
        })
        .unwrap_or(0)
}

// ------------------------------------------------------------ point 3

/// #13 point 3: concurrent GETs of one 32 MiB blob through the real agent
/// and the real registry leave `slipway_cache_size_bytes` equal to the
/// bytes on disk (it said 64 MiB with 32 MiB on disk).
#[test]
fn cache_gauge_equals_bytes_on_disk_after_concurrent_gets_of_one_blob() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let digest = push_layout(&big_layout(32), &s.registry.addr, "big:v1", Some(&s.pki));
    let (layer, size) = layers(&s.registry.addr, "big", &digest, &s.pki)[0].clone();
    assert!(size > 30 << 20, "{size}");
    let cache = s.dir.join("cache13");
    let agent = start_agent(
        &s.dir,
        "https://registry.shared-services:5443",
        Some(&s.registry.addr),
        &s.pki.ca(),
        "",
        &format!(
            "\n[cache]\ndir = {:?}\nmax_bytes = 1073741824\n",
            cache.display().to_string()
        ),
    );
    let target = format!("/v2/big/blobs/{layer}");
    let barrier = Arc::new(std::sync::Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let (proxy, target, barrier) = (agent.proxy.clone(), target.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                get(&proxy, &target, &[])
            })
        })
        .collect();
    for h in handles {
        let o = h.join().unwrap();
        assert_eq!(o.status, 200);
        assert!(
            o.complete(),
            "{} of {size} bytes, {:?}",
            o.body.len(),
            o.error
        );
        assert_eq!(sha256(&o.body), layer);
    }
    // Commits run just after each body ends; wait for the temp files to go.
    wait_for("cache commits", Duration::from_secs(10), || {
        fs::read_dir(cache.join("tmp"))
            .map(|rd| rd.count() == 0)
            .unwrap_or(false)
    });
    std::thread::sleep(Duration::from_millis(300));
    let disk = content_bytes_on_disk(&cache);
    assert_eq!(disk, size, "one copy of the blob on disk");
    assert_eq!(
        agent.metric("slipway_cache_size_bytes") as u64,
        disk,
        "{}",
        agent.metrics()
    );
    // And hits do not move it.
    let o = get(&agent.proxy, &target, &[]);
    assert!(o.complete());
    assert!(agent.metric("slipway_cache_hits_total") >= 1.0);
    assert_eq!(agent.metric("slipway_cache_size_bytes") as u64, disk);
}

// ------------------------------------------------------------ point 4

/// #13 point 4: 2,000 distinct request methods leave `/metrics` under
/// 20 KB larger (it grew by 283 KB): unknown methods count as `other`.
#[test]
fn two_thousand_methods_leave_metrics_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let up = StandIn::start(&pki, |_| Reply::ok("{}"));
    let agent = start_agent(
        tmp.path(),
        &format!("https://127.0.0.1:{}", up.addr.port()),
        None,
        &pki.ca(),
        "",
        "",
    );
    // One ordinary request first, so the baseline has its series.
    assert_eq!(http(&agent.proxy, "GET", "/v2/", &[]).unwrap().status, 200);
    assert_eq!(
        http(&agent.proxy, "M00000000", "/v2/", &[]).unwrap().status,
        405
    );
    let before = agent.metrics().len();
    for i in 1..=2000 {
        let r = http(&agent.proxy, &format!("M{i:08}"), "/v2/", &[]).unwrap();
        assert_eq!(r.status, 405);
    }
    let after = agent.metrics();
    eprintln!(
        "/metrics: {before} bytes before, {} after 2,000 methods",
        after.len()
    );
    assert!(
        after.len() < before + 20_000,
        "/metrics grew by {} bytes",
        after.len() - before
    );
    assert_eq!(
        agent.metric(
            "slipway_proxy_requests_total{method=\"other\",route=\"refused\",status=\"405\"}"
        ),
        2001.0,
        "{after}"
    );
    assert!(up.requests().len() <= 2, "refusals reached the upstream");
}

// ------------------------------------------------------------ point 6

/// #13 point 6: wrong bytes for a digest (blob or manifest, same length as
/// the right ones) end in an aborted connection, never a complete 200, and
/// are counted; the right bytes, and Range responses, pass.
#[test]
fn wrong_bytes_for_a_digest_abort_the_client_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let good = noise(3 << 20, 1);
    let dg_good = sha256(&good);
    // The upstream is asked for `wanted` and answers with `bad`, of the
    // same length.
    let wanted = noise(3 << 20, 2);
    let dg_wanted = sha256(&wanted);
    let bad = noise(3 << 20, 3);
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec();
    let dg_manifest = sha256(&manifest);
    let mut forged = manifest.clone();
    forged[2] = b'S';
    let (good2, bad2, g, w, m) = (
        good.clone(),
        bad.clone(),
        dg_good.clone(),
        dg_wanted.clone(),
        dg_manifest.clone(),
    );
    let up = StandIn::start(&pki, move |s| {
        if s.target == format!("/v2/app/blobs/{g}") {
            Reply::ok(good2.clone())
        } else if s.target == format!("/v2/app/blobs/{w}") {
            match s.header("range") {
                Some(r) => {
                    assert_eq!(r, "bytes=0-99");
                    Reply::Body {
                        status: 206,
                        headers: vec![("content-range", format!("bytes 0-99/{}", bad2.len()))],
                        body: Bytes::copy_from_slice(&bad2[..100]),
                    }
                }
                None => Reply::ok(bad2.clone()),
            }
        } else if s.target == format!("/v2/app/manifests/{m}") {
            Reply::Body {
                status: 200,
                headers: vec![(
                    "content-type",
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                body: Bytes::from(forged.clone()),
            }
        } else {
            Reply::ok("{}")
        }
    });
    let cache = tmp.path().join("cache");
    let agent = start_agent(
        tmp.path(),
        &format!("https://127.0.0.1:{}", up.addr.port()),
        None,
        &pki.ca(),
        "",
        &format!("\n[cache]\ndir = {:?}\n", cache.display().to_string()),
    );
    // The right bytes pass whole.
    let o = get(&agent.proxy, &format!("/v2/app/blobs/{dg_good}"), &[]);
    assert_eq!(o.status, 200);
    assert!(o.complete(), "{} bytes, {:?}", o.body.len(), o.error);
    assert_eq!(o.body, good);

    // Wrong bytes for a blob digest: the client never gets them all.
    let o = get(&agent.proxy, &format!("/v2/app/blobs/{dg_wanted}"), &[]);
    eprintln!(
        "wrong blob: status {}, {} of {:?} bytes, then {:?}",
        o.status,
        o.body.len(),
        o.content_length,
        o.error
    );
    assert!(!o.complete(), "wrong bytes ended in a complete response");
    assert!(o.body.len() < bad.len());

    // Wrong bytes for a manifest digest (one small chunk): none of it.
    let o = get(
        &agent.proxy,
        &format!("/v2/app/manifests/{dg_manifest}"),
        &[],
    );
    eprintln!(
        "forged manifest: status {}, {} of {:?} bytes, then {:?}",
        o.status,
        o.body.len(),
        o.content_length,
        o.error
    );
    assert!(
        !o.complete(),
        "a forged manifest ended in a complete response"
    );
    assert!(
        o.body.is_empty(),
        "{} bytes of a forged manifest",
        o.body.len()
    );
    assert_eq!(
        agent.metric("slipway_proxy_digest_mismatches_total"),
        2.0,
        "{}",
        agent.metrics()
    );

    // Range responses are passed as they are (a part cannot be checked).
    let o = get(
        &agent.proxy,
        &format!("/v2/app/blobs/{dg_wanted}"),
        &[("Range", "bytes=0-99")],
    );
    assert_eq!(o.status, 206);
    assert!(o.complete());
    assert_eq!(o.body, bad[..100]);
    assert_eq!(agent.metric("slipway_proxy_digest_mismatches_total"), 2.0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !cache
            .join("sha256")
            .join(dg_wanted.trim_start_matches("sha256:"))
            .exists(),
        "wrong bytes were cached"
    );
}

// ------------------------------------------------------------ point 7

/// #13 point 7: an upstream that 307-redirects to a second local TLS server
/// (same IP, another port: another origin) is refused by default, and
/// followed with `proxy.redirect_hosts`, without the client's
/// `Authorization`. Same-origin redirects are followed with it.
#[test]
fn redirect_to_another_origin_is_refused_unless_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let blob = noise(200_000, 3);
    let dg = sha256(&blob);
    let b2 = blob.clone();
    let target = StandIn::start(&pki, move |_| Reply::ok(b2.clone()));
    let tport = target.addr.port();
    let dg2 = dg.clone();
    let up = StandIn::start(&pki, move |s| {
        if s.target == format!("/v2/app/blobs/{dg2}") {
            Reply::Redirect(format!("https://127.0.0.1:{tport}/storage/{dg2}"))
        } else if s.target == format!("/v2/same/blobs/{dg2}") {
            Reply::Redirect(format!("/v2/app/blobs/{dg2}?here=1"))
        } else if s.target.ends_with("?here=1") {
            Reply::ok(blob.clone())
        } else {
            Reply::ok("{}")
        }
    });
    let upstream = format!("https://127.0.0.1:{}", up.addr.port());
    let auth = [("Authorization", "Bearer secret-13")];

    // Default: only the upstream's own origin.
    let a = start_agent(tmp.path(), &upstream, None, &pki.ca(), "", "");
    let o = get(&a.proxy, &format!("/v2/app/blobs/{dg}"), &auth);
    assert_ne!(o.status, 200, "a redirect to another origin was followed");
    assert_eq!(o.status, 503);
    let why = String::from_utf8_lossy(&o.body);
    assert!(
        why.contains(&format!(
            "https://127.0.0.1:{tport}, an IP address not listed in proxy.redirect_hosts"
        )),
        "{why}"
    );
    assert!(
        target.requests().is_empty(),
        "the redirect target was contacted: {:?}",
        target.requests()
    );
    // A same-origin redirect is followed, credentials kept.
    let o = get(&a.proxy, &format!("/v2/same/blobs/{dg}"), &auth);
    assert_eq!(o.status, 200);
    assert!(o.complete());
    let hop = up
        .requests()
        .into_iter()
        .find(|s| s.target.ends_with("?here=1"))
        .expect("same-origin hop");
    assert_eq!(hop.header("authorization"), Some("Bearer secret-13"));
    drop(a);

    // Listed (an IP literal must be listed as such), with its own CA.
    let a = start_agent(
        tmp.path(),
        &upstream,
        None,
        &pki.ca(),
        &format!(
            "redirect_hosts = [\"127.0.0.1\"]\nredirect_ca_file = {:?}\n",
            pki.ca().display().to_string()
        ),
        "",
    );
    let o = get(&a.proxy, &format!("/v2/app/blobs/{dg}"), &auth);
    assert_eq!(o.status, 200, "{:?}", String::from_utf8_lossy(&o.body));
    assert!(o.complete());
    assert_eq!(sha256(&o.body), dg);
    let seen = target.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].target.as_str()),
        ("GET", format!("/storage/{dg}").as_str())
    );
    assert_eq!(
        seen[0].header("authorization"),
        None,
        "Authorization crossed to another port"
    );
    let first = up
        .requests()
        .into_iter()
        .rfind(|s| s.target == format!("/v2/app/blobs/{dg}"))
        .unwrap();
    assert_eq!(first.header("authorization"), Some("Bearer secret-13"));
}

/// #18 point 5: the peer port never forwards the caller's `Authorization`.
/// Against a registry that wants credentials (distribution's `silly` auth
/// takes any), a peer-port GET with one is refused by the registry and
/// nothing is cached; before the fix it was served, and cached for every
/// node. The proxy port still passes containerd's credentials through.
#[test]
fn the_peer_port_never_forwards_credentials() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let authed = Registry::start_with(
        &s.dir,
        &format!("{}:5444", s.ns.ns_ip),
        Some(&s.pki),
        Some(&s.ns),
        "auth:\n  silly:\n    realm: https://auth.example/token\n    service: registry.shared-services\n",
    );
    let (layer, size) = layers(&s.registry.addr, "app", &s.digest, &s.pki)[0].clone();
    // The same image in the registry that wants credentials: a private
    // blob, which the peer port must not serve to a caller with any.
    let storage = authed.data.join("storage");
    fs::create_dir_all(&storage).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(s.registry.data.join("storage/."))
            .arg(&storage),
    );
    let ctd = Containerd::start(&s.dir);
    let cache = s.dir.join("peer-cache");
    let agent = Agent::start(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        "https://registry.shared-services:5444",
        Some(&authed.addr),
        &s.pki.ca(),
        &format!(
            "\n[cache]\ndir = {:?}\nmax_bytes = 1073741824\n[peers]\nlisten = \"127.0.0.1:0\"\n",
            cache.display().to_string()
        ),
    );
    let peer = addr_from_log(&agent.proc.log_text(), "slipway agent starting", " peers=")
        .expect("the agent logs its peer port");
    let target = format!("/v2/app/blobs/{layer}");
    let auth = [("Authorization", "Bearer a-guessed-password")];

    let r = http(&peer, "GET", &target, &auth).unwrap();
    assert_eq!(
        r.status, 401,
        "the peer port forwarded the caller's credentials"
    );
    assert_eq!(
        content_bytes_on_disk(&cache),
        0,
        "a blob fetched for a peer-port caller was cached"
    );

    // The proxy port is containerd's: its credentials pass.
    let r = http(&agent.proxy, "GET", &target, &auth).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, size);

    // #18 point 5: that blob is now in the node's cache, fetched with
    // credentials. The peer port does not serve it to a caller without
    // any, because the registry does not (before: 200, from the cache).
    wait_for(
        "the credentialed blob in the cache",
        Duration::from_secs(10),
        || content_bytes_on_disk(&cache) == size,
    );
    let r = http(&peer, "GET", &target, &[]).unwrap();
    assert_eq!(
        r.status, 404,
        "the peer port served a blob the registry serves only with credentials"
    );
    assert!(String::from_utf8_lossy(&r.body).contains("credentials"));
}

/// A blob of `bytes` put into `repo` of the TLS registry of `s`; its digest.
fn put_blob_bytes(s: &crate::TlsSetup, repo: &str, bytes: &[u8]) -> String {
    let file = s.dir.join("blob.bin");
    fs::write(&file, bytes).unwrap();
    let ip = s.registry.addr.split(':').next().unwrap();
    let digest = put_blob(
        "https://registry.shared-services:5443",
        &[
            "--resolve".into(),
            format!("registry.shared-services:5443:{ip}"),
        ],
        &s.pki.ca(),
        repo,
        &file,
    );
    fs::remove_file(&file).unwrap();
    digest
}

/// An agent for the TLS registry of `s` on `ctd`, with a cache at `cache`
/// capped at `max_bytes`, and `extra` tables (e.g. `[peers]`).
fn agent_with_cache(
    s: &crate::TlsSetup,
    ctd: &Containerd,
    cache: &Path,
    max_bytes: u64,
    extra: &str,
) -> Agent {
    Agent::start(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        "https://registry.shared-services:5443",
        Some(&s.registry.addr),
        &s.pki.ca(),
        &format!(
            "\n[cache]\ndir = {:?}\nmax_bytes = {max_bytes}\n{extra}",
            cache.display().to_string()
        ),
    )
}

/// Bytes of regular files under `dir`, temp files included.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    // Bounded: the cache has two levels.
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// #18 point 6: anyone who reaches the peer port could make the node fetch
/// at will (50 anonymous GETs of distinct digests made 50 upstream GETs).
/// With `peers.client_misses_per_sec = 2`, 50 such GETs cause at most the
/// configured rate of upstream requests (the rest are answered 429), and a
/// digest upstream just answered 404 for is answered from memory. A relay
/// ask (#23) never goes upstream.
#[test]
fn the_peer_port_limits_what_a_client_makes_the_node_fetch() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let agent = agent_with_cache(
        &s,
        &ctd,
        &s.dir.join("peer-cache"),
        1 << 30,
        "[peers]\nlisten = \"127.0.0.1:0\"\nclient_misses_per_sec = 2\n",
    );
    let peer = addr_from_log(&agent.proc.log_text(), "slipway agent starting", " peers=")
        .expect("the agent logs its peer port");
    let digests: Vec<String> = (0..50u32)
        .map(|i| {
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("missing-{i}")))
            )
        })
        .collect();
    let upstream = |ds: &[String]| -> usize {
        ds.iter()
            .map(|d| registry_blob_gets(&s.registry, d).0)
            .sum()
    };
    let t0 = std::time::Instant::now();
    let statuses: Vec<u16> = digests
        .iter()
        .map(|d| {
            http(&peer, "GET", &format!("/v2/app/blobs/{d}"), &[])
                .unwrap()
                .status
        })
        .collect();
    let took = t0.elapsed();
    let sent = upstream(&digests);
    let allowed = 2 + (2.0 * took.as_secs_f64()).floor() as usize;
    let limited = statuses.iter().filter(|s| **s == 429).count();
    eprintln!("50 distinct digests on the peer port in {took:?}: {sent} upstream GETs (at most {allowed} allowed), {limited} answered 429");
    assert!(sent <= allowed, "{sent} upstream GETs");
    assert!(limited >= 50 - allowed, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 404 || *s == 429),
        "{statuses:?}"
    );
    // Those upstream had no blob for are remembered: asked again, no
    // upstream request, and no allowance spent.
    let missing: Vec<&String> = digests
        .iter()
        .zip(&statuses)
        .filter(|(_, s)| **s == 404)
        .map(|(d, _)| d)
        .collect();
    assert!(!missing.is_empty());
    for d in &missing {
        let r = http(&peer, "GET", &format!("/v2/app/blobs/{d}"), &[]).unwrap();
        assert_eq!(r.status, 404);
    }
    assert_eq!(upstream(&digests), sent, "a remembered miss went upstream");
    // A blob the registry has is still served to a peer.
    let (layer, size) = layers(&s.registry.addr, "app", &s.digest, &s.pki)[0].clone();
    std::thread::sleep(Duration::from_secs(1));
    let r = http(&peer, "GET", &format!("/v2/app/blobs/{layer}"), &[]).unwrap();
    assert_eq!((r.status, r.body.len() as u64), (200, size));
    // #23: asked as a relay, the node serves only what it holds and
    // fetches nothing, whatever the asker claims to be; asked directly, it
    // spends the same allowance as a first ask.
    let others: Vec<String> = (0..20u32)
        .map(|i| {
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("relay-{i}")))
            )
        })
        .collect();
    for d in &others {
        let r = http(
            &peer,
            "GET",
            &format!("/v2/app/blobs/{d}"),
            &[("slipway-hop", "relay"), ("slipway-peer", "127.0.0.1:1")],
        )
        .unwrap();
        assert_eq!(r.status, 404, "a relay ask for a blob not held here");
    }
    assert_eq!(upstream(&others), 0, "a relay ask went upstream");
    std::thread::sleep(Duration::from_secs(1));
    let direct: Vec<u16> = others
        .iter()
        .map(|d| {
            http(
                &peer,
                "GET",
                &format!("/v2/app/blobs/{d}"),
                &[("slipway-hop", "direct")],
            )
            .unwrap()
            .status
        })
        .collect();
    let direct_limited = direct.iter().filter(|s| **s == 429).count();
    assert!(
        upstream(&others) <= 4 && direct_limited >= 16,
        "direct asks are limited like first asks: {direct:?}"
    );
}

/// #18 point 4: 20 connections each ask for a different uncached 16 MiB
/// blob and read nothing, with `cache.max_bytes` = 100 MiB. The cache
/// directory, temp files included, stays within the cap (before: every
/// download ran ahead of its reader into a temp file, 4.3 times the cap
/// with 50 clients of 32 MiB blobs), and a normal pull still works.
#[test]
fn never_reading_clients_keep_the_cache_directory_within_its_cap() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
    let blobs: Vec<String> = (0..20)
        .map(|_| {
            let mut b = Vec::with_capacity(16 << 20);
            while b.len() < 16 << 20 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.extend_from_slice(&x.to_le_bytes());
            }
            put_blob_bytes(&s, "app", &b)
        })
        .collect();
    let ctd = Containerd::start(&s.dir);
    let cache = s.dir.join("capped-cache");
    let cap: u64 = 100 << 20;
    let agent = agent_with_cache(&s, &ctd, &cache, cap, "");
    // Connections that ask and never read; dropped at the end.
    let held: Vec<TcpStream> = blobs
        .iter()
        .map(|d| {
            let mut c = TcpStream::connect(&agent.proxy).unwrap();
            write!(c, "GET /v2/app/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            c
        })
        .collect();
    let mut worst = 0;
    for _ in 0..30 {
        worst = worst.max(dir_bytes(&cache));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "20 never-reading clients of 16 MiB blobs: cache directory at most {} MiB (cap {} MiB)",
        worst >> 20,
        cap >> 20
    );
    assert!(
        worst <= cap,
        "{worst} bytes in the cache directory, cap {cap}"
    );
    // A normal pull, while they hold on.
    ctd.pull(&format!("{ALIAS}/app@{}", s.digest)).unwrap();
    drop(held);
}
