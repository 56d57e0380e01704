//! The long-running agent against real containerd, the real registry and
//! real TLS: the pull-through proxy, the cache, drift repair, signals and
//! hostile clients.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sha2::{Digest as _, Sha256};

use crate::harness::*;
use crate::{tls_setup, TlsSetup, ALIAS};

/// The agent dials the registry's IP but verifies TLS as the Service name,
/// as in a cluster (`registry.dial`); `extra` adds config.
fn agent_for(s: &TlsSetup, ctd: &Containerd, extra: &str) -> Agent {
    Agent::start(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        "https://registry.shared-services:5443",
        Some(&s.registry.addr),
        &s.pki.ca(),
        extra,
    )
}

fn cache_extra(s: &TlsSetup) -> String {
    format!(
        "\n[cache]\ndir = {:?}\nmax_bytes = 1073741824\n",
        s.dir.join("cache").display().to_string()
    )
}

/// Push an image with one `mib` MiB layer; that layer's digest and size.
fn big_blob(s: &TlsSetup, mib: usize) -> (String, u64) {
    let digest = push_layout(&big_layout(mib), &s.registry.addr, "big:v1", Some(&s.pki));
    layers(&s.registry.addr, "big", &digest, &s.pki)[0].clone()
}

fn cached_blobs(s: &TlsSetup) -> Vec<String> {
    fs::read_dir(s.dir.join("cache/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.ends_with(".type"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn proxy_serves_cri_pulls_by_digest_and_tag_and_skopeo() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let agent = agent_for(&s, &ctd, "");
    let hosts = fs::read_to_string(ctd.certs_dir.join(ALIAS).join("hosts.toml")).unwrap();
    let first = hosts.lines().find(|l| l.starts_with("[host.")).unwrap();
    assert_eq!(
        first,
        format!("[host.\"http://{}\"]", agent.proxy),
        "{hosts}"
    );

    let layers = layers(&s.registry.addr, "app", &s.digest, &s.pki);
    assert!(layers.len() >= 3, "{layers:?}");
    ctd.pull(&format!("{ALIAS}/app@{}", s.digest)).unwrap();
    // Every layer and the config came through the proxy, not the fallback host.
    let blobs =
        agent.metric("slipway_proxy_requests_total{method=\"GET\",route=\"blob\",status=\"200\"}");
    assert!(
        blobs >= (layers.len() + 1) as f64,
        "blob GETs through the proxy: {blobs}\n{}",
        agent.metrics()
    );
    ctd.pull(&format!("{ALIAS}/app:v1")).unwrap();
    assert!(
        agent.metric(
            "slipway_proxy_requests_total{method=\"HEAD\",route=\"manifest_tag\",status=\"200\"}"
        ) >= 1.0,
        "{}",
        agent.metrics()
    );
    assert!(agent.metric("slipway_last_successful_pull_timestamp_seconds") > 1.7e9);

    // skopeo as a second, independent client, over plain HTTP to the proxy.
    let out = s.dir.join("skopeo-copy");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{}/app@{}", agent.proxy, s.digest))
            .arg(format!("oci:{}:copy", out.display())),
    );
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"].as_str(),
        Some(s.digest.as_str()),
        "skopeo copied another manifest"
    );
    for (d, size) in &layers {
        let p = out
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        let b = fs::read(&p).unwrap();
        assert_eq!(b.len() as u64, *size);
        assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(&b))), *d);
    }
}

