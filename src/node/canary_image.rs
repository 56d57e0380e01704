//! `slipway canary push`: the canary image the agent's readiness pulls
//! (#8, point 5).
//!
//! Owns the image's bytes and the registry API calls that push it. The
//! image is built from constants: one uncompressed layer tar holding
//! `/slipway-canary` (mtime 0, uid and gid 0), an image config per
//! platform (linux/amd64, linux/arm64, `created` fixed at the epoch), an
//! OCI manifest per config and an OCI index over them. Same bytes, same
//! digest: the manifests in daemonset/ can name it before it is pushed, and
//! a node of either architecture can pull it (containerd picks the index
//! entry for its platform).
//!
//! Pushes with the registry API only: `POST /v2/<repo>/blobs/uploads/`, `PUT
//! <location>&digest=…` per blob (skipped when `HEAD` finds it), then `PUT
//! /v2/<repo>/manifests/<digest>`, over rustls trusting only `--ca-file`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

pub const DEFAULT_REPO: &str = "slipway/canary";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const FILE_NAME: &str = "slipway-canary";
const FILE_BODY: &[u8] = b"slipway canary: this node pulls through slipway\n";
/// Each registry call; a registry that does not answer in this time fails
/// the Job, which then retries (backoffLimit in daemonset/).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("--upstream {url:?}: {message}")]
    Upstream { url: String, message: String },
    #[error("--repo {repo:?}: {message}")]
    Repo { repo: String, message: String },
    #[error("--ca-file {path}: cannot read: {source}")]
    CaRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--ca-file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("{method} {url}: {source}")]
    Http {
        method: &'static str,
        url: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("{method} {url}: no answer within {} s", CALL_TIMEOUT.as_secs())]
    Timeout { method: &'static str, url: String },
    #[error("{method} {url}: reading the response: {source}")]
    Body {
        method: &'static str,
        url: String,
        source: hyper::Error,
    },
    #[error("{method} {url}: HTTP {status}: {body}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
    },
    #[error("POST {url}: 202 without a usable Location header")]
    Location { url: String },
}

impl crate::ExitStatus for PushError {
    fn exit_code(&self) -> u8 {
        match self {
            PushError::Upstream { .. }
            | PushError::Repo { .. }
            | PushError::CaRead { .. }
            | PushError::Ca { .. } => crate::EXIT_BAD_CONFIG,
            _ => crate::EXIT_APPLY_FAILED,
        }
    }
}

/// One content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: &'static str,
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Blob {
        Blob { media_type, bytes }
    }
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(&self.bytes)))
    }
    fn descriptor(&self, platform: Option<Platform>) -> Descriptor {
        Descriptor {
            media_type: self.media_type,
            digest: self.digest(),
            size: self.bytes.len(),
            platform,
        }
    }
}

// Structs, not `serde_json::Value`: their fields serialize in declaration
// order whatever serde_json features other crates turn on
// (`preserve_order` changes the order of a Value's map), so the bytes, and
// the digest, stay the same from one build of slipway to the next.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: &'static str,
    digest: String,
    size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
}

#[derive(serde::Serialize, Clone, Copy)]
struct Platform {
    architecture: &'static str,
    os: &'static str,
}

