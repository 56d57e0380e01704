//! The garbage collector's decision, pure (#21): what the registry holds
//! ([`Inventory`]), what the cluster and the agents say is in use
//! ([`Roots`]) and the policy ([`Policy`]) in; a [`Plan`] out, with every
//! kept manifest's reason and every object to delete. No I/O: the shell
//! ([`super::store`]) reads distribution's storage into the inventory and
//! carries out the plan.
//!
//! The keep set, per repository:
//! - every digest and every tag named by the cluster (pods' `imageID`s and
//!   images, the pod templates of workloads and of the ReplicaSets a
//!   Deployment keeps for rollback), matched by repository path whatever
//!   the host, and under `mirror/<host>/…` for mirrored upstreams (#20);
//! - the last `keep_builds` top-level manifests of each repository that is
//!   neither a Kaniko cache (`cache/…`) nor a mirror, by push time;
//! - every manifest pulled within `keep_pulled` (the gateway's records of
//!   the pulls the nodes' agents make through it);
//! - Kaniko cache entries whose config says they were made within
//!   `cache_ttl` (Kaniko's own expiry test, on the image's `created`);
//! - anything pushed within `min_age`: a push in progress has blobs and
//!   child manifests that no tag reaches yet.
//!
//! From each kept manifest the whole closure is kept: an index's children,
//! a manifest's config and layers, a mirror tag record's target (which is
//! stored as a blob, #20), recursively. distribution 2.8.2's
//! `--delete-untagged` deletes the children of a tagged index
//! (distribution#4285); this closure is why slipway never uses it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::mirror::RECORD_TARGET_MEDIA_TYPE;

/// `sha256:<hex>`.
pub type Digest = String;

/// What distribution's storage holds. Times are Unix seconds.
#[derive(Debug, Default, Clone)]
pub struct Inventory {
    pub repos: BTreeMap<String, Repo>,
    /// Every blob under `blobs/`, manifests included.
    pub blobs: BTreeMap<Digest, Blob>,
    /// The parsed content of every manifest the shell could read.
    pub manifests: BTreeMap<Digest, Parsed>,
    /// `created` of image configs the shell read (cache repositories).
    pub created: BTreeMap<Digest, u64>,
}

#[derive(Debug, Default, Clone)]
pub struct Repo {
    /// Manifest revisions, with the time their link was written (the push).
    pub revisions: BTreeMap<Digest, u64>,
    /// Tag → the digest its `current` link names.
    pub tags: BTreeMap<String, Digest>,
    /// Blobs linked into the repository (`_layers`), with the link's time.
    pub layers: BTreeMap<Digest, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    pub size: u64,
    pub mtime: u64,
}

/// What a manifest references.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Config and layers (and schema 1 `fsLayers`).
    pub blobs: Vec<Digest>,
    /// Index children, and a mirror tag record's target.
    pub manifests: Vec<Digest>,
    /// The config's digest, for the cache's `created`.
    pub config: Option<Digest>,
}

/// Parse a manifest or index; `None` for anything that is not one.
pub fn parse_manifest(bytes: &[u8]) -> Option<Parsed> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let mut p = Parsed::default();
    let digest = |d: &serde_json::Value| d["digest"].as_str().map(str::to_string);
    if let Some(children) = v["manifests"].as_array() {
        p.manifests.extend(children.iter().filter_map(digest));
    }
    if let Some(c) = digest(&v["config"]) {
        p.config = Some(c.clone());
        p.blobs.push(c);
    }
    for l in v["layers"].as_array().into_iter().flatten() {
        let Some(d) = digest(l) else { continue };
        if l["mediaType"] == RECORD_TARGET_MEDIA_TYPE {
            p.manifests.push(d);
        } else {
            p.blobs.push(d);
        }
    }
    for l in v["fsLayers"].as_array().into_iter().flatten() {
        if let Some(d) = l["blobSum"].as_str() {
            p.blobs.push(d.to_string());
        }
    }
    if p.blobs.is_empty() && p.manifests.is_empty() && v["schemaVersion"].is_null() {
        return None;
    }
    Some(p)
}

