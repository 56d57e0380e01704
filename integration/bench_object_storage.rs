//! Benchmark of the registry on an object store (#22): push and cold pull
//! of one image of `SLIPWAY_BENCH_MIB` MiB (default 1024, in 8 layers of
//! incompressible data) with 1 and with 3 replicas (distribution 2.8 with
//! the s3 driver, each behind its `slipway gateway`) on one SeaweedFS S3
//! gateway, through a per-connection round-robin balancer (what a Service
//! does). skopeo pushes and pulls, several layers at once. Each replica
//! count gets its own tree in the bucket, so the second run finds nothing
//! of the first. The figures are throughputs and the ratio 3 : 1, measured
//! in one run.
//!
//! Run as root after the README's set-up: `cargo bench --bench
//! object_storage`. Needs about 3 × `SLIPWAY_BENCH_MIB` free on the temp
//! directory's disk.

#[path = "harness.rs"]
mod harness;

// Their #[test]s compile out here; the replicas and clients are shared.
#[allow(dead_code, unused_imports)]
#[path = "gateway.rs"]
mod gateway;

#[allow(dead_code, unused_imports)]
#[path = "object_storage.rs"]
mod object_storage;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use object_storage::{Balancer, Replica};

pub(crate) const ALIAS: &str = "registry.shared-services:5000";

fn skopeo(args: &[String]) -> Duration {
    let started = Instant::now();
    let out = run(Command::new("skopeo").args(args));
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

fn main() {
    if !prerequisites_with(&["weed"]) {
        return;
    }
    let mib: usize = std::env::var("SLIPWAY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let layers = 8;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = Seaweed::start(dir);
    let pki = gateway::gateway_pki(dir);
    eprintln!("building a {mib} MiB image ({layers} layers)…");
    let layout = umoci_layout(&dir.join("image"), &vec![(mib << 20) / layers; layers]);
    let creds = format!("{}:{}", gateway::USER, gateway::PASSWORD);
    let mut rows = Vec::new();
    for n in [1usize, 3] {
        let root = format!("/bench-{n}");
        let rs: Vec<Replica> = (0..n)
            .map(|i| Replica::start_at(&dir.join(format!("run-{n}")), &store, &pki, i, &root))
            .collect();
        let lb = Balancer::start(rs.iter().map(|r| r.gw.addr.clone()).collect());
        let image = format!("docker://{}/bench/app:1", lb.addr);
        let push = skopeo(&[
            "copy".into(),
            "--quiet".into(),
            "--dest-cert-dir".into(),
            pki.trust_dir().display().to_string(),
            "--dest-creds".into(),
            creds.clone(),
            format!("oci:{}:app", layout.display()),
            image.clone(),
        ]);
        let out = dir.join(format!("pulled-{n}"));
        let pull = skopeo(&[
            "copy".into(),
            "--quiet".into(),
            "--src-cert-dir".into(),
            pki.trust_dir().display().to_string(),
            image,
            format!("dir:{}", out.display()),
        ]);
        std::fs::remove_dir_all(&out).unwrap();
        let served: Vec<usize> = rs.iter().map(|r| registry_requests(&r.registry)).collect();
        let mbps = |d: Duration| mib as f64 / d.as_secs_f64();
        eprintln!(
            "{n} replica(s): push {:.1} s ({:.1} MiB/s), cold pull {:.1} s ({:.1} MiB/s); requests per replica {served:?}",
            push.as_secs_f64(),
            mbps(push),
            pull.as_secs_f64(),
            mbps(pull)
        );
        rows.push((mbps(push), mbps(pull)));
        drop(lb);
        drop(rs);
    }
    let (one, three) = (rows[0], rows[1]);
    println!(
        "object storage, {mib} MiB image: push 3 replicas : 1 = {:.2} ({:.1} vs {:.1} MiB/s); cold pull 3 : 1 = {:.2} ({:.1} vs {:.1} MiB/s)",
        three.0 / one.0,
        three.0,
        one.0,
        three.1 / one.1,
        three.1,
        one.1
    );
}
