//! `slipway gc` (#21) against the real distribution 2.8 (Debian's
//! `docker-registry`, filesystem driver) behind `slipway gateway`: images
//! pushed through the gateway (curl and skopeo), pulls through CRI
//! (containerd and the node agent), the storage tree read back from disk.
//!
//! - one repository of 30 builds, untagged manifests, a multi-arch index
//!   and a Kaniko cache: a dry run changes no byte; `--apply` keeps exactly
//!   the keep set (it pulls through CRI, index children included),
//!   everything else answers 404, and the bytes freed are the bytes of the
//!   images the test expects gone, added up from what it pushed;
//! - distribution's own `garbage-collect --delete-untagged` deletes the
//!   children of the tagged index on the same tree (distribution#4285):
//!   slipway does not use it;
//! - pushes racing the sweep (20 rounds, re-pushing blobs the sweep is
//!   deleting): each either completes and pulls, or is refused and
//!   succeeds on retry; none exits 0 leaving a broken tag;
//! - distribution with its in-memory blob descriptor cache: a re-push
//!   straight to it after a sweep exits 0 and leaves a tag whose blob is
//!   gone; through the gateway, writes stay refused until distribution has
//!   restarted, then the re-push works. With the cache off (the install's
//!   setting) writes resume at once.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::gateway::{gateway_pki, Gateway, PASSWORD, USER};
use crate::harness::*;
use crate::ALIAS;

pub(crate) const DAY: u64 = 86_400;

pub(crate) fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// `n` bytes that only `seed` gives.
fn noise(seed: &str, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    let mut h = Sha256::digest(seed.as_bytes());
    while out.len() < n {
        out.extend_from_slice(&h);
        h = Sha256::digest(h);
    }
    out.truncate(n);
    out
}

/// One test image, as pushed: manifest, config and one layer.
#[derive(Clone)]
pub(crate) struct Image {
    pub(crate) digest: String,
    pub(crate) manifest: Vec<u8>,
    pub(crate) config: Vec<u8>,
    pub(crate) layer: Vec<u8>,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

impl Image {
    pub(crate) fn new(seed: &str, arch: &str, created: &str, size: usize) -> Image {
        let layer = slipway::node::canary_image::tar_of("data.bin", &noise(seed, size));
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "created": created,
            "config": {"Cmd": ["/data.bin"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(&layer)]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(&config),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha(&layer),
                "size": layer.len(),
            }],
        }))
        .unwrap();
        Image {
            digest: sha(&manifest),
            manifest,
            config,
            layer,
        }
    }

    /// Bytes of its three blobs.
    pub(crate) fn bytes(&self) -> u64 {
        (self.manifest.len() + self.config.len() + self.layer.len()) as u64
    }

    pub(crate) fn blob_digests(&self) -> [String; 2] {
        [sha(&self.config), sha(&self.layer)]
    }
}

/// distribution and the gateway in front of it, with the gateway seeing
/// the storage.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    registry: Registry,
    gw: Gateway,
}

/// distribution's blob descriptor cache, as the official image's and
/// Debian's configs turn it on.
const INMEMORY_CACHE: &str = "  cache:\n    blobdescriptor: inmemory\n";

