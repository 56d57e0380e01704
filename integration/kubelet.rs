//! A kubelet stand-in for the build pod's containers (#9): each container
//! of the Job that `job::job` renders is run from that Job object (its
//! `command`, `args`, `env`, `securityContext` and `volumeMounts`, nothing
//! copied by hand) in bubblewrap, as a kubelet and a container runtime
//! would run it:
//!
//! - the image's root filesystem is a directory laid out like the image
//!   (busybox applets in `/bin` with git for alpine/git; `/busybox` and
//!   `/kaniko/executor` for the Kaniko image), bound read-only when the
//!   container has `readOnlyRootFilesystem: true`; the host's `/usr` is
//!   bound read-only under it for the dynamic libraries and git's helpers.
//!   (bubblewrap 0.8 cannot add mount points such as `/slipway/context`
//!   under a read-only `--ro-bind / /`, so the root is the image's own.)
//! - every emptyDir is a directory owned by root with the pod's `fsGroup` as
//!   its group and mode 2777, which is what a kubelet makes of an emptyDir
//!   with `fsGroup` set: it sets group and mode, never the owner;
//! - Secret and ConfigMap volumes hold their items as root-owned files of
//!   group `fsGroup`, with the volume's `defaultMode` (0644 when unset);
//! - `/dev/termination-log` is a root-owned 0666 file, as the kubelet
//!   creates it so that a non-root container can write it;
//! - the process runs as the container's `runAsUser`/`runAsGroup` (root
//!   when unset) with the pod's `fsGroup` as its supplementary group, no
//!   capabilities for `capabilities.drop: [ALL]`, and no_new_privs for
//!   `allowPrivilegeEscalation: false`. The uid switch is `setpriv` inside
//!   the sandbox, not a user namespace: a user namespace would map the
//!   host's root to the container user and hide exactly the ownership
//!   mismatch a real node has.
//!
//! Needs root (chown, setpriv), `bwrap`, `setpriv`, `busybox` and `git`; a
//! test that lacks one fails naming it (integration/install-deps.sh
//! installs them).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

/// Panics, naming what is missing, unless every tool of the sandbox is
/// there and the test runs as root.
pub fn require() {
    let mut missing: Vec<String> = ["bwrap", "setpriv", "busybox", "git"]
        .iter()
        .filter(|b| which(b).is_none())
        .map(|b| b.to_string())
        .collect();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root (to chown the volumes and switch uid with setpriv)".into());
    }
    assert!(
        missing.is_empty(),
        "the kubelet-like sandbox needs {} (bash integration/install-deps.sh as root)",
        missing.join(", ")
    );
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An image's root filesystem.
pub struct Image {
    pub root: PathBuf,
    /// The image's `ENV PATH`.
    pub path: String,
}

