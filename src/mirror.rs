//! The `[mirror]` table (#20): public registries (`docker.io`, `ghcr.io`,
//! …) served through the in-cluster registry, so that a pull or a build
//! reaches the internet at most once per blob and once per tag per
//! `tag_ttl_secs`.
//!
//! Shared by three programs, pure (no I/O):
//! - `slipway agent` writes `certs.d/<upstream>/hosts.toml` for each
//!   configured upstream and maps containerd's `?ns=<upstream>` requests to
//!   the mirror repository ([`Mirrors::route`]);
//! - `slipway gateway` fills the mirror repositories from upstream
//!   ([`crate::gateway::fill`]), with the tag rules of [`tag_plan`] and
//!   [`on_failure`];
//! - `slipway build` maps each upstream to its repository prefix with
//!   Kaniko's `--registry-map` ([`Mirrors::registry_map`]).
//!
//! Where mirrored content lives: repository `mirror/<upstream>/<name>` of
//! the in-cluster registry (`mirror/docker.io/library/alpine`). Blobs are
//! blobs; manifests are stored as blobs too, so that an index whose other
//! platforms were never pulled can be kept (distribution refuses an index
//! manifest whose children are missing); a tag is a small record manifest
//! ([`TagRecord`]) under that tag, whose one layer is the manifest it names.
//!
//! Fails with [`ConfigError`] naming the key (`mirror.registries[1]`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::node::config::ConfigError;
use crate::node::hostconfig::Alias;

/// Every mirror repository is under this first path component.
pub const REPO_PREFIX: &str = "mirror";

/// 15 minutes. Docker Hub allows an anonymous address 10 manifest GETs an
/// hour (docker/docs#22134); at one revalidation per tag per 15 minutes, a
/// whole cluster spends at most 4 an hour on a tag however many nodes pull
/// it, and a moved tag (`latest`) reaches the nodes within 15 minutes. A
/// revalidation whose digest did not change is a `HEAD`, which Docker Hub
/// does not count; only a changed tag costs a `GET`.
pub const DEFAULT_TAG_TTL_SECS: u64 = 900;

/// Media type of a tag record's config (the 2-byte `{}`).
pub const RECORD_CONFIG_MEDIA_TYPE: &str = "application/vnd.slipway.mirror.tag.v1+json";
/// Media type of a tag record's one layer: the manifest the tag names,
/// stored as a blob. Not a manifest media type, so distribution checks only
/// that the blob exists (ocischema's verifyManifest).
pub const RECORD_TARGET_MEDIA_TYPE: &str = "application/vnd.slipway.mirror.target";
/// `{}`: a tag record's config.
pub const RECORD_CONFIG: &[u8] = b"{}";
const ANN_MEDIA_TYPE: &str = "io.slipway.mirror.media-type";
const ANN_RESOLVED_AT: &str = "io.slipway.mirror.resolved-at";
const ANN_SOURCE: &str = "io.slipway.mirror.source";

/// What the manifest endpoints accept and ask upstream for.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A manifest larger than this is refused (distribution's own limit is
/// 4 MiB, `maxManifestBodySize`).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// The raw `[mirror]` table, as in agent.toml.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMirror {
    pub registries: Option<Vec<String>>,
    pub tag_ttl_secs: Option<u64>,
    /// Extra roots for upstream TLS, besides the system's (a private
    /// upstream, or the test cluster's stand-ins).
    pub ca_file: Option<PathBuf>,
    /// Where to fetch from, per upstream; default `https://<upstream>`
    /// (`https://registry-1.docker.io` for `docker.io`).
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    /// A directory with `username` and `password` files (a Secret volume),
    /// per upstream; anonymous without.
    #[serde(default)]
    pub credentials: BTreeMap<String, PathBuf>,
}

/// One configured upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `docker.io`, `ghcr.io`, `registry.example:5000`: the name in image
    /// references, and the `certs.d` directory.
    pub host: Alias,
    /// `https://registry-1.docker.io`: scheme, host and port, no path.
    pub endpoint: String,
    pub credentials: Option<PathBuf>,
}

