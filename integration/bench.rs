//! Benchmarks of the node agent against the direct path and nginx, each
//! ratio measured in one run on the same machine (machines are noisy).
//!
//! Run as root after the README's set-up: `cargo bench --bench proxy`
//! (`SLIPWAY_BENCH_GIB=…` changes the blob size, default 1).
//!
//! (a) GET of a 1 GiB blob: directly from the registry over TLS, through
//!     slipway, and through nginx as a TLS reverse proxy (all with curl).
//! (b) 64 concurrent blob GETs through slipway: errors, peak agent RSS.
//! (c) idle agent RSS 60 s after start.
//! (d) CRI PullImage of a 10-layer ~200 MB image through slipway vs a
//!     direct hosts.toml entry with the CA, each on a fresh containerd,
//!     alternating, median of 5.

#[path = "harness.rs"]
mod harness;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;

const ALIAS: &str = "registry.shared-services:5000";

fn rss_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// curl one URL to /dev/null; seconds and bytes.
fn curl(url: &str, ca: Option<&Path>) -> (f64, u64) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "-f",
        "-o",
        "/dev/null",
        "-w",
        "%{time_total} %{size_download}",
    ]);
    if let Some(ca) = ca {
        c.arg("--cacert").arg(ca);
    }
    let out = run_ok(c.arg(url));
    let mut it = out.split_whitespace();
    (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Upload a raw blob of `bytes` random bytes; its digest (from sha256sum).
fn upload_blob(registry: &str, pki: &Pki, dir: &Path, bytes: u64) -> String {
    let f = dir.join("blob.bin");
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("head -c {bytes} /dev/urandom > {}", f.display())),
    );
    let digest = put_blob(&format!("https://{registry}"), &[], &pki.ca(), "bench", &f);
    fs::remove_file(&f).unwrap();
    digest
}

