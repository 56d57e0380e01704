//! The build pod's two shell scripts, run for real, as the pod runs them:
//! `job::GIT_SCRIPT` under busybox sh (Alpine's shell and tools) with real
//! git, against local repositories (`file://`, which speaks git's smart
//! protocol, shallow fetches included) and a loopback HTTP server that
//! demands credentials; `job::KANIKO_WRAPPER` under busybox sh around a
//! stand-in executor. The scripts' absolute paths (`/slipway/…`,
//! `/dev/termination-log`, `/kaniko/executor`) are rewritten into a
//! temporary directory; nothing else is changed.
//!
//! The `kubelet_*` tests go further (#9): they take each container's
//! command, env, user and mounts from the Job `job::job` renders and run it
//! in a bubblewrap sandbox as a kubelet would ([`kubelet`]): a read-only
//! root, uid 65534 with the pod's fsGroup, root-owned mode-2777 emptyDirs,
//! against real git servers on loopback ([`git_servers`]: `git daemon`,
//! and `git http-backend` behind Basic auth).
//!
//! Needs `busybox` and `git`, and for the sandbox tests root, `bwrap` and
//! `setpriv` (integration/install-deps.sh installs them); a test without
//! them fails, naming what is missing, unless
//! SLIPWAY_SKIP_INTEGRATION=<reason> is set: then it prints the reason and
//! skips (#12: a test must not pass by accident). SSH keys are not
//! exercised here (no SSH server on the test bed).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;
use slipway::builds::job::{GIT_SCRIPT, KANIKO_WRAPPER};

#[path = "git_servers.rs"]
mod git_servers;
#[path = "kubelet.rs"]
mod kubelet;

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

fn tools() -> Option<(PathBuf, PathBuf)> {
    match (which("busybox"), which("git")) {
        (Some(b), Some(g)) => Some((b, g)),
        (b, g) => {
            let missing: Vec<&str> = [("busybox", b.is_none()), ("git", g.is_none())]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(n, _)| *n)
                .collect();
            let msg = format!(
                "build script tests need {} (bash integration/install-deps.sh)",
                missing.join(" and ")
            );
            skip_or_fail(&msg);
            None
        }
    }
}

/// A temporary root with `bin/` holding busybox's applets and git, as in
/// the alpine/git image.
struct Bed {
    dir: tempfile::TempDir,
    busybox: PathBuf,
}

impl Bed {
    fn new() -> Option<Bed> {
        let (busybox, git) = tools()?;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let st = Command::new(&busybox)
            .args(["--install", "-s"])
            .arg(&bin)
            .status()
            .unwrap();
        assert!(st.success());
        let _ = std::fs::remove_file(bin.join("git"));
        std::os::unix::fs::symlink(git, bin.join("git")).unwrap();
        Some(Bed { dir, busybox })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn rewrite(&self, script: &str) -> String {
        let root = self.dir.path().display().to_string();
        script
            .replace("/slipway/context", &format!("{root}/slipway/context"))
            .replace("/slipway/out", &format!("{root}/slipway/out"))
            .replace("/slipway/git-secret", &format!("{root}/slipway/git-secret"))
            .replace("/dev/termination-log", &format!("{root}/termination-log"))
            .replace("/kaniko/executor", &format!("{root}/fake-executor"))
    }

    fn fresh_pod_dirs(&self) {
        for d in ["slipway", "termination-log"] {
            let p = self.path(d);
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_file(&p);
        }
        for d in ["slipway/context", "slipway/out", "slipway/home"] {
            std::fs::create_dir_all(self.path(d)).unwrap();
        }
        std::fs::write(self.path("termination-log"), "").unwrap();
    }

    fn termination_message(&self) -> String {
        std::fs::read_to_string(self.path("termination-log")).unwrap()
    }
}

/// What one git-container run left behind.
struct GitRun {
    code: i32,
    message: String,
    stderr: String,
}

struct GitInput<'a> {
    url: String,
    revision: &'a str,
    kind: &'a str,
    dockerfile: &'a str,
    context_dir: Option<&'a str>,
    extra_env: Vec<(&'a str, &'a str)>,
}

fn input<'a>(url: &str, revision: &'a str, kind: &'a str) -> GitInput<'a> {
    GitInput {
        url: url.to_string(),
        revision,
        kind,
        dockerfile: "Dockerfile",
        context_dir: None,
        extra_env: vec![],
    }
}

/// `GIT_CONFIG_*` variables that set the one git config `key` to `value`.
fn git_config_env<'a>(key: &'a str, value: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("GIT_CONFIG_COUNT", "1"),
        ("GIT_CONFIG_KEY_0", key),
        ("GIT_CONFIG_VALUE_0", value),
    ]
}

