//! The mirror (#20) against real components: a stand-in `docker.io`
//! (Debian's distribution 2.8 behind a TLS front with a test CA, reached as
//! `registry-1.docker.io` through the gateway's own name resolution, its
//! access log counting what reached it), the gateway and the in-cluster
//! registry on loopback, and two "nodes": containerd of the release under
//! test, each with an agent, pulling through CRI.
//!
//! Shown: a rollout sends each blob and manifest upstream once and resolves
//! the tag once per TTL; with the upstream stopped, and again answering
//! 429, both nodes still pull the cached tag and digest, while a tag never
//! cached fails naming the upstream and its status; a foreign
//! `certs.d/docker.io/hosts.toml` stays byte-identical and is reported; a
//! SIGHUP that adds and removes an upstream writes and removes exactly
//! that host's directory.

use std::fs;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::gateway::Gateway;
use crate::harness::*;
use crate::ALIAS;

/// The access log's lines: `METHOD TARGET STATUS`.
fn upstream_log(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A loopback address of this test process's own for a stand-in at port
/// 443 (Docker Hub's, so the mirror's default endpoint is what is dialled):
/// `slot` 0 is the 127.64/10 address of `unique_loopback_addr`, whose
/// other users take ports 20000-31999; slot 1 is in 127.128/10, so that
/// the two tests here can run at once.
fn upstream_ip(slot: u32) -> String {
    let pid = std::process::id();
    assert!(pid < 1 << 22, "pid {pid} does not fit the 127/8 scheme");
    format!(
        "127.{}.{}.{}",
        64 + 64 * slot + (pid >> 16),
        (pid >> 8) & 0xff,
        pid & 0xff
    )
}

/// The gateway in front of `local`, with the mirror on for docker.io,
/// trusting `upstream_pki`, resolving Docker Hub's names to `ip`; `extra`
/// is appended to its `[mirror]` table.
fn mirror_gateway(
    dir: &Path,
    local: &Registry,
    pki: &Pki,
    upstream_pki: &Pki,
    ip: &str,
    extra: &str,
) -> Gateway {
    let mirror_toml = dir.join(format!("mirror-{}.toml", unique()));
    fs::write(
        &mirror_toml,
        format!(
            "[mirror]\nregistries = [\"docker.io\"]\nca_file = {:?}\n{extra}",
            upstream_pki.ca().display().to_string()
        ),
    )
    .unwrap();
    Gateway::start_resolving(
        dir,
        &local.addr,
        pki,
        &[(
            "SLIPWAY_GATEWAY_MIRROR_CONFIG",
            mirror_toml.to_str().unwrap(),
        )],
        &format!("{ip} registry-1.docker.io docker.io"),
    )
}

fn count(log: &[String], method: &str, needle: &str) -> usize {
    log.iter()
        .filter(|l| l.starts_with(&format!("{method} ")) && l.contains(needle))
        .count()
}

/// The stand-in upstream's front: TLS for registry-1.docker.io and
/// docker.io on `addr`, relaying to `backend`, logging to `log`.
fn front(
    addr: &str,
    backend: &str,
    pki: &Pki,
    log: &Path,
    manifest_gets: Option<usize>,
) -> SlowFront {
    SlowFront::start_with(
        None,
        addr,
        backend,
        pki,
        FrontOpts {
            access_log: Some(log.to_path_buf()),
            manifest_gets,
            ..Default::default()
        },
    )
}

#[test]
fn public_images_come_through_the_mirror_and_survive_an_outage_and_a_rate_limit() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // The stand-in docker.io: a real registry holding library/app:1.
    let backend = Registry::start(dir, "127.0.0.1:0", None, None);
    let digest = push(&backend.addr, "library/app:1", None);
    let upstream_pki = Pki::new(
        &dir.join("upstream-pki"),
        &["registry-1.docker.io", "docker.io"],
        &[],
    );
    // Its own loopback address, port 443: Docker Hub's, so the mirror's
    // default endpoint (https://registry-1.docker.io) is what is dialled.
    let ip = upstream_ip(0);
    let up_addr = format!("{ip}:443");
    let log = dir.join("upstream-access.log");
    let mut up = Some(front(&up_addr, &backend.addr, &upstream_pki, &log, None));

    // The in-cluster registry and its gateway, with the mirror on.
    let pki = Pki::new(&dir.join("pki"), &["registry.shared-services"], &[]);
    let local = Registry::start(dir, "127.0.0.1:0", None, None);
    let gw = mirror_gateway(dir, &local, &pki, &upstream_pki, &ip, "tag_ttl_secs = 3\n");

    // Two nodes. Node 2 first holds an administrator's docker.io file.
    let ctd1 = Containerd::start(dir);
    let ctd2 = Containerd::start(dir);
    let foreign_dir = ctd2.certs_dir.join("docker.io");
    fs::create_dir_all(&foreign_dir).unwrap();
    let foreign = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
    fs::write(foreign_dir.join("hosts.toml"), foreign).unwrap();
    let before = snapshot(&foreign_dir);
    let upstream_url = format!("https://registry.shared-services:{}", gw.port());
    let agent = |ctd: &Containerd| {
        Agent::start(
            dir,
            &ctd.certs_dir,
            &ctd.config_file,
            &[ALIAS],
            &upstream_url,
            Some(&gw.addr),
            &pki.ca(),
            "[mirror]\nregistries = [\"docker.io\"]\n",
        )
    };
    let a1 = agent(&ctd1);
    let a2 = agent(&ctd2);

    // Foreign files: left byte-identical, reported.
    wait_for("the conflict in /readyz", Duration::from_secs(10), || {
        a2.admin_get("/readyz")
            .map(|r| String::from_utf8_lossy(&r.body).contains("note: docker.io: "))
            .unwrap_or(false)
    });
    assert_eq!(
        snapshot(&foreign_dir),
        before,
        "the foreign docker.io directory changed"
    );
    assert_eq!(
        a2.metric("slipway_hostconfig_state{alias=\"docker.io\",state=\"conflict\"}"),
        1.0,
        "{}",
        a2.metrics()
    );
    let ours = fs::read_to_string(ctd1.certs_dir.join("docker.io/hosts.toml")).unwrap();
    assert!(
        ours.contains("server = \"https://registry-1.docker.io\""),
        "{ours}"
    );
    assert!(
        ours.find(&a1.proxy).unwrap() < ours.find("registry.shared-services").unwrap(),
        "{ours}"
    );
    // Node 2 pulls through the mirror once its administrator's file is
    // gone (slipway never removes it).
    fs::remove_dir_all(&foreign_dir).unwrap();
    wait_for(
        "node 2's docker.io hosts.toml",
        Duration::from_secs(60),
        || {
            fs::read_to_string(foreign_dir.join("hosts.toml"))
                .map(|t| t.starts_with("# slipway"))
                .unwrap_or(false)
        },
    );

    // Rollout: both nodes pull the tag; the upstream sees each blob and
    // the manifest once, and the tag resolved once.
    let tag = "docker.io/library/app:1";
    let by_digest = format!("docker.io/library/app@{digest}");
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        let pulls = [&ctd1, &ctd2].map(|c| s.spawn(move || c.pull(tag)));
        for p in pulls {
            p.join().unwrap().unwrap();
        }
    });
    // At most one revalidation per TTL window (3 s) that the rollout spans.
    let windows = 1 + started.elapsed().as_secs() as usize / 3;
    let l = upstream_log(&log);
    let blobs: Vec<&String> = l
        .iter()
        .filter(|x| x.starts_with("GET ") && x.contains("/blobs/"))
        .collect();
    let mut distinct: Vec<&str> = blobs.iter().map(|x| x.split(' ').nth(1).unwrap()).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        blobs.len(),
        distinct.len(),
        "a blob was fetched twice: {l:#?}"
    );
    assert_eq!(blobs.len(), 4, "config and three layers: {l:#?}");
    assert_eq!(count(&l, "GET", "/manifests/"), 1, "{l:#?}");
    assert_eq!(count(&l, "GET", "/manifests/1 "), 0, "{l:#?}");
    assert!(
        count(&l, "HEAD", "/manifests/1 ") <= windows,
        "{windows} windows: {l:#?}"
    );
    // The figures of README, "The mirror".
    eprintln!(
        "mirror: rollout on 2 nodes in {:?}: upstream saw {} requests ({} blob GETs, {} manifest GETs, {} tag HEADs); pulling directly, each node would GET the manifest and the {} blobs itself",
        started.elapsed(),
        l.len(),
        blobs.len(),
        count(&l, "GET", "/manifests/"),
        count(&l, "HEAD", "/manifests/"),
        blobs.len(),
    );
    // A digest reference needs nothing from upstream once cached.
    let seen = l.len();
    ctd1.remove_image(tag);
    ctd1.pull(&by_digest).unwrap();
    assert_eq!(upstream_log(&log).len(), seen, "{:#?}", upstream_log(&log));

    // Upstream down, then rate-limited: the tag (stale after its 3 s TTL)
    // and the digest still pull on both nodes; a tag never cached fails
    // naming the upstream and what it answered.
    for (case, limit) in [("stopped", None), ("answering 429", Some(0))] {
        up.take();
        if let Some(n) = limit {
            up = Some(front(&up_addr, &backend.addr, &upstream_pki, &log, Some(n)));
        }
        std::thread::sleep(Duration::from_secs(4));
        let stale = gw.metric("slipway_mirror_stale_tags_served_total{upstream=\"docker.io\"}");
        for ctd in [&ctd1, &ctd2] {
            ctd.remove_image(tag);
            ctd.remove_image(&by_digest);
            ctd.pull(tag)
                .unwrap_or_else(|e| panic!("upstream {case}: {e}"));
            ctd.remove_image(tag);
            ctd.pull(&by_digest)
                .unwrap_or_else(|e| panic!("upstream {case}: {e}"));
        }
        assert!(
            gw.metric("slipway_mirror_stale_tags_served_total{upstream=\"docker.io\"}") > stale,
            "{}",
            gw.metrics()
        );
        let err = ctd1.pull("docker.io/library/app:never").unwrap_err();
        let want = if limit.is_some() {
            "answered 429"
        } else {
            "is unreachable"
        };
        assert!(
            err.contains("upstream docker.io") && err.contains(want),
            "upstream {case}: {err}"
        );
        assert!(gw
            .proc
            .log_text()
            .contains("serving the last digest known for the tag"));
    }
    let l = upstream_log(&log);
    assert!(
        count(&l, "HEAD", "429") + count(&l, "GET", "429") >= 1,
        "{l:#?}"
    );
    let m = gw.metrics();
    for series in [
        "slipway_mirror_upstream_requests_total{upstream=\"docker.io\",status=\"429\"}",
        "slipway_mirror_upstream_requests_total{upstream=\"docker.io\",status=\"unreachable\"}",
        "slipway_mirror_misses_total{upstream=\"docker.io\",kind=\"blob\"}",
        "slipway_mirror_hits_total{upstream=\"docker.io\",kind=\"blob\"}",
        "slipway_mirror_upstream_bytes_total{upstream=\"docker.io\"}",
    ] {
        assert!(gw.metric(series) > 0.0, "{series}:\n{m}");
    }

    // SIGHUP: adding an upstream writes exactly its directory; removing it
    // removes exactly that, and the others stay as they were.
    let certs = ctd1.certs_dir.clone();
    let others = snapshot(&certs);
    let cfg = fs::read_to_string(&a1.config).unwrap();
    fs::write(
        &a1.config,
        cfg.replace(
            "registries = [\"docker.io\"]",
            "registries = [\"docker.io\", \"ghcr.io\"]",
        ),
    )
    .unwrap();
    a1.signal(Signal::SIGHUP);
    wait_for("ghcr.io's hosts.toml", Duration::from_secs(10), || {
        certs.join("ghcr.io/hosts.toml").exists()
    });
    let added = snapshot(&certs);
    let new: Vec<_> = added.keys().filter(|k| !others.contains_key(*k)).collect();
    assert!(new.iter().all(|k| k.starts_with("ghcr.io")), "{new:?}");
    assert!(
        others.iter().all(|(k, v)| added.get(k) == Some(v)),
        "another file changed"
    );
    fs::write(&a1.config, &cfg).unwrap();
    a1.signal(Signal::SIGHUP);
    wait_for(
        "ghcr.io's directory removed",
        Duration::from_secs(10),
        || !certs.join("ghcr.io").exists(),
    );
    assert_eq!(snapshot(&certs), others);
}

