//! The one cluster harness of the end-to-end tests and benchmarks (#17,
//! #19): brings `integration/cluster.sh`'s cluster up (or uses the one that
//! is up), runs kubectl against it with a deadline on every call, installs
//! the test overlay, pushes to the in-cluster registry from the workstation
//! namespace, and takes the cluster down again if it brought it up.
//!
//! Included with `#[path]` by `integration/cluster_e2e.rs` and
//! `integration/bench_build.rs`. Every failure panics naming the command and
//! what it printed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The registry's CA (`certs/ca.crt`, for skopeo's --dest-cert-dir and
/// curl) and the push Secret's config.json, written under `dir`: what a
/// user with kubectl access takes from the install to push by hand.
pub(crate) fn registry_access(c: &Cluster, dir: &Path) -> (PathBuf, PathBuf) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = c
        .get(NS, "configmap/registry-ca", "{.data.ca\\.crt}")
        .unwrap();
    std::fs::write(certs.join("ca.crt"), ca).unwrap();
    let config = c
        .get(NS, "secret/registry-push", "{.data.config\\.json}")
        .unwrap();
    use base64::Engine as _;
    let config = base64::engine::general_purpose::STANDARD
        .decode(config.trim())
        .expect("config.json of Secret registry-push is base64");
    let authfile = write(dir, "config.json", &String::from_utf8(config).unwrap());
    (certs, authfile)
}

pub(crate) const NS: &str = "shared-services";
pub(crate) const ALIAS: &str = "registry.shared-services:5000";
pub(crate) const NODES: [&str; 2] = ["slw-n1", "slw-n2"];
pub(crate) const NODE_IPS: [&str; 2] = ["198.19.0.11", "198.19.0.12"];
pub(crate) const CLIENT_NS: &str = "slw-client";
/// Every API call has a deadline, above the longest `--timeout` given to
/// kubectl's own waits here (240 s): a hung API server fails the test.
pub(crate) const KUBECTL_REQUEST_TIMEOUT: &str = "--request-timeout=300s";

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn state_dir() -> PathBuf {
    std::env::var_os("SLIPWAY_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/slipway-cluster"))
}

pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("SLIPWAY_CLUSTER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/slipway/cluster"))
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub(crate) fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

pub(crate) fn run_ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Polls `f` once a second until it returns `Some`, failing after `secs`
/// with `what` and the last thing `f` saw.
pub(crate) fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {secs}s waiting for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

pub(crate) struct Cluster {
    pub(crate) kubeconfig: PathBuf,
    /// This test brought the cluster up, so it takes it down.
    owned: bool,
}

impl Cluster {
    pub(crate) fn up() -> Cluster {
        let script = repo().join("integration/cluster.sh");
        let already = run(Command::new("bash").arg(&script).arg("kubeconfig"));
        let (out, owned) = if already.status.success()
            && run(Command::new("kubectl")
                .args(["--kubeconfig"])
                .arg(state_dir().join("admin.kubeconfig"))
                .args([KUBECTL_REQUEST_TIMEOUT, "get", "--raw", "/readyz"]))
            .status
            .success()
        {
            (already, false)
        } else {
            let o = run(Command::new("bash").arg(&script).arg("up"));
            assert!(
                o.status.success(),
                "integration/cluster.sh up failed: {}",
                text(&o)
            );
            (o, true)
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        let kubeconfig = last
            .strip_prefix("KUBECONFIG=")
            .unwrap_or_else(|| panic!("cluster.sh's last line is not KUBECONFIG=…: {last:?}"));
        Cluster {
            kubeconfig: PathBuf::from(kubeconfig),
            owned,
        }
    }

    pub(crate) fn kubectl(&self, args: &[&str]) -> Output {
        run(Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg(KUBECTL_REQUEST_TIMEOUT)
            .args(args))
    }

    pub(crate) fn kubectl_ok(&self, args: &[&str]) -> String {
        let o = self.kubectl(args);
        assert!(o.status.success(), "kubectl {args:?} failed: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `kubectl get` with a jsonpath, as a string ("" when absent).
    pub(crate) fn get(&self, ns: &str, what: &str, path: &str) -> Result<String, String> {
        let o = self.kubectl(&["-n", ns, "get", what, "-o", &format!("jsonpath={path}")]);
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(text(&o))
        }
    }

    /// The events of one object, as "reason: message" lines.
    pub(crate) fn events(&self, ns: &str, name: &str) -> String {
        self.get(
            ns,
            "events",
            &format!(
                "{{range .items[?(@.involvedObject.name==\"{name}\")]}}{{.reason}}: {{.message}}{{\"\\n\"}}{{end}}"
            ),
        )
        .unwrap_or_default()
    }

    /// A pod that runs `sleep` from `image` on `node`.
    pub(crate) fn run_pod(&self, ns: &str, name: &str, image: &str, node: &str) {
        let overrides = serde_json::json!({
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "containers": [{
                    "name": name,
                    "image": image,
                    "command": ["sleep", "3600"],
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "capabilities": {"drop": ["ALL"]},
                        "runAsNonRoot": true,
                        "runAsUser": 65534,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    }
                }]
            }
        });
        self.kubectl_ok(&[
            "-n",
            ns,
            "run",
            name,
            "--restart=Never",
            &format!("--image={image}"),
            &format!("--overrides={overrides}"),
        ]);
    }