/// The git container in a pod whose emptyDirs are fresh.
fn run_git_in_fresh_pod(bed: &Bed, i: &GitInput) -> GitRun {
    bed.fresh_pod_dirs();
    run_git(bed, i)
}

fn run_git(bed: &Bed, i: &GitInput) -> GitRun {
    let script = bed.rewrite(GIT_SCRIPT);
    let mut cmd = Command::new(&bed.busybox);
    cmd.args(["sh", "-c", &script])
        .env_clear()
        .env("PATH", bed.path("bin"))
        .env("HOME", bed.path("slipway/home"))
        .env("TMPDIR", bed.path("slipway/home"))
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("SLIPWAY_GIT_URL", &i.url)
        .env("SLIPWAY_REVISION", i.revision)
        .env("SLIPWAY_REVISION_KIND", i.kind)
        .env("SLIPWAY_DOCKERFILE", i.dockerfile);
    if let Some(d) = i.context_dir {
        cmd.env("SLIPWAY_CONTEXT_DIR", d);
    }
    for (k, v) in &i.extra_env {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().unwrap();
    GitRun {
        code: out.status.code().unwrap_or(-1),
        message: bed.termination_message(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout),
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "protocol.file.allow")
        .env("GIT_CONFIG_VALUE_0", "always")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The origin repository:
/// - main: c1 (Dockerfile) → c2 (services/api/Dockerfile) → c3 (tip);
/// - annotated tag v1 on c2; branch feature/x off c2; a branch (on c2) and
///   a tag (on c3) both named `dup`. c1 is no tip: a server that only
///   allows advertised objects in `want` refuses it.
struct Origin {
    url: String,
    c1: String,
    c2: String,
    c3: String,
    feature: String,
}

fn origin(bed: &Bed) -> Origin {
    origin_in(&bed.path("origin"))
}

fn origin_in(o: &Path) -> Origin {
    let o = o.to_path_buf();
    std::fs::create_dir_all(&o).unwrap();
    git(&o, &["init", "-q", "-b", "main"]);
    std::fs::write(o.join("Dockerfile"), "FROM alpine:3.20\n").unwrap();
    git(&o, &["add", "."]);
    git(&o, &["commit", "-qm", "one"]);
    let c1 = git(&o, &["rev-parse", "HEAD"]);
    std::fs::create_dir_all(o.join("services/api")).unwrap();
    std::fs::write(o.join("services/api/Dockerfile"), "FROM alpine:3.20\n").unwrap();
    git(&o, &["add", "."]);
    git(&o, &["commit", "-qm", "two"]);
    let c2 = git(&o, &["rev-parse", "HEAD"]);
    git(&o, &["tag", "-a", "v1", "-m", "release 1"]);
    git(&o, &["checkout", "-qb", "feature/x"]);
    std::fs::write(o.join("feature.txt"), "x\n").unwrap();
    git(&o, &["add", "."]);
    git(&o, &["commit", "-qm", "feature"]);
    let feature = git(&o, &["rev-parse", "HEAD"]);
    git(&o, &["checkout", "-q", "main"]);
    std::fs::write(o.join("three.txt"), "3\n").unwrap();
    git(&o, &["add", "."]);
    git(&o, &["commit", "-qm", "three"]);
    let c3 = git(&o, &["rev-parse", "HEAD"]);
    git(&o, &["branch", "dup", &c2]);
    git(&o, &["tag", "dup", &c3]);
    Origin {
        url: format!("file://{}", o.display()),
        c1,
        c2,
        c3,
        feature,
    }
}

fn ok_message(commit: &str, r#ref: &str) -> String {
    format!("slipway-git ok\ncommit {commit}\nref {ref}\n")
}

#[test]
fn git_script_resolves_branches_tags_and_commits() {
    let Some(bed) = Bed::new() else { return };
    let o = origin(&bed);
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("main", "ref", o.c3.clone(), "refs/heads/main"),
        (
            "feature/x",
            "ref",
            o.feature.clone(),
            "refs/heads/feature/x",
        ),
        // An annotated tag resolves to the commit it points to.
        ("v1", "ref", o.c2.clone(), "refs/tags/v1"),
        // A tag wins over a branch of the same name, as in git.
        ("dup", "ref", o.c3.clone(), "refs/tags/dup"),
        ("refs/heads/dup", "ref", o.c2.clone(), "refs/heads/dup"),
    ];
    for (rev, kind, commit, r) in cases {
        let run = run_git_in_fresh_pod(&bed, &input(&o.url, rev, kind));
        assert_eq!(run.code, 0, "{rev}: {}", run.stderr);
        assert_eq!(run.message, ok_message(&commit, r), "{rev}");
        let written = std::fs::read_to_string(bed.path("slipway/out/commit")).unwrap();
        assert_eq!(written.trim(), commit);
        assert!(bed.path("slipway/context/Dockerfile").is_file());
        assert!(
            !bed.path("slipway/context/.git").exists(),
            ".git is removed before the build"
        );
    }
    // The branch checkout is shallow: one commit fetched, not the history.
    let run = run_git_in_fresh_pod(&bed, &input(&o.url, "main", "ref"));
    assert!(
        !run.stderr.contains("fetching all branches"),
        "{}",
        run.stderr
    );
}

#[test]
fn git_script_fetches_a_commit_directly_or_falls_back() {
    let Some(bed) = Bed::new() else { return };
    let o = origin(&bed);
    // A commit that is no branch tip, fetched by itself (protocol v2).
    let run = run_git_in_fresh_pod(&bed, &input(&o.url, &o.c1, "commit"));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.message, ok_message(&o.c1, "-"));
    assert!(
        !run.stderr.contains("fetching all branches"),
        "{}",
        run.stderr
    );
    // A server that refuses a sha in `want` (protocol v0 without
    // uploadpack.allowReachableSHA1InWant): the full fetch finds it.
    let mut i = input(&o.url, &o.c1, "commit");
    i.extra_env = git_config_env("protocol.version", "0");
    let run = run_git_in_fresh_pod(&bed, &i);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.message, ok_message(&o.c1, "-"));
    assert!(run.stderr.contains("would not send"), "{}", run.stderr);
    assert!(
        run.stderr.contains("fetching all branches and tags"),
        "{}",
        run.stderr
    );
    // A short sha: the full fetch, then git expands it.
    let short = &o.feature[..8];
    let run = run_git_in_fresh_pod(&bed, &input(&o.url, short, "short-commit"));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.message, ok_message(&o.feature, "-"));
}

