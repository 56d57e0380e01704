//! The seed's flow on a real Kubernetes v1.34 cluster (#17): a real API
//! server (Pod Security admission, RBAC), kube-controller-manager,
//! scheduler, CoreDNS, kube-proxy, and two kubelets on containerd 1.7 and
//! 2.1, from `integration/cluster.sh`. Everything a user does goes through
//! `kubectl` against it, and every check reads what Kubernetes or the node
//! reports (events, pod status, the agents' /metrics, the nodes' files).
//!
//! The steps run in the order a user meets them, in one test, because each
//! builds on the one before: the seed's failure, install, push and pull on
//! every node, renewal, builds from git with the real Kaniko executor
//! (`integration/cluster_builds.rs`, #19), public images through the mirror
//! (`integration/cluster_mirror.rs`, #20), garbage collection from the
//! install's CronJob (`integration/cluster_gc.rs`, #21), the registry scaled
//! out on an object store (`integration/cluster_object_storage.rs`, #22),
//! the startup taint, bad input, uninstall.
//!
//! Needs root and what `integration/install-deps.sh` installs. If the
//! cluster is not up, the test brings it up and takes it down at the end;
//! a cluster that was already up is left up. A test that cannot run fails
//! naming what is missing; `SLIPWAY_SKIP_CLUSTER=<reason>` skips it and
//! prints the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[path = "cluster_harness.rs"]
mod harness;
use harness::*;

#[path = "cluster_builds.rs"]
mod builds;

#[path = "cluster_mirror.rs"]
mod mirror;

#[path = "cluster_gc.rs"]
mod gc;

#[path = "cluster_object_storage.rs"]
mod object_storage;

/// Every file under a node's /etc/containerd/certs.d, with its bytes.
fn certs_d(node: &str) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    b"<dir>".to_vec(),
                );
                walk(base, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let base = node_path(node, "etc-containerd/certs.d");
    let mut out = BTreeMap::new();
    walk(&base, &base, &mut out);
    out
}

/// A node's own directory (integration/cluster/node.sh, NODE_BINDS).
fn node_path(node: &str, rel: &str) -> PathBuf {
    state_dir().join("nodes").join(node).join(rel)
}

/// One agent's /metrics, from the host (the node IPs are on the bridge).
fn metrics(node_ip: &str) -> String {
    run_ok(Command::new("curl").args([
        "-fsS",
        "--max-time",
        "5",
        &format!("http://{node_ip}:9464/metrics"),
    ]))
}

/// The sum of a metric's series whose labels contain `labels`.
fn metric(body: &str, name: &str, labels: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An OCI layout of the test workload (busybox) as `app:v1`, plus one
/// layer of `extra` random bytes when given, and its manifest digest.
fn workload_layout(dir: &Path, extra: Option<usize>) -> (PathBuf, String) {
    let tar = cache_dir().join("images/busybox.tar");
    assert!(
        tar.is_file(),
        "{} is missing (integration/cluster.sh up builds it)",
        tar.display()
    );
    let layout = dir.join("layout");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("docker-archive:{}", tar.display()),
        &format!("oci:{}:app", layout.display()),
    ]));
    if let Some(bytes) = extra {
        let f = dir.join("extra.bin");
        let mut data = vec![0u8; bytes];
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let mut x = seed | 1;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&f, data).unwrap();
        run_ok(Command::new("umoci").args([
            "insert",
            "--image",
            &format!("{}:app", layout.display()),
            f.to_str().unwrap(),
            "/extra.bin",
        ]));
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "app")
        .expect("app in index.json")["digest"]
        .as_str()
        .unwrap()
        .to_string();
    (layout, digest)
}

/// skopeo's name for the `app` image of an OCI layout.
fn oci(layout: &Path) -> String {
    format!("oci:{}:app", layout.display())
}

