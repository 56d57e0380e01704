//! The registry scaled out on an object store, in the real cluster (#22).
//! `integration/cluster.sh object-store` runs SeaweedFS's S3 gateway on the
//! cluster bridge and writes Secret registry-storage;
//! `integration/cluster/overlay-object-storage` installs
//! `daemonset/overlays/object-storage` with the test cluster's images. Then:
//! - three replicas become Ready, on the http.secret `slipway pki ensure`
//!   made (Secret registry-http-secret);
//! - an image pushed through the Service pulls on both nodes through CRI;
//! - the registry pods are drained off the node that holds the most of
//!   them (`kubectl drain --pod-selector`, the node cordoned: the test
//!   cluster has one CoreDNS replica, whose eviction would take name
//!   resolution down, which is not what is under test here) while pushes and
//!   pulls run in a loop: none fails, and the PodDisruptionBudget keeps at
//!   least two replicas available throughout;
//! - `slipway build` pushes through the scaled registry;
//! - `slipway gc` on the bucket: the gc step's scenario (dry run, apply,
//!   the deleted build no longer pulls, the kept ones do) through the
//!   Service, and the other two replicas' gateways stopped their writes
//!   for it through the bucket.
//!
//! The step puts the plain install back at its end, and stops the store.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::builds::{Builder, Repo};
use crate::harness::*;

struct ObjectStore;

impl ObjectStore {
    fn start() -> ObjectStore {
        let out = run_ok(
            Command::new("bash")
                .arg(repo().join("integration/cluster.sh"))
                .arg("object-store"),
        );
        assert!(
            out.lines().any(|l| l.starts_with("ENDPOINT=http://")),
            "cluster.sh object-store printed no ENDPOINT=: {out}"
        );
        ObjectStore
    }
}

impl Drop for ObjectStore {
    /// The test stops the server it started.
    fn drop(&mut self) {
        let _ = run(Command::new("bash")
            .arg(repo().join("integration/cluster.sh"))
            .arg("object-store-stop"));
    }
}

/// The nodes the registry's pods run on, one entry per pod.
fn registry_nodes(c: &Cluster) -> Vec<String> {
    let out = c.kubectl_ok(&[
        "-n",
        NS,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=registry",
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
    ]);
    out.lines().map(str::to_string).collect()
}

fn available(c: &Cluster) -> Option<u32> {
    c.get(NS, "deployment/registry", "{.status.availableReplicas}")
        .ok()
        .and_then(|v| v.trim().parse().ok())
}

/// skopeo copies `image` from the registry (through its Service) to a
/// directory: every blob verified by digest.
fn pull(certs: &Path, image: &str, dir: &Path) -> Result<(), String> {
    let out = dir.join(format!("pulled-{}", std::process::id()));
    let o = run(client("skopeo")
        .args([
            "--command-timeout",
            "120s",
            "copy",
            "--quiet",
            "--src-cert-dir",
        ])
        .arg(certs)
        .arg(format!("docker://{image}"))
        .arg(format!("dir:{}", out.display())));
    let _ = std::fs::remove_dir_all(&out);
    if o.status.success() {
        Ok(())
    } else {
        Err(text(&o))
    }
}

