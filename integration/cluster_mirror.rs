//! The mirror in the real cluster (#20): `integration/cluster.sh stand-in
//! docker.io` plays Docker Hub (distribution 2.8 behind TLS from the
//! stand-in CA, under the real names through the cluster's own resolver),
//! `integration/cluster/overlay-mirror` turns the mirror on, and then
//! - both kubelets pull `docker.io/library/app:stand-in` through their
//!   agents and the gateway, and the stand-in's access log shows each blob
//!   fetched once;
//! - `slipway build` with `FROM docker.io/library/app:stand-in` succeeds
//!   through Kaniko's `--registry-map`, and a second build of another commit
//!   sends the stand-in no request at all.
//!
//! The step puts the plain install back at its end, and stops the stand-in.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::builds::{Builder, Repo};
use crate::harness::*;

/// The stand-in's name for the image, as workloads write it.
const IMAGE: &str = "docker.io/library/app:stand-in";

struct StandIn {
    push: String,
    log: std::path::PathBuf,
}

impl StandIn {
    fn start() -> StandIn {
        let out = run_ok(
            Command::new("bash")
                .arg(repo().join("integration/cluster.sh"))
                .args(["stand-in", "docker.io"]),
        );
        let value = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("cluster.sh stand-in printed no {k}: {out}"))
                .to_string()
        };
        StandIn {
            push: value("PUSH="),
            log: value("LOG=").into(),
        }
    }

    /// The access log's lines: `METHOD URI STATUS BYTES`.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for StandIn {
    /// The test stops the server it started.
    fn drop(&mut self) {
        let _ = run(Command::new("bash")
            .arg(repo().join("integration/cluster.sh"))
            .args(["stand-in-stop", "docker.io"]));
    }
}

/// GETs of `path_part` in the access log, by status.
fn gets<'a>(lines: &'a [String], path_part: &str) -> Vec<&'a String> {
    lines
        .iter()
        .filter(|l| l.starts_with("GET ") && l.contains(path_part))
        .collect()
}

pub(crate) fn mirror(c: &Cluster, tmp: &Path) {
    let t = Instant::now();
    let dir = tmp.join("mirror");
    std::fs::create_dir_all(&dir).unwrap();
    let stand_in = StandIn::start();
    // A busybox image plus 1 MiB of its own: the nodes hold busybox's layer
    // (imported with the cluster's images), not this one.
    let (layout, digest) = crate::workload_layout(&dir, Some(1 << 20));
    run_ok(Command::new("skopeo").args([
        "--command-timeout",
        "180s",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &crate::oci(&layout),
        &format!("docker://{}/library/app:stand-in", stand_in.push),
    ]));
    apply_overlay(c, "integration/cluster/overlay-mirror");
    for node in NODES {
        let hosts = crate::node_path(node, "etc-containerd/certs.d/docker.io/hosts.toml");
        wait_for(&format!("{node}: {}", hosts.display()), 60, || {
            std::fs::read_to_string(&hosts).map_err(|e| e.to_string())
        });
    }
    let before = stand_in.requests().len();
    eprintln!("mirror: stand-in and overlay in {:?}", t.elapsed());

    // 1. Both nodes pull through CRI at once.
    let t = Instant::now();
    for node in NODES {
        c.run_pod("default", &format!("hub-{node}"), IMAGE, node);
    }
    for node in NODES {
        c.wait_running("default", &format!("hub-{node}"));
    }
    let pulled = stand_in.requests()[before..].to_vec();
    eprintln!(
        "mirror: pulled on both nodes in {:?}: {pulled:#?}",
        t.elapsed()
    );
    for (blob, _) in crate::blobs(&layout, &digest) {
        let n = gets(&pulled, &format!("/blobs/{blob}")).len();
        // busybox's own layer: already on every node, so never asked for.
        assert!(n <= 1, "blob {blob} fetched {n} times: {pulled:#?}");
    }
    let extra = crate::blobs(&layout, &digest).last().unwrap().0.clone();
    assert_eq!(
        gets(&pulled, &format!("/blobs/{extra}")).len(),
        1,
        "the new layer, once: {pulled:#?}"
    );
    assert!(
        gets(&pulled, "/manifests/").len() <= 1,
        "manifest GETs: {pulled:#?}"
    );

    // 2. Builds FROM the stand-in's image, through --registry-map.
    let b = Builder::new(c);
    let dockerfile = |n: &str| {
        format!(
            "FROM {IMAGE}\nRUN echo 'built {n} {}' > /message\nCMD [\"cat\", \"/message\"]\n",
            tmp.display()
        )
    };
    let repo = Repo::new(&dir.join("app"), &[("Dockerfile", &dockerfile("one"))]);
    let build = |id: &str| {
        b.build(&[
            "--git",
            &repo.url,
            "--rev",
            "main",
            "--repo",
            "hub-app",
            "--build-id",
            id,
        ])
        .ok()
    };
    let first = build(&format!("mirror1{}", std::process::id()));
    assert!(
        first
            .stderr
            .contains("FROM through the mirror: index.docker.io="),
        "{}",
        first.stderr
    );
    let after_first = stand_in.requests().len();
    repo.commit_files(&[("Dockerfile", &dockerfile("two"))], "second");
    let second = build(&format!("mirror2{}", std::process::id()));
    let after_second = stand_in.requests();
    assert_eq!(
        after_second.len(),
        after_first,
        "the second build reached the stand-in: {:#?}",
        &after_second[after_first..]
    );
    assert_ne!(
        first.stdout.lines().last(),
        second.stdout.lines().last(),
        "two commits, one image"
    );
    eprintln!(
        "mirror: builds {:.1}s and {:.1}s; the stand-in saw {} requests for the pulls and the first build, 0 for the second",
        first.secs,
        second.secs,
        after_first - before
    );

    // 3. The plain install again: the agents remove docker.io's directory.
    for node in NODES {
        c.kubectl(&[
            "-n",
            "default",
            "delete",
            "pod",
            &format!("hub-{node}"),
            "--wait=false",
        ]);
    }
    apply_overlay(c, "integration/cluster/overlay");
    // What the overlay made that the plain install does not name: builds
    // would still read the ConfigMap.
    c.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "configmap",
        "slipway-mirror",
        "slipway-mirror-ca",
    ]);
    for node in NODES {
        let d = crate::node_path(node, "etc-containerd/certs.d/docker.io");
        wait_for(&format!("{node}: {} removed", d.display()), 60, || {
            if d.exists() {
                Err("still there".to_string())
            } else {
                Ok(())
            }
        });
    }
    drop(stand_in);
}
