//! Golden tests over `host-config/`: every real-world containerd layout and
//! every foreign hosts.toml, compared as exact text with the checked-in
//! expected output. `SLIPWAY_BLESS=1 cargo test --test golden` rewrites the
//! expected files; review every change to one before committing it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use slipway::node::apply;
use slipway::node::config::{AgentConfig, Overrides};
use slipway::node::containerd;
use slipway::node::fs::RealFs;
use slipway::node::hostconfig::{Alias, HostEntry};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("host-config")
}

fn bless() -> bool {
    std::env::var_os("SLIPWAY_BLESS").is_some()
}

fn check_golden(path: &Path, actual: &str) {
    if bless() {
        fs::write(path, actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with SLIPWAY_BLESS=1 to create)",
            path.display()
        )
    });
    assert_eq!(actual, expected, "golden mismatch: {}", path.display());
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// Every file under `dir` with its bytes and mode.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<PathBuf, (Vec<u8>, u32)>) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let mode = e.metadata().unwrap().permissions().mode();
            if e.file_type().unwrap().is_dir() {
                out.insert(p.strip_prefix(base).unwrap().to_path_buf(), (vec![], mode));
                walk(base, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    (fs::read(&p).unwrap(), mode),
                );
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// The names in `host-config/<dir>`, sorted.
fn names_in(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// An agent config for `aliases` and `upstream` whose host root is `host`,
/// reading containerd's config from `/LAYOUT/config.toml` there.
fn layout_agent_config(host: &Path, aliases: &str, upstream: &str) -> AgentConfig {
    let text = format!(
        "[registry]\naliases = [{aliases:?}]\nupstream = {upstream:?}\nca_file = \"/ca.crt\"\n[containerd]\nhost_root = {host:?}\nconfig_file = \"/LAYOUT/config.toml\"\n"
    );
    AgentConfig::from_str(Path::new("/agent.toml"), &text, &Overrides::default()).unwrap()
}

#[test]
fn every_layout_is_inspected_as_expected() {
    let names = names_in("layouts");
    assert!(names.len() >= 10, "layouts missing: {names:?}");
    for name in names {
        let src = root().join("layouts").join(&name);
        // The layout's files appear to slipway at /LAYOUT on the "host",
        // which is how the fixtures write their `imports`.
        let host = tempfile::tempdir().unwrap();
        copy_tree(&src, &host.path().join("LAYOUT"));
        let cfg = layout_agent_config(
            host.path(),
            "registry.shared-services:5000",
            "https://registry.shared-services.svc.cluster.local:5000",
        );
        let (insp, fix_text) = slipway::node::reconcile::inspect_containerd(&RealFs, &cfg)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut out = String::new();
        out.push_str(&format!("version: {}\n", insp.version));
        out.push_str(&format!("section: [{}]\n", insp.section));
        match &insp.config_path {
            Some((cp, f)) => {
                out.push_str(&format!("config_path: {cp:?} (set in {})\n", f.display()))
            }
            None => out.push_str("config_path: none\n"),
        }
        out.push_str(&format!("mirrors: {:?}\n", insp.mirrors));
        out.push_str(&format!("generated_by: {:?}\n", insp.generated_by));
        out.push_str(&format!(
            "covers /etc/containerd/certs.d: {}\n",
            if insp.covered { "yes" } else { "no" }
        ));
        out.push_str(&format!(
            "advice: {}\n",
            insp.advice().unwrap_or_else(|| "-".into())
        ));
        let fixed_path = src.join("expected-fixed.toml");
        match containerd::plan_fix(&insp, &fix_text) {
            Ok(None) => out.push_str("fix: not needed\n"),
            Ok(Some(fixed)) => {
                out.push_str(&format!("fix: edits {}\n", insp.file_to_fix().display()));
                // The patched file must parse and now cover the directory.
                let fixed_doc = containerd::parse(Path::new("fixed"), &fixed).unwrap();
                drop(fixed_doc);
                let again = containerd::inspect(
                    (insp.file_to_fix(), &fixed),
                    &[],
                    Path::new("/etc/containerd/certs.d"),
                );
                if insp.file_to_fix() == insp.main_file {
                    assert!(again.unwrap().covered, "{name}: fix did not cover");
                }
                check_golden(&fixed_path, &fixed);
            }
            Err(e) => out.push_str(&format!("fix: refused: {e}\n")),
        }
        check_golden(&src.join("expected.txt"), &out);
        // An expected-fixed.toml the code no longer produces is a stale
        // fixture, not a passing test.
        if !out.contains("fix: edits ") {
            if bless() {
                let _ = fs::remove_file(&fixed_path);
            }
            assert!(
                !fixed_path.exists(),
                "{name}: {} is checked in but the code plans no fix",
                fixed_path.display()
            );
        }
    }
}

const UPSTREAM: &str = "https://10.96.0.20:5000";

fn ca_content() -> String {
    format!(
        "{}\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        slipway::node::ca_bundle::CA_MARKER
    )
}

/// Apply to a copy of each foreign tree, compare with the expected file,
/// then clean up and require the tree to be byte-identical to the input.
#[test]
fn foreign_hosts_files_merge_as_expected_and_cleanup_restores_them() {
    let cases = names_in("foreign");
    assert!(cases.len() >= 7, "{cases:?}");
    let alias = Alias::parse("registry.shared-services:5000").unwrap();
    for case in cases {
        let src = root().join("foreign").join(&case);
        let tmp = tempfile::tempdir().unwrap();
        let certs = tmp.path().join("certs.d");
        // Copy only the input (not the expected-* files).
        fs::create_dir_all(&certs).unwrap();
        for e in fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_tree(&e.path(), &certs.join(e.file_name()));
            }
        }
        let before = snapshot(&certs);
        let hosts = [HostEntry::upstream(UPSTREAM)];
        let apply = || {
            apply::apply_all(
                &RealFs,
                &certs,
                std::slice::from_ref(&alias),
                &[],
                &hosts,
                &ca_content(),
            )
            .unwrap()
        };
        let report = apply();
        assert_eq!(report.len(), 1, "{case}");
        let a = &report[0];
        let dir_name = a.dir.file_name().unwrap().to_string_lossy().to_string();
        match &a.result {
            Err(e) => {
                assert!(
                    !src.join(format!("expected.{dir_name}.hosts.toml")).exists(),
                    "{case}: apply failed ({e}) but an expected hosts.toml is checked in"
                );
                let shown = e.to_string().replace(&certs.display().to_string(), "CERTS");
                check_golden(&src.join("expected-error.txt"), &format!("{shown}\n"));
                // Nothing written on error.
                assert_eq!(snapshot(&certs), before, "{case}: files changed on error");
                continue;
            }
            Ok(done) if done.changes.is_empty() => panic!("{case}: nothing applied"),
            Ok(_) => {}
        }
        assert!(
            !src.join("expected-error.txt").exists(),
            "{case}: apply succeeded but expected-error.txt is checked in"
        );
        let written = fs::read_to_string(a.dir.join("hosts.toml")).unwrap();
        check_golden(
            &src.join(format!("expected.{dir_name}.hosts.toml")),
            &written,
        );
        // containerd must be able to parse what we leave.
        let doc: toml_edit::DocumentMut = written.parse().unwrap();
        let first = doc["host"].as_table().unwrap().iter().next();
        let _ = first;
        assert!(
            written.find(UPSTREAM).unwrap()
                < written
                    .find("[host.")
                    .map(|i| i + 200)
                    .unwrap_or(usize::MAX)
        );
        // Idempotent: a second apply changes nothing.
        let again = apply();
        assert_eq!(
            again[0].result.as_ref().unwrap().changes,
            Vec::<String>::new(),
            "{case}"
        );
        // Cleanup restores every foreign byte and mode and leaves nothing of ours.
        let clean = apply::cleanup_all(&RealFs, &certs, std::slice::from_ref(&alias)).unwrap();
        assert!(clean.iter().all(|d| d.result.is_ok()), "{case}: {clean:?}");
        assert_eq!(
            snapshot(&certs),
            before,
            "{case}: cleanup did not restore the tree"
        );
    }
}