#[test]
fn registry_killed_mid_blob_aborts_the_client_and_caches_nothing() {
    if !prerequisites() {
        return;
    }
    let mut s = tls_setup();
    let big = big_layout(64);
    let digest = push_layout(&big, &s.registry.addr, "big:v1", Some(&s.pki));
    let (layer, size) = layers(&s.registry.addr, "big", &digest, &s.pki)[0].clone();
    assert!(size > 60 << 20);
    let ctd = Containerd::start(&s.dir);
    let agent = agent_for(&s, &ctd, &cache_extra(&s));
    // A client that reads slowly, so the transfer is still running when the
    // registry dies; backpressure keeps the proxy from buffering ahead.
    let mut c = TcpStream::connect(&agent.proxy).unwrap();
    write!(
        c,
        "GET /v2/big/blobs/{layer} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = 0usize;
    let mut buf = [0u8; 65536];
    while got < 4 << 20 {
        got += c.read(&mut buf).unwrap();
    }
    s.registry.proc.child.kill().unwrap();
    let _ = s.registry.proc.child.wait();
    let mut err = None;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    eprintln!("client got {got} of {size} bytes, then {err:?}");
    assert!(
        (got as u64) < size + 1024,
        "the response completed although the registry died"
    );
    // The failed download's task drops its temp file when it ends (#11:
    // downloads run in a task of their own, not in the client's request).
    let _ = std::panic::catch_unwind(|| {
        wait_for("the temp file removed", Duration::from_secs(10), || {
            fs::read_dir(s.dir.join("cache/tmp"))
                .map(|rd| rd.count() == 0)
                .unwrap_or(false)
        })
    });
    assert!(
        !cached_blobs(&s).contains(&layer.trim_start_matches("sha256:").to_string()),
        "truncated blob cached"
    );
    assert_eq!(
        fs::read_dir(s.dir.join("cache/tmp")).unwrap().count(),
        0,
        "temp file left behind"
    );
    // containerd too fails cleanly (an error, not a hang or a bad image).
    let e = ctd.pull(&format!("{ALIAS}/big@{digest}")).unwrap_err();
    eprintln!("CRI pull with the registry down: {e}");
}

#[test]
fn cached_image_pulls_through_cri_with_the_registry_down() {
    if !prerequisites() {
        return;
    }
    let mut s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let agent = agent_for(&s, &ctd, &cache_extra(&s));
    let image = format!("{ALIAS}/app@{}", s.digest);
    ctd.pull(&image).unwrap();
    let n = layers(&s.registry.addr, "app", &s.digest, &s.pki).len();
    // Commits happen just after each body ends.
    let _ = std::panic::catch_unwind(|| {
        wait_for("cache commits", Duration::from_secs(5), || {
            cached_blobs(&s).len() == n + 2
        })
    });
    assert_eq!(
        cached_blobs(&s).len(),
        n + 2,
        "manifest, config and {n} layers should be cached: {:?}",
        cached_blobs(&s)
    );
    s.registry.proc.child.kill().unwrap();
    let _ = s.registry.proc.child.wait();
    // A fresh containerd (empty content store) on the same node.
    let ctd2 = Containerd::start(&s.dir);
    let dst = ctd2.certs_dir.join(ALIAS);
    fs::create_dir_all(&dst).unwrap();
    for f in ["hosts.toml", "slipway-ca.crt"] {
        fs::copy(ctd.certs_dir.join(ALIAS).join(f), dst.join(f)).unwrap();
    }
    let hits = agent.metric("slipway_cache_hits_total");
    ctd2.pull(&image)
        .unwrap_or_else(|e| panic!("cached re-pull failed: {e}"));
    assert!(
        agent.metric("slipway_cache_hits_total") >= hits + (n + 2) as f64,
        "{}",
        agent.metrics()
    );
    // A tag is never answered from the cache.
    assert!(ctd2.pull(&format!("{ALIAS}/app:v1")).is_err());
}

#[test]
fn sigterm_drains_eight_in_flight_pulls_then_exits_0() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let (layer, size) = big_blob(&s, 16);
    let ctd = Containerd::start(&s.dir);
    let mut agent = agent_for(&s, &ctd, "\n[agent]\ngrace_period_secs = 20\n");
    let started = std::sync::Arc::new(std::sync::Barrier::new(9));
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (proxy, layer, started) = (agent.proxy.clone(), layer.clone(), started.clone());
        handles.push(std::thread::spawn(move || {
            let mut c = TcpStream::connect(&proxy).unwrap();
            write!(
                c,
                "GET /v2/big/blobs/{layer} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut all = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            let n = c.read(&mut buf).unwrap();
            all.extend_from_slice(&buf[..n]);
            started.wait();
            // Read slowly: about 2 s for the whole blob.
            loop {
                match c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        all.extend_from_slice(&buf[..n]);
                        std::thread::sleep(Duration::from_millis(30));
                    }
                    Err(e) => panic!("transfer broken: {e}"),
                }
            }
            all
        }));
    }
    started.wait();
    agent.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // Draining: no new connections are accepted.
    assert!(
        http(&agent.proxy, "GET", "/v2/", &[]).is_err(),
        "accepted a connection while draining"
    );
    for h in handles {
        let raw = h.join().unwrap();
        let r = parse_response(&raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len() as u64, size);
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&r.body))),
            layer
        );
    }
    assert_eq!(
        agent.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        agent.proc.log_text()
    );
}