impl Setup {
    /// `storage_extra` goes inside distribution's `storage:`; `env` is its
    /// environment.
    fn new(storage_extra: &str, env: &[(&str, &str)]) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let pki = gateway_pki(&dir);
        let registry = Registry::start_opts(
            &dir,
            "127.0.0.1:0",
            None,
            None,
            RegistryOpts {
                storage_extra,
                env,
                ..RegistryOpts::default()
            },
        );
        let root = registry.data.join("storage");
        let gw = Gateway::start_env(
            &dir,
            &registry.addr,
            &pki,
            &crate::gateway::htpasswd(&dir),
            &[("SLIPWAY_GATEWAY_STORAGE_ROOT", root.to_str().unwrap())],
        );
        Setup {
            _tmp: tmp,
            dir,
            pki,
            registry,
            gw,
        }
    }

    fn root(&self) -> PathBuf {
        self.registry.data.join("storage")
    }

    fn base(&self) -> String {
        format!("https://{}", self.gw.addr)
    }

    fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "60",
            "-u",
            &format!("{USER}:{PASSWORD}"),
        ])
        .arg("--cacert")
        .arg(self.pki.ca());
        c
    }

    /// Status of `method path` through the gateway.
    fn status(&self, method: &str, path: &str) -> u16 {
        let mut c = self.curl();
        // distribution 2.8 answers a tag's OCI manifest only to a client
        // that accepts the type.
        c.args(["-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args(["-H", &format!("Accept: {OCI_MANIFEST}, {OCI_INDEX}")]);
        if method == "HEAD" {
            c.arg("-I");
        }
        c.arg(format!("{}{path}", self.base()));
        run_ok(&mut c).trim().parse().unwrap()
    }

    fn put_bytes(&self, repo: &str, bytes: &[u8]) {
        let d = sha(bytes);
        if self.status("HEAD", &format!("/v2/{repo}/blobs/{d}")) == 200 {
            return;
        }
        let f = self.dir.join(format!("blob-{}", unique()));
        fs::write(&f, bytes).unwrap();
        let got = put_blob(
            &self.base(),
            &["-u".to_string(), format!("{USER}:{PASSWORD}")],
            &self.pki.ca(),
            repo,
            &f,
        );
        assert_eq!(got, d);
        fs::remove_file(&f).unwrap();
    }

    fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let f = self.dir.join(format!("manifest-{}", unique()));
        fs::write(&f, bytes).unwrap();
        let out = run_ok(
            self.curl()
                .args(["-f", "-X", "PUT", "-H"])
                .arg(format!("Content-Type: {media_type}"))
                .arg("--data-binary")
                .arg(format!("@{}", f.display()))
                .arg(format!("{}/v2/{repo}/manifests/{reference}", self.base())),
        );
        let _ = out;
        fs::remove_file(&f).unwrap();
    }

    /// Push `img` to `repo`, by `tag` or by digest only.
    fn push(&self, repo: &str, img: &Image, tag: Option<&str>) {
        self.put_bytes(repo, &img.config);
        self.put_bytes(repo, &img.layer);
        self.put_manifest(
            repo,
            tag.unwrap_or(&img.digest),
            OCI_MANIFEST,
            &img.manifest,
        );
    }

    /// `slipway gc` against this gateway; its JSON report.
    fn gc(&self, args: &[&str]) -> (Output, Value) {
        let out = run(Command::new(slipway_bin())
            .arg("gc")
            .args(["--registry", &self.base()])
            .arg("--ca-file")
            .arg(self.pki.ca())
            .args(["--username", USER, "--no-cluster", "--json"])
            .arg("--termination-log")
            .arg(self.dir.join("termination-log"))
            .args(args)
            .env("SLIPWAY_GC_PASSWORD", PASSWORD)
            .env_remove("SLIPWAY_GC_APPLY"));
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out, v)
    }

    fn gc_ok(&self, args: &[&str]) -> Value {
        let (out, v) = self.gc(args);
        assert!(
            out.status.success(),
            "slipway gc {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        v
    }
}

impl Setup {
    /// An image pushed to `repo:v1` and pulled whole once (so a registry
    /// with the descriptor cache has its blobs' descriptors), then aged
    /// 40 days like everything in the tree.
    fn old_pulled_image(&self, repo: &str) -> Image {
        let img = Image::new(
            &format!("{repo}-{}", unique()),
            "amd64",
            &rfc3339(40 * DAY),
            50_000,
        );
        self.push(repo, &img, Some("v1"));
        pulls_whole(self, &format!("{repo}:v1")).unwrap();
        age_tree(&self.root().join("docker"), ago(40 * DAY));
        img
    }
}

/// Set the modification time of every file under `dir`.
fn age_tree(dir: &Path, t: SystemTime) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            age_tree(&e.path(), t);
        } else {
            set_mtime(&e.path(), t);
        }
    }
}

fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn ago(secs: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(secs)
}

fn revision_link(root: &Path, repo: &str, digest: &str) -> PathBuf {
    root.join("docker/registry/v2/repositories")
        .join(repo)
        .join("_manifests/revisions/sha256")
        .join(&digest[7..])
        .join("link")
}

/// The tree distribution reads, as bytes (gc's own pull records aside).
fn tree(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    snapshot(&root.join("docker"))
}