fn image_base(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    set_mode(root, 0o755);
    for d in ["usr", "etc", "dev", "proc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        set_mode(&root.join(d), 0o755);
    }
    for (l, t) in [("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        std::os::unix::fs::symlink(t, root.join(l)).unwrap();
    }
    // Alpine's nobody is 65534; OpenSSH and git look the uid up.
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnobody:x:65534:\n").unwrap();
    if Path::new("/etc/ld.so.cache").exists() {
        std::fs::copy("/etc/ld.so.cache", root.join("etc/ld.so.cache")).unwrap();
    }
}

fn busybox_applets(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    set_mode(dir, 0o755);
    let busybox = which("busybox").expect("busybox");
    let st = Command::new(&busybox)
        .args(["--install", "-s"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "busybox --install -s {}", dir.display());
}

/// alpine/git: busybox in `/bin` and git, `PATH=/bin`.
pub fn git_image(root: &Path) -> Image {
    image_base(root);
    busybox_applets(&root.join("bin"));
    let git = which("git").expect("git");
    let _ = std::fs::remove_file(root.join("bin/git"));
    std::os::unix::fs::symlink(std::fs::canonicalize(git).unwrap(), root.join("bin/git")).unwrap();
    Image {
        root: root.to_path_buf(),
        path: "/bin".into(),
    }
}

/// The Kaniko `:debug` image: busybox in `/busybox`, the executor (here a
/// stand-in script) at `/kaniko/executor`, `PATH=/busybox:/kaniko`.
pub fn kaniko_image(root: &Path, executor: &str) -> Image {
    image_base(root);
    busybox_applets(&root.join("busybox"));
    std::fs::create_dir_all(root.join("kaniko")).unwrap();
    set_mode(&root.join("kaniko"), 0o755);
    std::fs::write(root.join("kaniko/executor"), executor).unwrap();
    set_mode(&root.join("kaniko/executor"), 0o755);
    Image {
        root: root.to_path_buf(),
        path: "/busybox:/kaniko".into(),
    }
}

/// What one container run left.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// `/dev/termination-log` after the run.
    pub message: String,
}

/// One pod of a rendered Job: its volumes, as a kubelet sets them up.
pub struct Pod {
    pub dir: tempfile::TempDir,
    spec: PodSpec,
    fs_group: Option<u32>,
    volumes: BTreeMap<String, PathBuf>,
}

impl Pod {
    /// The pod of `job`, with the contents of the Secrets and ConfigMaps its
    /// volumes name (`name → key → bytes`), as the API server would give
    /// them to the kubelet.
    pub fn new(job: &Job, objects: &BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> Pod {
        require();
        let spec = job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .expect("the Job has a pod template");
        let fs_group = spec
            .security_context
            .as_ref()
            .and_then(|s| s.fs_group)
            .map(|g| g as u32);
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        let mut volumes = BTreeMap::new();
        for v in spec.volumes.iter().flatten() {
            let p = dir.path().join("volumes").join(&v.name);
            std::fs::create_dir_all(&p).unwrap();
            setup_volume(v, &p, fs_group, objects);
            volumes.insert(v.name.clone(), p);
        }
        Pod {
            dir,
            spec,
            fs_group,
            volumes,
        }
    }

    /// The host directory of volume `name`.
    pub fn volume(&self, name: &str) -> &Path {
        &self.volumes[name]
    }

    fn container(&self, name: &str) -> &Container {
        self.spec
            .init_containers
            .iter()
            .flatten()
            .chain(self.spec.containers.iter())
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name} in the Job"))
    }

    /// Runs container `name` from the Job as the kubelet would.
    pub fn run(&self, name: &str, image: &Image) -> Run {
        self.run_as(name, image, None, &[])
    }

    /// [`Pod::run`] with `extra_env` added after the Job's env (a test's
    /// knob, e.g. the server's protocol), or with `command` instead of the
    /// container's own command and args (the sandbox's self-check).
    pub fn run_as(
        &self,
        name: &str,
        image: &Image,
        command: Option<&[&str]>,
        extra_env: &[(&str, &str)],
    ) -> Run {
        let c = self.container(name);
        let sc = c.security_context.clone().unwrap_or_default();
        let uid = sc.run_as_user.unwrap_or(0);
        let gid = sc.run_as_group.unwrap_or(uid);
        let read_only_root = sc.read_only_root_filesystem == Some(true);
        let drop_all = sc
            .capabilities
            .as_ref()
            .and_then(|c| c.drop.as_ref())
            .is_some_and(|d| d.iter().any(|x| x == "ALL"));

        let termination_log = self.dir.path().join(format!("termination-log-{name}"));
        std::fs::write(&termination_log, "").unwrap();
        chown(&termination_log, Some(0), Some(0)).unwrap();
        set_mode(&termination_log, 0o666);

        let mut b = Command::new(which("bwrap").unwrap());
        b.args([
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
        ]);
        b.arg(if read_only_root {
            "--ro-bind"
        } else {
            "--bind"
        })
        .arg(&image.root)
        .arg("/");
        b.args([
            "--ro-bind",
            "/usr",
            "/usr",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
        ]);
        b.arg("--bind")
            .arg(&termination_log)
            .arg("/dev/termination-log");
        for m in c.volume_mounts.iter().flatten() {
            // The runtime makes the mount point in the image's root.
            let point = image.root.join(m.mount_path.trim_start_matches('/'));
            std::fs::create_dir_all(&point).unwrap();
            let src = self
                .volumes
                .get(&m.name)
                .unwrap_or_else(|| panic!("mount {} names no volume", m.name));
            b.arg(if m.read_only == Some(true) {
                "--ro-bind"
            } else {
                "--bind"
            })
            .arg(src)
            .arg(&m.mount_path);
        }
        b.args([
            "--chdir",
            "/",
            "--clearenv",
            "--setenv",
            "PATH",
            &image.path,
        ]);
        for e in c.env.iter().flatten() {
            let v = e
                .value
                .as_deref()
                .unwrap_or_else(|| panic!("env {} has no literal value", e.name));
            b.args(["--setenv", &e.name, v]);
        }
        for (k, v) in extra_env {
            b.args(["--setenv", k, v]);
        }
        b.arg("--").arg("/usr/bin/setpriv");
        b.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"));
        match self.fs_group {
            Some(g) => b.arg(format!("--groups={g}")),
            None => b.arg("--clear-groups"),
        };
        if drop_all {
            b.args(["--inh-caps=-all", "--bounding-set=-all"]);
        }
        if sc.allow_privilege_escalation == Some(false) {
            b.arg("--no-new-privs");
        }
        b.arg("--");
        match command {
            Some(cmd) => {
                b.args(cmd);
            }
            None => {
                b.args(c.command.iter().flatten());
                b.args(c.args.iter().flatten());
            }
        }
        let out = b.output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            message: std::fs::read_to_string(&termination_log).unwrap(),
        }
    }
}

fn setup_volume(
    v: &Volume,
    p: &Path,
    fs_group: Option<u32>,
    objects: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
) {
    if v.empty_dir.is_some() {
        // What the kubelet does with fsGroup: group and setgid mode, the
        // owner stays root.
        chown(p, Some(0), fs_group).unwrap();
        set_mode(p, if fs_group.is_some() { 0o2777 } else { 0o777 });
        return;
    }
    let (source, items, mode) = if let Some(s) = &v.secret {
        (
            s.secret_name.clone().unwrap_or_default(),
            s.items.clone(),
            s.default_mode,
        )
    } else if let Some(c) = &v.config_map {
        (c.name.clone(), c.items.clone(), c.default_mode)
    } else {
        panic!("volume {}: only emptyDir, secret and configMap", v.name)
    };
    let data = objects
        .get(&source)
        .unwrap_or_else(|| panic!("volume {} needs object {source}", v.name));
    let files: Vec<(String, String)> = match items {
        Some(items) => items.into_iter().map(|i| (i.key, i.path)).collect(),
        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    chown(p, Some(0), fs_group).unwrap();
    set_mode(p, 0o755);
    for (key, path) in files {
        let f = p.join(&path);
        std::fs::write(&f, &data[&key]).unwrap();
        chown(&f, Some(0), fs_group).unwrap();
        set_mode(&f, mode.unwrap_or(0o644) as u32);
    }
}