/// An image's `created`, as Unix seconds, from its config.
pub fn config_created(bytes: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let t = time::OffsetDateTime::parse(
        v["created"].as_str()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

// ------------------------------------------------------------ references

/// An image reference as the cluster writes it, normalised the way
/// containerd does (`nginx` is `docker.io/library/nginx:latest`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageRef {
    pub host: String,
    pub path: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Option<ImageRef> {
        let s = s.trim();
        let s = s.strip_prefix("docker-pullable://").unwrap_or(s);
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) if d.starts_with("sha256:") && d.len() == 71 => (n, Some(d.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (name, None),
        };
        if name.is_empty() {
            return None;
        }
        let (host, path) = match name.split_once('/') {
            Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                (h.to_string(), p.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let host = if host == "index.docker.io" {
            "docker.io".to_string()
        } else {
            host
        };
        let path = if host == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if path.is_empty() {
            return None;
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Some(ImageRef {
            host,
            path,
            tag,
            digest,
        })
    }

    /// The repositories of the registry it may name: its path, and its
    /// mirror repository (#20). Matching by path whatever the host keeps
    /// more than needed at worst, never less.
    fn repos(&self) -> [String; 2] {
        [
            self.path.clone(),
            format!("mirror/{}/{}", self.host, self.path),
        ]
    }
}

/// Where a reference in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UseKind {
    /// A container's `imageID` or image in a pod's status or spec.
    Pod,
    /// A pod template: Deployment, StatefulSet, DaemonSet, Job, CronJob,
    /// or a Deployment's ReplicaSet.
    Template,
}

/// What is in use, from outside the registry.
#[derive(Debug, Default, Clone)]
pub struct Roots {
    pub images: Vec<(ImageRef, UseKind)>,
    /// `(repository, manifest digest, unix seconds)` of pulls.
    pub pulls: Vec<(String, Digest, u64)>,
    /// `(repository, blob digest, unix seconds)` of blob `HEAD`s the
    /// registry answered `200`: a push checks its blobs so, and skips the
    /// upload of those present. One checked within `min_age` is kept, or
    /// the push's manifest would name a blob the sweep deleted.
    pub checked: Vec<(String, Digest, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `gc.keep_builds`: top-level manifests kept per repository.
    pub keep_builds: usize,
    /// `gc.keep_pulled_days`.
    pub keep_pulled: Duration,
    /// `gc.cache_ttl_hours`: the builds' Kaniko `--cache-ttl`.
    pub cache_ttl: Duration,
    /// `gc.min_age_secs`: nothing younger is deleted.
    pub min_age: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            keep_builds: 10,
            keep_pulled: Duration::from_secs(7 * 86_400),
            // Kaniko's default --cache-ttl (two weeks), which slipway build
            // does not change.
            cache_ttl: Duration::from_secs(336 * 3600),
            min_age: Duration::from_secs(3600),
        }
    }
}

/// Why a manifest is kept; the first that applies is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// A running pod's image.
    Pod,
    /// A workload's pod template.
    Template,
    /// Among the last `keep_builds` pushes.
    RecentBuild,
    /// Pulled within `keep_pulled_days`.
    Pulled,
    /// A Kaniko cache entry within its TTL.
    CacheFresh,
    /// Pushed within `min_age_secs`.
    Young,
    /// Referenced by a kept index or tag record.
    Child,
}

/// The kind of a repository, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Images,
    /// `cache/…`: Kaniko's layer cache (`slipway build --cache-repo`).
    Cache,
    /// `mirror/…` (#20).
    Mirror,
}

impl RepoKind {
    pub fn of(repo: &str) -> RepoKind {
        if repo.starts_with("cache/") {
            RepoKind::Cache
        } else if repo.starts_with("mirror/") {
            RepoKind::Mirror
        } else {
            RepoKind::Images
        }
    }
}

/// What one repository gives up.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freed {
    /// Bytes of blob data deleted (manifests included).
    pub bytes: u64,
    pub blobs: u64,
    pub manifests: u64,
    pub tags: u64,
}

