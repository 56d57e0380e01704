//! Integration tests against real components: containerd's CRI plugin (the
//! kubelet path), the distribution registry with TLS from `slipway pki
//! init`, skopeo and umoci. Run as root by `.ci/run`.

mod canary;
mod daemon;
mod gateway;
mod gc;
mod hardening;
mod harness;
mod layouts;
mod mirror;
mod object_storage;
mod proxy_hardening;
mod scale;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use harness::*;

pub(crate) const ALIAS: &str = "registry.shared-services:5000";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `slipway agent --once <flags> --config <cfg>`.
fn agent_once(cfg: &Path, flags: &[&str]) -> Output {
    let mut args = vec!["agent", "--once"];
    args.extend_from_slice(flags);
    args.extend(["--config", cfg.to_str().unwrap()]);
    slipway(&args)
}

/// The run failed as a whole: exit code 1.
fn assert_exit_1(out: &Output) {
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(out), stderr(out));
}

/// A TLS registry inside a network namespace, reachable at a non-loopback
/// IP (like a LoadBalancer address), with a certificate from `slipway pki
/// init` for the cluster names and that IP, and the test image pushed.
pub(crate) struct TlsSetup {
    pub(crate) _tmp: tempfile::TempDir,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) ns: NetNs,
    pub(crate) pki: Pki,
    pub(crate) registry: Registry,
    pub(crate) digest: String,
}

pub(crate) fn tls_setup() -> TlsSetup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let ns = NetNs::new();
    let pki = Pki::new(
        &dir.join("pki"),
        &[
            "registry.shared-services",
            "registry.shared-services.svc.cluster.local",
        ],
        &[&ns.ns_ip],
    );
    let registry = Registry::start(&dir, &format!("{}:5443", ns.ns_ip), Some(&pki), Some(&ns));
    let digest = push(&registry.addr, "app:v1", Some(&pki));
    TlsSetup {
        _tmp: tmp,
        dir,
        ns,
        pki,
        registry,
        digest,
    }
}

impl TlsSetup {
    /// The TLS registry at its IP, as an agent's upstream.
    fn upstream(&self) -> String {
        format!("https://{}", self.registry.addr)
    }

    /// An agent config for `aliases` on `ctd`, to `upstream` with this CA.
    fn agent_config(&self, ctd: &Containerd, aliases: &[&str], upstream: &str) -> PathBuf {
        agent_config(
            &self.dir,
            &ctd.certs_dir,
            &ctd.config_file,
            aliases,
            upstream,
            &self.pki.ca(),
        )
    }
}

/// A scratch directory, a PKI for the cluster name in it, and an agent
/// config there that applies ALIAS and 203.0.113.7:5000 under `certs` (a
/// path made from the scratch directory) with no containerd config.
fn two_alias_setup(certs: impl FnOnce(&Path) -> PathBuf) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), &["registry.shared-services"], &[]);
    let certs = certs(tmp.path());
    let cfg = agent_config(
        tmp.path(),
        &certs,
        &tmp.path().join("none.toml"),
        &[ALIAS, "203.0.113.7:5000"],
        "https://registry.shared-services:5000",
        &pki.ca(),
    );
    (tmp, certs, cfg)
}

/// (a) The seed's first failure: with no slipway config, containerd cannot
/// resolve the cluster name.
#[test]
fn a_without_slipway_cluster_name_fails_with_no_such_host() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let image = format!("{ALIAS}/app@{}", s.digest);
    let err = ctd
        .pull(&image)
        .expect_err("pull must fail without slipway");
    eprintln!("seed failure reproduced: {err}");
    assert!(err.contains("no such host"), "{err}");
    assert!(err.contains("lookup registry.shared-services"), "{err}");
}

