//! Builds in the real cluster with the real Kaniko executor (#19): `slipway
//! build` creates its Job through the real API server, a real kubelet runs
//! the git image and the Kaniko executor built from source
//! (`integration/cluster.sh build-env`), git fetches from `git daemon` in a
//! pod (`integration/cluster.sh git-serve`), Kaniko pulls its base image from
//! and pushes through the gateway, and slipway follows the real logs.
//!
//! Shared by the `cluster` test (the steps) and `cargo bench --bench build`
//! (`Builder`, `Repo`). Every check reads what slipway printed and what the
//! API server or the registry report. `SLIPWAY_BUILD_FIXTURES=DIR` also
//! keeps each build's container logs and slipway's stderr there (how
//! `integration/fixtures/kaniko-v1.27.5/` was made).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::harness::*;

/// The base image every test Dockerfile starts from, in the in-cluster
/// registry: no build reaches outside the cluster.
pub(crate) const BASE: &str = "registry.shared-services:5000/base/busybox:cluster";
/// The gcc base image of the benchmark.
pub(crate) const BASE_GCC: &str = "registry.shared-services:5000/base/gcc:debian";

/// Pushes the images of `bases.txt` (busybox, gcc) that `integration/cluster/
/// images.sh` built into the in-cluster registry, through the gateway, with
/// the push Secret's credentials.
pub(crate) fn push_bases(c: &Cluster, tmp: &Path) {
    let (certs, authfile) = registry_access(c, tmp);
    for (file, dest) in [("busybox.tar", BASE), ("gcc.tar", BASE_GCC)] {
        let tar = cache_dir().join("images").join(file);
        assert!(
            tar.is_file(),
            "{} is missing (integration/cluster.sh up builds it)",
            tar.display()
        );
        let o = push(
            &format!("docker-archive:{}", tar.display()),
            dest,
            &certs,
            Some(&authfile),
        );
        assert!(o.status.success(), "push {file} to {dest}: {}", text(&o));
    }
}

/// A git repository made by the test, served to the pods.
pub(crate) struct Repo {
    pub(crate) dir: PathBuf,
    pub(crate) url: String,
}

impl Repo {
    /// `git init` in `dir` with `files` committed on `main`, then served
    /// with `integration/cluster.sh git-serve`.
    pub(crate) fn new(dir: &Path, files: &[(&str, &str)]) -> Repo {
        std::fs::create_dir_all(dir).unwrap();
        let mut r = Repo {
            dir: dir.to_path_buf(),
            url: String::new(),
        };
        r.git(&["init", "-q", "-b", "main"]);
        r.commit_files(files, "first");
        let o = run(Command::new("bash")
            .arg(repo().join("integration/cluster.sh"))
            .arg("git-serve")
            .arg(dir));
        assert!(o.status.success(), "cluster.sh git-serve: {}", text(&o));
        let url = String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        assert!(url.starts_with("git://"), "git-serve's last line: {url:?}");
        r.url = url;
        r
    }

    /// The git-serve pod (and Service) of this repository.
    fn server(&self) -> &str {
        let host = self.url.trim_start_matches("git://");
        host.split('.').next().unwrap_or_default()
    }

    pub(crate) fn git(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("git")
                .arg("-C")
                .arg(&self.dir)
                .args([
                    "-c",
                    "user.name=slipway test",
                    "-c",
                    "user.email=test@slipway",
                ])
                .args(args),
        )
        .trim()
        .to_string()
    }

    /// Writes `files` and commits them on the current branch; the commit.
    pub(crate) fn commit_files(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, content) in files {
            let p = self.dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }
}

impl Drop for Repo {
    /// The test stops the server it started (`down` would too).
    fn drop(&mut self) {
        if self.url.is_empty() {
            return;
        }
        let server = self.server().to_string();
        let _ = run(Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(state_dir().join("admin.kubeconfig"))
            .arg(KUBECTL_REQUEST_TIMEOUT)
            .args([
                "-n",
                "slipway-git",
                "delete",
                "pod,service",
                &server,
                "--wait=false",
            ]));
    }
}

/// What one `slipway build` did.
#[derive(Debug)]
pub(crate) struct Built {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) secs: f64,
}