/// A kept manifest, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub digest: Digest,
    pub reason: Reason,
    pub tags: Vec<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Per repository: the kept manifests (revisions and mirror targets).
    pub kept: BTreeMap<String, Vec<Kept>>,
    pub delete_revisions: Vec<(String, Digest)>,
    pub delete_tags: Vec<(String, String)>,
    pub delete_layer_links: Vec<(String, Digest)>,
    pub delete_blobs: Vec<Digest>,
    /// Per repository (`""`: blobs no repository linked).
    pub freed: BTreeMap<String, Freed>,
}

impl Plan {
    pub fn total(&self) -> Freed {
        let mut t = Freed::default();
        for f in self.freed.values() {
            t.bytes += f.bytes;
            t.blobs += f.blobs;
            t.manifests += f.manifests;
            t.tags += f.tags;
        }
        t
    }
}

fn young(t: u64, now: u64, min_age: Duration) -> bool {
    now.saturating_sub(t) < min_age.as_secs() || t > now
}

/// The plan. `now` is Unix seconds.
pub fn plan(inv: &Inventory, roots: &Roots, policy: &Policy, now: u64) -> Plan {
    let mut out = Plan::default();
    // Roots: (repository, digest) → the first reason.
    let mut keep: BTreeMap<(String, Digest), Reason> = BTreeMap::new();
    let add = |keep: &mut BTreeMap<(String, Digest), Reason>, r: &str, d: &str, why| {
        let e = keep.entry((r.to_string(), d.to_string())).or_insert(why);
        if why < *e {
            *e = why;
        }
    };
    // Whether the repository holds a manifest: a revision, or (mirror) a
    // blob that parses as one.
    let holds = |repo: &Repo, d: &str| {
        repo.revisions.contains_key(d)
            || (repo.layers.contains_key(d) && inv.manifests.contains_key(d))
    };
    for (image, kind) in &roots.images {
        let why = match kind {
            UseKind::Pod => Reason::Pod,
            UseKind::Template => Reason::Template,
        };
        for name in image.repos() {
            let Some(repo) = inv.repos.get(&name) else {
                continue;
            };
            if let Some(d) = &image.digest {
                if holds(repo, d) {
                    add(&mut keep, &name, d, why);
                }
            }
            if let Some(t) = &image.tag {
                if let Some(d) = repo.tags.get(t) {
                    add(&mut keep, &name, d, why);
                }
            }
        }
    }
    // Within the window: younger than it (0 keeps none).
    let within = |at: u64, window: Duration| now.saturating_sub(at) < window.as_secs();
    for (name, d, at) in &roots.pulls {
        if !within(*at, policy.keep_pulled) {
            continue;
        }
        if let Some(repo) = inv.repos.get(name) {
            if holds(repo, d) {
                add(&mut keep, name, d, Reason::Pulled);
            }
        }
    }
    for (name, repo) in &inv.repos {
        // Children of any manifest in this repository: not builds of their
        // own (an index's per-platform manifests).
        let children: BTreeSet<&Digest> = repo
            .revisions
            .keys()
            .filter_map(|d| inv.manifests.get(d))
            .flat_map(|p| p.manifests.iter())
            .collect();
        let kind = RepoKind::of(name);
        if kind == RepoKind::Images {
            let mut top: Vec<(&u64, &Digest)> = repo
                .revisions
                .iter()
                .filter(|(d, _)| !children.contains(d))
                .map(|(d, t)| (t, d))
                .collect();
            top.sort_by(|a, b| b.cmp(a));
            for (_, d) in top.into_iter().take(policy.keep_builds) {
                add(&mut keep, name, d, Reason::RecentBuild);
            }
        }
        if kind == RepoKind::Cache {
            let since = now.saturating_sub(policy.cache_ttl.as_secs());
            for (d, pushed) in &repo.revisions {
                let created = inv
                    .manifests
                    .get(d)
                    .and_then(|p| p.config.as_ref())
                    .and_then(|c| inv.created.get(c))
                    .unwrap_or(pushed);
                if *created >= since {
                    add(&mut keep, name, d, Reason::CacheFresh);
                }
            }
        }
        for (d, pushed) in &repo.revisions {
            if young(*pushed, now, policy.min_age) {
                add(&mut keep, name, d, Reason::Young);
            }
        }
    }

    // The closure, per repository: manifests reached, blobs reached.
    let mut reached: BTreeMap<String, (BTreeSet<Digest>, BTreeSet<Digest>)> = BTreeMap::new();
    for ((name, root), why) in &keep {
        let (ms, bs) = reached.entry(name.clone()).or_default();
        let mut work = vec![root.clone()];
        while let Some(d) = work.pop() {
            if !ms.insert(d.clone()) {
                continue;
            }
            bs.insert(d.clone());
            if let Some(p) = inv.manifests.get(&d) {
                bs.extend(p.blobs.iter().cloned());
                work.extend(p.manifests.iter().cloned());
            }
        }
        let repo = &inv.repos[name];
        let tags = repo
            .tags
            .iter()
            .filter(|(_, t)| *t == root)
            .map(|(n, _)| n.clone())
            .collect();
        out.kept.entry(name.clone()).or_default().push(Kept {
            digest: root.clone(),
            reason: *why,
            tags,
        });
    }
    for (name, (ms, _)) in &reached {
        let kept = out.kept.entry(name.clone()).or_default();
        for d in ms {
            if !kept.iter().any(|k| &k.digest == d) && inv.repos[name].revisions.contains_key(d) {
                kept.push(Kept {
                    digest: d.clone(),
                    reason: Reason::Child,
                    tags: Vec::new(),
                });
            }
        }
    }

    for (name, d, at) in &roots.checked {
        if within(*at, policy.min_age) && inv.repos.contains_key(name) {
            reached.entry(name.clone()).or_default().1.insert(d.clone());
        }
    }

    // Deletions per repository, and which blobs stay referenced.
    let empty = (BTreeSet::new(), BTreeSet::new());
    let mut still: BTreeSet<&Digest> = BTreeSet::new();
    // Blob → the repositories that linked or held it before, for the report.
    let mut owners: BTreeMap<&Digest, &String> = BTreeMap::new();
    for (name, repo) in &inv.repos {
        let (ms, bs) = reached.get(name).unwrap_or(&empty);
        for d in repo.revisions.keys() {
            owners.entry(d).or_insert(name);
            if ms.contains(d) {
                still.insert(d);
            } else {
                out.delete_revisions.push((name.clone(), d.clone()));
                out.freed.entry(name.clone()).or_default().manifests += 1;
            }
        }
        for (t, d) in &repo.tags {
            if !ms.contains(d) {
                out.delete_tags.push((name.clone(), t.clone()));
                out.freed.entry(name.clone()).or_default().tags += 1;
            }
        }
        for (d, linked) in &repo.layers {
            owners.entry(d).or_insert(name);
            if bs.contains(d) || young(*linked, now, policy.min_age) {
                still.insert(d);
            } else {
                out.delete_layer_links.push((name.clone(), d.clone()));
            }
        }
        // A kept manifest's blobs stay even where the link is missing
        // (distribution serves a manifest's blobs only through links, but
        // deleting data a kept manifest names is never right).
        still.extend(bs.iter());
    }
    for (d, b) in &inv.blobs {
        if still.contains(d) || young(b.mtime, now, policy.min_age) {
            continue;
        }
        out.delete_blobs.push(d.clone());
        let owner = owners.get(d).map(|s| s.as_str()).unwrap_or("");
        let f = out.freed.entry(owner.to_string()).or_default();
        f.bytes += b.size;
        f.blobs += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    fn d(n: u32) -> Digest {
        format!("sha256:{n:064x}")
    }

    /// A builder of inventories: manifests are blobs too.
    #[derive(Default)]
    struct Inv(Inventory);

    impl Inv {
        fn blob(&mut self, dg: &Digest, size: u64, mtime: u64) -> &mut Self {
            self.0.blobs.insert(dg.clone(), Blob { size, mtime });
            self
        }
        fn layer(&mut self, repo: &str, dg: &Digest, size: u64, t: u64) -> &mut Self {
            self.blob(dg, size, t);
            self.0
                .repos
                .entry(repo.into())
                .or_default()
                .layers
                .insert(dg.clone(), t);
            self
        }
        /// A manifest blob `m` pushed to `repo` at `t`, referencing `p`.
        fn revision(&mut self, repo: &str, m: &Digest, p: Parsed, t: u64) -> &mut Self {
            self.blob(m, 100, t);
            self.0.manifests.insert(m.clone(), p);
            self.0
                .repos
                .entry(repo.into())
                .or_default()
                .revisions
                .insert(m.clone(), t);
            self
        }
        fn image(&mut self, repo: &str, m: &Digest, blobs: &[(&Digest, u64)], t: u64) -> &mut Self {
            for (b, s) in blobs {
                self.layer(repo, b, *s, t);
            }
            let p = Parsed {
                blobs: blobs.iter().map(|(b, _)| (*b).clone()).collect(),
                manifests: vec![],
                config: blobs.first().map(|(b, _)| (*b).clone()),
            };
            self.revision(repo, m, p, t)
        }
        fn index(&mut self, repo: &str, m: &Digest, children: &[&Digest], t: u64) -> &mut Self {
            let p = Parsed {
                blobs: vec![],
                manifests: children.iter().map(|c| (*c).clone()).collect(),
                config: None,
            };
            self.revision(repo, m, p, t)
        }
        fn tag(&mut self, repo: &str, tag: &str, m: &Digest) -> &mut Self {
            self.0
                .repos
                .get_mut(repo)
                .unwrap()
                .tags
                .insert(tag.into(), m.clone());
            self
        }
    }

    /// The kept manifests of `repo` with their reasons, sorted.
    fn kept_of(p: &Plan, repo: &str) -> Vec<(Digest, Reason)> {
        let mut v: Vec<_> = p.kept[repo]
            .iter()
            .map(|k| (k.digest.clone(), k.reason))
            .collect();
        v.sort();
        v
    }

    fn policy() -> Policy {
        Policy {
            keep_builds: 2,
            keep_pulled: Duration::from_secs(7 * DAY),
            cache_ttl: Duration::from_secs(14 * DAY),
            min_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn references_are_normalised_as_containerd_does() {
        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(
            (r.host.as_str(), r.path.as_str(), r.tag.as_deref()),
            ("docker.io", "library/nginx", Some("latest"))
        );
        let r =
            ImageRef::parse(&format!("registry.shared-services:5000/demo/app@{}", d(1))).unwrap();
        assert_eq!(r.host, "registry.shared-services:5000");
        assert_eq!(r.path, "demo/app");
        assert_eq!((r.tag, r.digest), (None, Some(d(1))));
        let r = ImageRef::parse("localhost/a/b:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.tag.as_deref()),
            ("localhost", Some("v1"))
        );
        let r = ImageRef::parse(&format!("10.0.0.1:5000/app:v2@{}", d(2))).unwrap();
        assert_eq!((r.path.as_str(), r.tag.as_deref()), ("app", Some("v2")));
        assert_eq!(ImageRef::parse("a@sha256:short"), None);
        assert_eq!(ImageRef::parse(""), None);
    }

    #[test]
    fn manifests_indexes_and_mirror_records_parse() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            d(1),
            d(2)
        );
        let p = parse_manifest(m.as_bytes()).unwrap();
        assert_eq!((p.blobs, p.config), (vec![d(1), d(2)], Some(d(1))));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}"}},{{"digest":"{}"}}]}}"#,
            d(3),
            d(4)
        );
        assert_eq!(
            parse_manifest(i.as_bytes()).unwrap().manifests,
            [d(3), d(4)]
        );
        let rec = crate::mirror::TagRecord {
            digest: d(5),
            media_type: "x".into(),
            size: 1,
            resolved_at: 1,
            source: String::new(),
        }
        .to_manifest();
        let p = parse_manifest(&rec).unwrap();
        assert_eq!(p.manifests, [d(5)]);
        assert_eq!(p.blobs.len(), 1, "the record's config");
        assert_eq!(parse_manifest(b"{\"a\":1}"), None);
        assert_eq!(parse_manifest(b"\x00\x01"), None);
        assert_eq!(
            config_created(br#"{"created":"2026-01-01T00:00:00Z"}"#),
            Some(1_767_225_600)
        );
    }

    #[test]
    fn the_last_builds_stay_with_their_blobs_and_the_rest_goes() {
        let mut i = Inv::default();
        // Four builds a day apart, each with its own layer and a shared one.
        for n in 0..4u32 {
            let t = NOW - (10 - u64::from(n)) * DAY;
            i.image("app", &d(100 + n), &[(&d(200 + n), 1000), (&d(300), 7)], t);
        }
        i.tag("app", "latest", &d(103)).tag("app", "old", &d(100));
        let p = plan(&i.0, &Roots::default(), &policy(), NOW);
        assert_eq!(
            kept_of(&p, "app"),
            [(d(102), Reason::RecentBuild), (d(103), Reason::RecentBuild)]
        );
        assert_eq!(
            p.delete_revisions,
            [("app".into(), d(100)), ("app".into(), d(101))]
        );
        assert_eq!(p.delete_tags, [("app".to_string(), "old".to_string())]);
        assert_eq!(p.delete_blobs, [d(100), d(101), d(200), d(201)]);
        assert_eq!(
            p.freed["app"],
            Freed {
                bytes: 2 * 100 + 2 * 1000,
                blobs: 4,
                manifests: 2,
                tags: 1
            }
        );
        assert!(!p.delete_blobs.contains(&d(300)), "shared with kept builds");
    }

    #[test]
    fn what_pods_templates_and_pulls_name_is_kept_whatever_the_host() {
        let mut i = Inv::default();
        for n in 0..6u32 {
            let t = NOW - (20 - u64::from(n)) * DAY;
            i.image("team/app", &d(100 + n), &[(&d(200 + n), 10)], t);
        }
        i.tag("team/app", "v0", &d(100));
        let mut pol = policy();
        pol.keep_builds = 0;
        let roots = Roots {
            images: vec![
                (
                    ImageRef::parse(&format!(
                        "registry.shared-services:5000/team/app@{}",
                        d(101)
                    ))
                    .unwrap(),
                    UseKind::Pod,
                ),
                (
                    ImageRef::parse("10.0.0.9:5000/team/app:v0").unwrap(),
                    UseKind::Template,
                ),
            ],
            pulls: vec![
                ("team/app".into(), d(102), NOW - DAY),
                ("team/app".into(), d(103), NOW - 8 * DAY),
            ],
            ..Roots::default()
        };
        let p = plan(&i.0, &roots, &pol, NOW);
        assert_eq!(
            kept_of(&p, "team/app"),
            [
                (d(100), Reason::Template),
                (d(101), Reason::Pod),
                (d(102), Reason::Pulled)
            ]
        );
        assert!(p.delete_tags.is_empty());
        assert_eq!(p.delete_revisions.len(), 3);
    }

    #[test]
    fn a_kept_index_keeps_every_child_and_their_blobs() {
        let mut i = Inv::default();
        let t = NOW - 30 * DAY;
        i.image("multi", &d(1), &[(&d(11), 5), (&d(12), 6)], t)
            .image("multi", &d(2), &[(&d(21), 5), (&d(22), 6)], t)
            .index("multi", &d(3), &[&d(1), &d(2)], t)
            .tag("multi", "v1", &d(3))
            // An untagged manifest of its own: garbage.
            .image("multi", &d(4), &[(&d(41), 9)], t - 1);
        let mut pol = policy();
        pol.keep_builds = 1;
        let p = plan(&i.0, &Roots::default(), &pol, NOW);
        assert_eq!(
            kept_of(&p, "multi"),
            [
                (d(1), Reason::Child),
                (d(2), Reason::Child),
                (d(3), Reason::RecentBuild)
            ]
        );
        assert_eq!(p.delete_revisions, [("multi".into(), d(4))]);
        assert_eq!(p.delete_blobs, [d(4), d(41)]);
    }

    #[test]
    fn cache_entries_go_by_their_created_time_and_young_pushes_stay() {
        let mut i = Inv::default();
        // Pushed long ago, both; the config says when Kaniko made each.
        i.image(
            "cache/app",
            &d(1),
            &[(&d(11), 5), (&d(12), 50)],
            NOW - 90 * DAY,
        )
        .image(
            "cache/app",
            &d(2),
            &[(&d(21), 5), (&d(22), 50)],
            NOW - 90 * DAY,
        );
        i.0.created.insert(d(11), NOW - DAY);
        i.0.created.insert(d(21), NOW - 15 * DAY);
        // Pushed a minute ago, no tag and nothing names it: a push in
        // progress. A lone blob, just uploaded.
        i.image("app", &d(3), &[(&d(31), 5)], NOW - 60)
            .blob(&d(4), 9, NOW - 60);
        // An old orphan blob.
        i.blob(&d(5), 99, NOW - 90 * DAY);
        let mut pol = policy();
        pol.keep_builds = 0;
        let p = plan(&i.0, &Roots::default(), &pol, NOW);
        assert_eq!(p.kept["cache/app"][0].digest, d(1));
        assert_eq!(p.kept["cache/app"][0].reason, Reason::CacheFresh);
        assert_eq!(p.kept["app"][0].reason, Reason::Young);
        assert_eq!(p.delete_blobs, [d(2), d(5), d(21), d(22)]);
        assert_eq!(p.freed[""].bytes, 99);
        assert_eq!(p.freed["cache/app"].bytes, 155);
    }

    #[test]
    fn a_blob_a_push_just_checked_stays_with_its_link() {
        let mut i = Inv::default();
        let old = NOW - 30 * DAY;
        i.image("app", &d(1), &[(&d(11), 5), (&d(12), 6)], old);
        let roots = Roots {
            checked: vec![
                ("app".into(), d(12), NOW - 60),
                ("app".into(), d(11), NOW - 2 * 3600),
            ],
            ..Roots::default()
        };
        let mut pol = policy();
        pol.keep_builds = 0;
        let p = plan(&i.0, &roots, &pol, NOW);
        assert_eq!(p.delete_blobs, [d(1), d(11)]);
        assert_eq!(
            p.delete_layer_links,
            [("app".to_string(), d(11))],
            "the checked blob keeps its link in the repository"
        );
    }

    #[test]
    fn a_mirror_tag_record_keeps_its_target_stored_as_a_blob() {
        let mut i = Inv::default();
        let t = NOW - 30 * DAY;
        let repo = "mirror/docker.io/library/alpine";
        // The target manifest: a blob of the repository that parses.
        i.layer(repo, &d(1), 300, t)
            .layer(repo, &d(11), 5, t)
            .layer(repo, &d(12), 6, t);
        i.0.manifests.insert(
            d(1),
            Parsed {
                blobs: vec![d(11), d(12)],
                manifests: vec![],
                config: Some(d(11)),
            },
        );
        // The record: a revision whose "layer" is the target.
        i.image(repo, &d(2), &[(&d(20), 2)], t);
        i.0.manifests.get_mut(&d(2)).unwrap().manifests.push(d(1));
        i.tag(repo, "3.19", &d(2));
        // A second, unused record and target.
        i.layer(repo, &d(3), 300, t);
        i.0.manifests.insert(d(3), Parsed::default());
        i.image(repo, &d(4), &[(&d(20), 2)], t);
        i.0.manifests.get_mut(&d(4)).unwrap().manifests.push(d(3));
        i.tag(repo, "3.18", &d(4));
        let roots = Roots {
            images: vec![(ImageRef::parse("alpine:3.19").unwrap(), UseKind::Pod)],
            ..Roots::default()
        };
        let p = plan(&i.0, &roots, &policy(), NOW);
        assert_eq!(p.delete_revisions, [(repo.to_string(), d(4))]);
        assert_eq!(p.delete_tags, [(repo.to_string(), "3.18".to_string())]);
        assert_eq!(p.delete_blobs, [d(3), d(4)]);
        // A digest reference to a target reaches it too.
        let roots = Roots {
            images: vec![(
                ImageRef::parse(&format!("docker.io/library/alpine@{}", d(3))).unwrap(),
                UseKind::Pod,
            )],
            ..Roots::default()
        };
        let p = plan(&i.0, &roots, &policy(), NOW);
        assert!(!p.delete_blobs.contains(&d(3)));
    }
}