/// Credentials (#20): an upstream that demands them (distribution's own
/// htpasswd auth, a `Basic` challenge) is filled with those of
/// `mirror.credentials`, files as a Secret volume holds them; without
/// them, the answer names the upstream and its 401.
#[test]
fn credentials_reach_an_upstream_that_demands_them() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pw = crate::gateway::htpasswd(dir);
    let backend = Registry::start_with(
        dir,
        "127.0.0.1:0",
        None,
        None,
        &format!(
            "auth:\n  htpasswd:\n    realm: stand-in\n    path: {}\n",
            pw.display()
        ),
    );
    let digest_file = dir.join("digest");
    run_ok(
        std::process::Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
            .arg(format!(
                "{}:{}",
                crate::gateway::USER,
                crate::gateway::PASSWORD
            ))
            .arg("--digestfile")
            .arg(&digest_file)
            .arg(format!("oci:{}:app", oci_layout().display()))
            .arg(format!("docker://{}/library/app:1", backend.addr)),
    );
    let digest = fs::read_to_string(&digest_file).unwrap();
    let upstream_pki = Pki::new(
        &dir.join("upstream-pki"),
        &["registry-1.docker.io", "docker.io"],
        &[],
    );
    let ip = upstream_ip(1);
    let log = dir.join("upstream-access.log");
    let _up = front(
        &format!("{ip}:443"),
        &backend.addr,
        &upstream_pki,
        &log,
        None,
    );
    let creds = dir.join("mirror-credentials/docker.io");
    fs::create_dir_all(&creds).unwrap();
    fs::write(creds.join("username"), crate::gateway::USER).unwrap();
    fs::write(creds.join("password"), crate::gateway::PASSWORD).unwrap();
    let pki = Pki::new(&dir.join("pki"), &["registry.shared-services"], &[]);

    for with_credentials in [true, false] {
        let local = Registry::start(dir, "127.0.0.1:0", None, None);
        let extra = match with_credentials {
            true => format!(
                "[mirror.credentials]\n\"docker.io\" = {:?}\n",
                creds.display().to_string()
            ),
            false => String::new(),
        };
        let gw = mirror_gateway(dir, &local, &pki, &upstream_pki, &ip, &extra);
        let out = run(std::process::Command::new("curl")
            .args(["-sS", "-i", "--max-time", "60", "--cacert"])
            .arg(pki.ca())
            .arg("--resolve")
            .arg(format!("registry.shared-services:{}:127.0.0.1", gw.port()))
            .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
            .arg(format!(
                "https://registry.shared-services:{}/v2/mirror/docker.io/library/app/manifests/1",
                gw.port()
            )));
        let answer = String::from_utf8_lossy(&out.stdout).to_string();
        if with_credentials {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains(&format!("docker-content-digest: {}", digest.trim())),
                "{answer}"
            );
        } else {
            assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(
                answer.contains("upstream docker.io") && answer.contains("401"),
                "{answer}"
            );
        }
    }
}