impl Upstream {
    /// `mirror/docker.io`: a port's `:` becomes `_`, since a repository
    /// name has no `:`.
    pub fn repo_prefix(&self) -> String {
        format!("{REPO_PREFIX}/{}", self.host.dir_name().replace(':', "_"))
    }

    /// The name containerd falls back to when every mirror fails: Docker
    /// Hub's registry is not at `docker.io` itself.
    pub fn server_url(&self) -> String {
        default_endpoint(&self.host.dir_name())
    }

    /// The label value in metrics (configured, so a closed set).
    pub fn label(&self) -> String {
        self.host.dir_name()
    }
}

fn default_endpoint(host: &str) -> String {
    match host {
        "docker.io" | "index.docker.io" => "https://registry-1.docker.io".into(),
        h => format!("https://{h}"),
    }
}

/// The parsed `[mirror]` table; empty `registries` means the mirror is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrors {
    pub registries: Vec<Upstream>,
    pub tag_ttl: Duration,
    pub ca_file: Option<PathBuf>,
}

impl Default for Mirrors {
    fn default() -> Self {
        Mirrors {
            registries: vec![],
            tag_ttl: Duration::from_secs(DEFAULT_TAG_TTL_SECS),
            ca_file: None,
        }
    }
}

fn invalid(key: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl Mirrors {
    /// Check and normalise the table. Relative paths are relative to
    /// `base` (the config file's directory).
    pub fn parse(f: &FileMirror, base: Option<&Path>) -> Result<Mirrors, ConfigError> {
        let rel = |p: &PathBuf| match (base, p.is_relative()) {
            (Some(dir), true) => dir.join(p),
            _ => p.clone(),
        };
        let mut registries: Vec<Upstream> = Vec::new();
        for (i, raw) in f.registries.iter().flatten().enumerate() {
            let key = || format!("mirror.registries[{i}]");
            let host = Alias::parse(raw).map_err(|e| invalid(key(), e.to_string()))?;
            if host.dir_name() != raw.to_ascii_lowercase() || raw.contains(['[', ']']) {
                return Err(invalid(
                    key(),
                    format!("{raw:?}: give a lowercase host name[:port], as in image references"),
                ));
            }
            if registries.iter().any(|u| u.host == host) {
                return Err(invalid(key(), format!("{raw:?} is listed twice")));
            }
            let endpoint = match f.endpoints.get(raw) {
                Some(e) => {
                    let k = format!("mirror.endpoints.{raw:?}");
                    let u = url::Url::parse(e)
                        .map_err(|err| invalid(k.clone(), format!("{e:?}: {err}")))?;
                    if u.scheme() != "https"
                        || u.host_str().is_none()
                        || u.path() != "/"
                        || u.query().is_some()
                        || !u.username().is_empty()
                    {
                        return Err(invalid(
                            k,
                            format!("{e:?}: give https://host[:port] with no path, query or user"),
                        ));
                    }
                    e.trim_end_matches('/').to_string()
                }
                None => default_endpoint(raw),
            };
            registries.push(Upstream {
                host,
                endpoint,
                credentials: f.credentials.get(raw).map(rel),
            });
        }
        // A key for an upstream that is not listed is a typo or a left-over:
        // either way the operator meant something else.
        for (table, keys) in [
            ("endpoints", f.endpoints.keys().collect::<Vec<_>>()),
            ("credentials", f.credentials.keys().collect()),
        ] {
            for k in keys {
                if !registries.iter().any(|u| &u.host.dir_name() == k) {
                    return Err(invalid(
                        format!("mirror.{table}.{k:?}"),
                        "not in mirror.registries",
                    ));
                }
            }
        }
        let ttl = f.tag_ttl_secs.unwrap_or(DEFAULT_TAG_TTL_SECS);
        if ttl == 0 || ttl > 7 * 86_400 {
            return Err(invalid(
                "mirror.tag_ttl_secs".into(),
                format!("{ttl}: give 1 to 604800 seconds"),
            ));
        }
        Ok(Mirrors {
            registries,
            tag_ttl: Duration::from_secs(ttl),
            ca_file: f.ca_file.as_ref().map(rel),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.registries.is_empty()
    }

    pub fn upstream(&self, host: &str) -> Option<&Upstream> {
        self.registries.iter().find(|u| u.host.dir_name() == host)
    }

    /// The mirror repository a request is for: `ns` is containerd's
    /// `?ns=<upstream>` (a request to a mirror host), else the repository
    /// name itself may be under `mirror/<upstream>/` (Kaniko's
    /// `--registry-map`, or a direct pull). Returns the upstream and the
    /// name there (`library/alpine`).
    pub fn route<'a>(&'a self, name: &str, ns: Option<&str>) -> Option<(&'a Upstream, String)> {
        if let Some(u) = ns.and_then(|ns| self.upstream(ns)) {
            return Some((u, name.to_string()));
        }
        self.registries.iter().find_map(|u| {
            name.strip_prefix(&u.repo_prefix())
                .and_then(|r| r.strip_prefix('/'))
                .filter(|r| !r.is_empty())
                .map(|r| (u, r.to_string()))
        })
    }

    /// Kaniko's `--registry-map` values for a registry at `registry`
    /// (`host:port`): `index.docker.io=<registry>/mirror/docker.io`. Kaniko
    /// (go-containerregistry) names Docker Hub `index.docker.io`.
    pub fn registry_map(&self, registry: &str) -> Vec<String> {
        self.registries
            .iter()
            .map(|u| {
                let from = match u.host.dir_name().as_str() {
                    "docker.io" => "index.docker.io".to_string(),
                    h => h.to_string(),
                };
                format!("{from}={registry}/{}", u.repo_prefix())
            })
            .collect()
    }
}

/// The name of the ConfigMap that holds the install's `mirror.toml`
/// (daemonset/overlays/mirror): mounted by the agents and the gateway, and
/// read by `slipway build` for its `--registry-map`. A fixed name, without
/// kustomize's hash suffix, so that a build can find it.
pub const CONFIGMAP: &str = "slipway-mirror";
/// Its key.
pub const CONFIGMAP_KEY: &str = "mirror.toml";

impl Mirrors {
    /// The `[mirror]` table of a TOML document (`origin` names it in
    /// errors: a file, or a ConfigMap's key); its other tables belong to
    /// whoever else reads the document, and are not checked here. No
    /// `[mirror]` table: off.
    pub fn from_toml(origin: &Path, text: &str) -> Result<Mirrors, ConfigError> {
        let parse = |message: String| ConfigError::Parse {
            path: origin.to_path_buf(),
            message,
        };
        let table: toml::Table =
            toml::from_str(text).map_err(|e| parse(e.to_string().trim_end().to_string()))?;
        let raw = match table.get("mirror") {
            Some(v) => {
                FileMirror::deserialize(v.clone()).map_err(|e| parse(format!("[mirror]: {e}")))?
            }
            None => FileMirror::default(),
        };
        Mirrors::parse(&raw, origin.parent())
    }

    /// [`Mirrors::from_toml`] of a file.
    pub fn load(file: &Path) -> Result<Mirrors, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        Mirrors::from_toml(file, &text)
    }
}

// ---------------------------------------------------------------- tags

/// What the mirror knows of a tag: the manifest it named when last asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Unix seconds of the last time upstream confirmed it.
    pub resolved_at: u64,
    /// `docker.io/library/alpine:3.19`, for people reading the registry.
    pub source: String,
}