#[test]
fn git_script_reports_missing_revisions_and_dockerfiles() {
    let Some(bed) = Bed::new() else { return };
    let o = origin(&bed);
    let missing: Vec<(String, &str, &str)> = vec![
        ("nope".into(), "ref", "no branch or tag named nope in"),
        (
            "0123456789abcdef0123456789abcdef01234567".into(),
            "commit",
            "no commit 0123456789abcdef0123456789abcdef01234567 in any branch or tag",
        ),
        (
            "abcdef1".into(),
            "short-commit",
            "no commit abcdef1 in any branch or tag",
        ),
    ];
    for (rev, kind, want) in missing {
        let run = run_git_in_fresh_pod(&bed, &input(&o.url, &rev, kind));
        assert_eq!(run.code, 11, "{rev}: {}", run.stderr);
        assert!(
            run.message.starts_with("slipway-git revision-not-found\n"),
            "{}",
            run.message
        );
        assert!(run.message.contains(want), "{}", run.message);
    }
    // The Dockerfile is checked at the resolved commit: services/api only
    // exists from c2 on.
    let mut i = input(&o.url, &o.c1, "commit");
    i.context_dir = Some("services/api");
    i.dockerfile = "services/api/Dockerfile";
    let run = run_git_in_fresh_pod(&bed, &i);
    assert_eq!(run.code, 12, "{}", run.stderr);
    assert!(
        run.message.starts_with(
            "slipway-git dockerfile-not-found\ncontext directory services/api does not exist"
        ),
        "{}",
        run.message
    );
    let mut i = input(&o.url, "main", "ref");
    i.context_dir = Some("services/api");
    i.dockerfile = "services/api/Dockerfile";
    let run = run_git_in_fresh_pod(&bed, &i);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let mut i = input(&o.url, "main", "ref");
    i.dockerfile = "docker/Dockerfile.prod";
    let run = run_git_in_fresh_pod(&bed, &i);
    assert_eq!(run.code, 12);
    assert_eq!(
        run.message,
        format!("slipway-git dockerfile-not-found\ndocker/Dockerfile.prod does not exist at commit {}\n", o.c3)
    );
}

/// A repository `sub` with `lib.txt`, and a repository `super` with
/// `dockerfile` and `sub`, fetched from `sub_url`, as submodule vendor/sub.
fn repos_with_submodule(sub: &Path, sup: &Path, sub_url: &str, dockerfile: &str) {
    std::fs::create_dir_all(sub).unwrap();
    git(sub, &["init", "-q", "-b", "main"]);
    std::fs::write(sub.join("lib.txt"), "lib\n").unwrap();
    git(sub, &["add", "."]);
    git(sub, &["commit", "-qm", "lib"]);
    std::fs::create_dir_all(sup).unwrap();
    git(sup, &["init", "-q", "-b", "main"]);
    std::fs::write(sup.join("Dockerfile"), dockerfile).unwrap();
    git(sup, &["submodule", "-q", "add", sub_url, "vendor/sub"]);
    git(sup, &["add", "."]);
    git(sup, &["commit", "-qm", "with submodule"]);
}

