//! Benchmark of `slipway gateway` (#10): a push of one 256 MiB layer
//! through the gateway (TLS, write guard, relay to the registry on
//! plain-http loopback) against the same push directly to the registry
//! serving TLS itself, as the seed ran it. Each run uses fresh registries
//! (a second push of a blob the registry has is skipped by skopeo's HEAD),
//! alternating direct and gateway; median of 3, in one run.
//!
//! Run as root after the README's set-up: `cargo bench --bench gateway`
//! (`SLIPWAY_BENCH_MIB=…` changes the layer size, default 256).

#[path = "harness.rs"]
mod harness;

// Its #[test]s compile out here; the helpers are shared.
#[allow(dead_code, unused_imports)]
#[path = "gateway.rs"]
mod gateway;

use std::process::Command;
use std::time::Instant;

use harness::*;

#[allow(dead_code)]
pub(crate) const ALIAS: &str = "registry.shared-services:5000";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn timed_push(layout: &std::path::Path, registry: &str, pki: &Pki, creds: Option<&str>) -> f64 {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-cert-dir"])
        .arg(pki.trust_dir());
    if let Some(c) = creds {
        cmd.args(["--dest-creds", c]);
    }
    cmd.arg(format!("oci:{}:app", layout.display()))
        .arg(format!("docker://{registry}/big:v1"));
    let t0 = Instant::now();
    run_ok(&mut cmd);
    t0.elapsed().as_secs_f64()
}

fn main() {
    if !prerequisites() {
        std::process::exit(2);
    }
    let mib: usize = std::env::var("SLIPWAY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = gateway::gateway_pki(dir);
    let layout = big_layout(mib);
    let creds = format!("{}:{}", gateway::USER, gateway::PASSWORD);
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    let mut peak_rss_kib = 0u64;
    for i in 0..3 {
        let run_dir = dir.join(format!("run{i}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let tls_registry = Registry::start(&run_dir, "127.0.0.1:0", Some(&pki), None);
        let plain = Registry::start(&run_dir, "127.0.0.1:0", None, None);
        let gw = gateway::Gateway::start(&run_dir, &plain.addr, &pki);
        // Alternate which goes first: the page cache favours the second.
        if i % 2 == 0 {
            direct.push(timed_push(&layout, &tls_registry.addr, &pki, None));
            through.push(timed_push(&layout, &gw.addr, &pki, Some(&creds)));
        } else {
            through.push(timed_push(&layout, &gw.addr, &pki, Some(&creds)));
            direct.push(timed_push(&layout, &tls_registry.addr, &pki, None));
        }
        peak_rss_kib = peak_rss_kib.max(rss_hwm_kib(gw.proc.child.id()));
    }
    let (d, g) = (median(direct.clone()), median(through.clone()));
    println!("push of a {mib} MiB layer (skopeo, median of 3):");
    println!("  direct to the registry serving TLS: {d:.2} s  {direct:.2?}");
    println!("  through slipway gateway:            {g:.2} s  {through:.2?}");
    println!("  ratio gateway/direct: {:.3} (limit 1.10)", g / d);
    println!("  gateway peak RSS: {} MiB", peak_rss_kib / 1024);
}

fn rss_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}