/// The blobs (config and layers) of the manifest `digest` in `layout`.
fn blobs(layout: &Path, digest: &str) -> Vec<(String, u64)> {
    let read = |d: &str| {
        let hex = d.strip_prefix("sha256:").unwrap();
        std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
    };
    let m: serde_json::Value = serde_json::from_slice(&read(digest)).unwrap();
    std::iter::once(&m["config"])
        .chain(m["layers"].as_array().unwrap())
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_string(),
                d["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_seeds_flow_on_a_real_cluster() {
    if let Some(reason) = std::env::var_os("SLIPWAY_SKIP_CLUSTER") {
        eprintln!(
            "SKIPPED: the real-cluster test: {}",
            reason.to_string_lossy()
        );
        return;
    }
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the real-cluster test needs root (network namespaces, mounts, cgroups)"
    );
    let t0 = Instant::now();
    let cluster = Cluster::up();
    eprintln!("cluster up in {:?}", t0.elapsed());
    assert!(
        !cluster.kubectl(&["get", "namespace", NS]).status.success(),
        "the cluster already has namespace {NS}: the steps start before the install \
         (bash integration/cluster.sh down, then run again)"
    );
    let tmp = tempfile::tempdir().unwrap();
    // busybox plus a layer of random bytes: every node already holds the
    // busybox layer (imported with the cluster's images), and containerd
    // fetches only what its content store lacks.
    let (layout, digest) = workload_layout(tmp.path(), Some(1 << 20));
    let image = format!("{ALIAS}/demo/app@{digest}");

    // A file of the administrator's in one node's certs.d, which the
    // install must never touch and the uninstall must leave as it was.
    let foreign = node_path(NODES[0], "etc-containerd/certs.d/mirror.example.com");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(
        foreign.join("hosts.toml"),
        "# the administrator's\nserver = \"https://mirror.example.com\"\n",
    )
    .unwrap();
    let before: Vec<_> = NODES.iter().map(|n| certs_d(n)).collect();

    let step = Instant::now();
    seed_failure(&cluster, &image);
    eprintln!("step 1 (the seed's failure): {:?}", step.elapsed());

    let step = Instant::now();
    install(&cluster);
    eprintln!("step 2 (install): {:?}", step.elapsed());

    let step = Instant::now();
    let (certs, authfile) = registry_access(&cluster, tmp.path());
    push_and_pull(&cluster, &layout, &digest, &certs, &authfile);
    eprintln!("step 3 (push, pull on every node): {:?}", step.elapsed());

    let step = Instant::now();
    renewal(&cluster, &certs, tmp.path());
    eprintln!("step 5 (renewal without a restart): {:?}", step.elapsed());

    let step = Instant::now();
    builds::builds(&cluster, tmp.path());
    eprintln!(
        "step 8 (builds with the real Kaniko executor): {:?}",
        step.elapsed()
    );

    let step = Instant::now();
    mirror::mirror(&cluster, tmp.path());
    eprintln!(
        "step 9 (docker.io through the mirror, from its stand-in): {:?}",
        step.elapsed()
    );

    let step = Instant::now();
    gc::gc(&cluster, tmp.path(), &certs, &authfile);
    eprintln!(
        "step 10 (garbage collection from the CronJob): {:?}",
        step.elapsed()
    );

    let step = Instant::now();
    object_storage::object_storage(&cluster, tmp.path(), &certs, &authfile);
    eprintln!(
        "step 11 (three replicas on an object store, a drain, a build): {:?}",
        step.elapsed()
    );

    let step = Instant::now();
    startup_taint(&cluster);
    eprintln!("step 4 (startup taint): {:?}", step.elapsed());

    let step = Instant::now();
    bad_input(&cluster);
    eprintln!("step 7 (bad input reaches the user): {:?}", step.elapsed());

    let step = Instant::now();
    uninstall(&cluster);
    let after: Vec<_> = NODES.iter().map(|n| certs_d(n)).collect();
    for (i, node) in NODES.iter().enumerate() {
        assert_eq!(
            before[i].keys().collect::<Vec<_>>(),
            after[i].keys().collect::<Vec<_>>(),
            "{node}'s certs.d after uninstall"
        );
        assert_eq!(
            before[i], after[i],
            "{node}'s certs.d is not byte-identical"
        );
    }
    eprintln!("step 6 (uninstall): {:?}", step.elapsed());
    eprintln!("all steps in {:?}", t0.elapsed());
}