#[test]
fn git_script_checks_out_submodules() {
    let Some(bed) = Bed::new() else { return };
    let sub = bed.path("sub");
    let sup = bed.path("super");
    let sub_url = format!("file://{}", sub.display());
    repos_with_submodule(
        &sub,
        &sup,
        &sub_url,
        "FROM scratch\nCOPY vendor/sub/lib.txt /\n",
    );
    let mut i = input(&format!("file://{}", sup.display()), "main", "ref");
    // The file transport is off for submodules by default (CVE-2022-39253);
    // real submodules use https or ssh.
    i.extra_env = git_config_env("protocol.file.allow", "always");
    let run = run_git_in_fresh_pod(&bed, &i);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(bed.path("slipway/context/vendor/sub/lib.txt")).unwrap(),
        "lib\n"
    );
    assert!(!bed.path("slipway/context/vendor/sub/.git").exists());
}

/// A loopback HTTP server that answers every request with 401 and records
/// the Authorization headers it got.
fn auth_server() -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/team/app.git", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut auth = None;
            let mut r = BufReader::new(c.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.strip_prefix("Authorization: ") {
                    auth = Some(v.trim().to_string());
                }
            }
            s2.lock().unwrap().push(auth);
            let _ = c.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    (url, seen)
}

#[test]
fn git_script_reports_auth_failures_and_sends_the_secret() {
    let Some(bed) = Bed::new() else { return };
    let (url, seen) = auth_server();
    // No credentials.
    let run = run_git_in_fresh_pod(&bed, &input(&url, "main", "ref"));
    assert_eq!(run.code, 10, "{}", run.stderr);
    assert!(
        run.message.starts_with("slipway-git git-auth-failed\n"),
        "{}",
        run.message
    );
    assert!(
        run.message.contains("terminal prompts disabled"),
        "{}",
        run.message
    );

    // A token: sent as x-access-token:<token> through the credential helper.
    for (files, user_pass) in [
        (vec![("token", "glpat-123")], "x-access-token:glpat-123"),
        (vec![("token", "t0k"), ("username", "oauth2")], "oauth2:t0k"),
        (
            vec![("username", "builder"), ("password", "s3cret")],
            "builder:s3cret",
        ),
    ] {
        seen.lock().unwrap().clear();
        bed.fresh_pod_dirs();
        let sec = bed.path("slipway/git-secret");
        std::fs::create_dir_all(&sec).unwrap();
        for (k, v) in &files {
            std::fs::write(sec.join(k), v).unwrap();
        }
        let run = run_git(&bed, &input(&url, "main", "ref"));
        assert_eq!(run.code, 10, "{}", run.stderr);
        assert!(
            run.message.contains("Authentication failed for"),
            "{}",
            run.message
        );
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        );
        assert!(
            seen.lock().unwrap().contains(&Some(want.clone())),
            "{files:?}: server saw {:?}",
            seen.lock().unwrap()
        );
        assert!(!run.message.contains("s3cret") && !run.stderr.contains("s3cret"));
    }
}

#[test]
fn git_script_reports_an_unreachable_remote_as_a_fetch_failure() {
    let Some(bed) = Bed::new() else { return };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x.git", l.local_addr().unwrap());
    drop(l);
    let run = run_git_in_fresh_pod(&bed, &input(&url, "main", "ref"));
    assert_eq!(run.code, 13, "{}", run.stderr);
    assert!(
        run.message.starts_with("slipway-git fetch-failed\n"),
        "{}",
        run.message
    );
}

// ---- the Kaniko wrapper ----------------------------------------------------