pub(crate) fn rfc3339(secs_ago: u64) -> String {
    let t = time::OffsetDateTime::now_utc() - time::Duration::seconds(secs_ago as i64);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
fn gc_keeps_what_is_in_use_and_frees_exactly_the_rest() {
    if !prerequisites() {
        return;
    }
    let s = Setup::new("", &[]);
    let created = rfc3339(40 * DAY);
    // 30 builds of team/app, a build an hour, each with its own layer.
    let builds: Vec<Image> = (1..=30)
        .map(|i| {
            Image::new(
                &format!("build-{i}-{}", unique()),
                "amd64",
                &created,
                20_000 + i,
            )
        })
        .collect();
    for (i, b) in builds.iter().enumerate() {
        s.push("team/app", b, Some(&format!("b{}", i + 1)));
    }
    s.put_manifest("team/app", "latest", OCI_MANIFEST, &builds[29].manifest);
    // Three manifests pushed by digest, never tagged.
    let untagged: Vec<Image> = (1..=3)
        .map(|i| {
            Image::new(
                &format!("untagged-{i}-{}", unique()),
                "amd64",
                &created,
                9_000,
            )
        })
        .collect();
    for u in &untagged {
        s.push("team/app", u, None);
    }
    // A multi-arch index: two children pushed by digest, the index by tag.
    let amd = Image::new(
        &format!("multi-amd64-{}", unique()),
        "amd64",
        &created,
        7_000,
    );
    let arm = Image::new(
        &format!("multi-arm64-{}", unique()),
        "arm64",
        &created,
        7_000,
    );
    s.push("team/multi", &amd, None);
    s.push("team/multi", &arm, None);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": amd.digest, "size": amd.manifest.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": arm.digest, "size": arm.manifest.len(),
             "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let index_digest = sha(&index);
    s.put_manifest("team/multi", "v1", OCI_INDEX, &index);
    // The Kaniko cache: entries tagged by cache key, made 1 and 20 days
    // ago by their config (Kaniko's --cache-ttl default is 14 days).
    let fresh: Vec<Image> = (0..2)
        .map(|i| {
            Image::new(
                &format!("cache-fresh-{i}-{}", unique()),
                "amd64",
                &rfc3339(DAY),
                5_000,
            )
        })
        .collect();
    let stale: Vec<Image> = (0..2)
        .map(|i| {
            Image::new(
                &format!("cache-stale-{i}-{}", unique()),
                "amd64",
                &rfc3339(20 * DAY),
                5_000,
            )
        })
        .collect();
    for (i, c) in fresh.iter().chain(&stale).enumerate() {
        s.push("cache/team/app", c, Some(&format!("{:064x}", i + 1)));
    }

    // Everything was pushed 40 days ago, builds an hour apart, the
    // untagged ones before them.
    let root = s.root();
    age_tree(&root.join("docker"), ago(40 * DAY));
    for (i, b) in builds.iter().enumerate() {
        set_mtime(
            &revision_link(&root, "team/app", &b.digest),
            ago(40 * DAY) + Duration::from_secs(3600 * (i as u64 + 1)),
        );
    }
    for u in &untagged {
        set_mtime(&revision_link(&root, "team/app", &u.digest), ago(41 * DAY));
    }

    // A node pulls build 7 through its agent, now.
    let ctd = Containerd::start(&s.dir);
    let _agent = Agent::start(
        &s.dir,
        &ctd.certs_dir,
        &ctd.config_file,
        &[ALIAS],
        &format!("https://registry.shared-services:{}", s.gw.port()),
        Some(&s.gw.addr),
        &s.pki.ca(),
        "",
    );
    ctd.pull(&format!("{ALIAS}/team/app@{}", builds[6].digest))
        .unwrap();

    // In use, as the cluster would say: a pod runs build 3 (by digest), a
    // Deployment names build 5 by tag, another the index by tag.
    let in_use = [
        format!("--image={ALIAS}/team/app@{}", builds[2].digest),
        format!("--image={ALIAS}/team/app:b5"),
        format!("--image={ALIAS}/team/multi:v1"),
    ];
    let in_use: Vec<&str> = in_use.iter().map(String::as_str).collect();

    // What must go: builds 1, 2, 4, 6 and 8 to 20, the untagged three and
    // the two stale cache entries, each with its config and layer (no blob
    // is shared); their tags (b1 … b20 but b3, b5, b7, and two cache keys).
    let gone_builds: Vec<usize> = (1..=20).filter(|i| ![3, 5, 7].contains(i)).collect();
    let mut gone: Vec<(&str, &Image)> = gone_builds
        .iter()
        .map(|i| ("team/app", &builds[i - 1]))
        .collect();
    gone.extend(untagged.iter().map(|u| ("team/app", u)));
    gone.extend(stale.iter().map(|c| ("cache/team/app", c)));
    let want_bytes: u64 = gone.iter().map(|(_, i)| i.bytes()).sum();
    let app_bytes: u64 = gone
        .iter()
        .filter(|(r, _)| *r == "team/app")
        .map(|(_, i)| i.bytes())
        .sum();

    // The dry run: the same numbers, and not one byte changed.
    let before = tree(&root);
    let dry = s.gc_ok(&in_use);
    assert_eq!(tree(&root), before, "the dry run changed the storage");
    assert_eq!(dry["applied"], false);
    assert_eq!(dry["total"]["bytes"], want_bytes, "{dry:#}");
    assert_eq!(dry["total"]["manifests"], gone.len(), "{dry:#}");
    assert_eq!(dry["total"]["blobs"], 3 * gone.len(), "{dry:#}");
    assert_eq!(
        dry["total"]["tags"],
        gone_builds.len() + stale.len(),
        "{dry:#}"
    );
    assert_eq!(dry["repositories"]["team/app"]["bytes"], app_bytes);

    // distribution's own sweep, on a copy of the same tree, deletes the
    // children of the tagged index (distribution#4285 on 2.8.2).
    let copy = s.dir.join("copy");
    run_ok(Command::new("cp").arg("-a").arg(&root).arg(&copy));
    let cfg = s.dir.join("copy.yml");
    fs::write(
        &cfg,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n",
            copy.display()
        ),
    )
    .unwrap();
    run_ok(
        Command::new("docker-registry")
            .args(["garbage-collect", "--delete-untagged"])
            .arg(&cfg),
    );
    assert!(
        revision_link(&copy, "team/multi", &index_digest).exists(),
        "the tagged index itself stays"
    );
    assert!(
        !revision_link(&copy, "team/multi", &amd.digest).exists()
            && !revision_link(&copy, "team/multi", &arm.digest).exists(),
        "distribution 2.8's garbage-collect --delete-untagged kept the index's children: the bug this test guards against is not reproduced"
    );

    // As the kubelet does, the termination message file exists.
    fs::write(s.dir.join("termination-log"), "").unwrap();
    let mut apply = in_use.clone();
    apply.push("--apply");
    let r = s.gc_ok(&apply);
    assert_eq!(r["applied"], true);
    assert_eq!(r["total"], dry["total"], "{r:#}");
    assert_eq!(r["repositories"], dry["repositories"]);
    let kept_reason = |repo: &str, d: &str| -> String {
        r["kept"][repo]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["digest"] == d)
            .map(|k| k["reason"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    // `--image` references count as templates.
    assert_eq!(kept_reason("team/app", &builds[2].digest), "template");
    assert_eq!(kept_reason("team/app", &builds[4].digest), "template");
    assert_eq!(kept_reason("team/app", &builds[6].digest), "pulled");
    assert_eq!(kept_reason("team/app", &builds[29].digest), "recent-build");
    assert_eq!(kept_reason("team/multi", &amd.digest), "child");
    assert_eq!(
        kept_reason("cache/team/app", &fresh[0].digest),
        "cache-fresh"
    );

    // Everything outside the keep set answers 404, tags included.
    for (repo, img) in &gone {
        assert_eq!(
            s.status("HEAD", &format!("/v2/{repo}/manifests/{}", img.digest)),
            404
        );
        for b in img.blob_digests() {
            assert_eq!(s.status("HEAD", &format!("/v2/{repo}/blobs/{b}")), 404);
        }
    }
    for i in &gone_builds {
        assert_eq!(
            s.status("HEAD", &format!("/v2/team/app/manifests/b{i}")),
            404
        );
    }
    // The termination message and the metrics say the same.
    let msg = fs::read_to_string(s.dir.join("termination-log")).unwrap();
    assert!(
        msg.starts_with(&format!("gc applied: freed {want_bytes} bytes")),
        "{msg}"
    );
    assert_eq!(
        s.gw.metric("slipway_gc_freed_bytes_total{repository=\"team/app\"}"),
        app_bytes as f64
    );

    // Every digest of the keep set pulls through CRI, index children
    // included (this node has only build 7 already), and copies whole
    // with skopeo, every blob's digest checked.
    let mut keep: Vec<(&str, &str)> = vec![
        ("team/app", &builds[2].digest),
        ("team/app", &builds[4].digest),
        ("team/app", &builds[6].digest),
        ("team/multi", &index_digest),
        ("team/multi", &amd.digest),
        ("team/multi", &arm.digest),
    ];
    keep.extend(builds[20..].iter().map(|b| ("team/app", b.digest.as_str())));
    keep.extend(fresh.iter().map(|c| ("cache/team/app", c.digest.as_str())));
    for (repo, d) in keep {
        let image = format!("{ALIAS}/{repo}@{d}");
        ctd.pull(&image)
            .unwrap_or_else(|e| panic!("{image} no longer pulls through CRI: {e}"));
        pulls_whole(&s, &format!("{repo}@{d}"))
            .unwrap_or_else(|e| panic!("{repo}@{d} no longer copies: {e}"));
    }
    for t in ["b3", "b5", "b7", "b21", "b30", "latest"] {
        assert_eq!(
            s.status("HEAD", &format!("/v2/team/app/manifests/{t}")),
            200,
            "{t}"
        );
    }
}

/// Push `layout` with skopeo through the gateway, as a build would; the
/// exit status and stderr.
fn skopeo_push(s: &Setup, layout: &Path, dest: &str) -> Output {
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--retry-times", "0", "--dest-cert-dir"])
        .arg(s.pki.trust_dir())
        .args(["--dest-creds", &format!("{USER}:{PASSWORD}")])
        .arg(format!("oci:{}:app", layout.display()))
        .arg(format!("docker://{}/{dest}", s.gw.addr)))
}

/// Copy `repo:tag` out through the gateway with skopeo, which verifies
/// every blob's digest.
fn pulls_whole(s: &Setup, repo_tag: &str) -> Result<(), String> {
    let out_dir = s.dir.join(format!("pulled-{}", unique()));
    let o = run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-cert-dir"])
        .arg(s.pki.trust_dir())
        .arg(format!("docker://{}/{repo_tag}", s.gw.addr))
        .arg(format!("dir:{}", out_dir.display())));
    let _ = fs::remove_dir_all(&out_dir);
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).to_string())
    }
}

