//! Golden YAML of `slipway build --render` for representative option sets,
//! produced by the real binary, compared as exact text with
//! `integration/golden/build/<case>.yaml`. `SLIPWAY_BLESS=1 cargo test --test
//! build_golden` rewrites them: review every change to one before
//! committing it. `.ci/validate-manifests.sh` checks every golden file with
//! `kubernetes-validate --strict` (integration/test.sh passes them).
//!
//! The build id is injected (`--build-id`), so the renders are stable; no
//! config file is read (`--config /dev/null`) and `SLIPWAY_*` variables are
//! removed from the child's environment.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

const SHA: &str = "3f786850e387550fdab836ed7e6dc881de23001b";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/golden/build")
}

/// (case name, build id, arguments after `slipway build`).
fn cases() -> Vec<(&'static str, &'static str, Vec<String>)> {
    let ca = dir().join("inputs/registry-ca.crt");
    let app = |rest: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--git",
            "https://github.com/example/app.git",
            "--repo",
            "app",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    vec![
        ("branch", "b1branch01", app(&["--rev", "main"])),
        ("tag", "b2tag00001", app(&["--rev", "v1.4.0"])),
        ("sha", "b3sha00001", app(&["--rev", SHA])),
        ("short-sha", "b4short001", app(&["--rev", &SHA[..7]])),
        (
            "target",
            "b5target01",
            app(&["--rev", "main", "--target", "runtime"]),
        ),
        (
            "build-args",
            "b6args0001",
            app(&[
                "--rev",
                "main",
                "--build-arg",
                "GO_VERSION=1.22",
                "--build-arg",
                "LDFLAGS=-s -w",
            ]),
        ),
        (
            "subdir",
            "b7subdir01",
            app(&[
                "--rev",
                "release/2.x",
                "--context-dir",
                "services/api",
                "--dockerfile",
                "deploy/Dockerfile",
            ]),
        ),
        (
            "no-cache",
            "b8nocache1",
            app(&["--rev", "main", "--no-cache"]),
        ),
        (
            "private-git",
            "b9private1",
            vec![
                "--git".into(),
                "git@github.com:example/private-app.git".into(),
                "--rev".into(),
                "main".into(),
                "--repo".into(),
                "team/private-app".into(),
                "--git-secret".into(),
                "app-deploy-key".into(),
            ],
        ),
        (
            "private-git-token",
            "b10token01",
            vec![
                "--git".into(),
                "https://gitlab.example.com/team/private-app.git".into(),
                "--rev".into(),
                "v2.0.0".into(),
                "--repo".into(),
                "team/private-app".into(),
                "--git-secret".into(),
                "gitlab-token".into(),
            ],
        ),
        (
            "push-secret",
            "b11push001",
            app(&[
                "--rev",
                "main",
                "--tag",
                "1.4.0",
                "--push-secret",
                "regcred",
                "--push-secret-key",
                ".dockerconfigjson",
                "--namespace",
                "team-a",
                "--registry-ca-file",
                ca.to_str().unwrap(),
                "--timeout",
                "20m",
                "--cpu",
                "2",
                "--memory",
                "4Gi",
            ]),
        ),
        (
            "other-namespace",
            "b12ns00001",
            app(&["--rev", "main", "--namespace", "team-b"]),
        ),
        // #20: FROM docker.io/… and ghcr.io/… through the mirror.
        (
            "mirror",
            "b13mirror1",
            app(&["--rev", "main", "--mirror-registries", "docker.io,ghcr.io"]),
        ),
    ]
}

/// `<bin> build --render --build-id <id> --config /dev/null <args>`.
fn render_command(bin: impl AsRef<std::ffi::OsStr>, id: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "build",
        "--render",
        "--build-id",
        id,
        "--config",
        "/dev/null",
    ])
    .args(args);
    cmd
}

/// `slipway build --render --config /dev/null` of the example app at
/// `rev`, with no build id.
fn render_app_at(rev: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_slipway"));
    cmd.args([
        "build",
        "--render",
        "--config",
        "/dev/null",
        "--git",
        "https://github.com/example/app.git",
        "--rev",
        rev,
        "--repo",
        "app",
    ]);
    cmd
}

fn render(id: &str, args: &[String]) -> String {
    let mut cmd = render_command(env!("CARGO_BIN_EXE_slipway"), id, args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SLIPWAY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "slipway build --render {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn renders_match_the_golden_files() {
    let bless = std::env::var_os("SLIPWAY_BLESS").is_some();
    let mut names = Vec::new();
    for (name, id, args) in cases() {
        let actual = render(id, &args);
        let path = dir().join(format!("{name}.yaml"));
        names.push(format!("{name}.yaml"));
        if bless {
            fs::write(&path, &actual).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with SLIPWAY_BLESS=1 to create)",
                path.display()
            )
        });
        assert_eq!(actual, expected, "golden mismatch: {}", path.display());
    }
    // No stale golden files.
    let mut on_disk: Vec<String> = fs::read_dir(dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    names.sort();
    assert_eq!(
        on_disk, names,
        "golden files without a case (or the reverse)"
    );
}