#[test]
fn second_signal_exits_at_once() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let (layer, _) = big_blob(&s, 16);
    let ctd = Containerd::start(&s.dir);
    let mut agent = agent_for(&s, &ctd, "\n[agent]\ngrace_period_secs = 60\n");
    // A stalled reader keeps one transfer in flight forever.
    let mut c = TcpStream::connect(&agent.proxy).unwrap();
    write!(c, "GET /v2/big/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 1024];
    c.read_exact(&mut buf).unwrap();
    agent.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        agent.wait_exit(Duration::from_millis(100)),
        None,
        "exited without draining"
    );
    let t = Instant::now();
    agent.signal(Signal::SIGTERM);
    let code = agent.wait_exit(Duration::from_secs(5));
    assert!(code.is_some() && code != Some(0), "second signal: {code:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn managed_hosts_toml_is_restored_within_5s() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let agent = agent_for(&s, &ctd, "\n[agent]\nreconcile_interval_secs = 60\n");
    let p = ctd.certs_dir.join(ALIAS).join("hosts.toml");
    let good = fs::read_to_string(&p).unwrap();
    for (what, act) in [
        (
            "deleted",
            Box::new(|| fs::remove_file(&p).unwrap()) as Box<dyn Fn()>,
        ),
        (
            "altered",
            Box::new(|| {
                fs::write(
                    &p,
                    good.replace(
                        "capabilities = [\"pull\", \"resolve\"]",
                        "capabilities = [\"push\"]",
                    ),
                )
                .unwrap()
            }),
        ),
        (
            "truncated",
            Box::new(|| fs::write(&p, &good[..good.len() / 2]).unwrap()),
        ),
        (
            "ca deleted",
            Box::new(|| fs::remove_file(ctd.certs_dir.join(ALIAS).join("slipway-ca.crt")).unwrap()),
        ),
        (
            "dir deleted",
            Box::new(|| fs::remove_dir_all(ctd.certs_dir.join(ALIAS)).unwrap()),
        ),
    ] {
        act();
        let t = Instant::now();
        wait_for(
            &format!("{what} hosts.toml restored"),
            Duration::from_secs(5),
            || {
                fs::read_to_string(&p).ok().as_deref() == Some(good.as_str())
                    && ctd.certs_dir.join(ALIAS).join("slipway-ca.crt").exists()
            },
        );
        eprintln!("{what}: restored after {:?}", t.elapsed());
    }
    // Replaced by someone else's file (no slipway marker): that file is
    // theirs now, so slipway merges into it rather than overwriting it.
    fs::write(
        &p,
        "# admin's own\nserver = \"https://registry.shared-services:5000\"\n",
    )
    .unwrap();
    wait_for("merge into the replacement", Duration::from_secs(5), || {
        fs::read_to_string(&p)
            .map(|t| {
                t.starts_with("# slipway: merged")
                    && t.contains("# admin's own")
                    && t.contains(&format!("[host.\"http://{}\"]", agent.proxy))
            })
            .unwrap_or(false)
    });
    ctd.pull(&format!("{ALIAS}/app@{}", s.digest)).unwrap();
    assert!(
        agent.proc.log_text().contains("drifted; restored"),
        "{}",
        agent.proc.log_text()
    );
}

