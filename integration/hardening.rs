//! #13's node-side findings against the real agent binary: hostile host
//! files (a FIFO, a 1 GiB sparse file, a persistent bad file) and the admin
//! server at its fd limit. No containerd or registry is needed: the agent
//! reads a containerd config file that covers its certs_dir, and its
//! upstream never answers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::ALIAS;

const OTHER: &str = "203.0.113.7:5000";

struct Node {
    _tmp: tempfile::TempDir,
    certs: PathBuf,
    agent: Option<Agent>,
}

impl Node {
    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }
}

/// An agent for ALIAS and OTHER; `prepare` runs on certs_dir before start.
fn node(prepare: impl FnOnce(&Path)) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let certs = dir.join("certs.d");
    fs::create_dir_all(&certs).unwrap();
    let config = dir.join("containerd.toml");
    fs::write(
        &config,
        format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = {:?}\n",
            certs.display().to_string()
        ),
    )
    .unwrap();
    let pki = Pki::new(&dir.join("pki"), &["registry.shared-services"], &[]);
    prepare(&certs);
    let agent = Agent::start(
        &dir,
        &certs,
        &config,
        &[ALIAS, OTHER],
        "https://registry.shared-services:5443",
        // Nothing listens there: the upstream never answers.
        Some("127.0.0.1:9"),
        &pki.ca(),
        "\n[agent]\ngrace_period_secs = 2\nreconcile_interval_secs = 1\n",
    );
    Node {
        _tmp: tmp,
        certs,
        agent: Some(agent),
    }
}

fn readyz(a: &Agent) -> (u16, String) {
    let r = http(&a.admin, "GET", "/readyz", &[]).unwrap();
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// #13.1/.2: a FIFO named hosts.toml froze the agent's loop in `open`:
/// SIGTERM was ignored, other aliases were not repaired, /readyz said ready.
#[test]
fn a_fifo_hosts_toml_neither_blocks_the_agent_nor_passes_readiness() {
    if !prerequisites() {
        return;
    }
    let mut n = node(|certs| {
        fs::create_dir_all(certs.join(ALIAS)).unwrap();
        nix::unistd::mkfifo(
            &certs.join(ALIAS).join("hosts.toml"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
    });
    let fifo = n.certs.join(ALIAS).join("hosts.toml");
    let other = n.certs.join(OTHER).join("hosts.toml");
    wait_for("the other alias applied", Duration::from_secs(10), || {
        other.exists()
    });
    wait_for("/readyz names the FIFO", Duration::from_secs(5), || {
        let (status, body) = readyz(n.agent());
        status == 503 && body.contains(&format!("{}: cannot read: is a FIFO", fifo.display()))
    });
    // The other alias is still kept true.
    fs::remove_file(&other).unwrap();
    wait_for("the other alias restored", Duration::from_secs(5), || {
        other.exists()
    });
    let mut agent = n.agent.take().unwrap();
    let t = Instant::now();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(4)), Some(0));
    eprintln!("exited {:?} after SIGTERM", t.elapsed());
}

/// #13.2: a 1 GiB sparse hosts.toml was read whole on every pass (RSS
/// 2.3-3 GB, one core busy).
#[test]
fn a_sparse_gigabyte_hosts_toml_keeps_the_agent_small() {
    if !prerequisites() {
        return;
    }
    let n = node(|certs| {
        fs::create_dir_all(certs.join(ALIAS)).unwrap();
        fs::File::create(certs.join(ALIAS).join("hosts.toml"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
    });
    let pid = n.agent().proc.child.id();
    wait_for("/readyz names the size", Duration::from_secs(5), || {
        readyz(n.agent()).1.contains("byte limit for a host file")
    });
    // Several passes: ticks every second, and events from touching the dir.
    for i in 0..30 {
        fs::write(n.certs.join(OTHER).join(format!("touch-{i}")), b"x").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let hwm = vm_hwm_kib(pid);
    eprintln!("agent peak RSS {} KiB", hwm);
    assert!(hwm < 64 * 1024, "peak RSS {hwm} KiB");
}

/// #13.6: a persistent bad file was logged on every pass (99 ERROR lines
/// in 10 s).
#[test]
fn a_persistent_bad_file_is_logged_at_most_twice_in_10s() {
    if !prerequisites() {
        return;
    }
    let n = node(|certs| {
        fs::create_dir_all(certs.join(ALIAS)).unwrap();
        fs::write(certs.join(ALIAS).join("hosts.toml"), "[host\nbroken").unwrap();
    });
    let bad = n.certs.join(ALIAS).join("hosts.toml");
    let start = Instant::now();
    // Events every 100 ms in the bad alias's directory, and a tick a second.
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(10) {
        fs::write(n.certs.join(ALIAS).join(format!("note-{}", i % 3)), b"x").unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = n.agent().proc.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains(&bad.display().to_string()))
        .count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{log}");
    assert!(
        n.agent().metric(&format!(
            "slipway_hostconfig_errors_total{{alias=\"{ALIAS}\"}}"
        )) >= 2.0
    );
}

/// #12/#13.5: at the fd limit the admin server's accept loop spun a core.
#[test]
fn the_admin_server_at_its_fd_limit_does_not_spin() {
    if !prerequisites() {
        return;
    }
    let n = node(|_| {});
    let pid = n.agent().proc.child.id();
    wait_for("agent settled", Duration::from_secs(5), || {
        n.certs.join(OTHER).join("hosts.toml").exists()
    });
    // Few descriptors left: every accept beyond them fails with EMFILE.
    let open = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let limit = open + 4;
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "prlimit: {out:?}");
    let mut held = Vec::new();
    for _ in 0..16 {
        if let Ok(s) = std::net::TcpStream::connect(&n.agent().admin) {
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_secs(pid) - before;
    drop(held);
    eprintln!("agent CPU at the fd limit: {used:.2} s in 2 s");
    assert!(used < 0.5, "{used} CPU seconds in 2 s");
}

/// #12: an alias removed by SIGHUP stayed in /metrics as
/// `slipway_hostconfig_state{alias="gone.example:5000",state="applied"} 1`,
/// and the removal path labelled series with display text.
#[test]
fn sighup_removing_an_alias_drops_its_series_and_its_directory() {
    if !prerequisites() {
        return;
    }
    let n = node(|_| {});
    let a = n.agent();
    wait_for("both aliases applied", Duration::from_secs(5), || {
        a.metrics().contains(&format!(
            "slipway_hostconfig_state{{alias=\"{OTHER}\",state=\"applied\"}} 1"
        ))
    });
    let text = fs::read_to_string(&a.config).unwrap();
    let fewer = text.replace(&format!(", {OTHER:?}"), "");
    assert_ne!(text, fewer);
    fs::write(&a.config, fewer).unwrap();
    a.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        "the removed alias's series gone",
        Duration::from_secs(5),
        || {
            let m = a.metrics();
            !m.contains(OTHER) && m.contains(&format!("alias=\"{ALIAS}\""))
        },
    );
    assert!(!a.metrics().contains("no longer configured"));
    wait_for("its directory removed", Duration::from_secs(5), || {
        !n.certs.join(OTHER).exists()
    });
}