/// Write `img` as an OCI layout `app` for skopeo.
pub(crate) fn layout_of(dir: &Path, img: &Image) -> PathBuf {
    let l = dir.join(format!("layout-{}", unique()));
    let blobs = l.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    for b in [&img.manifest, &img.config, &img.layer] {
        fs::write(blobs.join(&sha(b)[7..]), b).unwrap();
    }
    fs::write(l.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(
        l.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST,
                "digest": img.digest,
                "size": img.manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": "app"},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    l
}

#[test]
fn pushes_racing_the_sweep_complete_or_are_refused_and_never_break_a_tag() {
    if !prerequisites() {
        return;
    }
    let s = Setup::new("", &[]);
    let root = s.root();
    // Per round: images nothing keeps (old, untagged), which the pushes
    // send again: skopeo finds their blobs present, skips the upload, and
    // names them in the manifest it sends next, while the sweep deletes
    // them. The pushes run back to back for the whole sweep.
    const PER_ROUND: usize = 8;
    let (mut pushes, mut completed, mut refused, mut raced) = (0, 0, 0, 0);
    const ROUNDS: usize = 24;
    for round in 0..ROUNDS {
        let refused_before = refused;
        let imgs: Vec<Image> = (0..PER_ROUND)
            .map(|k| {
                Image::new(
                    &format!("race-{round}-{k}-{}", unique()),
                    "amd64",
                    &rfc3339(40 * DAY),
                    64_000,
                )
            })
            .collect();
        for img in &imgs {
            s.push("race/app", img, None);
        }
        age_tree(&root.join("docker"), ago(40 * DAY));
        let layouts: Vec<PathBuf> = imgs.iter().map(|i| layout_of(&s.dir, i)).collect();
        let gc = {
            let (base, ca) = (s.base(), s.pki.ca());
            let term = s.dir.join("termination-log");
            std::thread::spawn(move || {
                run(Command::new(slipway_bin())
                    .arg("gc")
                    .args(["--registry", &base])
                    .arg("--ca-file")
                    .arg(&ca)
                    .args(["--username", USER, "--no-cluster", "--apply"])
                    .args(["--keep-builds", "0", "--keep-pulled-days", "0"])
                    .arg("--termination-log")
                    .arg(&term)
                    .env("SLIPWAY_GC_PASSWORD", PASSWORD))
            })
        };
        for (k, layout) in layouts.iter().enumerate() {
            let tag = format!("r{round}-{k}");
            let mut attempts = 0;
            loop {
                attempts += 1;
                pushes += 1;
                let o = skopeo_push(&s, layout, &format!("race/app:{tag}"));
                if o.status.success() {
                    completed += 1;
                    // Exit 0: the tag must pull whole.
                    pulls_whole(&s, &format!("race/app:{tag}")).unwrap_or_else(|e| {
                        panic!("round {round}: the push exited 0 but {tag} does not pull: {e}")
                    });
                    break;
                }
                let err = String::from_utf8_lossy(&o.stderr).to_string();
                // The one way a racing push may fail: refused, to retry.
                assert!(
                    err.contains("503"),
                    "round {round}: push of {tag} failed otherwise than with 503: {err}"
                );
                refused += 1;
                assert!(attempts < 50, "round {round}: {tag} never pushed: {err}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let g = gc.join().unwrap();
        assert!(
            g.status.success(),
            "round {round}: gc: {}",
            String::from_utf8_lossy(&g.stderr)
        );
        if refused > refused_before {
            raced += 1;
        }
        for k in 0..PER_ROUND {
            pulls_whole(&s, &format!("race/app:r{round}-{k}")).unwrap_or_else(|e| {
                panic!("round {round}: r{round}-{k} broken after the sweep: {e}")
            });
        }
    }
    let fenced = s.gw.metric("slipway_gc_writes_refused_total");
    eprintln!(
        "races: {ROUNDS} sweeps, {raced} of them met by a push that was refused; {pushes} push attempts: {completed} completed, {refused} refused with 503 and retried; the gateway refused {fenced} requests"
    );
    assert!(raced >= 20, "fewer than 20 sweeps met a push ({raced})");
}

/// distribution 2.8.2 with `storage.cache.blobdescriptor: inmemory`, as
/// the official image and Debian's default config have it.
#[test]
fn a_registry_that_caches_blob_descriptors_gets_no_writes_until_it_restarts() {
    if !prerequisites() {
        return;
    }
    let mut s = Setup::new(INMEMORY_CACHE, &[]);
    let img = s.old_pulled_image("cached/app");
    // Pulled just now, which would keep it: --keep-pulled-days 0.
    let (out, _) = s.gc(&["--apply", "--keep-builds", "0", "--keep-pulled-days", "0"]);
    assert!(
        !out.status.success(),
        "gc did not notice distribution's stale cache"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("restart the registry"), "{err}");
    assert_eq!(s.gw.metric("slipway_gc_registry_stale"), 1.0);
    // Nor does another run start, which would lift the fence.
    let (again, _) = s.gc(&["--keep-builds", "0"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("restart the registry container first"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Straight to distribution, the re-push of the same image exits 0
    // and leaves a tag whose layer is gone: the data loss.
    let layout = layout_of(&s.dir, &img);
    let direct = run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:app", layout.display()))
        .arg(format!("docker://{}/cached/app:direct", s.registry.addr)));
    assert!(
        direct.status.success(),
        "{}",
        String::from_utf8_lossy(&direct.stderr)
    );
    let layer = sha(&img.layer);
    // It answers 200 from the cached descriptor and then has no data to
    // send: the body is not the layer.
    let got = http(
        &s.registry.addr,
        "GET",
        &format!("/v2/cached/app/blobs/{layer}"),
        &[],
    );
    assert!(
        got.as_ref().map_or(true, |r| sha(&r.body) != layer),
        "distribution 2.8's descriptor cache did not hide the deleted blob: the bug this test guards against is not reproduced"
    );

    // Through the gateway the same push is refused, with the reason.
    let o = skopeo_push(&s, &layout, "cached/app:v2");
    assert!(
        !o.status.success(),
        "a write went through before distribution restarted"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("503"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Restart distribution: its cache is gone, and writes resume by
    // themselves.
    s.registry.restart();
    wait_for("writes to resume", Duration::from_secs(30), || {
        s.gw.metric("slipway_gc_registry_stale") == 0.0
    });
    let o = skopeo_push(&s, &layout, "cached/app:v2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    pulls_whole(&s, "cached/app:v2").unwrap();
}

#[test]
fn with_the_cache_off_as_installed_a_re_push_right_after_the_sweep_works() {
    if !prerequisites() {
        return;
    }
    // The install's setting over a config that turns the cache on.
    let s = Setup::new(
        INMEMORY_CACHE,
        &[("REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR", "disabled")],
    );
    let img = s.old_pulled_image("plain/app");
    let r = s.gc_ok(&["--apply", "--keep-builds", "0", "--keep-pulled-days", "0"]);
    assert_eq!(r["total"]["bytes"], img.bytes());
    let layout = layout_of(&s.dir, &img);
    let o = skopeo_push(&s, &layout, "plain/app:v2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    pulls_whole(&s, "plain/app:v2").unwrap();
}