impl TagRecord {
    /// The record as an OCI image manifest: config `{}`, one layer that is
    /// the tagged manifest (so it must exist as a blob of the repository).
    pub fn to_manifest(&self) -> Vec<u8> {
        let config_digest = format!("sha256:{}", sha256_hex(RECORD_CONFIG));
        let v = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": RECORD_CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": RECORD_CONFIG.len(),
            },
            "layers": [{
                "mediaType": RECORD_TARGET_MEDIA_TYPE,
                "digest": self.digest,
                "size": self.size,
            }],
            "annotations": {
                ANN_MEDIA_TYPE: self.media_type,
                ANN_RESOLVED_AT: self.resolved_at.to_string(),
                ANN_SOURCE: self.source,
            },
        });
        serde_json::to_vec(&v).expect("record serialises")
    }

    /// A record read back; `None` for anything else under the tag.
    pub fn from_manifest(bytes: &[u8]) -> Option<TagRecord> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        if v["config"]["mediaType"] != RECORD_CONFIG_MEDIA_TYPE {
            return None;
        }
        let layer = v["layers"].as_array()?.first()?;
        let ann = &v["annotations"];
        Some(TagRecord {
            digest: layer["digest"].as_str()?.to_string(),
            size: layer["size"].as_u64()?,
            media_type: ann[ANN_MEDIA_TYPE].as_str()?.to_string(),
            resolved_at: ann[ANN_RESOLVED_AT].as_str()?.parse().ok()?,
            source: ann[ANN_SOURCE].as_str().unwrap_or_default().to_string(),
        })
    }
}

