//! Benchmark of node-to-node sharing (#11): `SLIPWAY_BENCH_NODES` nodes
//! (default 6), each a network namespace with its own containerd and agent,
//! cold-pull one image with a `SLIPWAY_BENCH_MIB` MiB layer (default 256)
//! through CRI at once, from a registry in its own namespace behind a `tc`
//! rate limit of `SLIPWAY_BENCH_MBIT` Mbit/s (default 200), so that the
//! registry is the bottleneck. Once with sharing off, once with it on (fresh
//! nodes each time); for each, the bytes the registry sent as a multiple of
//! the image's bytes, and the wall time of the slowest node.
//!
//! Run as root after the README's set-up: `cargo bench --bench scale`.

#[path = "harness.rs"]
mod harness;

// Its #[test]s compile out here; the cluster helpers are shared.
#[allow(dead_code, unused_imports)]
#[path = "scale.rs"]
mod scale;

use std::time::Duration;

use harness::*;

pub(crate) const ALIAS: &str = "registry.shared-services:5000";

fn main() {
    if !prerequisites_with(&["tc"]) {
        return;
    }
    let nodes = env_or("SLIPWAY_BENCH_NODES", 6);
    let mib = env_or("SLIPWAY_BENCH_MIB", 256);
    let mbit = env_or("SLIPWAY_BENCH_MBIT", scale::RATE_MBIT as usize) as u32;
    let layout = big_layout(mib);
    let image = scale::image_bytes(&layout);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let reference = format!(
        "{ALIAS}/big@{}",
        index["manifests"][0]["digest"].as_str().unwrap()
    );
    let all: Vec<usize> = (0..nodes).collect();
    println!("{nodes} nodes, one {mib} MiB layer ({image} image bytes), registry at {mbit} Mbit/s");
    for share in [false, true] {
        let c = scale::Cluster::start(nodes, &layout, share, mbit);
        let results = c.pull_all(&reference, &all);
        let slowest = results
            .iter()
            .map(|(_, t)| *t)
            .max()
            .unwrap_or(Duration::ZERO);
        let failed = results.iter().filter(|(r, _)| r.is_err()).count();
        let sent = registry_get_bytes(&c.registry);
        println!(
            "sharing {:3}: registry sent {:.2}x the image ({sent} bytes); slowest node {:.1} s; failed pulls {failed}",
            if share { "on" } else { "off" },
            sent as f64 / image as f64,
            slowest.as_secs_f64(),
        );
        for (i, (r, t)) in results.iter().enumerate() {
            if let Err(e) = r {
                println!("  node {i}: failed after {:.1} s: {e}", t.as_secs_f64());
            }
        }
    }
}
