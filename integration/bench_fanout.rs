//! Benchmark of the fan-out tree (#23): `SLIPWAY_BENCH_NODES` nodes
//! (default 16), each a network namespace with an agent only (no
//! containerd), and the registry, all on one bridge with every link shaped
//! to `SLIPWAY_BENCH_MBIT` Mbit/s (default 100) in both directions, as in a
//! cluster whose nodes have equal NICs. One blob of `SLIPWAY_BENCH_MIB` MiB
//! (default 256); every node asks its own agent for it at once, as
//! containerd would, and hashes what it gets.
//!
//! In one run, on fresh nodes each time: one node alone, then all nodes
//! with sharing off, with one owner serving every node (`peers.fanout =
//! 0`, the behaviour before #23), and with the tree (`peers.fanout` 1, the
//! default, and 2). For each: the slowest node's time as a ratio to one
//! node alone, and the registry's bytes as a multiple of the blob's.
//! `SLIPWAY_BENCH_MODES` (comma-separated: off, owner, tree1, tree2)
//! picks some of them.
//!
//! Run as root after the README's set-up: `cargo bench --bench fanout`.

#[path = "harness.rs"]
mod harness;

// Its #[test]s compile out here; the cluster helpers are shared.
#[allow(dead_code, unused_imports)]
#[path = "scale.rs"]
mod scale;

use std::time::Duration;

use harness::*;
use scale::{AgentNet, Sharing};

pub(crate) const ALIAS: &str = "registry.shared-services:5000";

struct Run {
    slowest: Duration,
    failed: usize,
    sent: u64,
    relay_bytes: f64,
    owner_bytes: f64,
}

fn run(
    n: usize,
    layout: &std::path::Path,
    layer: &(String, u64),
    sharing: Sharing,
    mbit: u32,
) -> Run {
    let net = AgentNet::start(n, layout, sharing, mbit, "");
    let all: Vec<usize> = (0..n).collect();
    let results = net.get_all(&layer.0, &all);
    let want = layer.0.trim_start_matches("sha256:");
    let mut failed = 0;
    for (i, (r, t)) in results.iter().enumerate() {
        match r {
            Ok((len, h)) if *len == layer.1 && h == want => {}
            other => {
                failed += 1;
                println!("  node {i}: {other:?} after {:.1} s", t.as_secs_f64());
            }
        }
    }
    let sum = |series: &str| net.agents.iter().map(|a| a.metric(series)).sum::<f64>();
    Run {
        slowest: results.iter().map(|(_, t)| *t).max().unwrap_or_default(),
        failed,
        sent: registry_get_bytes(&net.registry),
        relay_bytes: sum("slipway_peer_served_bytes_total{role=\"relay\"}"),
        owner_bytes: sum("slipway_peer_served_bytes_total{role=\"owner\"}"),
    }
}

fn main() {
    if !prerequisites_with(&["tc"]) {
        return;
    }
    let nodes = env_or("SLIPWAY_BENCH_NODES", 16);
    let mib = env_or("SLIPWAY_BENCH_MIB", 256);
    let mbit = env_or("SLIPWAY_BENCH_MBIT", 100) as u32;
    let modes = std::env::var("SLIPWAY_BENCH_MODES").unwrap_or("off,owner,tree1,tree2".into());
    let layout = big_layout(mib);
    let (layers, _, _) = scale::layout_image(&layout);
    let layer = layers[0].clone();
    println!("{nodes} nodes, one {mib} MiB blob, every link {mbit} Mbit/s both ways");
    let alone = run(1, &layout, &layer, Sharing::Off, mbit);
    assert_eq!(alone.failed, 0, "one node alone failed");
    let t1 = alone.slowest.as_secs_f64();
    println!("one node alone: {t1:.1} s");
    for mode in modes.split(',') {
        let (label, sharing) = match mode.trim() {
            "off" => ("sharing off", Sharing::Off),
            "owner" => ("one owner (peers.fanout = 0)", Sharing::Fanout(0)),
            "tree1" => ("tree (peers.fanout = 1)", Sharing::Fanout(1)),
            "tree2" => ("tree (peers.fanout = 2)", Sharing::Fanout(2)),
            other => panic!("SLIPWAY_BENCH_MODES: unknown mode {other:?}"),
        };
        let r = run(nodes, &layout, &layer, sharing, mbit);
        println!(
            "{label}: slowest node {:.1} s = {:.2}x one node alone; registry sent {:.2}x the blob; peer bytes sent as owner {:.2}x, as relay {:.2}x; failed {}",
            r.slowest.as_secs_f64(),
            r.slowest.as_secs_f64() / t1,
            r.sent as f64 / layer.1 as f64,
            r.owner_bytes / layer.1 as f64,
            r.relay_bytes / layer.1 as f64,
            r.failed,
        );
    }
}
