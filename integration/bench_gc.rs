//! Benchmark of `slipway gc` (#21), two figures:
//!
//! 1. The keep set over `SLIPWAY_BENCH_PODS` pods (default 10,000, two
//!    containers each, as the API server's PodList JSON) and
//!    `SLIPWAY_BENCH_TAGS` tags (default 2,000, in 200 repositories): the
//!    pods' JSON parsed into `Pod` objects, their images taken out and
//!    parsed, and the plan made over the inventory.
//! 2. The sweep of a distribution filesystem tree of `SLIPWAY_BENCH_GIB`
//!    GiB (default 10) of real blob data, half of it garbage: the tree
//!    read from disk, planned and pruned with the real store, as the
//!    gateway does it; the bytes freed and the time.
//!
//! Run as root after the README's set-up: `cargo bench --bench gc`. Needs
//! twice `SLIPWAY_BENCH_GIB` free on the temp directory's disk.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use sha2::{Digest as _, Sha256};
use slipway::gc::plan::{self, Blob, Inventory, Parsed, Policy, Repo, UseKind};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn d(n: usize) -> String {
    format!("sha256:{n:064x}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn keep_set(pods: usize, tags: usize) {
    let repos = 200;
    let per_repo = tags / repos;
    let t0 = now() - 40 * 86_400;
    // The inventory: each tag a manifest with a config and two layers,
    // one of them shared by the repository's manifests.
    let mut inv = Inventory::default();
    let mut n = 0;
    let mut next = || {
        n += 1;
        d(n)
    };
    let mut tagged = Vec::new();
    for r in 0..repos {
        let name = format!("team{r}/app");
        let mut repo = Repo::default();
        let shared = next();
        inv.blobs.insert(
            shared.clone(),
            Blob {
                size: 50 << 20,
                mtime: t0,
            },
        );
        repo.layers.insert(shared.clone(), t0);
        for t in 0..per_repo {
            let (m, c, l) = (next(), next(), next());
            for (b, size) in [(&m, 2_000), (&c, 3_000), (&l, 20 << 20)] {
                inv.blobs.insert(b.clone(), Blob { size, mtime: t0 });
            }
            repo.layers.insert(c.clone(), t0);
            repo.layers.insert(l.clone(), t0);
            repo.revisions.insert(m.clone(), t0 + t as u64 * 60);
            repo.tags.insert(format!("v{t}"), m.clone());
            inv.manifests.insert(
                m.clone(),
                Parsed {
                    blobs: vec![c.clone(), shared.clone(), l],
                    manifests: vec![],
                    config: Some(c),
                },
            );
            tagged.push((name.clone(), format!("v{t}"), m));
        }
        inv.repos.insert(name, repo);
    }
    // The pods: half by tag, half by the digest they run, over a tenth of
    // the tags; plus images from elsewhere.
    let mut items = Vec::with_capacity(pods);
    for p in 0..pods {
        let (repo, tag, digest) = &tagged[(p * 7) % (tagged.len() / 10).max(1)];
        items.push(serde_json::json!({
            "metadata": {"name": format!("pod-{p}"), "namespace": format!("ns{}", p % 50)},
            "spec": {"containers": [
                {"name": "app", "image": format!("registry.shared-services:5000/{repo}:{tag}")},
                {"name": "sidecar", "image": format!("docker.io/library/envoy:v{}", p % 30)},
            ]},
            "status": {"containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0,
                "image": format!("registry.shared-services:5000/{repo}:{tag}"),
                "imageID": format!("registry.shared-services:5000/{repo}@{digest}"),
            }]},
        }));
    }
    let list = serde_json::to_vec(&serde_json::json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items,
    }))
    .unwrap();
    println!(
        "keep set: {pods} pods ({} KiB of PodList JSON), {tags} tags in {repos} repositories",
        list.len() / 1024
    );
    let started = Instant::now();
    let parsed: k8s_openapi::List<k8s_openapi::api::core::v1::Pod> =
        serde_json::from_slice(&list).unwrap();
    let t_json = started.elapsed();
    let images: Vec<(String, UseKind)> = parsed
        .items
        .iter()
        .flat_map(slipway::gc::cluster::pod_images)
        .map(|i| (i, UseKind::Pod))
        .collect();
    let (roots, unparsed) = slipway::gc::roots(&images, Vec::new(), Vec::new());
    assert!(unparsed.is_empty());
    let t_roots = started.elapsed();
    // Three builds kept per repository, so that most tags are garbage
    // unless a pod names them.
    let policy = Policy {
        keep_builds: 3,
        ..Policy::default()
    };
    let p = plan::plan(&inv, &roots, &policy, now());
    let total = started.elapsed();
    let kept: usize = p.kept.values().map(Vec::len).sum();
    println!(
        "keep set: {:.3} s in all (PodList parsed {:.3} s, {} references parsed {:.3} s, plan {:.3} s); {kept} manifests kept, {} deleted",
        total.as_secs_f64(),
        t_json.as_secs_f64(),
        images.len(),
        (t_roots - t_json).as_secs_f64(),
        (total - t_roots).as_secs_f64(),
        p.delete_revisions.len(),
    );
}