impl Built {
    /// The `--output json` object.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "not one JSON object ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    pub(crate) fn last_stderr(&self) -> &str {
        self.stderr.lines().last().unwrap_or_default()
    }

    pub(crate) fn ok(self) -> Built {
        assert_eq!(self.code, 0, "slipway build failed:\n{}", self.stderr);
        self
    }
}

/// Runs `slipway build` against the cluster with the images the nodes hold.
pub(crate) struct Builder {
    kubeconfig: PathBuf,
    env: Vec<(String, String)>,
}

impl Builder {
    pub(crate) fn new(c: &Cluster) -> Builder {
        let out = run_ok(
            Command::new("bash")
                .arg(repo().join("integration/cluster.sh"))
                .arg("build-env"),
        );
        let env: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for k in ["SLIPWAY_BUILD_EXECUTOR_IMAGE", "SLIPWAY_BUILD_GIT_IMAGE"] {
            assert!(
                env.iter().any(|(n, _)| n == k),
                "cluster.sh build-env printed no {k}: {out}"
            );
        }
        Builder {
            kubeconfig: c.kubeconfig.clone(),
            env,
        }
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_slipway"));
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::temp_dir())
            .env("KUBECONFIG", &self.kubeconfig)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args);
        c
    }

    /// `slipway build ARGS`, to the end (at most `BUILD_SECS`).
    pub(crate) fn build(&self, args: &[&str]) -> Built {
        self.spawn(args).finish(BUILD_SECS)
    }

    /// `slipway build ARGS` in the background; its stderr lines are
    /// collected as they come.
    pub(crate) fn spawn(&self, args: &[&str]) -> Running {
        let mut a = vec!["build"];
        a.extend_from_slice(args);
        let mut child = self
            .command(&a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn slipway build");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Running {
            child,
            lines,
            reader: Some(reader),
            started: Instant::now(),
        }
    }
}

/// The longest a test waits for one `slipway build` (the benchmark's cold
/// build takes about 90 s here); a hung one fails the test.
const BUILD_SECS: u64 = 900;

/// A `slipway build` running in the background.
pub(crate) struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Running {
    /// Waits (at most `secs`) until a stderr line contains `needle`.
    pub(crate) fn wait_line(&mut self, needle: &str, secs: u64) {
        let lines = self.lines.clone();
        let child = &mut self.child;
        wait_for(&format!("slipway build to print {needle:?}"), secs, || {
            let l = lines.lock().unwrap();
            if l.iter().any(|x| x.contains(needle)) {
                return Ok(());
            }
            if let Ok(Some(s)) = child.try_wait() {
                panic!("slipway build ended ({s}) first:\n{}", l.join("\n"));
            }
            Err(l.last().cloned().unwrap_or_default())
        })
    }

    pub(crate) fn ended(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits (at most `secs`) for the end. Polled every 50 ms, not every
    /// second as `wait_for` does: the benchmark's times come from here.
    pub(crate) fn finish(mut self, secs: u64) -> Built {
        let deadline = self.started + std::time::Duration::from_secs(secs);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for slipway build") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "slipway build did not end within {secs}s; its last line: {:?}",
                self.lines.lock().unwrap().last()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let secs = self.started.elapsed().as_secs_f64();
        let mut stdout = String::new();
        use std::io::Read as _;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        self.reader.take().unwrap().join().unwrap();
        Built {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr: self.lines.lock().unwrap().join("\n"),
            secs,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keeps a build's container logs, termination messages and slipway's
/// stderr in `$SLIPWAY_BUILD_FIXTURES/<case>.*` when that is set.
pub(crate) fn keep_fixture(c: &Cluster, ns: &str, job: &str, case: &str, b: &Built) {
    let Some(dir) = std::env::var_os("SLIPWAY_BUILD_FIXTURES") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{case}.slipway.stderr")), &b.stderr).unwrap();
    for container in ["git", "kaniko"] {
        let o = c.kubectl(&["-n", ns, "logs", &format!("job/{job}"), "-c", container]);
        if o.status.success() && !o.stdout.is_empty() {
            std::fs::write(dir.join(format!("{case}.{container}.log")), &o.stdout).unwrap();
        }
    }
    let msg = c
        .get(
            ns,
            "pods",
            &format!(
                "{{range .items[?(@.metadata.labels.job-name==\"{job}\")]}}{{.status.containerStatuses[0].state.terminated.message}}{{end}}"
            ),
        )
        .unwrap_or_default();
    if !msg.is_empty() {
        std::fs::write(dir.join(format!("{case}.termination-log")), msg).unwrap();
    }
}

/// The sample application: two COPY steps, each followed by a RUN that
/// uses what it copied, so a change to the second file rebuilds only the
/// layers after its COPY.
fn app_files(greeting: &str, script: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "Dockerfile",
            format!(
                "FROM {BASE}\n\
                 WORKDIR /app\n\
                 COPY greeting.txt ./\n\
                 RUN echo \"built from $(cat greeting.txt)\" > message\n\
                 COPY check.sh ./\n\
                 RUN sh check.sh > checked\n\
                 CMD [\"sh\", \"-c\", \"cat /app/message /app/checked; exec sleep 3600\"]\n"
            ),
        ),
        ("greeting.txt", format!("{greeting}\n")),
        ("check.sh", format!("echo \"{script}\"\n")),
    ]
}

fn files<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(n, c)| (*n, c.as_str())).collect()
}