const FAKE_EXECUTOR: &str = r#"#!/bin/sh
# Stands in for /kaniko/executor: records its args, writes the two files as
# Kaniko does, exits with $FAKE_RC, or waits for SIGTERM with $FAKE_WAIT.
printf '%s\n' "$@" >"$FAKE_DIR/args"
# As Kaniko's multi-stage cleanup deletes /busybox when it is no volume.
[ -z "${FAKE_CLEANUP:-}" ] || rm -f "$FAKE_CLEANUP"/*
trap 'echo TERM >>"$FAKE_DIR/args"; exit 143' TERM
if [ -n "${FAKE_WAIT:-}" ]; then
  : >"$FAKE_DIR/started"
  while :; do sleep 1; done
fi
for a; do
  case "$a" in
    --digest-file=*) printf 'sha256:%064d' 7 >"${a#*=}" ;;
    --image-name-with-digest-file=*) printf 'registry.shared-services:5000/app@sha256:%064d\n' 7 >"${a#*=}" ;;
  esac
done
exit "${FAKE_RC:-0}"
"#;

const COMMIT: &str = "3f786850e387550fdab836ed7e6dc881de23001b";

fn wrapper(bed: &Bed, env: &[(&str, &str)]) -> std::process::Child {
    wrapper_in(bed, env, &[bed.busybox.to_str().unwrap(), "sh"])
}

/// The wrapper under `shell` (program and arguments before `-c`).
fn wrapper_in(bed: &Bed, env: &[(&str, &str)], shell: &[&str]) -> std::process::Child {
    bed.fresh_pod_dirs();
    std::fs::write(bed.path("slipway/out/commit"), format!("{COMMIT}\n")).unwrap();
    let exe = bed.path("fake-executor");
    std::fs::write(&exe, FAKE_EXECUTOR).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = bed.dir.path().display().to_string();
    let mut cmd = Command::new(shell[0]);
    cmd.args(&shell[1..])
        .args(["-c", &bed.rewrite(KANIKO_WRAPPER), "slipway-kaniko"])
        .arg(format!("--digest-file={root}/termination-log"))
        .arg(format!(
            "--image-name-with-digest-file={root}/slipway/out/image-name"
        ))
        .arg("--cache=true")
        .env_clear()
        .env("PATH", bed.path("bin"))
        .env("FAKE_DIR", bed.dir.path())
        .env("SLIPWAY_SOURCE_URL", "https://github.com/example/app.git")
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn args(bed: &Bed) -> Vec<String> {
    std::fs::read_to_string(bed.path("args"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn kaniko_wrapper_adds_the_commit_and_reports_the_digest() {
    let Some(bed) = Bed::new() else { return };
    let st = wrapper(
        &bed,
        &[(
            "SLIPWAY_IMAGE_BY_COMMIT",
            "registry.shared-services:5000/app",
        )],
    )
    .wait()
    .unwrap();
    assert_eq!(st.code(), Some(0));
    let a = args(&bed);
    let root = bed.dir.path().display().to_string();
    assert_eq!(
        a,
        [
            format!("--digest-file={root}/termination-log"),
            format!("--image-name-with-digest-file={root}/slipway/out/image-name"),
            "--cache=true".into(),
            format!("--label=org.opencontainers.image.revision={COMMIT}"),
            format!("--label=org.opencontainers.image.source=https://github.com/example/app.git#{COMMIT}"),
            "--destination=registry.shared-services:5000/app:3f78685".into(),
        ]
    );
    let d = format!("sha256:{:064}", 7);
    assert_eq!(
        bed.termination_message(),
        format!("{d}\nregistry.shared-services:5000/app@{d}\n")
    );
    // With --tag the destination is in the Job's args; nothing is added.
    let st = wrapper(&bed, &[]).wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert!(!args(&bed).iter().any(|a| a.starts_with("--destination")));
}

/// Kaniko's multi-stage cleanup deletes `/busybox` unless the runtime
/// mounts the image's VOLUME there (CRI-O with `image_volumes=ignore` does
/// not). busybox sh may run `cat` as a built-in, so the check runs the
/// wrapper under dash, which has no such built-in, with every tool in PATH
/// deleted by the executor: the image name still reaches the message (#19).
#[test]
fn kaniko_wrapper_needs_no_tool_once_the_executor_ran() {
    let Some(bed) = Bed::new() else { return };
    let Some(dash) = which("dash") else {
        return skip_or_fail("dash is not installed (apt-get install dash)");
    };
    let bin = bed.path("bin");
    let st = wrapper_in(
        &bed,
        &[("FAKE_CLEANUP", bin.to_str().unwrap())],
        &[dash.to_str().unwrap()],
    )
    .wait()
    .unwrap();
    assert_eq!(st.code(), Some(0));
    assert!(
        !bin.join("cat").exists(),
        "the stand-in executor did not delete the tools"
    );
    let d = format!("sha256:{:064}", 7);
    assert_eq!(
        bed.termination_message(),
        format!("{d}\nregistry.shared-services:5000/app@{d}\n")
    );
}

#[test]
fn kaniko_wrapper_empties_the_message_on_failure() {
    let Some(bed) = Bed::new() else { return };
    // The executor wrote a digest (as Kaniko does before pushing) and failed.
    let st = wrapper(&bed, &[("FAKE_RC", "1")]).wait().unwrap();
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        bed.termination_message(),
        "",
        "the kubelet then reports the log tail (FallbackToLogsOnError)"
    );
}

#[test]
fn kaniko_wrapper_forwards_sigterm() {
    let Some(bed) = Bed::new() else { return };
    let mut child = wrapper(&bed, &[("FAKE_WAIT", "1")]);
    let started = bed.path("started");
    for _ in 0..100 {
        if started.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(started.exists(), "the executor did not start");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(143));
    assert_eq!(args(&bed).last().map(String::as_str), Some("TERM"));
    assert_eq!(bed.termination_message(), "");
}

/// A test that cannot run fails naming what is missing; only
/// SLIPWAY_SKIP_INTEGRATION=<reason> makes it skip, printing the reason
/// (straight to fd 2, past cargo's output capture).
fn skip_or_fail(msg: &str) {
    match std::env::var("SLIPWAY_SKIP_INTEGRATION") {
        Ok(reason) if !reason.trim().is_empty() => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (SLIPWAY_SKIP_INTEGRATION={reason}): {msg}"
            );
        }
        _ => panic!("{msg}; to skip instead, set SLIPWAY_SKIP_INTEGRATION=<reason>"),
    }
}

// ---- the rendered pod, as a kubelet runs it (#9) ---------------------------

use std::collections::BTreeMap;

use git_servers::{GitDaemon, HttpBackend};
use k8s_openapi::api::batch::v1::Job;
use kubelet::Pod;
use slipway::builds::job::{self, GIT_CONTAINER, KANIKO_CONTAINER};
use slipway::builds::{BuildArgs, Plan, Settings};

/// The plan `slipway build --git URL --rev REV --repo app` makes (no config
/// file), and the Job it renders.
fn rendered(git: &str, rev: &str, git_secret: Option<&str>) -> (Plan, Job) {
    let args = BuildArgs {
        git: git.into(),
        rev: rev.into(),
        repo: "app".into(),
        dockerfile: "Dockerfile".into(),
        build_id: Some("kubelet001".into()),
        git_secret: git_secret.map(String::from),
        settings: Settings {
            config: Some(PathBuf::from("/dev/null")),
            namespace: None,
        },
        ..Default::default()
    };
    let plan = args.plan().unwrap();
    let job = job::job(&plan.spec);
    (plan, job)
}

/// The push Secret's `config.json` in these pods, and its password.
const PUSH_PASSWORD: &str = "pw-only-in-the-mounted-file";
fn push_config() -> String {
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("slipway-push:{PUSH_PASSWORD}"));
    format!("{{\"auths\":{{\"registry.shared-services:5000\":{{\"auth\":\"{auth}\"}}}}}}\n")
}

/// What the API server holds for the pod's volumes: the registry CA
/// ConfigMap, the push Secret `registry-push` as `slipway pki ensure` makes
/// it (#10), and `secrets`.
fn objects(secrets: &[(&str, &[(&str, &str)])]) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let mut o = BTreeMap::from([
        (
            "registry-ca".to_string(),
            BTreeMap::from([(
                "ca.crt".to_string(),
                b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec(),
            )]),
        ),
        (
            "registry-push".to_string(),
            BTreeMap::from([
                ("config.json".to_string(), push_config().into_bytes()),
                ("password".to_string(), PUSH_PASSWORD.as_bytes().to_vec()),
                ("htpasswd".to_string(), b"slipway-push:$2b$10$x\n".to_vec()),
            ]),
        ),
    ]);
    for (name, files) in secrets {
        o.insert(
            name.to_string(),
            files
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        );
    }
    o
}

/// The rendered Job's git container, run in its pod with the registry CA
/// and `secrets`.
fn git_container_in_pod(job: &Job, secrets: &[(&str, &[(&str, &str)])]) -> (Pod, kubelet::Run) {
    let pod = Pod::new(job, &objects(secrets));
    let image = kubelet::git_image(&pod.dir.path().join("image-git"));
    let run = pod.run(GIT_CONTAINER, &image);
    (pod, run)
}

/// The origin repository (see `origin`) under a `git daemon` on loopback,
/// and the temporary directory that holds it.
fn origin_on_git_daemon() -> (tempfile::TempDir, Origin, GitDaemon) {
    let repos = tempfile::tempdir().unwrap();
    let origin = origin_in(&repos.path().join("origin"));
    let daemon = GitDaemon::start(repos.path());
    (repos, origin, daemon)
}

/// The sandbox itself: the git container's user, groups, volume ownership,
/// read-only root and writable termination log are what a kubelet gives it.
#[test]
fn kubelet_sandbox_runs_the_git_container_as_a_node_would() {
    kubelet::require();
    let (_, job) = rendered("https://example.com/app.git", "main", None);
    let pod = Pod::new(&job, &objects(&[]));
    let image = kubelet::git_image(&pod.dir.path().join("image-git"));
    let run = pod.run_as(
        GIT_CONTAINER,
        &image,
        Some(&[
            "/bin/sh",
            "-c",
            "id -u; id -g; id -G; stat -c '%u %g %a' /slipway/context /slipway/home; \
             touch /x 2>/dev/null && echo rw || echo ro; echo written >/dev/termination-log",
        ]),
        &[],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout, "65534\n65534\n65534\n0 65534 2777\n0 65534 2777\nro\n",
        "{run:?}"
    );
    assert_eq!(run.message, "written\n");
}

/// Issue #9's "done when": the rendered git init container, as uid 65534 in
/// root-owned mode-2777 emptyDirs, checks out a branch, a tag, a full commit
/// and a short commit from a `git daemon` on loopback.
#[test]
fn kubelet_git_container_checks_out_branch_tag_commit_and_short_commit() {
    kubelet::require();
    let (_repos, o, daemon) = origin_on_git_daemon();
    let url = daemon.url("origin");
    let short = o.feature[..8].to_string();
    let cases: Vec<(&str, &str, &str)> = vec![
        ("main", &o.c3, "refs/heads/main"),
        ("v1", &o.c2, "refs/tags/v1"),
        // c1 is no tip: fetched by itself (protocol v2).
        (&o.c1, &o.c1, "-"),
        (&short, &o.feature, "-"),
    ];
    for (rev, commit, r) in cases {
        let (_, job) = rendered(&url, rev, None);
        let (pod, run) = git_container_in_pod(&job, &[]);
        assert_eq!(run.code, 0, "{rev}: {run:?}");
        assert_eq!(run.message, ok_message(commit, r), "{rev}");
        let written = std::fs::read_to_string(pod.volume("out").join("commit")).unwrap();
        assert_eq!(written, format!("{commit}\n"), "{rev}");
        assert!(pod.volume("context").join("Dockerfile").is_file(), "{rev}");
        assert!(!pod.volume("context").join(".git").exists(), "{rev}");
    }
    // As in fixtures/kaniko-v1.27.6/fail-no-such-revision.git.log:
    // `slipway: revision-not-found: no branch or tag named nosuchbranch in
    // git://127.0.0.1:9418/app.git`, exit 11.
    let (_, job) = rendered(&url, "nosuchbranch", None);
    let (_pod, run) = git_container_in_pod(&job, &[]);
    assert_eq!(run.code, 11, "{run:?}");
    assert!(
        run.stderr.ends_with(&format!(
            "slipway: revision-not-found: no branch or tag named nosuchbranch in {url}\n"
        )),
        "{run:?}"
    );
    drop(daemon);
}

/// The token and basic-auth paths, through `git http-backend`: the Secret's
/// files reach the server as Basic credentials and the checkout succeeds;
/// a wrong password is exit 10. (The planner refuses a secret over plain
/// http, so the URL is set on the validated spec: the test server has no
/// TLS.)
#[test]
fn kubelet_git_container_authenticates_to_http_backend() {
    kubelet::require();
    let repos = tempfile::tempdir().unwrap();
    let o = origin_in(&repos.path().join("origin"));
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // (Secret files, the credentials the server accepts, whether they match)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, bool);
    let cases: Vec<Case> = vec![
        (
            vec![("token", "glpat-123")],
            "x-access-token:glpat-123",
            true,
        ),
        (
            vec![("token", "t0k"), ("username", "oauth2")],
            "oauth2:t0k",
            true,
        ),
        (
            vec![("username", "builder"), ("password", "s3cret")],
            "builder:s3cret",
            true,
        ),
        (
            vec![("username", "builder"), ("password", "wrong")],
            "builder:s3cret",
            false,
        ),
    ];
    for (files, want, ok) in cases {
        let server = HttpBackend::start(repos.path(), &format!("Basic {}", b64(want)));
        let (mut plan, _) = rendered("https://example.com/team/app.git", "main", Some("git-cred"));
        plan.spec.git_url = server.url("origin");
        let job = job::job(&plan.spec);
        let (_pod, run) = git_container_in_pod(&job, &[("git-cred", &files)]);
        if ok {
            assert_eq!(run.code, 0, "{files:?}: {run:?}");
            assert_eq!(run.message, ok_message(&o.c3, "refs/heads/main"));
            assert!(server
                .seen
                .lock()
                .unwrap()
                .contains(&Some(format!("Basic {}", b64(want)))));
        } else {
            assert_eq!(run.code, 10, "{files:?}: {run:?}");
            assert!(
                run.message.starts_with("slipway-git git-auth-failed\n"),
                "{run:?}"
            );
        }
        assert!(!run.stderr.contains("s3cret") && !run.message.contains("s3cret"));
        drop(server);
    }
}

/// Stands in for /kaniko/executor in the Kaniko image (whose only shell is
/// /busybox/sh): records its argv, checks it can read the Dockerfile and the
/// CA it is given, and writes the two files as Kaniko does.
const SANDBOX_EXECUTOR: &str = r#"#!/busybox/sh
printf '%s\n' "$@" >/kaniko/argv
env >/kaniko/env
# Kaniko reads its push credentials from $DOCKER_CONFIG or /kaniko/.docker.
cat /kaniko/.docker/config.json >/kaniko/seen-config.json || exit 2
ls -A /kaniko/.docker >/kaniko/seen-docker-dir
for a; do
  case "$a" in
    --dockerfile=*) [ -r "${a#*=}" ] || { echo "cannot read ${a#*=}" >&2; exit 2; } ;;
    --registry-certificate=*) [ -r "${a##*=}" ] || { echo "cannot read ${a##*=}" >&2; exit 2; } ;;
    --digest-file=*) printf 'sha256:%064d' 7 >"${a#*=}" ;;
    --image-name-with-digest-file=*) printf 'registry.shared-services:5000/app@sha256:%064d\n' 7 >"${a#*=}" ;;
  esac
done
"#;

/// The whole pod: the git init container, then the Kaniko container's
/// wrapper around a stand-in executor, sharing the emptyDirs as in the pod.
/// The executor gets the Job's args plus the three the wrapper adds.
#[test]
fn kubelet_pod_runs_git_then_the_kaniko_wrapper() {
    kubelet::require();
    let (_repos, o, daemon) = origin_on_git_daemon();
    let url = daemon.url("origin");
    let (plan, job) = rendered(&url, "main", None);
    let (pod, run) = git_container_in_pod(&job, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    drop(daemon);

    let kaniko_image =
        kubelet::kaniko_image(&pod.dir.path().join("image-kaniko"), SANDBOX_EXECUTOR);
    let run = pod.run(KANIKO_CONTAINER, &kaniko_image);
    assert_eq!(run.code, 0, "{run:?}");
    let argv: Vec<String> = std::fs::read_to_string(kaniko_image.root.join("kaniko/argv"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut want = job::kaniko_args(&plan.spec);
    want.push(format!(
        "--label=org.opencontainers.image.revision={}",
        o.c3
    ));
    want.push(format!(
        "--label=org.opencontainers.image.source={url}#{}",
        o.c3
    ));
    want.push(format!(
        "--destination=registry.shared-services:5000/app:{}",
        &o.c3[..7]
    ));
    assert_eq!(argv, want);
    // #10: the push credential reaches Kaniko as the mounted config.json
    // only, the Secret's other keys do not, and neither args nor
    // environment carry it.
    let seen = |f: &str| std::fs::read_to_string(kaniko_image.root.join("kaniko").join(f)).unwrap();
    assert_eq!(seen("seen-config.json"), push_config());
    let dir = seen("seen-docker-dir");
    assert!(dir.lines().any(|l| l == "config.json"), "{dir}");
    assert!(
        !dir.contains("password") && !dir.contains("htpasswd"),
        "{dir}"
    );
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("slipway-push:{PUSH_PASSWORD}"));
    for f in ["argv", "env"] {
        assert!(!seen(f).contains(PUSH_PASSWORD), "{f} has the password");
        assert!(!seen(f).contains(&auth), "{f} has the auth");
    }
    let d = format!("sha256:{:064}", 7);
    assert_eq!(
        run.message,
        format!("{d}\nregistry.shared-services:5000/app@{d}\n")
    );
}

/// The other git calls of the script under the same ownership: submodules
/// (cloned by `git submodule update` inside the root-owned context) and
/// `.git` removal, with the submodule served by the same `git daemon`.
#[test]
fn kubelet_git_container_checks_out_submodules() {
    kubelet::require();
    let repos = tempfile::tempdir().unwrap();
    let daemon = GitDaemon::start(repos.path());
    repos_with_submodule(
        &repos.path().join("sub"),
        &repos.path().join("super"),
        &daemon.url("sub"),
        "FROM scratch\n",
    );
    let (_, job) = rendered(&daemon.url("super"), "main", None);
    let (pod, run) = git_container_in_pod(&job, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let ctx = pod.volume("context");
    assert_eq!(
        std::fs::read_to_string(ctx.join("vendor/sub/lib.txt")).unwrap(),
        "lib\n"
    );
    assert!(!ctx.join("vendor/sub/.git").exists() && !ctx.join(".git").exists());
    drop(daemon);
}
