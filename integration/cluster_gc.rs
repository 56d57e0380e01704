//! Garbage collection in the real cluster (#21): the install's CronJob
//! `slipway-gc`, its ClusterRole's lists through the real API server, the
//! gateway sweeping the registry's volume, the kubelets pulling afterwards.
//!
//! Three builds of `demo/gc` are pushed a second apart; a pod runs the
//! first by digest. A Job made from the CronJob (the dry run) reports and
//! deletes nothing; a Job made from it as the README says, with
//! `SLIPWAY_GC_APPLY=true` (and `gc.keep_builds=1`, `gc.min_age_secs=0`,
//! `gc.keep_pulled_days=0`, so that the second build is garbage at once),
//! deletes the second build and keeps the first (a pod's) and the third
//! (the last build). Its termination message names the bytes freed in
//! `demo/gc`, which the test adds up from the layouts it pushed. The
//! second build then fails to pull on a node; the third pulls.

use std::path::Path;
use std::process::Command;

use crate::harness::*;
use crate::{blobs, oci, workload_layout};

/// Run a Job made from the CronJob, with `env` added, to its end; the
/// termination message of its pod.
fn gc_job(c: &Cluster, name: &str, env: &[&str]) -> String {
    let kubectl = |args: &str| format!("kubectl --kubeconfig {} {args}", c.kubeconfig.display());
    // The README's command, with the test's settings added to its env.
    let script = format!(
        "{} | {} | {}",
        kubectl(&format!(
            "-n {NS} create job {name} --from=cronjob/slipway-gc --dry-run=client -o yaml"
        )),
        kubectl(&format!("set env --local -f - {} -o yaml", env.join(" "))),
        kubectl("create -f -"),
    );
    let o = run(Command::new("sh").args(["-c", &script]));
    assert!(o.status.success(), "{script}: {}", text(&o));
    wait_for(&format!("job {name} to finish"), 300, || {
        let s = c.get(
            NS,
            &format!("job/{name}"),
            "{.status.succeeded}/{.status.failed}",
        )?;
        match s.as_str() {
            "1/" | "1/0" => Ok(()),
            s if s.ends_with("/1") || s.ends_with("/2") || s.ends_with("/3") => panic!(
                "job {name} failed: {}",
                c.kubectl(&["-n", NS, "logs", &format!("job/{name}")])
                    .stdout
                    .iter()
                    .map(|b| *b as char)
                    .collect::<String>()
            ),
            s => Err(format!("succeeded/failed: {s}")),
        }
    });
    c.get(
        NS,
        "pods",
        &format!(
            "{{.items[?(@.metadata.labels.job-name==\"{name}\")].status.containerStatuses[0].state.terminated.message}}"
        ),
    )
    .unwrap()
}

fn manifest_status(certs: &Path, repo: &str, reference: &str) -> String {
    let o = run(client("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "30",
        "-I",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        "--cacert",
        certs.join("ca.crt").to_str().unwrap(),
        &format!("https://{ALIAS}/v2/{repo}/manifests/{reference}"),
    ]));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub(crate) fn gc(c: &Cluster, dir: &Path, certs: &Path, authfile: &Path) {
    scenario(c, dir, certs, authfile, "");
}

/// The scenario of this module's header; `v` names its repository (`demo/gc<v>`), Jobs and
/// pods apart, so that it runs again on the object-storage overlay (#22,
/// `v` = `-s3`).
pub(crate) fn scenario(c: &Cluster, dir: &Path, certs: &Path, authfile: &Path, v: &str) {
    let repo = format!("demo/gc{v}");
    let (dry_job, apply_job) = (format!("slipway-gc-dry{v}"), format!("slipway-gc-apply{v}"));
    let pod = |i: usize| format!("gc{v}-b{i}");
    // Three builds of demo/gc, a second apart (push times are the
    // revision links' mtimes, or the objects' Last-Modified, in seconds).
    let mut builds = Vec::new();
    for i in 1..=3 {
        let d = dir.join(format!("gc-build-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let (layout, digest) = workload_layout(&d, Some(64 << 10));
        let o = push(
            &oci(&layout),
            &format!("{ALIAS}/{repo}:b{i}"),
            certs,
            Some(authfile),
        );
        assert!(o.status.success(), "push {repo}:b{i}: {}", text(&o));
        builds.push((layout, digest));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let image = |i: usize| format!("{ALIAS}/{repo}@{}", builds[i].1);
    c.run_pod("default", &pod(1), &image(0), NODES[0]);
    c.wait_running("default", &pod(1));

    // The dry run, as the CronJob runs it: the second build would go.
    let dry = gc_job(
        c,
        &dry_job,
        &[
            "SLIPWAY_GC_KEEP_BUILDS=1",
            "SLIPWAY_GC_MIN_AGE_SECS=0",
            "SLIPWAY_GC_KEEP_PULLED_DAYS=0",
        ],
    );
    assert!(dry.starts_with("gc dry run: would free "), "{dry}");
    assert_eq!(manifest_status(certs, &repo, &builds[1].1), "200");

    // What goes: the second build's manifest, config and own layer (the
    // busybox layer is every build's).
    let b2 = blobs(&builds[1].0, &builds[1].1);
    let manifest = std::fs::metadata(
        builds[1]
            .0
            .join("blobs/sha256")
            .join(builds[1].1.strip_prefix("sha256:").unwrap()),
    )
    .unwrap()
    .len();
    let shared: Vec<String> = blobs(&builds[0].0, &builds[0].1)
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let own: u64 = b2
        .iter()
        .filter(|(d, _)| !shared.contains(d))
        .map(|(_, s)| s)
        .sum();
    let want = manifest + own;

    let applied = gc_job(
        c,
        &apply_job,
        &[
            "SLIPWAY_GC_APPLY=true",
            "SLIPWAY_GC_KEEP_BUILDS=1",
            "SLIPWAY_GC_MIN_AGE_SECS=0",
            "SLIPWAY_GC_KEEP_PULLED_DAYS=0",
        ],
    );
    eprintln!("gc: {applied}");
    assert!(applied.starts_with("gc applied: freed "), "{applied}");
    assert!(
        applied.contains(&format!(
            "\n{repo}: freed {want} bytes: 3 blobs, 1 manifests, 1 tags\n"
        )),
        "expected {repo} to free {want} bytes: {applied}"
    );
    assert_eq!(manifest_status(certs, &repo, &builds[1].1), "404");
    assert_eq!(manifest_status(certs, &repo, "b2"), "404");
    assert_eq!(manifest_status(certs, &repo, &builds[0].1), "200");
    assert_eq!(manifest_status(certs, &repo, "b3"), "200");

    // On the other node, which has none of them: the third build pulls
    // through the kubelet, the second does not.
    c.run_pod("default", &pod(3), &image(2), NODES[1]);
    c.wait_running("default", &pod(3));
    c.run_pod("default", &pod(2), &image(1), NODES[1]);
    let events = wait_for(
        "the kubelet's pull failure of the deleted build",
        120,
        || {
            let e = c.events("default", &pod(2));
            if e.contains("Failed: ") {
                Ok(e)
            } else {
                Err(e)
            }
        },
    );
    assert!(
        events.contains("not found") || events.contains("404"),
        "{events}"
    );
    for i in 1..=3 {
        c.kubectl_ok(&["-n", "default", "delete", "pod", &pod(i), "--wait=false"]);
    }
}