/// Write a blob into the tree; its digest.
fn put_blob(v2: &Path, bytes: &[u8]) -> String {
    let h = hex::encode(Sha256::digest(bytes));
    let dir = v2.join("blobs/sha256").join(&h[..2]).join(&h);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("data"), bytes).unwrap();
    format!("sha256:{h}")
}

fn link(path: &Path, digest: &str) {
    fs::create_dir_all(path).unwrap();
    fs::write(path.join("link"), digest).unwrap();
}

fn sweep(gib: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let v2 = root.join("docker/registry/v2");
    // Images of one 16 MiB layer each; every other one is garbage (old,
    // untagged, outside the last builds).
    let layer_mib = 16;
    let images = gib * 1024 / layer_mib;
    let mut garbage_bytes = 0u64;
    let t = Instant::now();
    let mut layer = vec![0u8; layer_mib << 20];
    for i in 0..images {
        let repo = format!("team{}/app", i % 20);
        // Distinct content per image: a counter stamped every 4 KiB.
        for (k, chunk) in layer.chunks_mut(4096).enumerate() {
            chunk[..16].copy_from_slice(&((i as u128) << 64 | k as u128).to_le_bytes());
        }
        let l = put_blob(&v2, &layer);
        let config = format!(r#"{{"created":"2026-01-01T00:00:00Z","n":{i}}}"#);
        let c = put_blob(&v2, config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"digest":"{c}","size":{}}},"layers":[{{"digest":"{l}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        let m = put_blob(&v2, manifest.as_bytes());
        let r = v2.join("repositories").join(&repo);
        link(&r.join("_layers/sha256").join(&l[7..]), &l);
        link(&r.join("_layers/sha256").join(&c[7..]), &c);
        link(&r.join("_manifests/revisions/sha256").join(&m[7..]), &m);
        if i % 2 == 0 {
            // Kept: tagged and named by a pod.
            let tag = r.join(format!("_manifests/tags/v{i}"));
            link(&tag.join("current"), &m);
        } else {
            garbage_bytes += (layer.len() + config.len() + manifest.len()) as u64;
        }
    }
    std::io::stdout().flush().unwrap();
    println!(
        "sweep: wrote {images} images ({gib} GiB) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Make everything old, so nothing is kept for its age.
    run(std::process::Command::new("find").arg(root).args([
        "-type",
        "f",
        "-exec",
        "touch",
        "-d",
        "2026-01-01",
        "{}",
        "+",
    ]));
    // The pods name the kept half by tag.
    let images_in_use: Vec<(String, UseKind)> = (0..images)
        .step_by(2)
        .map(|i| {
            (
                format!("registry.shared-services:5000/team{}/app:v{i}", i % 20),
                UseKind::Pod,
            )
        })
        .collect();
    let req = slipway::gc::GcRequest {
        apply: true,
        images: images_in_use,
        policy: slipway::gc::WirePolicy {
            keep_builds: 0,
            ..Default::default()
        },
    };
    // Cold caches, as after days of uptime.
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    let started = Instant::now();
    let (p, report) = slipway::gc::collect(
        &slipway::gc::store::RealRegistryFs,
        root,
        &req,
        slipway::gc::Seen::default(),
        now(),
    )
    .unwrap();
    let took = started.elapsed();
    assert_eq!(report.total.bytes, garbage_bytes, "freed what was garbage");
    println!(
        "sweep: {:.2} s for {} blobs scanned, {} freed ({:.2} GiB of {gib} GiB), {} manifests and {} links deleted; {:.0} MiB/s of garbage",
        took.as_secs_f64(),
        report.blobs_scanned,
        report.total.blobs,
        report.total.bytes as f64 / (1u64 << 30) as f64,
        p.delete_revisions.len(),
        p.delete_layer_links.len(),
        report.total.bytes as f64 / (1 << 20) as f64 / took.as_secs_f64().max(1e-9),
    );
}

/// The process's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn run(c: &mut std::process::Command) {
    let s = c.status().unwrap();
    assert!(s.success(), "{c:?}");
}

fn main() {
    keep_set(
        env_or("SLIPWAY_BENCH_PODS", 10_000),
        env_or("SLIPWAY_BENCH_TAGS", 2_000),
    );
    println!("peak RSS after the keep set: {:.0} MiB", peak_rss_mib());
    sweep(env_or("SLIPWAY_BENCH_GIB", 10));
    println!("peak RSS after the sweep: {:.0} MiB", peak_rss_mib());
}
