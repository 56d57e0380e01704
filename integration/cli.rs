//! The `slipway` binary on bad input: each case exits 64 with a message
//! that names the file or field, and writes nothing.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

const SLIPWAY: &str = env!("CARGO_BIN_EXE_slipway");

fn run(args: &[&str]) -> Output {
    Command::new(SLIPWAY)
        .args(args)
        .env("SLIPWAY_LOG_FORMAT", "text")
        .env_remove("SLIPWAY_CONFIG")
        .output()
        .unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A valid CA from `slipway pki init`.
fn ca(dir: &Path) -> std::path::PathBuf {
    let out = run(&[
        "pki",
        "init",
        "--out-dir",
        dir.join("pki").to_str().unwrap(),
        "--dns",
        "registry",
    ]);
    assert!(out.status.success(), "{}", err(&out));
    dir.join("pki/ca.crt")
}

fn config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("agent.toml");
    fs::write(&p, body).unwrap();
    p
}

fn good_body(dir: &Path, ca: &Path) -> String {
    format!(
        "[registry]\naliases = [\"registry.shared-services:5000\"]\nupstream = \"https://registry.shared-services:5000\"\nca_file = {:?}\n[containerd]\ncerts_dir = {:?}\nconfig_file = {:?}\n",
        ca.display().to_string(),
        dir.join("certs.d").display().to_string(),
        dir.join("config.toml").display().to_string()
    )
}

fn assert_bad_config(dir: &Path, cfg: &Path, expect: &str) {
    let out = run(&["agent", "--once", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", err(&out));
    assert!(
        err(&out).contains(expect),
        "wanted {expect:?} in: {}",
        err(&out)
    );
    assert!(!dir.join("certs.d").exists(), "something was written");
}

#[test]
fn good_config_applies_and_exits_0() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), &good_body(d.path(), &ca(d.path())));
    let out = run(&["agent", "--once", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    // containerd's config is missing here: said once, not fatal.
    assert!(
        err(&out).contains("cannot tell whether containerd reads"),
        "{}",
        err(&out)
    );
    assert!(d
        .path()
        .join("certs.d/registry.shared-services:5000/hosts.toml")
        .exists());
}

#[test]
fn malformed_config_exits_64_naming_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "[registry\naliases = []\n");
    assert_bad_config(
        d.path(),
        &cfg,
        &format!("config file {}: TOML parse error at line 1", cfg.display()),
    );
}

