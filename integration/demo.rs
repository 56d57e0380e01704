//! The local pull demo (README, first command; run it with
//! `bash integration/demo.sh` as root).
//!
//! It starts the Debian distribution registry serving TLS with a
//! certificate from `slipway pki init`, inside a network namespace so it has
//! a non-loopback "LoadBalancer" IP, pushes an image with skopeo, and starts
//! containerd with its CRI plugin. Then, through CRI `PullImage` (the call
//! kubelet makes), it shows the seed's two failures, runs
//! `slipway agent --once`, and pulls the same digest again; then runs the
//! long-running agent and pulls through its node-local proxy. Everything it
//! starts is stopped when it ends.

#[path = "harness.rs"]
mod harness;

use harness::*;
use std::process::Command;

fn step(n: u32, s: &str) {
    println!("\n=== {n}. {s}");
}

fn main() {
    if !prerequisites() {
        std::process::exit(2);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ns = NetNs::new();

    step(1, "slipway pki init: the registry CA and certificate");
    let pki = Pki::new(
        &dir.join("pki"),
        &[
            "registry.shared-services",
            "registry.shared-services.svc.cluster.local",
        ],
        &[&ns.ns_ip],
    );
    println!(
        "{}",
        run_ok(
            Command::new("openssl")
                .args([
                    "x509",
                    "-noout",
                    "-subject",
                    "-ext",
                    "subjectAltName",
                    "-in"
                ])
                .arg(pki.dir.join("tls.crt"))
        )
        .trim()
    );

    step(
        2,
        "the registry (distribution 2.8) over TLS, and an image pushed with skopeo",
    );
    let tls = Registry::start(dir, &format!("{}:5443", ns.ns_ip), Some(&pki), Some(&ns));
    let digest = push(&tls.addr, "app:v1", Some(&pki));
    println!("pushed {}/app:v1 = {digest}", tls.addr);

    let ctd = Containerd::start(dir);
    step(
        3,
        &format!(
            "{} with its CRI plugin; config_path = certs.d (empty)",
            ctd.release.describe()
        ),
    );
    println!("socket {}", ctd.sock.display());

    let image = format!("registry.shared-services:5000/app@{digest}");
    step(4, &format!("CRI PullImage {image}"));
    match ctd.pull(&image) {
        Ok(r) => panic!("unexpected success: {r}"),
        Err(e) => println!("FAILED (as in the seed): {e}"),
    }

    step(
        5,
        "the seed's workaround: the registry over plain HTTP on a LoadBalancer IP",
    );
    let plain = Registry::start(dir, &format!("{}:5000", ns.ns_ip), None, Some(&ns));
    let plain_digest = push(&plain.addr, "app:v1", None);
    let plain_image = format!("{}/app@{plain_digest}", plain.addr);
    println!("CRI PullImage {plain_image}");
    match ctd.pull(&plain_image) {
        Ok(r) => panic!("unexpected success: {r}"),
        Err(e) => println!("FAILED (as in the seed): {e}"),
    }
    drop(plain);

    step(6, "slipway agent --once");
    let cfg = agent_config(
        dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &["registry.shared-services:5000", &tls.addr],
        &format!("https://{}", tls.addr),
        &pki.ca(),
    );
    println!("{}", std::fs::read_to_string(&cfg).unwrap());
    let out = slipway(&["agent", "--once", "--config", cfg.to_str().unwrap()]);
    print!("{}", String::from_utf8_lossy(&out.stderr));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hosts = ctd
        .certs_dir
        .join("registry.shared-services:5000/hosts.toml");
    println!(
        "\n{}:\n{}",
        hosts.display(),
        std::fs::read_to_string(&hosts).unwrap()
    );

    step(7, &format!("CRI PullImage {image}"));
    let r = ctd
        .pull(&image)
        .unwrap_or_else(|e| panic!("pull failed: {e}"));
    println!("OK: pulled, image id {r}");
    let ip_image = format!("{}/app@{digest}", tls.addr);
    println!("CRI PullImage {ip_image}");
    let r = ctd
        .pull(&ip_image)
        .unwrap_or_else(|e| panic!("pull failed: {e}"));
    println!("OK: pulled over HTTPS with the cluster CA, image id {r}");

    step(8, "slipway cleanup");
    let out = slipway(&["cleanup", "--config", cfg.to_str().unwrap()]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success());

    step(
        9,
        "slipway agent (the DaemonSet process): the same pull through its node-local proxy",
    );
    let ctd2 = Containerd::start(dir);
    let agent = Agent::start(
        dir,
        &ctd2.certs_dir,
        &ctd2.config_file,
        &["registry.shared-services:5000"],
        "https://registry.shared-services:5443",
        Some(&tls.addr),
        &pki.ca(),
        "",
    );
    let hosts = ctd2
        .certs_dir
        .join("registry.shared-services:5000/hosts.toml");
    println!(
        "{}:\n{}",
        hosts.display(),
        std::fs::read_to_string(&hosts).unwrap()
    );
    println!("CRI PullImage {image} (fresh containerd)");
    let r = ctd2
        .pull(&image)
        .unwrap_or_else(|e| panic!("pull failed: {e}"));
    println!("OK: pulled through the proxy, image id {r}");
    for l in agent
        .metrics()
        .lines()
        .filter(|l| l.starts_with("slipway_proxy_requests_total{") && !l.ends_with(" 0"))
    {
        println!("  {l}");
    }
    println!(
        "\ndemo finished: the seed's failures, then a pull by digest through CRI with slipway"
    );
}