#[test]
fn every_render_has_the_job_hygiene() {
    for (name, id, args) in cases() {
        let ds = docs(&render(id, &args));
        let job = ds.last().unwrap();
        assert_eq!(job["kind"], "Job", "{name}");
        assert_eq!(get(job, "spec.backoffLimit").as_i64(), Some(0), "{name}");
        assert!(get(job, "spec.activeDeadlineSeconds").as_i64().unwrap() > 0);
        assert!(get(job, "spec.ttlSecondsAfterFinished").as_i64().unwrap() > 0);
        let labels = get(job, "metadata.labels");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "slipway", "{name}");
        assert_eq!(labels["slipway.dev/build-id"].as_str(), Some(id), "{name}");
        assert!(labels["slipway.dev/repo"].is_string(), "{name}");
        assert!(labels["slipway.dev/revision"].is_string(), "{name}");
        assert_eq!(get(job, "spec.template.metadata.labels"), labels, "{name}");
        let name_of_job = get(job, "metadata.name").as_str().unwrap();
        assert!(
            name_of_job.ends_with(id) && name_of_job.len() <= 52,
            "{name}"
        );
        let pod = get(job, "spec.template.spec");
        assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
        assert_eq!(pod["enableServiceLinks"], false, "{name}");
        assert_eq!(pod["serviceAccountName"], "slipway-build", "{name}");
        assert_eq!(pod["restartPolicy"], "Never", "{name}");
        let kaniko = get(pod, "containers.0");
        assert!(kaniko["image"]
            .as_str()
            .unwrap()
            .starts_with("ghcr.io/osscontainertools/kaniko:v"));
        let a = strs(&kaniko["args"]);
        for must in [
            "--context=dir:///slipway/context",
            "--registry-certificate=registry.shared-services:5000=/slipway/ca/ca.crt",
            "--digest-file=/dev/termination-log",
            "--image-name-with-digest-file=/slipway/out/image-name",
            "--snapshot-mode=redo",
            "--compressed-caching=false",
            "--push-retry=3",
        ] {
            assert!(
                a.contains(&must.to_string()),
                "{name}: {must} missing from {a:?}"
            );
        }
    }
}