/// The first `[host]` table containerd sees in a merged file is ours:
/// checked on what the merge code writes for each foreign input (the
/// checked-in expected files are compared with that same output above).
#[test]
fn merged_files_list_our_host_first() {
    for case in [
        "commented",
        "several-hosts",
        "relative-ca",
        "underscore-dir",
    ] {
        let src = root().join("foreign").join(case);
        let input_dir = fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.is_dir() && p.join("hosts.toml").exists())
            .unwrap_or_else(|| panic!("{case}: no input hosts.toml"));
        let input = fs::read_to_string(input_dir.join("hosts.toml")).unwrap();
        let text = slipway::node::hostconfig::merge(
            "x/hosts.toml",
            &input,
            &[HostEntry::upstream(UPSTREAM)],
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let doc: toml_edit::DocumentMut = text.parse().unwrap();
        // Render order is what containerd reads; find the first header.
        let first_header = text
            .lines()
            .find(|l| l.trim_start().starts_with("[host."))
            .unwrap();
        assert_eq!(
            first_header.trim(),
            format!("[host.{UPSTREAM:?}]"),
            "{case}\n{text}"
        );
        assert!(
            doc["host"][UPSTREAM]["ca"].as_str() == Some("slipway-ca.crt"),
            "{case}\n{text}"
        );
    }
}