    /// `kubectl create job --from=cronjob/slipway-pki-renew`, until done.
    pub(crate) fn renewal_job(&self, job: &str) {
        self.kubectl_ok(&[
            "-n",
            NS,
            "create",
            "job",
            job,
            "--from=cronjob/slipway-pki-renew",
        ]);
        self.kubectl_ok(&[
            "-n",
            NS,
            "wait",
            "--for=condition=complete",
            &format!("job/{job}"),
            "--timeout=120s",
        ]);
    }

    /// `kubectl rollout status` of a DaemonSet in the install's namespace.
    pub(crate) fn rolled_out(&self, ds: &str) {
        self.kubectl_ok(&[
            "-n",
            NS,
            "rollout",
            "status",
            &format!("daemonset/{ds}"),
            "--timeout=240s",
        ]);
    }

    pub(crate) fn wait_running(&self, ns: &str, pod: &str) {
        wait_for(&format!("pod {ns}/{pod} to run"), 120, || {
            let phase = self.get(ns, &format!("pod/{pod}"), "{.status.phase}")?;
            if phase == "Running" {
                Ok(())
            } else {
                Err(format!("phase {phase:?}; events: {}", self.events(ns, pod)))
            }
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned && std::env::var_os("SLIPWAY_CLUSTER_KEEP").is_none() {
            let o = run(Command::new("bash")
                .arg(repo().join("integration/cluster.sh"))
                .arg("down"));
            if !o.status.success() {
                eprintln!("integration/cluster.sh down failed: {}", text(&o));
            }
        }
    }
}

/// A command in the workstation namespace, which resolves cluster names.
pub(crate) fn client(program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", CLIENT_NS, program]);
    c
}

/// skopeo pushes `source` (a skopeo reference: `oci:DIR:app`,
/// `docker-archive:FILE`) to the registry from the workstation namespace,
/// digests preserved, trusting the registry's CA; `authfile` is the push
/// Secret's config.json, or none.
pub(crate) fn push(source: &str, dest: &str, certs: &Path, authfile: Option<&Path>) -> Output {
    let mut c = client("skopeo");
    c.args([
        "--command-timeout",
        "180s",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-cert-dir",
    ])
    .arg(certs);
    match authfile {
        Some(f) => c.arg("--dest-authfile").arg(f),
        None => c.arg("--dest-no-creds"),
    };
    c.arg(source).arg(format!("docker://{dest}"));
    run(&mut c)
}

/// 2. `kubectl apply -k` of the test overlay, with Pod Security admission
///    and RBAC enforced by the API server: the PKI Job completes, the
///    registry is Available, and the agent is Ready on every node through
///    the kubelet's probe on /readyz.
pub(crate) fn install(c: &Cluster) {
    // The registry's volume (`cluster.sh up`) is Retain: after an uninstall
    // it is Released, bound to the deleted claim, and a new install's claim
    // would wait for it forever (the benchmark installs again after the
    // cluster test uninstalled). An administrator frees it the same way.
    if c.get("default", "pv/slipway-test-registry", "{.status.phase}")
        .is_ok_and(|p| p == "Released")
    {
        c.kubectl_ok(&[
            "patch",
            "pv",
            "slipway-test-registry",
            "--type=json",
            "-p",
            "[{\"op\": \"remove\", \"path\": \"/spec/claimRef\"}]",
        ]);
    }
    let overlay = repo().join("integration/cluster/overlay");
    let o = c.kubectl(&["apply", "-k", overlay.to_str().unwrap()]);
    let out = text(&o);
    assert!(
        o.status.success(),
        "kubectl apply -k {}: {out}",
        overlay.display()
    );
    // The namespace warns at "baseline" (daemonset/base/namespace.yaml):
    // the API server's Pod Security admission evaluated the agent's
    // DaemonSet and names its host access. Nothing is refused.
    assert!(
        out.contains("would violate PodSecurity \"baseline:latest\"")
            && out.contains("hostNetwork"),
        "no Pod Security warning for the agent's hostNetwork: {out}"
    );
    c.kubectl_ok(&[
        "-n",
        NS,
        "wait",
        "--for=condition=complete",
        "job/slipway-pki",
        "--timeout=180s",
    ]);
    registry_available(c);
    c.rolled_out("slipway-agent");
    let ready = c
        .get(NS, "daemonset/slipway-agent", "{.status.numberReady}")
        .unwrap();
    assert_eq!(ready, NODES.len().to_string(), "agents ready");
    // Ready means the kubelet's readiness probe on /readyz passed.
    let probe = c
        .get(
            NS,
            "daemonset/slipway-agent",
            "{.spec.template.spec.containers[0].readinessProbe.httpGet.path}",
        )
        .unwrap();
    assert_eq!(probe, "/readyz");
}

pub(crate) fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// The documented uninstall: `kubectl delete -k` of the installed
/// `overlay`, then the cleanup DaemonSet restores every node's certs.d, then
/// it goes too.
pub(crate) fn uninstall_overlay(c: &Cluster, overlay: &Path) {
    let cleanup = repo().join("integration/cluster/overlay-cleanup");
    c.kubectl_ok(&[
        "delete",
        "-k",
        overlay.to_str().unwrap(),
        "--wait=true",
        "--timeout=240s",
    ]);
    c.kubectl_ok(&["create", "namespace", NS]);
    c.kubectl_ok(&["apply", "-k", cleanup.to_str().unwrap()]);
    c.rolled_out("slipway-cleanup");
    c.kubectl_ok(&[
        "delete",
        "-k",
        cleanup.to_str().unwrap(),
        "--wait=true",
        "--timeout=240s",
    ]);
    c.kubectl_ok(&["delete", "namespace", NS, "--wait=true", "--timeout=240s"]);
}

/// `kubectl apply -k` of `overlay` (a path in the repository) over the
/// install, then waits for the registry's rollout (its replicas Ready and
/// the Deployment Available) and the agents'.
pub(crate) fn apply_overlay(c: &Cluster, overlay: &str) {
    let dir = repo().join(overlay);
    c.kubectl_ok(&["apply", "-k", dir.to_str().unwrap()]);
    c.kubectl_ok(&[
        "-n",
        NS,
        "rollout",
        "status",
        "deployment/registry",
        "--timeout=240s",
    ]);
    registry_available(c);
    c.rolled_out("slipway-agent");
}

/// Waits (at most 180 s) for the registry Deployment to be Available.
pub(crate) fn registry_available(c: &Cluster) {
    c.kubectl_ok(&[
        "-n",
        NS,
        "wait",
        "--for=condition=available",
        "deployment/registry",
        "--timeout=180s",
    ]);
}