pub(crate) fn object_storage(c: &Cluster, tmp: &Path, certs: &Path, authfile: &Path) {
    let t = Instant::now();
    let dir = tmp.join("object-storage");
    std::fs::create_dir_all(&dir).unwrap();
    let store = ObjectStore::start();
    apply_overlay(c, "integration/cluster/overlay-object-storage");
    let ready = c
        .get(NS, "deployment/registry", "{.status.readyReplicas}")
        .unwrap();
    assert_eq!(ready, "3", "ready replicas");
    let secret = c
        .get(NS, "secret/registry-http-secret", "{.data.secret}")
        .unwrap();
    assert!(!secret.trim().is_empty(), "registry-http-secret is empty");
    let nodes = registry_nodes(c);
    eprintln!(
        "object storage: store and overlay in {:?}; replicas on {nodes:?}",
        t.elapsed()
    );

    // 1. Push through the Service, pull on both nodes through CRI.
    std::fs::create_dir_all(dir.join("first")).unwrap();
    let (layout, digest) = crate::workload_layout(&dir.join("first"), Some(4 << 20));
    let o = push(
        &crate::oci(&layout),
        &format!("{ALIAS}/scaled/app:v1"),
        certs,
        Some(authfile),
    );
    assert!(
        o.status.success(),
        "push to the scaled registry: {}",
        text(&o)
    );
    let image = format!("{ALIAS}/scaled/app@{digest}");
    for node in NODES {
        let pod = format!("scaled-{node}");
        c.run_pod("default", &pod, &image, node);
        c.wait_running("default", &pod);
    }

    // 2. Drain the registry off the node with the most replicas, with
    //    pushes and pulls running.
    let drained = NODES
        .iter()
        .max_by_key(|n| nodes.iter().filter(|m| m == n).count())
        .unwrap()
        .to_string();
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::<String>::new());
    let (mut pushes, mut pulls) = (0usize, 0usize);
    let mut least = u32::MAX;
    std::thread::scope(|s| {
        let pusher = s.spawn(|| {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && n < 200 {
                let d = dir.join(format!("drain-{n}"));
                std::fs::create_dir_all(&d).unwrap();
                let (l, _) = crate::workload_layout(&d, Some(256 << 10));
                let o = push(
                    &crate::oci(&l),
                    &format!("{ALIAS}/scaled/app:drain-{n}"),
                    certs,
                    Some(authfile),
                );
                if !o.status.success() {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("push {n}: {}", text(&o)));
                }
                n += 1;
            }
            n
        });
        let puller = s.spawn(|| {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && n < 500 {
                if let Err(e) = pull(certs, &format!("{ALIAS}/scaled/app:v1"), &dir) {
                    failures.lock().unwrap().push(format!("pull {n}: {e}"));
                }
                n += 1;
            }
            n
        });
        let watcher = s.spawn(|| {
            let mut least = u32::MAX;
            while !stop.load(Ordering::Relaxed) {
                if let Some(a) = available(c) {
                    least = least.min(a);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            least
        });
        // Let the loops run against the whole set first.
        std::thread::sleep(Duration::from_secs(5));
        let t = Instant::now();
        let out = c.kubectl(&[
            "drain",
            &drained,
            "--pod-selector=app.kubernetes.io/name=registry",
            "--delete-emptydir-data",
            "--timeout=300s",
        ]);
        let drain_secs = t.elapsed();
        // The replacements become Ready on the other node.
        let back = Instant::now();
        while available(c) != Some(3) && back.elapsed() < Duration::from_secs(240) {
            std::thread::sleep(Duration::from_secs(1));
        }
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, Ordering::Relaxed);
        pushes = pusher.join().unwrap();
        pulls = puller.join().unwrap();
        least = watcher.join().unwrap();
        assert!(
            out.status.success(),
            "kubectl drain {drained}: {}",
            text(&out)
        );
        eprintln!(
            "object storage: drained {drained} in {drain_secs:?}: {}",
            text(&out).lines().collect::<Vec<_>>().join("; ")
        );
    });
    c.kubectl_ok(&["uncordon", &drained]);
    let failed = failures.into_inner().unwrap();
    eprintln!(
        "object storage: during the drain {pushes} pushes and {pulls} pulls, {} failed; at least {least} replicas available",
        failed.len()
    );
    assert!(failed.is_empty(), "during the drain: {failed:#?}");
    assert!(pushes >= 2 && pulls >= 2, "{pushes} pushes, {pulls} pulls");
    assert!(
        least >= 2,
        "the PodDisruptionBudget let availability fall to {least}"
    );
    assert_eq!(available(c), Some(3), "replicas after the drain");
    assert!(
        !registry_nodes(c).contains(&drained),
        "a registry pod is still on the drained node"
    );

    // 3. A build pushes through the scaled registry.
    let b = Builder::new(c);
    let repo = Repo::new(
        &dir.join("app"),
        &[(
            "Dockerfile",
            &format!(
                "FROM {ALIAS}/scaled/app@{digest}\nRUN echo 'scaled {}' > /message\n",
                tmp.display()
            ),
        )],
    );
    let built = b
        .build(&[
            "--git",
            &repo.url,
            "--rev",
            "main",
            "--repo",
            "scaled-build",
            "--build-id",
            &format!("scaled{}", std::process::id()),
        ])
        .ok();
    let reference = built.stdout.lines().last().unwrap_or_default().to_string();
    assert!(
        reference.contains("/scaled-build@sha256:"),
        "{}",
        built.stdout
    );
    pull(certs, &reference, &dir).unwrap_or_else(|e| panic!("{reference}: {e}"));
    eprintln!("object storage: build in {:.1}s: {reference}", built.secs);

    // 4. `slipway gc` on the bucket (#22 point 4): the gc step's scenario
    //    (three builds, one in a pod; the CronJob's dry run, then the
    //    README's apply; the deleted build no longer pulls on a kubelet),
    //    through whichever replica the Service picks. The other two must
    //    have stopped their writes for it, through the bucket.
    let t4 = Instant::now();
    crate::gc::scenario(c, &dir.join("gc"), certs, authfile, "-s3");
    let logs = c.kubectl_ok(&[
        "-n",
        NS,
        "logs",
        "-l",
        "app.kubernetes.io/name=registry",
        "-c",
        "gateway",
        "--prefix",
        "--tail=-1",
    ]);
    let fenced: std::collections::BTreeSet<&str> = logs
        .lines()
        .filter(|l| l.contains("writes refused: garbage collection on another gateway"))
        .filter_map(|l| l.split(']').next())
        .collect();
    assert!(
        fenced.len() >= 2,
        "fewer than 2 replicas stopped their writes for the sweep: {fenced:?}"
    );
    eprintln!(
        "object storage: gc on the bucket in {:?}; fenced through the bucket: {fenced:?}",
        t4.elapsed()
    );

    // 5. The plain install again.
    for node in NODES {
        c.kubectl(&[
            "-n",
            "default",
            "delete",
            "pod",
            &format!("scaled-{node}"),
            "--wait=false",
        ]);
    }
    apply_overlay(c, "integration/cluster/overlay");
    c.kubectl_ok(&["-n", NS, "delete", "poddisruptionbudget", "registry"]);
    drop(store);
}