/// (b) The seed's second failure over an IP over plain HTTP, then with
/// `slipway agent --once` both the cluster name and the IP alias pull by
/// digest over HTTPS with the CA.
#[test]
fn b_agent_once_makes_cluster_name_and_ip_alias_pullable() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);

    // The seed exposed a plain-HTTP registry on a LoadBalancer IP.
    let plain = Registry::start(&s.dir, &format!("{}:5000", s.ns.ns_ip), None, Some(&s.ns));
    let plain_digest = push(&plain.addr, "app:v1", None);
    let err = ctd
        .pull(&format!("{}/app@{plain_digest}", plain.addr))
        .expect_err("https to an http registry must fail");
    eprintln!("seed failure reproduced: {err}");
    assert!(
        err.contains("server gave HTTP response to HTTPS client"),
        "{err}"
    );

    // The TLS registry at its IP is not trusted yet either.
    let ip_alias = s.registry.addr.clone();
    let ip_image = format!("{ip_alias}/app@{}", s.digest);
    let err = ctd.pull(&ip_image).expect_err("unknown CA must fail");
    assert!(err.contains("x509") || err.contains("certificate"), "{err}");

    let cfg = s.agent_config(&ctd, &[ALIAS, &ip_alias], &s.upstream());
    let out = agent_once(&cfg, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{ALIAS}: changed (owned)")),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("containerd reads"),
        "{}",
        stderr(&out)
    );

    let image = format!("{ALIAS}/app@{}", s.digest);
    let r = ctd
        .pull(&image)
        .unwrap_or_else(|e| panic!("pull {image}: {e}"));
    assert!(r.starts_with("sha256:"), "{r}");
    ctd.pull(&ip_image)
        .unwrap_or_else(|e| panic!("pull {ip_image}: {e}"));
    // By tag too (needs the `resolve` capability).
    ctd.pull(&format!("{ALIAS}/app:v1")).unwrap();

    // Idempotent: a second run changes nothing.
    let out = agent_once(&cfg, &[]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains(&format!("{ALIAS}: unchanged")),
        "{}",
        stdout(&out)
    );
}

/// (c) Foreign files in certs_dir survive install and are byte-identical
/// after cleanup; the merged file works for containerd in between.
#[test]
fn c_foreign_files_are_identical_after_cleanup() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    // An administrator's own hosts.toml for our alias, another registry's
    // directory with client certificates, and a loose file at the top.
    let admin = ctd.certs_dir.join(ALIAS);
    fs::create_dir_all(&admin).unwrap();
    fs::write(
        admin.join("hosts.toml"),
        "# ours, hands off\nserver = \"https://registry.shared-services:5000\"\n\n# a mirror that does not exist\n[host.\"https://127.0.0.1:1\"]\n  capabilities = [\"pull\"]\n",
    )
    .unwrap();
    fs::write(admin.join("client.cert"), "not really a cert\n").unwrap();
    let other = ctd.certs_dir.join("docker.io");
    fs::create_dir_all(&other).unwrap();
    fs::write(
        other.join("hosts.toml"),
        "server = \"https://registry-1.docker.io\"\n",
    )
    .unwrap();
    fs::write(ctd.certs_dir.join("README"), "admin notes\n").unwrap();
    let before = snapshot(&ctd.certs_dir);

    let cfg = s.agent_config(&ctd, &[ALIAS], &s.upstream());
    let out = agent_once(&cfg, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("(merged)"), "{}", stdout(&out));
    let merged = fs::read_to_string(admin.join("hosts.toml")).unwrap();
    assert!(
        merged.contains("# a mirror that does not exist"),
        "{merged}"
    );
    ctd.pull(&format!("{ALIAS}/app@{}", s.digest))
        .unwrap_or_else(|e| panic!("pull through merged file: {e}\n{merged}"));
    assert_eq!(
        fs::read(other.join("hosts.toml")).unwrap(),
        b"server = \"https://registry-1.docker.io\"\n"
    );

    let out = slipway(&["cleanup", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        snapshot(&ctd.certs_dir),
        before,
        "cleanup did not restore certs.d byte for byte"
    );
}

