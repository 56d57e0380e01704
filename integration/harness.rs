//! Test harness over real components: containerd (with its CRI plugin and
//! `config_path`), the distribution registry serving TLS with a certificate
//! from `slipway pki init`, skopeo and umoci for images, and network
//! namespaces for non-loopback registry addresses.
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
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The slipway binary under test: cargo's for tests, `SLIPWAY_BIN` for the
/// demo example (cargo does not tell examples where binaries are).
pub fn slipway_bin() -> String {
    std::env::var("SLIPWAY_BIN")
        .ok()
        .or(option_env!("CARGO_BIN_EXE_slipway").map(String::from))
        .expect("set SLIPWAY_BIN to the slipway binary")
}

/// Integration tests need root and the Debian packages. Under `.ci/run`
/// (SLIPWAY_REQUIRE_INTEGRATION=1) a missing prerequisite fails the test;
/// elsewhere the test is skipped with the reason printed.
pub fn prerequisites() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_string());
    }
    for bin in [
        "containerd",
        "runc",
        "docker-registry",
        "skopeo",
        "umoci",
        "ip",
        "unshare",
        "setpriv",
    ] {
        if which(bin).is_none() {
            missing.push(bin.to_string());
        }
    }
    if missing.is_empty() {
        remove_stale_images();
        return true;
    }
    let msg = format!(
        "integration test needs {}: run `bash .ci/run` as root",
        missing.join(", ")
    );
    if std::env::var_os("SLIPWAY_REQUIRE_INTEGRATION").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
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

fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
/// TEST-NET-1: the host side gets .1, the namespace .2. Removed on drop.
pub struct NetNs {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        let n = (std::process::id() % 1000) * 16 + unique();
        let name = format!("slipway-it-{n}");
        let host_if = format!("swh{n}");
        let ns_if = format!("swn{n}");
        let base = (unique() % 60) * 4; // 192.0.2.0/24 in /30 steps
        let host_ip = format!("192.0.2.{}", base + 1);
        let ns_ip = format!("192.0.2.{}", base + 2);
        let _ = run(Command::new("ip").args(["netns", "del", &name]));
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
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
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["link", "del", &self.host_if]));
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

// ------------------------------------------------------------------ registry

/// The Debian distribution registry (2.8), TLS or plain HTTP.
pub struct Registry {
    pub proc: Proc,
    pub addr: String,
    pub data: PathBuf,
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
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls_yaml}{extra}",
                data.join("storage").display()
            ),
        )
        .unwrap();
        let mut cmd = match netns {
            Some(ns) => ns.command("docker-registry"),
            None => Command::new("docker-registry"),
        };
        cmd.arg("serve").arg(&cfg);
        let proc = Proc::spawn("registry", cmd, data.join("registry.log"));
        let a = addr.to_string();
        wait_for(
            &format!("registry on {addr}"),
            Duration::from_secs(10),
            || TcpStream::connect_timeout(&a.parse().unwrap(), Duration::from_millis(200)).is_ok(),
        );
        Registry {
            proc,
            addr: addr.into(),
            data,
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
        let n = unique();
        let ip = format!(
            "127.53.{}.{}",
            (std::process::id() % 250) + 1,
            (n % 250) + 1
        );
        let sock = std::net::UdpSocket::bind(format!("{ip}:53"))
            .unwrap_or_else(|e| panic!("bind {ip}:53: {e}"));
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

/// containerd 1.6 with its CRI plugin, private root/state/socket, and
/// `config_path` pointing at `certs_dir`.
pub struct Containerd {
    pub proc: Proc,
    pub dns: NxDns,
    pub sock: PathBuf,
    pub certs_dir: PathBuf,
    pub config_file: PathBuf,
    pub dir: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        Self::start_opts(dir, true)
    }

    /// `with_config_path: false` leaves `config_path` out, as on GKE/DOKS
    /// images.
    pub fn start_opts(dir: &Path, with_config_path: bool) -> Containerd {
        let dir = dir.join(format!("ctd{}", unique()));
        fs::create_dir_all(&dir).unwrap();
        let certs_dir = dir.join("certs.d");
        fs::create_dir_all(&certs_dir).unwrap();
        let sock = dir.join("c.sock");
        let config_file = dir.join("config.toml");
        fs::write(
            &config_file,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
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
                registry = if with_config_path {
                    format!(
                        "  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{}\"\n",
                        certs_dir.display()
                    )
                } else {
                    String::new()
                },
            ),
        )
        .unwrap();
        let dns = NxDns::start();
        fs::write(dir.join("nsswitch.conf"), "hosts: files dns\n").unwrap();
        fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {}\noptions timeout:1 attempts:1\n", dns.ip),
        )
        .unwrap();
        let proc = Self::spawn(&dir, &config_file, &sock);
        let c = Containerd {
            proc,
            dns,
            sock,
            certs_dir,
            config_file,
            dir,
        };
        wait_for("containerd CRI", Duration::from_secs(20), || {
            rt().block_on(c.cri_version()).is_ok()
        });
        c
    }

    fn spawn(dir: &Path, config_file: &Path, sock: &Path) -> Proc {
        let _ = fs::remove_file(sock);
        let script = format!(
            "mount --bind {d}/nsswitch.conf /etc/nsswitch.conf && mount --bind {d}/resolv.conf /etc/resolv.conf && exec containerd --config {c}",
            d = dir.display(),
            c = config_file.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
        let proc = Proc::spawn(
            "containerd",
            cmd,
            dir.join(format!("containerd-{}.log", unique())),
        );
        let s = sock.to_path_buf();
        wait_for("containerd socket", Duration::from_secs(20), || s.exists());
        proc
    }

    /// Stop and start containerd again with the same config, as an operator
    /// does after changing `config_path`.
    pub fn restart(&mut self) {
        self.proc.stop();
        self.proc = Self::spawn(&self.dir, &self.config_file, &self.sock);
        wait_for("containerd CRI", Duration::from_secs(20), || {
            rt().block_on(self.cri_version()).is_ok()
        });
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
        let proxy = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
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
        text.push_str(&format!("\n[proxy]\nlisten = {proxy:?}\nclient_header_timeout_secs = 1\nbody_idle_timeout_secs = 3\n{proxy_keys}\n[admin]\nlisten = {admin:?}\n{extra}"));
        fs::write(&config, text).unwrap();
        let mut cmd = Command::new(slipway_bin());
        cmd.args(["agent", "--config"])
            .arg(&config)
            .env("SLIPWAY_LOG", "info,slipway=debug")
            .env("SLIPWAY_LOG_FORMAT", "text");
        let proc = Proc::spawn(
            "slipway-agent",
            cmd,
            dir.join(format!("agent-{}.log", unique())),
        );
        let a = Agent {
            proc,
            config,
            proxy,
            admin,
        };
        let first = certs_dir.join(aliases[0]).join("hosts.toml");
        wait_for("agent host configuration", Duration::from_secs(10), || {
            first.exists()
        });
        wait_for("agent /healthz", Duration::from_secs(10), || {
            http(&a.admin, "GET", "/healthz", &[])
                .map(|r| r.status == 200)
                .unwrap_or(false)
        });
        a
    }

    pub fn metrics(&self) -> String {
        http(&self.admin, "GET", "/metrics", &[])
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