fn nginx(dir: &Path, listen: &str, upstream: &str, pki: &Pki) -> Proc {
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    fs::write(
        &conf,
        format!(
            r#"
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fastcgi;
  uwsgi_temp_path {d}/nginx-uwsgi;
  scgi_temp_path {d}/nginx-scgi;
  upstream registry {{ server {upstream}; keepalive 16; }}
  server {{
    listen {listen};
    location /v2/ {{
      proxy_pass https://registry;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_name registry.shared-services;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }}
  }}
}}
"#,
            ca = pki.ca().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&conf).arg("-p").arg(dir);
    let p = Proc::spawn("nginx", cmd, dir.join("nginx.log"));
    let a = listen.to_string();
    wait_for("nginx", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&a).is_ok()
    });
    p
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    if !prerequisites_with(&["nginx", "curl"]) {
        std::process::exit(2);
    }
    let gib: f64 = std::env::var("SLIPWAY_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(
        &dir.join("pki"),
        &["registry.shared-services"],
        &["127.0.0.1"],
    );
    // Port 0: the registry binds a free port and reports it.
    let registry = Registry::start(dir, "127.0.0.1:0", Some(&pki), None);
    let reg_addr = registry.addr.clone();
    let ctd_dir = dir.join("ctd");
    fs::create_dir_all(&ctd_dir).unwrap();
    let certs = dir.join("agent-certs.d");
    let agent = Agent::start(
        dir,
        &certs,
        &dir.join("none.toml"),
        &[ALIAS],
        "https://registry.shared-services:5000",
        Some(&reg_addr),
        &pki.ca(),
        "",
    );
    let agent_pid = agent.proc.child.id();
    // A second agent that only starts and then idles, for (c).
    let idle_certs = dir.join("idle-certs.d");
    let idle = Agent::start(
        dir,
        &idle_certs,
        &dir.join("none.toml"),
        &[ALIAS],
        "https://registry.shared-services:5000",
        Some(&reg_addr),
        &pki.ca(),
        "",
    );
    let idle_started = Instant::now();
    // nginx cannot listen on port 0 and say which port it got.
    let nginx_addr = unique_loopback_addr();
    let _nginx = nginx(dir, &nginx_addr, &reg_addr, &pki);

    // SLIPWAY_BENCH_ONLY=a,b,c,d runs a subset.
    let only = std::env::var("SLIPWAY_BENCH_ONLY").unwrap_or_else(|_| "a,b,c,d".into());
    let part = |p: &str| only.split(',').any(|x| x.trim() == p);
    println!(
        "slipway benchmarks ({} cores; release build)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if part("a") {
        let size = (gib * (1u64 << 30) as f64) as u64;
        let digest = upload_blob(&reg_addr, &pki, dir, size);
        let path = format!("/v2/bench/blobs/{digest}");
        let (mut d, mut s, mut n) = (vec![], vec![], vec![]);
        for round in 0..4 {
            let direct = curl(&format!("https://{reg_addr}{path}"), Some(&pki.ca()));
            let slip = curl(&format!("http://{}{path}", agent.proxy), None);
            let ngx = curl(&format!("http://{nginx_addr}{path}"), None);
            assert_eq!((direct.1, slip.1, ngx.1), (size, size, size));
            if round > 0 {
                // round 0 warms the page cache and connection pools
                d.push(direct.0);
                s.push(slip.0);
                n.push(ngx.0);
            }
        }
        let (d, s, n) = (median(d), median(s), median(n));
        let mib = size as f64 / (1 << 20) as f64;
        println!(
            "\n(a) GET of a {mib:.0} MiB blob, median of 3 (after 1 warm-up), curl to /dev/null"
        );
        println!("| path | seconds | MiB/s | vs direct |");
        println!("|---|---|---|---|");
        println!(
            "| direct TLS to the registry | {d:.3} | {:.0} | 1.00x |",
            mib / d
        );
        println!(
            "| through slipway (http on loopback -> TLS) | {s:.3} | {:.0} | {:.2}x |",
            mib / s,
            s / d
        );
        println!(
            "| through nginx (http on loopback -> TLS) | {n:.3} | {:.0} | {:.2}x |",
            mib / n,
            n / d
        );
        println!("slipway / nginx = {:.2}", s / n);
    }

    if part("b") {
        let small = upload_blob(&reg_addr, &pki, dir, 16 << 20);
        let base_hwm = rss_kib(agent_pid, "VmHWM:");
        let t = Instant::now();
        let handles: Vec<_> = (0..64)
            .map(|_| {
                let url = format!("http://{}/v2/bench/blobs/{small}", agent.proxy);
                std::thread::spawn(move || {
                    let out = Command::new("curl")
                        .args(["-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}"])
                        .arg(url)
                        .output()
                        .unwrap();
                    out.status.success()
                        && String::from_utf8_lossy(&out.stdout).trim() == (16u64 << 20).to_string()
                })
            })
            .collect();
        let ok = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        let elapsed = t.elapsed().as_secs_f64();
        let hwm = rss_kib(agent_pid, "VmHWM:");
        println!("\n(b) 64 concurrent GETs of a 16 MiB blob through slipway");
        println!("| errors | wall seconds | agent peak RSS (VmHWM) | before |");
        println!("|---|---|---|---|");
        println!(
            "| {} | {elapsed:.2} | {:.1} MiB | {:.1} MiB |",
            64 - ok,
            hwm as f64 / 1024.0,
            base_hwm as f64 / 1024.0
        );
    }

    if part("d") {
        let layout = umoci_layout(&dir.join("ten"), &[20_000_000; 10]);
        let ten = push_layout(&layout, &reg_addr, "ten:v1", Some(&pki));
        let image = format!("{ALIAS}/ten@{ten}");
        let (mut via, mut direct) = (vec![], vec![]);
        let mut agent_cpu = vec![];
        for round in 0..5 {
            // Alternate which goes first so neither always gets a warmer cache.
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for through_slipway in order {
                let ctd = Containerd::start(&ctd_dir);
                let dst = ctd.certs_dir.join(ALIAS);
                if through_slipway {
                    fs::create_dir_all(&dst).unwrap();
                    for f in ["hosts.toml", "slipway-ca.crt"] {
                        fs::copy(certs.join(ALIAS).join(f), dst.join(f)).unwrap();
                    }
                } else {
                    let cfg = agent_config(
                        &ctd_dir,
                        &ctd.certs_dir,
                        &ctd.config_file,
                        &[ALIAS],
                        &format!("https://{reg_addr}"),
                        &pki.ca(),
                    );
                    assert!(
                        slipway(&["agent", "--once", "--config", cfg.to_str().unwrap()])
                            .status
                            .success()
                    );
                }
                let (t, cpu0) = (Instant::now(), cpu_secs(agent_pid));
                ctd.pull(&image).unwrap();
                let secs = t.elapsed().as_secs_f64();
                if through_slipway {
                    agent_cpu.push(cpu_secs(agent_pid) - cpu0);
                }
                if through_slipway {
                    via.push(secs)
                } else {
                    direct.push(secs)
                }
            }
        }
        let (v, dd) = (median(via.clone()), median(direct.clone()));
        println!(
            "\n(d) CRI PullImage of a 10-layer ~200 MB image, fresh containerd each, median of 5"
        );
        println!("| path | seconds | vs direct |");
        println!("|---|---|---|");
        println!("| direct hosts.toml entry with the CA | {dd:.3} | 1.00x |");
        println!("| through slipway | {v:.3} | {:.2}x |", v / dd);
        println!("runs (slipway): {via:.3?}\nruns (direct):  {direct:.3?}\nagent CPU seconds per pull through slipway: {agent_cpu:.3?}");
    }

    if part("c") {
        std::thread::sleep(Duration::from_secs(60).saturating_sub(idle_started.elapsed()));
        let idle_pid = idle.proc.child.id();
        println!(
        "\n(c) idle agent RSS {:.0} s after start: {:.1} MiB (VmRSS; peak {:.1} MiB); the busy agent above now holds {:.1} MiB",
        idle_started.elapsed().as_secs_f64(),
        rss_kib(idle_pid, "VmRSS:") as f64 / 1024.0,
        rss_kib(idle_pid, "VmHWM:") as f64 / 1024.0,
        rss_kib(agent_pid, "VmRSS:") as f64 / 1024.0
    );
    }
    drop(idle);
    drop(agent);
    drop(registry);
}