/// (d) SIGKILL at random points during a loop of rewrites never leaves a
/// partial or unparsable hosts.toml, and containerd still pulls afterwards.
#[test]
fn d_sigkill_during_rewrites_never_leaves_a_partial_file() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let ctd = Containerd::start(&s.dir);
    let good = s.upstream();
    // Two configs whose output differs, so every run rewrites the files.
    let aliases = [
        ALIAS,
        "registry.shared-services.svc.cluster.local:5000",
        "203.0.113.7:5000",
    ];
    let cfgs = [
        s.agent_config(&ctd, &aliases, &good),
        s.agent_config(
            &ctd,
            &aliases,
            "https://registry.shared-services.svc.cluster.local:5443",
        ),
    ];
    // Time a full run so kill points spread over all of it.
    let t = std::time::Instant::now();
    for c in &cfgs {
        assert!(agent_once(c, &[]).status.success());
    }
    let full = (t.elapsed() / 2).as_micros() as u64;
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill-loop seed {seed}, full run {full}us");
    let mut killed = 0;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..150 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % (full + full / 5));
        let mut child = Command::new(slipway_bin())
            .args(["agent", "--once", "--config"])
            .arg(&cfgs[i % 2])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        for a in aliases {
            let p = ctd.certs_dir.join(a).join("hosts.toml");
            if let Ok(text) = fs::read_to_string(&p) {
                assert!(
                    text.starts_with("# slipway: managed file"),
                    "iteration {i}: {p:?}: {text:?}"
                );
                let doc: toml_edit::DocumentMut = text
                    .parse()
                    .unwrap_or_else(|e| panic!("iteration {i}: {p:?} unparsable: {e}\n{text}"));
                let first = doc["host"]
                    .as_table()
                    .and_then(|t| t.iter().next().map(|(k, _)| k.to_string()));
                *seen
                    .entry(first.unwrap_or_else(|| panic!("iteration {i}: {p:?} has no host")))
                    .or_default() += 1;
            }
        }
    }
    eprintln!("upstreams seen in hosts.toml across the loop: {seen:?}");
    assert_eq!(seen.len(), 2, "the loop never switched content: {seen:?}");
    eprintln!("{killed} of 150 runs were killed mid-flight");
    assert!(killed > 10, "the loop never interrupted a run ({killed})");
    // A clean run repairs everything and removes stray temp files.
    let out = agent_once(&cfgs[0], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for a in aliases {
        for e in fs::read_dir(ctd.certs_dir.join(a)).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            assert!(
                !n.starts_with(".slipway-tmp-"),
                "stray temp file {n} in {a}"
            );
        }
    }
    ctd.pull(&format!("{ALIAS}/app@{}", s.digest)).unwrap();
}

/// A certs_dir on a read-only filesystem: every alias fails with an error
/// naming the path, the exit code is non-zero, nothing is written.
#[test]
fn read_only_certs_dir_fails_cleanly() {
    if !prerequisites() {
        return;
    }
    let (_tmp, ro, cfg) = two_alias_setup(|tmp| tmp.join("ro"));
    fs::create_dir_all(&ro).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(&ro),
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&ro);
    let out = agent_once(&cfg, &[]);
    assert_exit_1(&out);
    let o = stdout(&out);
    assert!(
        o.contains(&format!(
            "{ALIAS}: error: {}/{ALIAS}: cannot create directory: Read-only file system",
            ro.display()
        )),
        "{o}"
    );
    assert!(o.contains("203.0.113.7:5000: error:"), "{o}");
    assert!(
        stderr(&out).contains("2 of 2 registry aliases failed to apply"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_dir(&ro).unwrap().count(), 0);
}