/// #18 point 13: each cause once, and a parse error keeps its lines (the
/// caret under the column).
#[test]
fn errors_say_each_cause_once_and_keep_their_lines() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nonexistent.toml");
    let out = run(&["agent", "--once", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", err(&out));
    assert_eq!(err(&out).matches("os error 2").count(), 1, "{}", err(&out));

    let body = good_body(d.path(), &ca(d.path())).replace(
        "\"registry.shared-services:5000\"",
        "\"../registry.shared-services:5000\"",
    );
    let out = run(&[
        "agent",
        "--once",
        "--config",
        config(d.path(), &body).to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", err(&out));
    let line = err(&out);
    let line = line.lines().find(|l| l.starts_with("slipway: ")).unwrap();
    assert_eq!(line.matches("contains '/'").count(), 1, "{line}");

    let cfg = config(d.path(), "[registry]\naliases = [\"a:5000\",\n");
    let out = run(&["agent", "--once", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", err(&out));
    let text = err(&out);
    let report = &text[text.find("slipway: config file").expect(&text)..];
    assert!(report.lines().count() > 2, "folded onto one line: {report}");
    assert!(
        report.lines().any(|l| l.trim_end().ends_with('^')),
        "no caret: {report}"
    );
}

#[test]
fn bad_alias_exits_64_naming_the_field() {
    let d = tempfile::tempdir().unwrap();
    let body = good_body(d.path(), &ca(d.path()));
    for (alias, expect) in [
        (
            "registry/x:5000",
            "registry.aliases[0]: \"registry/x:5000\" contains '/'",
        ),
        (
            "../etc:5000",
            "registry.aliases[0]: \"../etc:5000\" contains '/'",
        ),
        ("..:5000", "registry.aliases[0]: \"..:5000\" contains '..'"),
        (
            "reg istry:5000",
            "registry.aliases[0]: \"reg istry:5000\" contains a space",
        ),
        (":5000", "registry.aliases[0]: \":5000\" has an empty host"),
    ] {
        let cfg = config(
            d.path(),
            &body.replace("registry.shared-services:5000\"]", &format!("{alias}\"]")),
        );
        assert_bad_config(d.path(), &cfg, expect);
    }
}

#[test]
fn ca_not_pem_exits_64_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("ca.crt");
    fs::write(&bad, "this is not a certificate\n").unwrap();
    let cfg = config(d.path(), &good_body(d.path(), &bad));
    assert_bad_config(
        d.path(),
        &cfg,
        &format!(
            "registry.ca_file {}: not a PEM certificate bundle",
            bad.display()
        ),
    );
}

#[test]
fn expired_ca_exits_64_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    // An expired CA made with rcgen, the same library `slipway pki` uses.
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let k = rcgen::KeyPair::generate().unwrap();
    let expired = d.path().join("expired.crt");
    fs::write(&expired, p.self_signed(&k).unwrap().pem()).unwrap();
    let cfg = config(d.path(), &good_body(d.path(), &expired));
    assert_bad_config(
        d.path(),
        &cfg,
        &format!("registry.ca_file {}: certificate 0", expired.display()),
    );
    let out = run(&["agent", "--once", "--config", cfg.to_str().unwrap()]);
    assert!(err(&out).contains("expired at"), "{}", err(&out));
}

#[test]
fn missing_key_and_unknown_key_exit_64() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "[registry]\naliases = [\"r:5000\"]\n");
    assert_bad_config(d.path(), &cfg, "registry.upstream is not set");
    let cfg = config(
        d.path(),
        &format!(
            "{}\n[proxy]\nlisten_addr = \"x\"\n",
            good_body(d.path(), &ca(d.path()))
        ),
    );
    assert_bad_config(d.path(), &cfg, "unknown field `listen_addr`");
}

#[test]
fn env_and_flags_override_the_file() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), &good_body(d.path(), &ca(d.path())));
    let out = Command::new(SLIPWAY)
        .args([
            "agent",
            "--once",
            "--config",
            cfg.to_str().unwrap(),
            "--registry-upstream",
            "https://10.96.0.20:5000",
        ])
        .env(
            "SLIPWAY_REGISTRY_ALIASES",
            "a.example:5000,203.0.113.7:5000",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", err(&out));
    let t = fs::read_to_string(d.path().join("certs.d/203.0.113.7:5000/hosts.toml")).unwrap();
    assert!(t.contains("[host.\"https://10.96.0.20:5000\"]"), "{t}");
    assert!(d.path().join("certs.d/a.example:5000/hosts.toml").exists());
    assert!(!d
        .path()
        .join("certs.d/registry.shared-services:5000")
        .exists());
}

#[test]
fn foreign_malformed_hosts_toml_fails_that_alias_only() {
    let d = tempfile::tempdir().unwrap();
    let body = good_body(d.path(), &ca(d.path())).replace(
        "aliases = [\"registry.shared-services:5000\"]",
        "aliases = [\"registry.shared-services:5000\", \"other:5000\"]",
    );
    let cfg = config(d.path(), &body);
    let bad_dir = d.path().join("certs.d/registry.shared-services:5000");
    fs::create_dir_all(&bad_dir).unwrap();
    fs::write(bad_dir.join("hosts.toml"), "server = \"https://x\n").unwrap();
    let out = run(&["agent", "--once", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", err(&out));
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        so.contains(&format!(
            "registry.shared-services:5000: error: {}/hosts.toml: not valid TOML",
            bad_dir.display()
        )),
        "{so}"
    );
    assert!(so.contains("other:5000: changed (owned)"), "{so}");
    assert_eq!(
        fs::read_dir(&bad_dir).unwrap().count(),
        1,
        "wrote into the broken alias dir"
    );
    assert_eq!(
        fs::read_to_string(bad_dir.join("hosts.toml")).unwrap(),
        "server = \"https://x\n"
    );
}

/// The DaemonSet's config (daemonset/config/agent.toml) is valid for this
/// binary, so manifests and code cannot drift apart.
#[test]
fn daemonset_agent_config_is_valid() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("daemonset/config/agent.toml");
    let cfg = slipway::node::config::AgentConfig::load(Some(&p), &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.containerd.host_root, Path::new("/host"));
    assert_eq!(cfg.ca_file, Path::new("/etc/slipway/ca/ca.crt"));
    assert_eq!(cfg.aliases[0].dir_name(), "registry.shared-services:5000");
    // #11: sharing on, held until verified.
    let peers = cfg.peers.expect("[peers] in the install's config");
    assert_eq!(peers.listen, "0.0.0.0:5052".parse().unwrap());
    assert_eq!(
        peers.dns.as_deref(),
        Some("slipway-peers.shared-services.svc.cluster.local:5052")
    );
    assert!(peers.hold_until_verified);
}