#[derive(serde::Serialize)]
struct Config {
    architecture: &'static str,
    os: &'static str,
    created: &'static str,
    config: ExecConfig,
    rootfs: RootFs,
    history: [History; 1],
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct ExecConfig {
    cmd: [&'static str; 1],
}

#[derive(serde::Serialize)]
struct RootFs {
    r#type: &'static str,
    diff_ids: [String; 1],
}

#[derive(serde::Serialize)]
struct History {
    created: &'static str,
    created_by: &'static str,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: [Descriptor; 1],
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

/// The whole image: blobs (layer, configs) to upload, then manifests in
/// push order (children before the index that names them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub blobs: Vec<Blob>,
    pub manifests: Vec<Blob>,
}

impl Image {
    /// The index: what `REPO@<digest>` names.
    pub fn index(&self) -> &Blob {
        self.manifests.last().expect("built with an index")
    }
}

/// A ustar archive with one regular file, every variable field fixed.
pub fn layer_tar() -> Vec<u8> {
    tar_of(FILE_NAME, FILE_BODY)
}

/// A ustar archive holding one regular file `name` (under 100 bytes) with
/// `body`, mode 0644, owner 0, time 0: the same bytes for the same input.
/// Also the test images of `slipway gc`'s tests (#21).
pub fn tar_of(name: &str, body: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(&mut h, 0, &name.as_bytes()[..name.len().min(99)]);
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{:011o}\0", body.len()).as_bytes());
    put(&mut h, 136, b"00000000000\0");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    // The checksum counts its own field as eight spaces (POSIX ustar).
    put(&mut h, 148, b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut tar = h.to_vec();
    tar.extend_from_slice(body);
    tar.resize(512 + body.len().div_ceil(512) * 512, 0);
    // Two zero blocks end the archive.
    tar.resize(tar.len() + 1024, 0);
    tar
}

/// The canary, for linux/amd64 and linux/arm64.
pub fn build() -> Image {
    let layer = Blob::new(LAYER_TYPE, layer_tar());
    let mut blobs = vec![layer.clone()];
    let mut manifests = Vec::new();
    let mut entries = Vec::new();
    const EPOCH: &str = "1970-01-01T00:00:00Z";
    for arch in ["amd64", "arm64"] {
        let platform = Platform {
            architecture: arch,
            os: "linux",
        };
        let config = Config {
            architecture: arch,
            os: "linux",
            created: EPOCH,
            config: ExecConfig {
                cmd: ["/slipway-canary"],
            },
            rootfs: RootFs {
                r#type: "layers",
                diff_ids: [layer.digest()],
            },
            history: [History {
                created: EPOCH,
                created_by: "slipway canary push",
            }],
        };
        let config = Blob::new(CONFIG_TYPE, serde_json::to_vec(&config).expect("json"));
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_TYPE,
            config: config.descriptor(None),
            layers: [layer.descriptor(None)],
        };
        let manifest = Blob::new(MANIFEST_TYPE, serde_json::to_vec(&manifest).expect("json"));
        entries.push(manifest.descriptor(Some(platform)));
        blobs.push(config);
        manifests.push(manifest);
    }
    let index = Index {
        schema_version: 2,
        media_type: INDEX_TYPE,
        manifests: entries,
    };
    manifests.push(Blob::new(
        INDEX_TYPE,
        serde_json::to_vec(&index).expect("json"),
    ));
    Image { blobs, manifests }
}

/// What `canary push` needs.
#[derive(Debug, Clone)]
pub struct PushArgs {
    /// `https://host[:port]`.
    pub upstream: String,
    pub ca_file: PathBuf,
    pub repo: String,
    /// The registry name to print (an alias); default the upstream's
    /// `host[:port]`.
    pub name_as: Option<String>,
}

fn validate_repo(repo: &str) -> Result<(), PushError> {
    // The distribution spec's path components: lowercase alphanumerics
    // with single separators.
    let ok = !repo.is_empty()
        && repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
        });
    if ok {
        Ok(())
    } else {
        Err(PushError::Repo {
            repo: repo.into(),
            message: "must be lowercase path components such as slipway/canary".into(),
        })
    }
}

fn authority(upstream: &str) -> Result<String, PushError> {
    let bad = |message: &str| PushError::Upstream {
        url: upstream.into(),
        message: message.into(),
    };
    let u = url::Url::parse(upstream).map_err(|e| bad(&e.to_string()))?;
    if u.scheme() != "https" {
        return Err(bad("must use https"));
    }
    if !(u.path() == "/" || u.path().is_empty()) || u.query().is_some() {
        return Err(bad("must be a bare https://host[:port] with no path"));
    }
    let host = u.host_str().ok_or_else(|| bad("has no host"))?;
    Ok(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    })
}