/// An alias directory the agent cannot read fails alone; the other alias
/// still applies and the failure is reported.
#[test]
fn unreadable_alias_dir_fails_alone() {
    if !prerequisites() {
        return;
    }
    let (_tmp, certs, cfg) = two_alias_setup(|tmp| tmp.join("certs.d"));
    let locked = certs.join(ALIAS);
    fs::create_dir_all(&locked).unwrap();
    fs::write(locked.join("hosts.toml"), "server = \"https://x:1\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    // Root would read a 0000 directory anyway; drop the capabilities that
    // let it (a non-root agent, or an LSM denial, looks the same).
    let out = run(Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--bounding-set=-dac_override,-dac_read_search",
            "--",
        ])
        .arg(slipway_bin())
        .args(["agent", "--once", "--config", cfg.to_str().unwrap()]));
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    assert_exit_1(&out);
    let o = stdout(&out);
    assert!(
        o.contains(&format!(
            "{ALIAS}: error: {}: cannot read directory: Permission denied",
            locked.display()
        )),
        "{o}"
    );
    assert!(o.contains("203.0.113.7:5000: changed (owned)"), "{o}");
    assert_eq!(
        fs::read_to_string(locked.join("hosts.toml")).unwrap(),
        "server = \"https://x:1\"\n"
    );
    assert!(certs.join("203.0.113.7:5000/hosts.toml").exists());
}

/// A node whose containerd has no `config_path`: the agent says exactly what
/// to change; `--fix-containerd-config` adds it with a backup and never
/// restarts containerd; after the operator restarts it, the pull works.
#[test]
fn fix_containerd_config_adds_config_path_with_backup() {
    if !prerequisites() {
        return;
    }
    let s = tls_setup();
    let mut ctd = Containerd::start_opts(&s.dir, false);
    let original = fs::read(&ctd.config_file).unwrap();
    let cfg = s.agent_config(&ctd, &[ALIAS], &s.upstream());
    let out = agent_once(&cfg, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let advice = format!(
        "containerd does not read {certs}: {file} has no config_path; set config_path = \"{certs}\" under [{section}] in {file}, then restart containerd",
        certs = ctd.certs_dir.display(),
        file = ctd.config_file.display(),
        section = ctd.release.registry_section(),
    );
    assert!(
        stderr(&out).contains(&advice),
        "wanted {advice}\nin {}",
        stderr(&out)
    );
    let image = format!("{ALIAS}/app@{}", s.digest);
    assert!(ctd.pull(&image).unwrap_err().contains("no such host"));
    assert_eq!(
        fs::read(&ctd.config_file).unwrap(),
        original,
        "changed without opt-in"
    );

    let pid = ctd.proc.child.id();
    let out = agent_once(&cfg, &["--fix-containerd-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("containerd must be restarted"),
        "{}",
        stderr(&out)
    );
    // Still the same containerd process: slipway never restarts it.
    assert!(ctd.proc.child.try_wait().unwrap().is_none());
    assert_eq!(ctd.proc.child.id(), pid);
    let backups: Vec<_> = fs::read_dir(&ctd.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("config.toml.slipway-backup."))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(fs::read(&backups[0]).unwrap(), original);
    let patched = fs::read_to_string(&ctd.config_file).unwrap();
    // Only the registry table and its config_path are added; every other
    // line stays, in order. Where the table goes depends on the version: a
    // 1.x file gets it at the end, a 2.x file (whose
    // [plugins."io.containerd.cri.v1.images"] exists) right after its parent.
    let wanted = format!("config_path = \"{}\"", ctd.certs_dir.display());
    let header = format!("[{}]", ctd.release.registry_section());
    let kept: Vec<&str> = patched
        .lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != header && l.trim() != wanted)
        .collect();
    let before: Vec<&str> = std::str::from_utf8(&original)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(kept, before, "{patched}");
    assert!(patched.contains(&header), "{patched}");
    assert!(patched.contains(&wanted), "{patched}");

    ctd.restart();
    ctd.pull(&image)
        .unwrap_or_else(|e| panic!("after restart: {e}\n{patched}"));
    // Now covered: a further run reports it and does not touch the file.
    let out = agent_once(&cfg, &["--fix-containerd-config"]);
    assert!(
        stderr(&out).contains("containerd reads"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_to_string(&ctd.config_file).unwrap(), patched);
}