/// 1. Before slipway: the kubelet's pull by digest ends in `no such host`.
fn seed_failure(c: &Cluster, image: &str) {
    c.run_pod("default", "seed", image, NODES[0]);
    let events = wait_for("the kubelet's pull failure event for pod seed", 120, || {
        let e = c.events("default", "seed");
        if e.contains("Failed: ") && e.contains("no such host") {
            Ok(e)
        } else {
            Err(e)
        }
    });
    assert!(
        events.contains(&format!("Failed to pull image \"{image}\"")),
        "{events}"
    );
    assert!(
        events.contains("lookup registry.shared-services"),
        "{events}"
    );
    c.kubectl_ok(&["-n", "default", "delete", "pod", "seed", "--wait=false"]);
}

/// 3. Push through the gateway with the push Secret's config.json (and not
///    without it), then `kubectl run` by digest on every node.
fn push_and_pull(c: &Cluster, layout: &Path, digest: &str, certs: &Path, authfile: &Path) {
    // Without credentials: refused, and nothing written.
    let o = push(
        &oci(layout),
        &format!("{ALIAS}/demo/denied:v1"),
        certs,
        None,
    );
    assert!(!o.status.success(), "an anonymous push succeeded");
    let tags = run(client("curl").args([
        "-sS",
        "--max-time",
        "30",
        "--cacert",
        certs.join("ca.crt").to_str().unwrap(),
        &format!("https://{ALIAS}/v2/demo/denied/tags/list"),
    ]));
    assert!(
        text(&tags).contains("NAME_UNKNOWN"),
        "the refused push left a repository: {}",
        text(&tags)
    );

    let o = push(
        &oci(layout),
        &format!("{ALIAS}/demo/app:v1"),
        certs,
        Some(authfile),
    );
    assert!(
        o.status.success(),
        "push with registry-push's config.json: {}",
        text(&o)
    );

    // The layer's owner among the agents, by the agents' own rendezvous
    // hashing: it pulls first and fetches from the registry; the other node
    // then gets the layer from it (the `peer` source).
    let peers: Vec<SocketAddr> = NODE_IPS
        .iter()
        .map(|ip| format!("{ip}:5052").parse().unwrap())
        .collect();
    let blobs = blobs(layout, digest);
    let (layer, layer_size) = blobs.last().unwrap().clone();
    let owner = slipway::proxy::peers::rank(
        &peers,
        &slipway::proxy::route::Digest::parse(&layer).unwrap(),
    )[0];
    let first = NODE_IPS
        .iter()
        .position(|ip| *ip == owner.ip().to_string())
        .unwrap();
    let order = [first, 1 - first];

    // Sharing needs each agent to have found the other, and itself (the
    // headless Service slipway-peers lists an agent once it is ready): an
    // agent that ranks without itself asks its peer for the blobs it owns.
    for ip in NODE_IPS {
        wait_for(&format!("the agent on {ip} to find its peer"), 60, || {
            let m = metrics(ip);
            if metric(&m, "slipway_peers", "") >= 1.0
                && metric(&m, "slipway_peer_self_listed", "") >= 1.0
            {
                Ok(())
            } else {
                Err(m
                    .lines()
                    .filter(|l| l.starts_with("slipway_peer"))
                    .collect())
            }
        });
    }
    let image = format!("{ALIAS}/demo/app@{digest}");
    let before: Vec<String> = NODE_IPS.iter().map(|ip| metrics(ip)).collect();
    for &i in &order {
        let pod = format!("app-{}", NODES[i]);
        c.run_pod("default", &pod, &image, NODES[i]);
        c.wait_running("default", &pod);
        let id = c
            .get(
                "default",
                &format!("pod/{pod}"),
                "{.status.containerStatuses[0].imageID}",
            )
            .unwrap();
        assert!(id.ends_with(digest), "pod {pod} runs {id}, not {digest}");
    }
    let after: Vec<String> = NODE_IPS.iter().map(|ip| metrics(ip)).collect();
    let delta = |i: usize, source: &str| {
        let l = format!("source=\"{source}\"");
        metric(&after[i], "slipway_proxy_bytes_total", &l)
            - metric(&before[i], "slipway_proxy_bytes_total", &l)
    };
    let second = order[1];
    eprintln!(
        "pulls: first {} upstream {} peer {}; second {} upstream {} peer {}; layer {layer_size} bytes",
        NODES[first],
        delta(first, "upstream"),
        delta(first, "peer"),
        NODES[second],
        delta(second, "upstream"),
        delta(second, "peer"),
    );
    assert!(
        delta(second, "peer") >= layer_size as f64,
        "{}'s agent did not get the layer from {} (peer bytes {})",
        NODES[second],
        NODES[first],
        delta(second, "peer")
    );
    assert!(delta(first, "upstream") >= layer_size as f64);
    // The config and the new layer crossed from the registry once each,
    // whichever node fetched them (the busybox layer was on every node);
    // the manifest, which is not a shared blob, once per node.
    let (config, config_size) = blobs[0].clone();
    assert!(config != layer);
    let manifest = std::fs::metadata(
        layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap()
    .len();
    let fetched = (config_size + layer_size + 2 * manifest) as f64;
    let upstream = delta(0, "upstream") + delta(1, "upstream");
    assert!(
        upstream == fetched,
        "registry bytes {upstream} through the agents, for {fetched}: config {config_size}, \
         layer {layer_size}, manifest {manifest} on each node"
    );
}

/// The certificate the gateway serves to a new connection, as PEM.
fn served_certificate(certs: &Path) -> String {
    let o = run(client("sh").args([
        "-c",
        &format!(
            "timeout 20 openssl s_client -connect {ALIAS} -servername registry.shared-services -CAfile {} </dev/null 2>/dev/null | openssl x509",
            certs.join("ca.crt").display()
        ),
    ]));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// 5. `kubectl create job --from=cronjob/slipway-pki-renew` completes; a
///    forced reissue (a new DNS name, the documented SLIPWAY_PKI_DNS) is
///    served by the running gateway to new connections without a restart,
///    and pulls through it keep working.
fn renewal(c: &Cluster, certs: &Path, tmp: &Path) {
    let tls = |c: &Cluster| {
        c.get(NS, "secret/registry-tls", "{.data.tls\\.crt}")
            .unwrap()
    };
    let pod_id = |c: &Cluster| {
        c.get(
            NS,
            "pods",
            "{.items[?(@.metadata.labels.app\\.kubernetes\\.io/name==\"registry\")].metadata.uid}",
        )
        .unwrap()
    };
    let before_uid = pod_id(c);
    let old = tls(c);
    c.renewal_job("renew-1");
    assert_eq!(
        tls(c),
        old,
        "a renewal with nothing due reissued the certificate"
    );

    c.kubectl_ok(&[
        "-n",
        NS,
        "set",
        "env",
        "cronjob/slipway-pki-renew",
        "SLIPWAY_PKI_DNS=registry.example.test",
    ]);
    c.renewal_job("renew-2");
    let new = tls(c);
    assert_ne!(new, old, "the forced reissue did not change registry-tls");
    use base64::Engine as _;
    let new_pem = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(new.trim())
            .unwrap(),
    )
    .unwrap();
    let leaf = new_pem
        .split_inclusive("-----END CERTIFICATE-----")
        .next()
        .unwrap()
        .trim()
        .to_string();
    // The kubelet updates the Secret volume in place; the gateway re-reads
    // it. New connections then get the new certificate.
    wait_for("the gateway to serve the reissued certificate", 240, || {
        let served = served_certificate(certs);
        if served == leaf {
            Ok(())
        } else {
            Err(format!(
                "still serving {} bytes of another certificate",
                served.len()
            ))
        }
    });
    assert_eq!(pod_id(c), before_uid, "the registry pod was replaced");
    let restarts = c
        .get(
            NS,
            "pods",
            "{.items[?(@.metadata.labels.app\\.kubernetes\\.io/name==\"registry\")].status.containerStatuses[*].restartCount}",
        )
        .unwrap();
    assert!(
        restarts.split_whitespace().all(|r| r == "0"),
        "registry containers restarted: {restarts}"
    );

    // Pulls keep working: a new image (a layer no node has) through the
    // renewed certificate, on every node.
    let dir = tmp.join("app2");
    std::fs::create_dir_all(&dir).unwrap();
    let (layout, digest) = workload_layout(&dir, Some(1 << 20));
    let authfile = tmp.join("config.json");
    let o = push(
        &oci(&layout),
        &format!("{ALIAS}/demo/app2:v1"),
        certs,
        Some(&authfile),
    );
    assert!(o.status.success(), "push after renewal: {}", text(&o));
    for node in NODES {
        let pod = format!("app2-{node}");
        c.run_pod(
            "default",
            &pod,
            &format!("{ALIAS}/demo/app2@{digest}"),
            node,
        );
        c.wait_running("default", &pod);
    }
}

fn taints(c: &Cluster, node: &str) -> Result<String, String> {
    c.get("default", &format!("node/{node}"), "{.spec.taints[*].key}")
}

/// 4. With the startup-taint overlay, a node that registers with the taint
///    has it removed by its agent (its ServiceAccount, the overlay's RBAC,
///    the real API server) once /readyz passes; then a pod that does not
///    tolerate the taint schedules there.
fn startup_taint(c: &Cluster) {
    const TAINT: &str = "slipway.dev/registry-unready";
    let overlay = repo().join("integration/cluster/overlay-startup-taint");
    c.kubectl_ok(&["apply", "-k", overlay.to_str().unwrap()]);
    c.rolled_out("slipway-agent");
    let node = NODES[1];
    let o = run(Command::new("bash")
        .arg(repo().join("integration/cluster.sh"))
        .args(["node-restart", node])
        .arg(format!("--register-with-taints={TAINT}=:NoSchedule")));
    assert!(o.status.success(), "cluster.sh node-restart: {}", text(&o));
    let registered = taints(c, node).unwrap();
    assert!(
        registered.contains(TAINT),
        "{node} registered without the taint: {registered:?}"
    );
    wait_for(
        &format!("the agent to remove {TAINT} from {node}"),
        240,
        || {
            let t = taints(c, node)?;
            if t.contains(TAINT) {
                Err(t)
            } else {
                Ok(())
            }
        },
    );
    let pod = c
        .get(
            NS,
            "pods",
            &format!("{{.items[?(@.spec.nodeName==\"{node}\")].metadata.name}}"),
        )
        .unwrap();
    let agent = pod
        .split_whitespace()
        .find(|p| p.starts_with("slipway-agent-"))
        .unwrap_or_else(|| panic!("no agent pod on {node}: {pod}"))
        .to_string();
    let logs = c.kubectl_ok(&["-n", NS, "logs", &agent]);
    assert!(
        logs.contains("startup taint removed"),
        "the agent on {node} did not log the removal: {logs}"
    );
    // A pod without a toleration, placed by the scheduler.
    c.run_pod(
        "default",
        "untolerant",
        "localhost/slipway/busybox:cluster",
        node,
    );
    c.wait_running("default", "untolerant");
}

/// 7. Bad input reaches the user as a not-ready agent pod whose status or
///    events name the cause, and nothing on the node is half-written.
fn bad_input(c: &Cluster) {
    let agents = |c: &Cluster| -> Vec<(String, String)> {
        let names = c
            .get(
                NS,
                "pods",
                "{range .items[*]}{.metadata.name} {.spec.nodeName}{\"\\n\"}{end}",
            )
            .unwrap_or_default();
        names
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(p, _)| p.starts_with("slipway-agent-"))
            .map(|(p, n)| (p.to_string(), n.to_string()))
            .collect()
    };
    let before: Vec<_> = NODES.iter().map(|n| certs_d(n)).collect();
    let unchanged = |what: &str| {
        for (i, node) in NODES.iter().enumerate() {
            assert_eq!(
                certs_d(node),
                before[i],
                "{node}'s certs.d changed after {what}"
            );
        }
    };

    // A wrong alias in the agent's ConfigMap, then a restart of the agents
    // (maxUnavailable 1: the first replaced pod fails and the rollout
    // stops there, the other node keeps its working agent).
    let cm = c
        .get(NS, "configmaps", "{.items[*].metadata.name}")
        .unwrap()
        .split_whitespace()
        .find(|n| n.starts_with("slipway-agent-config-"))
        .expect("the agent's generated ConfigMap")
        .to_string();
    let toml = c
        .get(NS, &format!("configmap/{cm}"), "{.data.agent\\.toml}")
        .unwrap();
    const BAD: &str = "../registry.shared-services:5000";
    let bad = toml.replacen("\"registry.shared-services:5000\"", &format!("{BAD:?}"), 1);
    assert_ne!(bad, toml);
    let patch = |c: &Cluster, content: &str| {
        let p = serde_json::json!({"data": {"agent.toml": content}}).to_string();
        c.kubectl_ok(&[
            "-n",
            NS,
            "patch",
            "configmap",
            &cm,
            "--type=merge",
            "-p",
            &p,
        ]);
        c.kubectl_ok(&["-n", NS, "rollout", "restart", "daemonset/slipway-agent"]);
    };
    patch(c, &bad);
    let (pod, message) = wait_for(
        "an agent's bad-alias failure in its pod status",
        180,
        || {
            let mut seen = Vec::new();
            for (pod, _) in agents(c) {
                let m = c.get(
                    NS,
                    &format!("pod/{pod}"),
                    "{.status.containerStatuses[0].lastState.terminated.message}",
                )?;
                if m.contains(BAD) {
                    return Ok((pod, m));
                }
                seen.push(format!("{pod}: {m:?}"));
            }
            Err(seen.join("; "))
        },
    );
    assert!(message.contains("registry.aliases[0]"), "{message}");
    let status = |path: &str| c.get(NS, &format!("pod/{pod}"), path).unwrap();
    assert_eq!(
        status("{.status.containerStatuses[0].lastState.terminated.exitCode}"),
        "64"
    );
    assert_eq!(status("{.status.containerStatuses[0].ready}"), "false");
    unchanged("a bad alias");
    patch(c, &toml);
    c.rolled_out("slipway-agent");

    // The registry-ca ConfigMap missing: a new agent pod cannot mount its
    // config, and its event says which ConfigMap.
    c.kubectl_ok(&["-n", NS, "delete", "configmap", "registry-ca"]);
    let node = NODES[0];
    let old = agents(c)
        .into_iter()
        .find(|(_, n)| n == node)
        .map(|(p, _)| p)
        .unwrap_or_else(|| panic!("no agent pod on {node}"));
    c.kubectl_ok(&["-n", NS, "delete", "pod", &old, "--wait=false"]);
    wait_for(
        "the missing registry-ca to show in the agent pod's events",
        180,
        || {
            let (pod, _) = agents(c)
                .into_iter()
                .find(|(p, n)| n == node && *p != old)
                .ok_or("no new agent pod yet")?;
            let e = c.events(NS, &pod);
            if e.contains("configmap \"registry-ca\" not found") {
                Ok(())
            } else {
                Err(e)
            }
        },
    );
    unchanged("registry-ca went missing");
    // ensure makes the ConfigMap again from the CA Secret.
    c.renewal_job("restore-ca");
    c.rolled_out("slipway-agent");
}

/// 6. `kubectl delete -k`, then the cleanup kustomization. The install's
///    namespace is gone by then, and daemonset/cleanup deliberately does
///    not carry it (deleting the cleanup must never delete a running
///    install's namespace), so the namespace is made first, as
///    daemonset/README.md says for this order.
fn uninstall(c: &Cluster) {
    for pod in [
        "untolerant",
        "app-slw-n1",
        "app-slw-n2",
        "app2-slw-n1",
        "app2-slw-n2",
    ] {
        c.kubectl(&[
            "-n",
            "default",
            "delete",
            "pod",
            pod,
            "--wait=false",
            "--ignore-not-found",
        ]);
    }
    uninstall_overlay(c, &repo().join("integration/cluster/overlay-startup-taint"));
}