/// What to do with a tag request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagPlan {
    /// Confirmed within the TTL: serve the record's manifest, ask no one.
    Fresh,
    /// Ask upstream (a `HEAD`), and fetch only if the digest changed.
    Revalidate,
}

pub fn tag_plan(record: Option<&TagRecord>, now: u64, ttl: Duration) -> TagPlan {
    match record {
        Some(r) if now.saturating_sub(r.resolved_at) < ttl.as_secs() && r.resolved_at <= now => {
            TagPlan::Fresh
        }
        _ => TagPlan::Revalidate,
    }
}

/// How an upstream request ended, when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No HTTP answer: refused, reset, timed out, or no such host.
    Unreachable(String),
    Status(u16),
}

impl UpstreamFailure {
    /// Whether the mirror serves what it has instead: the upstream is down
    /// or refusing for now (#20: unreachable, 429 or 5xx), not saying the
    /// content is gone or forbidden.
    pub fn serve_stale(&self) -> bool {
        match self {
            UpstreamFailure::Unreachable(_) => true,
            UpstreamFailure::Status(s) => *s == 429 || *s >= 500,
        }
    }

    /// The metrics label: the status, or `unreachable`.
    pub fn label(&self) -> String {
        match self {
            UpstreamFailure::Unreachable(_) => "unreachable".into(),
            UpstreamFailure::Status(s) => s.to_string(),
        }
    }
}

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamFailure::Unreachable(e) => write!(f, "is unreachable ({e})"),
            UpstreamFailure::Status(s) => write!(
                f,
                "answered {s} {}",
                http::StatusCode::from_u16(*s)
                    .ok()
                    .and_then(|c| c.canonical_reason())
                    .unwrap_or("")
            ),
        }
    }
}