/// #13: `cache.max_bytes = 0` and out-of-range seconds exit 64 naming the
/// key and the real bounds, from the file, a flag or the environment.
#[test]
fn out_of_range_values_exit_64_naming_the_key_and_bounds() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(d.path());
    let cfg = config(
        d.path(),
        &format!(
            "{}[cache]\ndir = {:?}\nmax_bytes = 0\n",
            good_body(d.path(), &ca),
            d.path().join("cache").display().to_string()
        ),
    );
    assert_bad_config(
        d.path(),
        &cfg,
        "cache.max_bytes: 0 is out of range: a size in bytes of at least 1",
    );
    let cfg = config(
        d.path(),
        &format!(
            "{}[agent]\ngrace_period_secs = 0\n",
            good_body(d.path(), &ca)
        ),
    );
    assert_bad_config(
        d.path(),
        &cfg,
        "agent.grace_period_secs: 0 is out of range: a number of seconds greater than 0 and at most 86400",
    );
    let cfg = config(d.path(), &good_body(d.path(), &ca));
    for (flag_or_env, expect) in [
        (
            ["--cache-max-bytes", "0"],
            "cache.max_bytes: 0 is out of range",
        ),
        (
            ["--proxy-connect-timeout-secs", "90000"],
            "proxy.connect_timeout_secs: 90000 is out of range: a number of seconds greater than 0 and at most 86400",
        ),
    ] {
        let out = run(&[
            "agent",
            "--once",
            "--config",
            cfg.to_str().unwrap(),
            flag_or_env[0],
            flag_or_env[1],
        ]);
        assert_eq!(out.status.code(), Some(64), "{}", err(&out));
        assert!(err(&out).contains(expect), "wanted {expect:?} in: {}", err(&out));
    }
    let out = Command::new(SLIPWAY)
        .args(["agent", "--once", "--config", cfg.to_str().unwrap()])
        .env("SLIPWAY_LOG_FORMAT", "text")
        .env("SLIPWAY_CACHE_MAX_BYTES", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", err(&out));
    assert!(
        err(&out).contains("cache.max_bytes: 0 is out of range"),
        "{}",
        err(&out)
    );
    assert!(!d.path().join("certs.d").exists(), "something was written");
}

/// `slipway gc` (#21) on bad input: a `[gc]` file with an unknown key, a
/// registry that is not https, an unreadable password file. Each exits 64
/// naming the file or key, before any request is made.
#[test]
fn gc_bad_input_exits_64_naming_the_file_or_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = dir.join("gc.toml");
    fs::write(&cfg, "[gc]\nkeep_bilds = 3\n").unwrap();
    let gc = |extra: &[&str]| {
        let mut args = vec!["gc", "--no-cluster", "--ca-file", "/nonexistent/ca.crt"];
        if !extra.contains(&"--registry") {
            args.extend(["--registry", "https://registry.shared-services:5000"]);
        }
        args.extend_from_slice(extra);
        let o = Command::new(SLIPWAY)
            .args(&args)
            .env("SLIPWAY_LOG_FORMAT", "text")
            .env_remove("SLIPWAY_GC_PASSWORD")
            .env_remove("SLIPWAY_GC_CONFIG")
            .env_remove("SLIPWAY_GC_APPLY")
            .output()
            .unwrap();
        (o.status.code(), err(&o))
    };
    let (code, e) = gc(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{e}");
    assert!(e.contains("gc.toml") && e.contains("keep_bilds"), "{e}");
    let (code, e) = gc(&["--registry", "http://registry:5000"]);
    assert_eq!(code, Some(64), "{e}");
    assert!(e.contains("gc.registry"), "{e}");
    let missing = dir.join("password");
    let (code, e) = gc(&["--password-file", missing.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{e}");
    assert!(e.contains(missing.to_str().unwrap()), "{e}");
}