/// A build id of the test's own, so that the Job's name is known:
/// `build-app-<id>`.
fn id(case: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 100_000;
    format!("{}{t}", case.replace('-', ""))
        .chars()
        .take(20)
        .collect()
}

fn job_of(repo: &str, id: &str) -> String {
    format!("build-{repo}-{id}")
}

/// Jobs and pods of a build id in a namespace, as "kind/name" lines.
fn left_behind(c: &Cluster, ns: &str, build_id: &str) -> Vec<String> {
    let o = c.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "jobs,pods",
        "-l",
        &format!("slipway.dev/build-id={build_id}"),
        "-o",
        "name",
    ]);
    o.lines().map(str::to_string).collect()
}

fn digest_of(image: &str) -> &str {
    image.rsplit_once('@').map(|(_, d)| d).unwrap_or_default()
}

/// The steps, in the order a team meets them. `tmp` holds the repository.
pub(crate) fn builds(c: &Cluster, tmp: &Path) {
    let t = Instant::now();
    push_bases(c, tmp);
    let b = Builder::new(c);
    // A greeting of this run's own: the cache keys chain from it, so a
    // cluster kept from an earlier run has no layer of this one cached.
    let greeting = format!("hello {}", id("run"));
    let v1 = app_files(&greeting, "check v1");
    let repo = Repo::new(&tmp.join("app"), &files(&v1));
    let c1 = repo.git(&["rev-parse", "HEAD"]);
    repo.git(&["tag", "v1"]);
    eprintln!(
        "builds: bases pushed, {} served, in {:?}",
        repo.url,
        t.elapsed()
    );

    // 1. Build and run.
    let cold_id = id("cold");
    let cold = b
        .build(&[
            "--git",
            &repo.url,
            "--rev",
            "main",
            "--repo",
            "app",
            "--build-id",
            &cold_id,
        ])
        .ok();
    keep_fixture(c, NS, &job_of("app", &cold_id), "01-cold", &cold);
    let image = cold.stdout.lines().last().unwrap_or_default().to_string();
    assert!(
        image.starts_with(&format!("{ALIAS}/app@sha256:"))
            && image.len() == ALIAS.len() + 4 + 7 + 1 + 64,
        "last stdout line: {image:?}\n{}",
        cold.stderr
    );
    assert!(
        cold.stderr.contains(&format!("commit {c1}")),
        "the cold build does not name commit {c1}:\n{}",
        cold.stderr
    );
    // The registry has it, by that digest.
    assert_eq!(
        c.get(
            NS,
            &format!("job/{}", job_of("app", &cold_id)),
            "{.metadata.labels.slipway\\.dev/commit}"
        )
        .unwrap(),
        c1,
        "the Job's commit label"
    );
    c.kubectl_ok(&[
        "-n",
        "default",
        "delete",
        "pod",
        "built-app",
        "--ignore-not-found",
    ]);
    c.kubectl_ok(&[
        "-n",
        "default",
        "run",
        "built-app",
        "--restart=Never",
        &format!("--image={image}"),
    ]);
    c.wait_running("default", "built-app");
    let said = wait_for("built-app to print its message", 60, || {
        let o = c.kubectl(&["-n", "default", "logs", "built-app"]);
        let s = text(&o);
        if s.contains(&format!("built from {greeting}")) && s.contains("check v1") {
            Ok(s)
        } else {
            Err(s)
        }
    });
    eprintln!(
        "builds: 1 (cold build {:.1}s, the pod ran and said {said:?})",
        cold.secs
    );

    // 3. Cache: the same commit again takes every RUN layer from cache/app.
    let warm = cached_build(c, &b, &repo, "02-warm", &c1, (2, 2));
    assert!(
        warm.stderr.contains("cache: 2 hit, 2 rebuilt"),
        "the progress line does not count the hits:\n{}",
        warm.stderr
    );
    // One source file changed: only the layers after its COPY are rebuilt
    // (the RUN before check.sh's COPY from the cache).
    let c2 = repo.commit_files(&[("check.sh", "echo \"check v2\"\n")], "change check.sh");
    let change = cached_build(c, &b, &repo, "03-change", &c2, (1, 3));
    eprintln!(
        "builds: 3 (warm {:.1}s, one change {:.1}s, cold {:.1}s)",
        warm.secs, change.secs, cold.secs
    );

    // 2. Revisions: a branch, a tag, a full commit and a short commit.
    repo.git(&["checkout", "-q", "-b", "feature", &c1]);
    let cf = repo.commit_files(&[("greeting.txt", "feature\n")], "feature greeting");
    repo.git(&["checkout", "-q", "main"]);
    let short = &cf[..7];
    for (rev, want) in [
        ("feature", &cf),
        ("v1", &c1),
        (c2.as_str(), &c2),
        (short, &cf),
    ] {
        let o = b
            .build(&[
                "--git", &repo.url, "--rev", rev, "--repo", "app", "--output", "json",
            ])
            .ok();
        assert_eq!(
            o.json()["commit"].as_str(),
            Some(want.as_str()),
            "--rev {rev}:\n{}",
            o.stderr
        );
        eprintln!("builds: 2 (--rev {rev} is {want}, {:.1}s)", o.secs);
    }

    // 4. Failures, each with its exit code, its message, and what is left.
    failures(c, &b, &repo, tmp);

    // 5. Ctrl-C during the Kaniko step, then builds and logs.
    interrupt(c, &b, &repo);
    let o = run_ok(&mut b.command(&["builds"]));
    let cold_job = job_of("app", &cold_id);
    let row = o
        .lines()
        .find(|l| l.contains(&cold_job))
        .unwrap_or_else(|| panic!("slipway builds does not list {cold_job}:\n{o}"));
    assert!(
        row.contains(&c1[..7]) && row.contains(&digest_of(&image)[..19]),
        "slipway builds' row of {cold_job} lacks its commit or digest: {row}"
    );
    let logs = run_ok(&mut b.command(&["logs", &cold_job]));
    assert!(
        logs.contains(&format!("is commit {c1}")) && logs.contains("RUN sh check.sh"),
        "slipway logs {cold_job} lacks the git or Kaniko log:\n{logs}"
    );

    // 6. Another namespace.
    other_namespace(c, &b, &repo, tmp);

    c.kubectl(&[
        "-n",
        "default",
        "delete",
        "pod",
        "built-app",
        "--wait=false",
    ]);
    eprintln!("builds: all in {:?}", t.elapsed());
}