#[test]
fn the_options_reach_the_job() {
    let all: std::collections::BTreeMap<&str, Value> = cases()
        .into_iter()
        .map(|(n, id, args)| (n, docs(&render(id, &args)).pop().unwrap()))
        .collect();
    let args = |n: &str| strs(get(&all[n], "spec.template.spec.containers.0.args"));
    let env = |n: &str, c: &str| -> Vec<(String, String)> {
        let path = if c == "git" {
            "spec.template.spec.initContainers.0.env"
        } else {
            "spec.template.spec.containers.0.env"
        };
        get(&all[n], path)
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let has_env = |n: &str, c: &str, k: &str, v: &str| env(n, c).contains(&(k.into(), v.into()));

    // Revisions: a branch and a tag are both refs, resolved by the remote.
    assert!(has_env("branch", "git", "SLIPWAY_REVISION_KIND", "ref"));
    assert!(has_env("tag", "git", "SLIPWAY_REVISION", "v1.4.0"));
    assert!(has_env("tag", "git", "SLIPWAY_REVISION_KIND", "ref"));
    assert!(has_env("sha", "git", "SLIPWAY_REVISION_KIND", "commit"));
    assert_eq!(
        get(&all["sha"], "metadata.labels")["slipway.dev/commit"].as_str(),
        Some(SHA),
        "a full sha is the commit label already"
    );
    assert!(get(&all["branch"], "metadata.labels")["slipway.dev/commit"].is_null());
    assert!(has_env(
        "short-sha",
        "git",
        "SLIPWAY_REVISION_KIND",
        "short-commit"
    ));
    assert!(has_env("short-sha", "git", "SLIPWAY_REVISION", &SHA[..7]));

    // Default tag: the short commit, added by the wrapper.
    assert!(has_env(
        "branch",
        "kaniko",
        "SLIPWAY_IMAGE_BY_COMMIT",
        "registry.shared-services:5000/app"
    ));
    assert!(!args("branch")
        .iter()
        .any(|a| a.starts_with("--destination")));
    assert!(args("push-secret")
        .contains(&"--destination=registry.shared-services:5000/app:1.4.0".to_string()));
    assert!(!env("push-secret", "kaniko")
        .iter()
        .any(|(k, _)| k == "SLIPWAY_IMAGE_BY_COMMIT"));

    assert!(args("target").contains(&"--target=runtime".to_string()));
    let m = args("mirror");
    assert!(m.contains(
        &"--registry-map=index.docker.io=registry.shared-services:5000/mirror/docker.io"
            .to_string()
    ));
    assert!(m.contains(
        &"--registry-map=ghcr.io=registry.shared-services:5000/mirror/ghcr.io".to_string()
    ));
    assert!(!args("branch")
        .iter()
        .any(|a| a.starts_with("--registry-map")));
    let ba = args("build-args");
    assert!(ba.contains(&"--build-arg=GO_VERSION=1.22".to_string()));
    assert!(ba.contains(&"--build-arg=LDFLAGS=-s -w".to_string()));

    let sd = args("subdir");
    assert!(sd.contains(&"--context-sub-path=services/api".to_string()));
    assert!(
        sd.contains(&"--dockerfile=/slipway/context/services/api/deploy/Dockerfile".to_string())
    );
    assert!(has_env(
        "subdir",
        "git",
        "SLIPWAY_DOCKERFILE",
        "services/api/deploy/Dockerfile"
    ));
    assert!(has_env(
        "subdir",
        "git",
        "SLIPWAY_CONTEXT_DIR",
        "services/api"
    ));
    assert_eq!(
        get(&all["subdir"], "metadata.labels")["slipway.dev/revision"].as_str(),
        Some("release-2.x")
    );

    assert!(args("branch").contains(&"--cache=true".to_string()));
    assert!(args("branch")
        .contains(&"--cache-repo=registry.shared-services:5000/cache/app".to_string()));
    assert!(args("no-cache").contains(&"--cache=false".to_string()));
    assert!(!args("no-cache")
        .iter()
        .any(|a| a.starts_with("--cache-repo")));

    // Private git: the Secret is a read-only volume of the git container.
    for n in ["private-git", "private-git-token"] {
        let pod = get(&all[n], "spec.template.spec");
        let vols = pod["volumes"].as_sequence().unwrap();
        let secret = vols.iter().find(|v| v["name"] == "git-secret").unwrap();
        assert!(secret["secret"]["secretName"].is_string());
        let mounts = get(pod, "initContainers.0.volumeMounts")
            .as_sequence()
            .unwrap();
        let m = mounts.iter().find(|m| m["name"] == "git-secret").unwrap();
        assert_eq!(m["mountPath"], "/slipway/git-secret");
        assert_eq!(m["readOnly"], true);
    }

    // Push secret: mounted as /kaniko/.docker/config.json.
    let pod = get(&all["push-secret"], "spec.template.spec");
    let vols = pod["volumes"].as_sequence().unwrap();
    let dc = vols.iter().find(|v| v["name"] == "docker-config").unwrap();
    assert_eq!(dc["secret"]["secretName"], "regcred");
    assert_eq!(dc["secret"]["items"][0]["key"], ".dockerconfigjson");
    assert_eq!(dc["secret"]["items"][0]["path"], "config.json");
    let km = get(pod, "containers.0.volumeMounts").as_sequence().unwrap();
    assert!(km
        .iter()
        .any(|m| m["name"] == "docker-config" && m["mountPath"] == "/kaniko/.docker"));
    assert_eq!(
        get(&all["push-secret"], "spec.activeDeadlineSeconds").as_i64(),
        Some(1200)
    );
    assert_eq!(get(pod, "containers.0.resources.requests.cpu"), "2");
    assert_eq!(get(pod, "containers.0.resources.limits.memory"), "4Gi");
}

#[test]
fn a_ca_file_renders_the_configmap_first() {
    let (_, id, args) = cases().into_iter().find(|c| c.0 == "push-secret").unwrap();
    let ds = docs(&render(id, &args));
    assert_eq!(ds.len(), 2);
    assert_eq!(ds[0]["kind"], "ConfigMap");
    assert_eq!(get(&ds[0], "metadata.name"), "registry-ca");
    assert_eq!(get(&ds[0], "metadata.namespace"), "team-a");
    let pem = fs::read_to_string(dir().join("inputs/registry-ca.crt")).unwrap();
    assert_eq!(get(&ds[0], "data.ca.crt").as_str(), None, "key has a dot");
    assert_eq!(ds[0]["data"]["ca.crt"].as_str(), Some(pem.as_str()));
    // In another namespace without a file, the render says how to copy it.
    let (_, id, args) = cases()
        .into_iter()
        .find(|c| c.0 == "other-namespace")
        .unwrap();
    let text = render(id, &args);
    assert!(
        text.contains("# Copy the CA first: kubectl -n shared-services get configmap registry-ca")
    );
    assert_eq!(docs(&text).len(), 1);
}

#[test]
fn render_makes_no_api_call() {
    // An unreachable kubeconfig: --render must not need it.
    let tmp = tempfile::tempdir().unwrap();
    let kc = tmp.path().join("kubeconfig");
    fs::write(
        &kc,
        "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n",
    )
    .unwrap();
    let out = render_app_at("main")
        .env("KUBECONFIG", &kc)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("kind: Job"));
}

#[test]
fn bad_options_exit_64_before_anything() {
    let out = render_app_at("a..b").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid revision"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn works_as_a_kubectl_plugin() {
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("kubectl-slipway");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_slipway"), &link).unwrap();
    let out = Command::new(&link)
        .args(["build", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: kubectl slipway build"), "{help}");
    let (_, id, args) = cases().into_iter().next().unwrap();
    let out = render_command(&link, id, &args).output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        fs::read_to_string(dir().join("branch.yaml")).unwrap()
    );
}