#[test]
fn hostile_requests_get_errors_and_cause_no_upstream_traffic() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let agent = agent_for(&s, &ctd, "");
    // Let the start-up probe of /v2/ land before counting.
    wait_for("upstream probe", Duration::from_secs(10), || {
        registry_requests(&s.registry) > 1
    });
    std::thread::sleep(Duration::from_millis(200));
    let before = registry_requests(&s.registry);
    let d = &s.digest;
    let cases: Vec<(String, u16)> = vec![
        ("PUT /v2/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(), 405),
        ("POST /v2/app/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(), 405),
        (format!("DELETE /v2/app/manifests/{d} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 405),
        ("GET /v2/../../etc/passwd/blobs/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), 400),
        ("GET /v2/app/%2e%2e/%2e%2e/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), 400),
        ("GET /v2/_catalog HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), 404),
        (format!("GET http://127.0.0.1:1/v2/app/manifests/{d} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 400),
        ("GET https://evil.example/v2/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".to_string(), 400),
        ("GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".replace("/v2/ ", "/v2/?ns=evil.example:443 "), 403),
        (format!("GET /v2/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(100 * 1024)), 431),
    ];
    for (raw, want) in &cases {
        let line = raw
            .lines()
            .next()
            .unwrap()
            .chars()
            .take(80)
            .collect::<String>();
        match http_raw(&agent.proxy, raw.as_bytes()) {
            Ok(r) => {
                assert_eq!(
                    r.status,
                    *want,
                    "{line}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                if r.status != 431 {
                    let body: serde_json::Value = serde_json::from_slice(&r.body)
                        .unwrap_or_else(|_| panic!("{line}: not a registry error body"));
                    assert!(body["errors"][0]["code"].is_string(), "{line}: {body}");
                }
            }
            // hyper may answer an oversized head by closing the connection.
            Err(e) => assert_eq!(*want, 431, "{line}: {e}"),
        }
    }
    // A foreign Host header does not choose the destination: it is the configured upstream that answers.
    let r = http(
        &agent.proxy,
        "GET",
        "/v2/",
        &[("X-Forwarded-Host", "evil.example")],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let after_allowed = registry_requests(&s.registry);
    assert_eq!(
        after_allowed,
        before + 1,
        "refused requests reached the registry"
    );

    // Slowloris: a client trickling its request head does not block others
    // and is cut off (client_header_timeout_secs = 1).
    let mut slow = TcpStream::connect(&agent.proxy).unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let r = http(&agent.proxy, "GET", "/v2/", &[]).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "slowloris blocked another client"
    );
    let mut closed = false;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        if slow.write_all(b"X-A: b\r\n").is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 512];
        slow.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        if let Ok(n) = slow.read(&mut b) {
            closed = true;
            let _ = n;
            break;
        }
    }
    assert!(closed, "slowloris connection was never cut off");
}

#[test]
fn rotated_ca_and_sighup_reload_without_restart() {
    if !prerequisites() {
        return;
    }
    let mut s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    // The agent's CA lives in its own directory, as a ConfigMap mount.
    let ca_dir = s.dir.join("ca-mount");
    fs::create_dir_all(&ca_dir).unwrap();
    fs::copy(s.pki.ca(), ca_dir.join("ca.crt")).unwrap();
    let agent = Agent::start(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        "https://registry.shared-services:5443",
        Some(&s.registry.addr),
        &ca_dir.join("ca.crt"),
        "",
    );
    ctd.pull(&format!("{ALIAS}/app@{}", s.digest)).unwrap();
    // New CA and certificate; the registry restarts with them.
    let pki2 = Pki::new(
        &s.dir.join("pki2"),
        &["registry.shared-services"],
        &[&s.ns.ns_ip],
    );
    s.registry.proc.stop();
    let data = s.registry.data.clone();
    let reg2 = Registry::start(&s.dir, &s.registry.addr, Some(&pki2), Some(&s.ns));
    let digest2 = push(&reg2.addr, "app:v2", Some(&pki2));
    let _ = data;
    let new_ca = fs::read(pki2.ca()).unwrap();
    // Replace the file the way kubelet updates a ConfigMap volume: rename.
    fs::write(ca_dir.join(".ca.crt.new"), &new_ca).unwrap();
    fs::rename(ca_dir.join(".ca.crt.new"), ca_dir.join("ca.crt")).unwrap();
    let written = ctd.certs_dir.join(ALIAS).join("slipway-ca.crt");
    let pem = String::from_utf8(new_ca).unwrap();
    wait_for(
        "new CA written for containerd",
        Duration::from_secs(5),
        || {
            fs::read_to_string(&written)
                .map(|t| t.contains(pem.lines().nth(1).unwrap()))
                .unwrap_or(false)
        },
    );
    ctd.pull(&format!("{ALIAS}/app@{digest2}"))
        .unwrap_or_else(|e| panic!("after CA rotation: {e}\n{}", agent.proc.log_text()));
    assert!(
        agent.metric("slipway_proxy_requests_total{method=\"GET\",route=\"blob\",status=\"200\"}")
            > 0.0
    );

    // SIGHUP: a new alias in the config file appears without a restart.
    let text = fs::read_to_string(&agent.config).unwrap().replace(
        &format!("aliases = [\"{ALIAS}\"]"),
        &format!("aliases = [\"{ALIAS}\", \"203.0.113.7:5000\"]"),
    );
    fs::write(&agent.config, text).unwrap();
    agent.signal(Signal::SIGHUP);
    let added = ctd.certs_dir.join("203.0.113.7:5000/hosts.toml");
    let t = Instant::now();
    while !added.exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        added.exists(),
        "alias not added on SIGHUP:\n{}",
        agent.proc.log_text()
    );
    // A broken config on SIGHUP keeps the running one.
    fs::write(&agent.config, "[registry\n").unwrap();
    agent.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent
        .proc
        .log_text()
        .contains("config reload failed, keeping the running config"));
    assert_eq!(
        http(&agent.admin, "GET", "/healthz", &[]).unwrap().status,
        200
    );
}

#[test]
fn readiness_and_metrics_reflect_the_node() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let agent = agent_for(&s, &ctd, "");
    wait_for("ready", Duration::from_secs(10), || {
        http(&agent.admin, "GET", "/readyz", &[])
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    let m = agent.metrics();
    for name in [
        "slipway_proxy_requests",
        "slipway_proxy_bytes",
        "slipway_upstream_response_seconds",
        "slipway_proxy_in_flight_requests",
        "slipway_cache_hits",
        "slipway_cache_misses",
        "slipway_cache_size_bytes",
        "slipway_cache_evictions",
        "slipway_last_successful_pull_timestamp_seconds",
        "slipway_hostconfig_state",
        "slipway_containerd_config_path_covered",
        "slipway_ca_expiry_timestamp_seconds",
        "slipway_build_info",
    ] {
        assert!(
            m.contains(&format!("# HELP {name} ")),
            "{name} missing:\n{m}"
        );
    }
    assert_eq!(agent.metric("slipway_containerd_config_path_covered"), 1.0);
    assert_eq!(
        agent.metric(&format!(
            "slipway_hostconfig_state{{alias=\"{ALIAS}\",state=\"applied\"}}"
        )),
        1.0
    );
    assert!(agent.metric("slipway_ca_expiry_timestamp_seconds") > 1.7e9);
    // Probes are not access-logged.
    let log = agent.proc.log_text();
    assert!(
        !log.contains("/healthz") && !log.contains("/readyz"),
        "{log}"
    );
    // A containerd whose config_path does not cover certs_dir: not ready.
    let ctd2 = Containerd::start_opts(&s.dir, false);
    let agent2 = Agent::start(
        &s.dir,
        &ctd2.certs_dir,
        &ctd2.config_file,
        &[ALIAS],
        "https://registry.shared-services:5443",
        Some(&s.registry.addr),
        &s.pki.ca(),
        "",
    );
    let r = http(&agent2.admin, "GET", "/readyz", &[]).unwrap();
    assert_eq!(r.status, 503);
    assert!(String::from_utf8_lossy(&r.body).contains("containerd_config_path_covers_certs_dir"));
    assert_eq!(agent2.metric("slipway_containerd_config_path_covered"), 0.0);
}

#[test]
fn non_loopback_proxy_address_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let pki = Pki::new(&d.path().join("pki"), &["registry"], &[]);
    let cfg = agent_config(
        d.path(),
        &d.path().join("certs.d"),
        &d.path().join("c.toml"),
        &[ALIAS],
        "https://registry:5000",
        &pki.ca(),
    );
    let mut t = fs::read_to_string(&cfg).unwrap();
    t.push_str("\n[proxy]\nlisten = \"0.0.0.0:0\"\n");
    fs::write(&cfg, t).unwrap();
    let out = slipway(&["agent", "--config", cfg.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("proxy.listen: 0.0.0.0:0: not a loopback address"));
    assert!(!d.path().join("certs.d").exists());
}

/// Range, the headers containerd relies on, and auth pass through the
/// proxy unchanged; compared with the same requests sent to the registry.
#[test]
fn range_headers_and_auth_pass_through() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let agent = agent_for(&s, &ctd, &cache_extra(&s));
    let (layer, size) = layers(&s.registry.addr, "app", &s.digest, &s.pki)[0].clone();
    let blob = format!("/v2/app/blobs/{layer}");
    // Range on the upstream path (not cached yet) and again from the cache.
    for pass in ["upstream", "cache"] {
        let r = http(&agent.proxy, "GET", &blob, &[("Range", "bytes=10-109")]).unwrap();
        assert_eq!(r.status, 206, "{pass}");
        assert_eq!(r.body.len(), 100, "{pass}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes 10-109/{size}").as_str()),
            "{pass}"
        );
        if pass == "upstream" {
            // Fill the cache with a full GET.
            let full = http(&agent.proxy, "GET", &blob, &[]).unwrap();
            assert_eq!(full.body.len() as u64, size);
            assert_eq!(&full.body[10..110], &r.body[..]);
            // The blob is committed (verified, fsynced, renamed) after its
            // body ends; until then a Range is served from the download
            // itself (#11), not counted as a cache hit.
            let cached = s
                .dir
                .join("cache/sha256")
                .join(layer.trim_start_matches("sha256:"));
            wait_for(
                "the blob committed to the cache",
                Duration::from_secs(10),
                || cached.is_file(),
            );
        }
    }
    assert!(agent.metric("slipway_cache_hits_total") >= 1.0);
    // HEAD and GET of a manifest keep Content-Length, Content-Type and
    // Docker-Content-Digest exactly as the registry sends them.
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let m = format!("/v2/app/manifests/{}", s.digest);
    for method in ["HEAD", "GET"] {
        let via = http(&agent.proxy, method, &m, &[("Accept", accept)]).unwrap();
        let direct = run_ok(
            Command::new("curl")
                .args([
                    "-sS",
                    "-D",
                    "-",
                    "-o",
                    "/dev/null",
                    "-H",
                    &format!("Accept: {accept}"),
                    "--cacert",
                ])
                .arg(s.pki.ca())
                .args(if method == "HEAD" { vec!["-I"] } else { vec![] })
                .arg(format!("https://{}{m}", s.registry.addr)),
        );
        let direct = parse_response(format!("{direct}\r\n\r\n").as_bytes()).unwrap();
        assert_eq!(via.status, 200, "{method}");
        for h in ["content-length", "content-type", "docker-content-digest"] {
            assert_eq!(via.header(h), direct.header(h), "{method} {h}");
        }
    }

    // A registry that demands auth: the challenge comes back through the
    // proxy, and the client's Authorization goes through to the registry.
    let ns = &s.ns;
    let authed = Registry::start_with(&s.dir, &format!("{}:5444", ns.ns_ip), Some(&s.pki), Some(ns),
        "auth:\n  silly:\n    realm: https://auth.example/token\n    service: registry.shared-services\n");
    let ctd2 = Containerd::start(&s.dir);
    let a2 = Agent::start(
        &s.dir,
        &ctd2.certs_dir,
        &ctd2.config_file,
        &[ALIAS],
        "https://registry.shared-services:5444",
        Some(&authed.addr),
        &s.pki.ca(),
        "",
    );
    let r = http(&a2.proxy, "GET", "/v2/", &[]).unwrap();
    assert_eq!(r.status, 401);
    let challenge = r
        .header("www-authenticate")
        .expect("WWW-Authenticate dropped");
    assert!(
        challenge.contains("realm=\"https://auth.example/token\""),
        "{challenge}"
    );
    let r = http(&a2.proxy, "HEAD", "/v2/", &[]).unwrap();
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate").is_some(),
        "WWW-Authenticate dropped on HEAD"
    );
    let r = http(
        &a2.proxy,
        "GET",
        "/v2/",
        &[("Authorization", "Bearer anything")],
    )
    .unwrap();
    assert_eq!(r.status, 200, "Authorization not passed through");
}

/// Object-storage backends answer blob GETs with a redirect; the proxy
/// follows it to a host in `proxy.redirect_hosts` (#13). Here nginx (serving
/// TLS with a cluster-CA certificate) stands in front of the registry and
/// redirects every blob to it, at its IP literal, which is listed.
#[test]
fn upstream_redirects_are_followed() {
    if !prerequisites_with(&["nginx"]) {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    // nginx cannot listen on port 0 and say which port it got.
    let front = unique_loopback_addr();
    let d = s.dir.join("nginx");
    fs::create_dir_all(&d).unwrap();
    let conf = d.join("nginx.conf");
    fs::write(&conf, format!(r#"
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
  server {{
    listen {front} ssl;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    location ~ ^/v2/.*/blobs/ {{ return 307 https://{reg}$request_uri; }}
    location /v2/ {{
      proxy_pass https://{reg};
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_name registry.shared-services;
    }}
  }}
}}
"#, d = d.display(), crt = s.pki.dir.join("tls.crt").display(), key = s.pki.dir.join("tls.key").display(), ca = s.pki.ca().display(), reg = s.registry.addr)).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&conf).arg("-p").arg(&d);
    let _nginx = Proc::spawn("nginx", cmd, d.join("nginx.log"));
    let f = front.clone();
    wait_for("nginx", Duration::from_secs(10), || {
        TcpStream::connect(&f).is_ok()
    });
    let agent = Agent::start(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        "https://registry.shared-services:1",
        Some(&front),
        &s.pki.ca(),
        &format!(
            "redirect_hosts = [{:?}]\nredirect_ca_file = {:?}\n",
            s.ns.ns_ip,
            s.pki.ca().display().to_string()
        ),
    );
    // The TLS name check still applies: the dial address is nginx.
    ctd.pull(&format!("{ALIAS}/app@{}", s.digest))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.log_text()));
    let redirects = fs::read_to_string(d.join("access.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(" 307 "))
        .count();
    assert!(redirects >= 3, "blob GETs were not redirected: {redirects}");
    assert!(
        agent.metric("slipway_proxy_requests_total{method=\"GET\",route=\"blob\",status=\"200\"}")
            >= 3.0,
        "{}",
        agent.metrics()
    );
}
