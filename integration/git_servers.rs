//! Real git servers on loopback for the build pod tests (#9):
//! - [`GitDaemon`]: `git://`, one `git daemon --inetd` per connection on a
//!   listener the test binds and keeps (port 0, read back);
//! - [`HttpBackend`]: smart HTTP, `git http-backend` run as a CGI program
//!   behind a minimal HTTP/1.1 server that demands Basic credentials.
//!
//! Both stop when dropped: a flag, a connection to wake the accept loop,
//! and a join; the accept loop also ends after [`MAX_CONNECTIONS`].

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bound on the connections one server accepts in a test.
pub const MAX_CONNECTIONS: usize = 500;

struct Stopper {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept; it sees the flag and returns.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `git daemon --inetd --export-all --base-path=BASE` per connection.
pub struct GitDaemon {
    pub port: u16,
    _stopper: Stopper,
}

impl GitDaemon {
    pub fn start(base: &Path) -> GitDaemon {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let base = base.to_path_buf();
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut children = Vec::new();
            for conn in l.incoming().take(MAX_CONNECTIONS) {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let Ok(read) = conn.try_clone() else { continue };
                let child = Command::new("git")
                    .args(["daemon", "--inetd", "--export-all", "--informative-errors"])
                    .arg(format!("--base-path={}", base.display()))
                    .stdin(Stdio::from(OwnedFd::from(read)))
                    .stdout(Stdio::from(OwnedFd::from(conn)))
                    .stderr(Stdio::null())
                    .spawn();
                if let Ok(c) = child {
                    children.push(c);
                }
            }
            for mut c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
        });
        GitDaemon {
            port,
            _stopper: Stopper {
                port,
                stop,
                thread: Some(thread),
            },
        }
    }

    /// `git://127.0.0.1:PORT/<path under the base>`.
    pub fn url(&self, path: &str) -> String {
        format!("git://127.0.0.1:{}/{path}", self.port)
    }
}

/// `git http-backend` behind Basic auth.
pub struct HttpBackend {
    pub port: u16,
    /// The Authorization header of every request (None: none sent).
    pub seen: Arc<Mutex<Vec<Option<String>>>>,
    _stopper: Stopper,
}

impl HttpBackend {
    /// Serves the repositories under `root`; a request passes with the
    /// `Authorization` header `expected` (e.g. `Basic …`), else 401.
    pub fn start(root: &Path, expected: &str) -> HttpBackend {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s2, seen2, root, expected) = (
            stop.clone(),
            seen.clone(),
            root.to_path_buf(),
            expected.to_string(),
        );
        let thread = std::thread::spawn(move || {
            for conn in l.incoming().take(MAX_CONNECTIONS) {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = serve(conn, &root, &expected, &seen2);
            }
        });
        HttpBackend {
            port,
            seen,
            _stopper: Stopper {
                port,
                stop,
                thread: Some(thread),
            },
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}

/// One request, one response, then the connection is closed.
fn serve(
    conn: TcpStream,
    root: &PathBuf,
    expected: &str,
    seen: &Mutex<Vec<Option<String>>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for _ in 0..200 {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(n) = header("content-length").and_then(|n| n.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        for _ in 0..100_000 {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let auth = header("authorization");
    seen.lock().unwrap().push(auth.clone());
    if auth.as_deref() != Some(expected) {
        w.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cgi = Command::new("git");
    cgi.arg("http-backend")
        .env_clear()
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REMOTE_USER", "test")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (h, env) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(v) = header(h) {
            cgi.env(env, v);
        }
    }
    let mut child = cgi.spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    let out = out.stdout;
    let (head, rest) = split_cgi(&out);
    let mut status = "200 OK".to_string();
    let mut resp = Vec::new();
    for h in String::from_utf8_lossy(head).lines() {
        let h = h.trim_end_matches('\r');
        if let Some(s) = h.strip_prefix("Status:") {
            status = s.trim().to_string();
        } else if !h.is_empty() {
            resp.extend_from_slice(h.as_bytes());
            resp.extend_from_slice(b"\r\n");
        }
    }
    w.write_all(format!("HTTP/1.1 {status}\r\n").as_bytes())?;
    w.write_all(&resp)?;
    w.write_all(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            rest.len()
        )
        .as_bytes(),
    )?;
    w.write_all(rest)?;
    w.flush()
}

/// CGI output: headers, an empty line, the body.
fn split_cgi(out: &[u8]) -> (&[u8], &[u8]) {
    for sep in [&b"\r\n\r\n"[..], &b"\n\n"[..]] {
        if let Some(i) = out.windows(sep.len()).position(|w| w == sep) {
            return (&out[..i], &out[i + sep.len()..]);
        }
    }
    (out, &[])
}