/// #20: a mirrored upstream's directory: the node proxy, then the
/// in-cluster cache (containerd adds `?ns=docker.io`), then Docker Hub
/// itself as `server`, the fallback.
#[test]
fn mirror_hosts_toml_is_golden() {
    let text = "[registry]\naliases = [\"registry.shared-services:5000\"]\nupstream = \"https://10.96.0.20:5000\"\nca_file = \"/ca.crt\"\n[mirror]\nregistries = [\"docker.io\", \"ghcr.io\"]\n";
    let cfg = AgentConfig::from_str(Path::new("/agent.toml"), text, &Overrides::default()).unwrap();
    let dirs = slipway::node::reconcile::mirror_dirs(&cfg);
    assert_eq!(dirs.len(), 2);
    for d in dirs {
        let text = slipway::node::hostconfig::render_mirror(
            &d.host,
            &d.server,
            &[
                HostEntry::proxy("http://127.0.0.1:5050"),
                HostEntry::upstream(UPSTREAM),
            ],
        );
        check_golden(
            &root().join(format!("expected-mirror-{}.hosts.toml", d.host.dir_name())),
            &text,
        );
    }
}

/// A fresh directory gets slipway's own file, whose text is golden too.
#[test]
fn owned_hosts_toml_is_golden() {
    let alias = Alias::parse("registry.shared-services:5000").unwrap();
    let text = slipway::node::hostconfig::render_owned(&alias, &[HostEntry::upstream(UPSTREAM)]);
    check_golden(&root().join("expected-owned.hosts.toml"), &text);
    // The long-running agent lists its proxy first.
    let text = slipway::node::hostconfig::render_owned(
        &alias,
        &[
            HostEntry::proxy("http://127.0.0.1:5050"),
            HostEntry::upstream(UPSTREAM),
        ],
    );
    check_golden(&root().join("expected-owned-with-proxy.hosts.toml"), &text);
    let merged = slipway::node::hostconfig::merge(
        "x/hosts.toml",
        &fs::read_to_string(
            root().join("foreign/commented/registry.shared-services:5000/hosts.toml"),
        )
        .unwrap(),
        &[
            HostEntry::proxy("http://127.0.0.1:5050"),
            HostEntry::upstream(UPSTREAM),
        ],
    )
    .unwrap();
    check_golden(
        &root().join("foreign/commented/expected-with-proxy.hosts.toml"),
        &merged,
    );
}

/// CRI-O drop-ins: what CRI-O would do for each alias (slipway does not
/// write CRI-O configuration; it reports).
#[test]
fn crio_registries_conf_is_reported_as_expected() {
    let dir = root().join("crio/registries.conf.d");
    let aliases: Vec<Alias> = [
        "registry.shared-services:5000",
        "registry.shared-services.svc.cluster.local:5000",
        "docker.io",
    ]
    .iter()
    .map(|a| Alias::parse(a).unwrap())
    .collect();
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for p in names {
        let text = fs::read_to_string(&p).unwrap();
        let regs = slipway::node::crio::parse(&p.display().to_string(), &text).unwrap();
        let out = slipway::node::crio::report(&regs, &aliases);
        check_golden(&p.with_extension("expected.txt"), &out);
    }
}

/// In the DaemonSet only config.toml is mounted: a drop-in directory the
/// agent cannot see is reported as such, not silently treated as empty.
#[test]
fn unmounted_imports_directory_is_reported() {
    let host = tempfile::tempdir().unwrap();
    let layout = host.path().join("LAYOUT");
    fs::create_dir_all(&layout).unwrap();
    fs::copy(
        root().join("layouts/containerd-1.7-imports/config.toml"),
        layout.join("config.toml"),
    )
    .unwrap();
    let cfg = layout_agent_config(host.path(), "r:5000", "https://r:5000");
    let e = slipway::node::reconcile::inspect_containerd(&RealFs, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "containerd config /LAYOUT/conf.d: imports directory not visible to the agent"
        ),
        "{e}"
    );
}
