//! The canary against real containerd and the TLS registry (#8, points 4
//! and 5): `slipway canary push` gives the same digest every time and the
//! image pulls through CRI; the agent's `/readyz` is 503 naming the canary
//! while its pull fails, and 200 only once a CRI pull of it succeeded.
//! Runs on the release under test (`SLIPWAY_CONTAINERD`).

use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use crate::{tls_setup, TlsSetup, ALIAS};

fn canary_push(s: &TlsSetup) -> String {
    let out = slipway(&[
        "canary",
        "push",
        "--upstream",
        &format!("https://{}", s.registry.addr),
        "--ca-file",
        s.pki.ca().to_str().unwrap(),
        "--name-as",
        ALIAS,
    ]);
    assert!(
        out.status.success(),
        "canary push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn readyz(a: &Agent) -> (u16, String) {
    let r = http(&a.admin, "GET", "/readyz", &[]).unwrap();
    (r.status, String::from_utf8_lossy(&r.body).to_string())
}

fn canary_agent(s: &TlsSetup, ctd: &Containerd, image: &str) -> Agent {
    Agent::start_env(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        "https://registry.shared-services:5443",
        Some(&s.registry.addr),
        &s.pki.ca(),
        "",
        &[
            ("SLIPWAY_CONTAINERD_SOCKET", ctd.sock.to_str().unwrap()),
            ("SLIPWAY_AGENT_CANARY_IMAGE", image),
        ],
    )
}

#[test]
fn canary_push_is_deterministic_and_the_image_pulls_through_cri() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let first = canary_push(&s);
    let second = canary_push(&s);
    assert_eq!(first, second, "the same bytes gave another digest");
    let (name, digest) = first.split_once('@').unwrap();
    assert_eq!(name, format!("{ALIAS}/slipway/canary"));
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{first}"
    );
    // The registry serves it under that digest, as an index of two
    // platforms.
    let raw = run_ok(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--cert-dir"])
            .arg(s.pki.trust_dir())
            .arg(format!(
                "docker://{}/slipway/canary@{digest}",
                s.registry.addr
            )),
    );
    let sha = {
        use sha2::Digest as _;
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(raw.as_bytes()))
        )
    };
    assert_eq!(
        sha, digest,
        "the registry's bytes are not the printed digest"
    );
    let index: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{raw}");
    eprintln!("canary push printed {first}");

    // And containerd pulls it by that digest through slipway's host file.
    let ctd = Containerd::start(&s.dir);
    let cfg = agent_config(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        &format!("https://{}", s.registry.addr),
        &s.pki.ca(),
    );
    let out = slipway(&["agent", "--once", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = ctd
        .pull(&first)
        .unwrap_or_else(|e| panic!("CRI pull of the canary {first}: {e}"));
    eprintln!("containerd {} pulled the canary: {r}", ctd.release.name);
}

#[test]
fn readyz_follows_the_canary_pull() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);

    // A digest nobody pushed: every other check passes, the canary fails
    // and /readyz names it with containerd's error.
    let missing = format!("{ALIAS}/slipway/canary@sha256:{}", "0".repeat(64));
    let a = canary_agent(&s, &ctd, &missing);
    let mut last = (0, String::new());
    // The upstream probe may answer a moment after the first canary.
    wait_for(
        "/readyz fails on the canary alone",
        Duration::from_secs(40),
        || {
            last = readyz(&a);
            last.1.starts_with("not ready: canary\n") && last.1.contains("canary: CRI PullImage")
        },
    );
    eprintln!(
        "missing canary on containerd {}: {last:?}",
        ctd.release.name
    );
    assert_eq!(last.0, 503);
    assert!(last.1.starts_with("not ready: canary\n"), "{}", last.1);
    assert!(last.1.contains(&missing), "{}", last.1);
    assert!(a.metrics().contains("slipway_canary_pull_seconds_count 1"));
    assert_eq!(
        a.metric("slipway_canary_last_success_timestamp_seconds"),
        0.0
    );
    drop(a);

    // The pushed canary: 503 until its pull succeeded, then 200.
    let image = canary_push(&s);
    let a = canary_agent(&s, &ctd, &image);
    let mut seen_not_ready_for_canary = false;
    let mut ready = false;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(40) {
        let (status, body) = readyz(&a);
        if status == 200 {
            ready = true;
            break;
        }
        if body.contains("canary: ") {
            seen_not_ready_for_canary = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready, "never ready:\n{}", a.proc.log_text());
    // Ready implies the canary had succeeded: the success time was set, and
    // the proxy served the canary's manifest.
    assert!(a.metric("slipway_canary_last_success_timestamp_seconds") > 1.7e9);
    assert!(a.metric("slipway_last_successful_pull_timestamp_seconds") > 1.7e9);
    let log = a.proc.log_text();
    assert!(log.contains("canary pulled through CRI"), "{log}");
    eprintln!(
        "canary on containerd {}: 503 naming the canary before the pull: {seen_not_ready_for_canary}; 200 after {:?}",
        ctd.release.name,
        started.elapsed()
    );
    // The agent removed it again: a pull now fetches through the proxy.
    ctd.pull(&image).unwrap();
}

/// #18 point 11: a proxy that fails every request (here its upstream
/// address refuses connections) while containerd can reach the registry
/// directly, the next host in hosts.toml. containerd's pull succeeds past
/// the proxy; before, the canary passed and `/readyz` showed the canary as
/// fine. Now the canary fails, naming the proxy.
#[test]
fn a_pull_that_falls_back_past_the_proxy_fails_the_canary() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let image = canary_push(&s);
    // Port 9 (discard) on loopback: nothing listens, connections are refused.
    let dead = "127.0.0.1:9";
    let a = Agent::start_env(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        &format!("https://{}", s.registry.addr),
        Some(dead),
        &s.pki.ca(),
        "",
        &[
            ("SLIPWAY_CONTAINERD_SOCKET", ctd.sock.to_str().unwrap()),
            ("SLIPWAY_AGENT_CANARY_IMAGE", &image),
        ],
    );
    let mut last = (0, String::new());
    wait_for(
        "/readyz names the canary's pull past the proxy",
        Duration::from_secs(40),
        || {
            last = readyz(&a);
            last.1.contains("canary: CRI PullImage") && last.1.contains("not through the proxy")
        },
    );
    eprintln!(
        "fallback past the proxy on containerd {}: {last:?}",
        ctd.release.name
    );
    assert_eq!(last.0, 503);
    assert!(
        last.1
            .contains(&format!("not through the proxy http://{}", a.proxy)),
        "{}",
        last.1
    );
    assert_eq!(
        a.metric("slipway_canary_last_success_timestamp_seconds"),
        0.0
    );
    assert!(!a.proc.log_text().contains("canary pulled through CRI"));
    // containerd did pull it, from the next host: the proxy path is what
    // failed, not the image.
    ctd.pull(&image).unwrap();
}