/// Builds `main` again (as `case`, kept as a fixture): it must be `commit`,
/// with `(hits, rebuilt)` as the `--output json` cache counts.
fn cached_build(
    c: &Cluster,
    b: &Builder,
    repo: &Repo,
    case: &str,
    commit: &str,
    want: (u64, u64),
) -> Built {
    let bid = id(case);
    let o = b
        .build(&[
            "--git",
            &repo.url,
            "--rev",
            "main",
            "--repo",
            "app",
            "--build-id",
            &bid,
            "--output",
            "json",
        ])
        .ok();
    keep_fixture(c, NS, &job_of("app", &bid), case, &o);
    let j = o.json();
    assert_eq!(j["commit"], commit, "{case}");
    assert_eq!(
        (j["cache"]["hits"].as_u64(), j["cache"]["rebuilt"].as_u64()),
        (Some(want.0), Some(want.1)),
        "{case}: cache counts (hits, rebuilt):\n{}",
        o.stderr
    );
    o
}

fn failures(c: &Cluster, b: &Builder, repo: &Repo, tmp: &Path) {
    // A revision that does not exist: the git container says so (11).
    let nid = id("norev");
    let o = b.build(&[
        "--git",
        &repo.url,
        "--rev",
        "nosuchbranch",
        "--repo",
        "app",
        "--build-id",
        &nid,
    ]);
    keep_fixture(c, NS, &job_of("app", &nid), "fail-no-such-revision", &o);
    assert_eq!(o.code, 11, "{}", o.stderr);
    assert!(
        o.last_stderr().contains("nosuchbranch"),
        "the last line does not name the revision: {}",
        o.stderr
    );
    // Left: the failed Job and its pod, for `slipway logs` (README).
    assert_eq!(
        left_behind(c, NS, &nid).len(),
        2,
        "{:?}",
        left_behind(c, NS, &nid)
    );

    // A RUN that exits 1 (1), naming the step.
    repo.git(&["checkout", "-q", "-b", "broken", "main"]);
    repo.commit_files(
        &[(
            "Dockerfile",
            &format!("FROM {BASE}\nRUN echo about to fail && exit 1\n"),
        )],
        "broken",
    );
    repo.git(&["checkout", "-q", "main"]);
    let rid = id("runfail");
    let o = b.build(&[
        "--git",
        &repo.url,
        "--rev",
        "broken",
        "--repo",
        "app",
        "--build-id",
        &rid,
    ]);
    keep_fixture(c, NS, &job_of("app", &rid), "fail-run-exit1", &o);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.last_stderr().contains("RUN echo about to fail && exit 1")
            && o.last_stderr().contains("exit code 1"),
        "the last line does not name the step and its exit code: {}",
        o.stderr
    );
    assert_eq!(
        left_behind(c, NS, &rid).len(),
        2,
        "{:?}",
        left_behind(c, NS, &rid)
    );

    // A push refused: a push Secret with the wrong password (13).
    let wrong = serde_json::json!({"auths": {ALIAS: {"auth": "c2xpcHdheS1wdXNoOndyb25n"}}});
    let f = write(tmp, "wrong-config.json", &wrong.to_string());
    c.kubectl_ok(&[
        "-n",
        NS,
        "create",
        "secret",
        "generic",
        "wrong-push",
        &format!("--from-file=config.json={}", f.display()),
    ]);
    let did = id("denied");
    let o = b.build(&[
        "--git",
        &repo.url,
        "--rev",
        "main",
        "--repo",
        "app",
        "--build-id",
        &did,
        "--push-secret",
        "wrong-push",
    ]);
    keep_fixture(c, NS, &job_of("app", &did), "fail-push-denied", &o);
    assert_eq!(o.code, 13, "{}", o.stderr);
    assert!(o.last_stderr().contains("push denied"), "{}", o.stderr);
    assert_eq!(
        left_behind(c, NS, &did).len(),
        2,
        "{:?}",
        left_behind(c, NS, &did)
    );
    c.kubectl_ok(&["-n", NS, "delete", "secret", "wrong-push"]);

    // The registry down during the push (20): the Kaniko step is under way
    // (the permission check before the build passed) when the registry
    // Deployment goes to zero.
    slow_branch(repo, "slow");
    let gid = id("regdown");
    let mut r = b.spawn(&[
        "--git",
        &repo.url,
        "--rev",
        "slow",
        "--repo",
        "app",
        "--build-id",
        &gid,
    ]);
    r.wait_line(SLOW_RUNNING, 180);
    // Gone, not only out of the Service: Kaniko keeps its connections
    // open, and a terminating pod's gateway still answers them.
    c.kubectl_ok(&["-n", NS, "scale", "deployment/registry", "--replicas=0"]);
    c.kubectl_ok(&[
        "-n",
        NS,
        "wait",
        "--for=delete",
        "pod",
        "-l",
        "app.kubernetes.io/name=registry",
        "--timeout=40s",
    ]);
    assert!(
        !r.ended(),
        "the build ended before the registry was down; lengthen its RUN sleep"
    );
    let o = r.finish(300);
    keep_fixture(c, NS, &job_of("app", &gid), "fail-registry-down", &o);
    c.kubectl_ok(&["-n", NS, "scale", "deployment/registry", "--replicas=1"]);
    registry_available(c);
    assert_eq!(o.code, 20, "{}", o.stderr);
    assert!(
        o.last_stderr()
            .contains("push to registry.shared-services:5000 failed"),
        "{}",
        o.stderr
    );
    assert_eq!(
        left_behind(c, NS, &gid).len(),
        2,
        "{:?}",
        left_behind(c, NS, &gid)
    );
    eprintln!("builds: 4 (failures: revision, RUN, denied push, registry down)");
}