pub(crate) type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// An HTTPS client that trusts `ca_file` only (also `slipway gc`'s).
pub(crate) fn client(ca_file: &Path) -> Result<HttpsClient, PushError> {
    let pem = std::fs::read(ca_file).map_err(|source| PushError::CaRead {
        path: ca_file.into(),
        source,
    })?;
    let bad = |message: String| PushError::Ca {
        path: ca_file.into(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

struct Registry {
    client: HttpsClient,
    base: String,
    repo: String,
}

struct Answer {
    status: u16,
    location: Option<String>,
}

impl Registry {
    async fn call(
        &self,
        method: &'static str,
        url: String,
        content_type: Option<&str>,
        body: Vec<u8>,
        want: &[u16],
    ) -> Result<Answer, PushError> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::CONTENT_LENGTH, body.len());
        if let Some(t) = content_type {
            req = req.header(http::header::CONTENT_TYPE, t);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PushError::Upstream {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let resp = match tokio::time::timeout(CALL_TIMEOUT, self.client.request(req)).await {
            Err(_) => return Err(PushError::Timeout { method, url }),
            Ok(r) => r.map_err(|source| PushError::Http {
                method,
                url: url.clone(),
                source,
            })?,
        };
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect()).await {
            Err(_) => return Err(PushError::Timeout { method, url }),
            Ok(b) => b
                .map_err(|source| PushError::Body {
                    method,
                    url: url.clone(),
                    source,
                })?
                .to_bytes(),
        };
        if !want.contains(&status) {
            let mut text = String::from_utf8_lossy(&body).trim().to_string();
            text.truncate(512);
            return Err(PushError::Status {
                method,
                url,
                status,
                body: text,
            });
        }
        Ok(Answer { status, location })
    }

    async fn put_blob(&self, blob: &Blob) -> Result<(), PushError> {
        let digest = blob.digest();
        let head = format!("{}/v2/{}/blobs/{digest}", self.base, self.repo);
        if self
            .call("HEAD", head, None, vec![], &[200, 404])
            .await?
            .status
            == 200
        {
            return Ok(());
        }
        let post = format!("{}/v2/{}/blobs/uploads/", self.base, self.repo);
        let a = self
            .call("POST", post.clone(), None, vec![], &[202])
            .await?;
        let loc = a
            .location
            .ok_or(PushError::Location { url: post.clone() })?;
        // Location may be relative to the registry (distribution does both).
        let loc = if loc.starts_with('/') {
            format!("{}{loc}", self.base)
        } else {
            loc
        };
        let mut put = url::Url::parse(&loc).map_err(|_| PushError::Location { url: post })?;
        put.query_pairs_mut().append_pair("digest", &digest);
        self.call(
            "PUT",
            put.to_string(),
            Some("application/octet-stream"),
            blob.bytes.clone(),
            &[201],
        )
        .await?;
        Ok(())
    }

    async fn put_manifest(&self, m: &Blob) -> Result<(), PushError> {
        let url = format!("{}/v2/{}/manifests/{}", self.base, self.repo, m.digest());
        self.call("PUT", url, Some(m.media_type), m.bytes.clone(), &[201])
            .await?;
        Ok(())
    }
}

/// Push the canary; its reference by digest, `NAME/REPO@sha256:…`.
pub async fn push(args: &PushArgs) -> Result<String, PushError> {
    let auth = authority(&args.upstream)?;
    validate_repo(&args.repo)?;
    let reg = Registry {
        client: client(&args.ca_file)?,
        base: format!("https://{auth}"),
        repo: args.repo.clone(),
    };
    let image = build();
    for b in &image.blobs {
        reg.put_blob(b).await?;
    }
    for m in &image.manifests {
        reg.put_manifest(m).await?;
    }
    let name = args.name_as.clone().unwrap_or(auth);
    Ok(format!("{name}/{}@{}", args.repo, image.index().digest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_give_the_same_digest() {
        let (a, b) = (build(), build());
        assert_eq!(a, b);
        assert_eq!(a.index().digest(), b.index().digest());
    }

    /// The layer, checked field by field against the ustar layout.
    #[test]
    fn the_layer_is_a_fixed_ustar_archive() {
        let t = layer_tar();
        // Header, one data block (48 bytes of body), two end blocks.
        assert_eq!(FILE_BODY.len(), 48);
        assert_eq!(t.len(), 512 * 4);
        assert_eq!(&t[0..14], b"slipway-canary");
        assert_eq!(&t[124..136], b"00000000060\0"); // 48 in octal
        assert_eq!(&t[136..148], b"00000000000\0"); // mtime 0
        assert_eq!(&t[257..263], b"ustar\0");
        let mut h = t[..512].to_vec();
        let stored = std::str::from_utf8(&h[148..154]).unwrap().to_string();
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_str_radix(&stored, 8).unwrap(), sum);
        assert_eq!(&t[512..560], FILE_BODY);
        assert!(t[560..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_index_names_a_manifest_per_platform_and_each_names_its_blobs() {
        // Field order as written, whatever serde_json's features.
        let img0 = build();
        let text = String::from_utf8(img0.index().bytes.clone()).unwrap();
        assert!(
            text.starts_with("{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:"),
            "{text}"
        );
        let img = build();
        let layer = &img.blobs[0];
        let index: serde_json::Value = serde_json::from_slice(&img.index().bytes).unwrap();
        let entries = index["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        for (i, (entry, arch)) in entries.iter().zip(["amd64", "arm64"]).enumerate() {
            let m = &img.manifests[i];
            assert_eq!(entry["digest"], m.digest());
            assert_eq!(entry["size"], m.bytes.len());
            assert_eq!(entry["platform"]["architecture"], arch);
            let mv: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
            let config = &img.blobs[1 + i];
            assert_eq!(mv["config"]["digest"], config.digest());
            assert_eq!(mv["layers"][0]["digest"], layer.digest());
            let cv: serde_json::Value = serde_json::from_slice(&config.bytes).unwrap();
            // Uncompressed layer: its diff_id is its digest.
            assert_eq!(cv["rootfs"]["diff_ids"][0], layer.digest());
            assert_eq!(cv["created"], "1970-01-01T00:00:00Z");
            assert_eq!(cv["architecture"], arch);
        }
    }

    #[test]
    fn bad_input_is_named_and_exits_64() {
        use crate::ExitStatus;
        let e = authority("http://r:5000").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--upstream \"http://r:5000\": must use https"
        );
        assert_eq!(e.exit_code(), 64);
        assert_eq!(authority("https://r:5000").unwrap(), "r:5000");
        assert!(validate_repo("slipway/canary").is_ok());
        for r in ["Slipway/canary", "slipway//canary", "", "-x"] {
            assert_eq!(validate_repo(r).unwrap_err().exit_code(), 64, "{r}");
        }
    }
}