/// The media type of a manifest: its `mediaType` field, or, for an OCI
/// manifest that leaves it out, what its fields say.
pub fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(m) = v["mediaType"].as_str() {
        return Some(m.to_string());
    }
    if v["schemaVersion"] != 2 {
        return None;
    }
    if v["manifests"].is_array() {
        Some("application/vnd.oci.image.index.v1+json".into())
    } else if v["config"].is_object() {
        Some("application/vnd.oci.image.manifest.v1+json".into())
    } else {
        None
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Mirrors, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            mirror: FileMirror,
        }
        let f: F = toml::from_str(t).unwrap();
        Mirrors::parse(&f.mirror, Some(Path::new("/etc/slipway")))
    }

    #[test]
    fn docker_hub_is_fetched_from_registry_1_and_others_from_their_name() {
        let m = parse("[mirror]\nregistries = [\"docker.io\", \"ghcr.io\", \"r.example:5000\"]\ncredentials = { \"ghcr.io\" = \"creds/ghcr\" }\n").unwrap();
        assert_eq!(m.registries[0].endpoint, "https://registry-1.docker.io");
        assert_eq!(m.registries[1].endpoint, "https://ghcr.io");
        assert_eq!(
            m.registries[1].credentials.as_deref(),
            Some(Path::new("/etc/slipway/creds/ghcr"))
        );
        assert_eq!(m.registries[2].repo_prefix(), "mirror/r.example_5000");
        assert_eq!(m.tag_ttl, Duration::from_secs(DEFAULT_TAG_TTL_SECS));
        assert_eq!(
            m.registry_map("reg:5000"),
            [
                "index.docker.io=reg:5000/mirror/docker.io",
                "ghcr.io=reg:5000/mirror/ghcr.io",
                "r.example:5000=reg:5000/mirror/r.example_5000"
            ]
        );
    }

    #[test]
    fn bad_entries_name_their_key() {
        for (t, key) in [
            (
                "registries = [\"https://docker.io\"]",
                "mirror.registries[0]",
            ),
            ("registries = [\"a.io\", \"a.io\"]", "mirror.registries[1]"),
            ("registries = [\"Docker.io\"]", "mirror.registries[0]"),
            (
                "registries = [\"a.io\"]\nendpoints = { \"a.io\" = \"http://a.io\" }",
                "mirror.endpoints.\"a.io\"",
            ),
            (
                "registries = [\"a.io\"]\ncredentials = { \"b.io\" = \"x\" }",
                "mirror.credentials.\"b.io\"",
            ),
            ("tag_ttl_secs = 0", "mirror.tag_ttl_secs"),
        ] {
            match parse(&format!("[mirror]\n{t}\n")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{t}"),
                other => panic!("{t}: {other:?}"),
            }
        }
    }

    #[test]
    fn requests_map_by_ns_or_by_prefix_and_nothing_else() {
        let m = parse("[mirror]\nregistries = [\"docker.io\"]\n").unwrap();
        let (u, n) = m.route("library/alpine", Some("docker.io")).unwrap();
        assert_eq!(
            (u.label(), n.as_str()),
            ("docker.io".into(), "library/alpine")
        );
        let (_, n) = m.route("mirror/docker.io/library/alpine", None).unwrap();
        assert_eq!(n, "library/alpine");
        assert!(m
            .route("library/alpine", Some("registry.shared-services:5000"))
            .is_none());
        assert!(m.route("mirror/docker.io", None).is_none());
        assert!(m.route("mirror/docker.iox/a", None).is_none());
        assert!(m.route("app", None).is_none());
    }

    #[test]
    fn a_record_round_trips_and_freshness_follows_the_ttl() {
        let r = TagRecord {
            digest: format!("sha256:{}", "a".repeat(64)),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            size: 512,
            resolved_at: 1000,
            source: "docker.io/library/alpine:3.19".into(),
        };
        assert_eq!(TagRecord::from_manifest(&r.to_manifest()), Some(r.clone()));
        let ttl = Duration::from_secs(900);
        assert_eq!(tag_plan(Some(&r), 1899, ttl), TagPlan::Fresh);
        assert_eq!(tag_plan(Some(&r), 1900, ttl), TagPlan::Revalidate);
        assert_eq!(tag_plan(None, 1000, ttl), TagPlan::Revalidate);
        // A clock that went back does not make a record fresh for ever.
        assert_eq!(tag_plan(Some(&r), 10, ttl), TagPlan::Revalidate);
        assert!(UpstreamFailure::Status(429).serve_stale());
        assert!(UpstreamFailure::Status(503).serve_stale());
        assert!(UpstreamFailure::Unreachable("refused".into()).serve_stale());
        assert!(!UpstreamFailure::Status(404).serve_stale());
        assert!(!UpstreamFailure::Status(401).serve_stale());
    }

    #[test]
    fn media_types_come_from_the_field_or_the_shape() {
        assert_eq!(
            manifest_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(
            manifest_media_type(br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{}}"#).as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );
        assert_eq!(manifest_media_type(br#"{"schemaVersion":1}"#), None);
    }
}