/// What Kaniko logs when the RUN of a `slow_branch` starts.
const SLOW_RUNNING: &str = "Running: [/bin/sh -c sleep 45";

/// A branch whose one RUN sleeps 45 s, different in each run (so never a
/// cache hit, also in a cluster kept from an earlier run).
fn slow_branch(repo: &Repo, branch: &str) {
    repo.git(&["checkout", "-q", "-b", branch, "main"]);
    repo.commit_files(
        &[(
            "Dockerfile",
            &format!("FROM {BASE}\nRUN sleep 45 && echo {} > /slow\n", id(branch)),
        )],
        branch,
    );
    repo.git(&["checkout", "-q", "main"]);
}

fn interrupt(c: &Cluster, b: &Builder, repo: &Repo) {
    slow_branch(repo, "slow2");
    let iid = id("sigint");
    let mut r = b.spawn(&[
        "--git",
        &repo.url,
        "--rev",
        "slow2",
        "--repo",
        "app",
        "--build-id",
        &iid,
    ]);
    r.wait_line(SLOW_RUNNING, 180);
    assert!(
        !left_behind(c, NS, &iid).is_empty(),
        "no Job or pod while Kaniko runs"
    );
    let t = Instant::now();
    r.signal(nix::sys::signal::Signal::SIGINT);
    let o = r.finish(60);
    assert_eq!(o.code, 130, "{}", o.stderr);
    // Within the pod's grace period (30 s, the default) and a margin for
    // the garbage collector.
    wait_for("the interrupted build's Job and pod to be gone", 45, || {
        let left = left_behind(c, NS, &iid);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    eprintln!(
        "builds: 5 (Ctrl-C: exit 130, Job and pod gone {:.1}s after SIGINT)",
        t.elapsed().as_secs_f64()
    );
}

fn other_namespace(c: &Cluster, b: &Builder, repo: &Repo, tmp: &Path) {
    let ns = "team-a";
    c.kubectl_ok(&["create", "namespace", ns]);
    c.kubectl_ok(&["-n", ns, "create", "serviceaccount", "slipway-build"]);
    c.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "serviceaccount",
        "slipway-build",
        "-p",
        "{\"automountServiceAccountToken\": false}",
    ]);
    // Without the push Secret: stops before the Job, naming it (19).
    let oid = id("teamno");
    let o = b.build(&[
        "-n",
        ns,
        "--git",
        &repo.url,
        "--rev",
        "main",
        "--repo",
        "app",
        "--build-id",
        &oid,
    ]);
    assert_eq!(o.code, 19, "{}", o.stderr);
    assert!(
        o.last_stderr().contains("registry-push") && o.last_stderr().contains(ns),
        "the message does not name the Secret and namespace: {}",
        o.stderr
    );
    assert!(
        left_behind(c, ns, &oid).is_empty(),
        "a Job was created without the Secret"
    );
    // The README's copy of config.json only.
    let (_, authfile) = registry_access(c, &tmp.join("team-a"));
    c.kubectl_ok(&[
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "registry-push",
        &format!("--from-file=config.json={}", authfile.display()),
    ]);
    let o = b
        .build(&[
            "-n", ns, "--git", &repo.url, "--rev", "main", "--repo", "app", "--output", "json",
        ])
        .ok();
    assert!(
        o.json()["image"]
            .as_str()
            .unwrap_or_default()
            .starts_with(ALIAS),
        "{}",
        o.stdout
    );
    c.kubectl_ok(&["delete", "namespace", ns, "--wait=false"]);
    eprintln!("builds: 6 (namespace {ns}: exit 19 without the Secret, built with the copy)");
}
