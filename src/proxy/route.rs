//! Pure classification of a request to the pull-through proxy.
//!
//! Owns the allow-list: `GET`/`HEAD` on `/v2/`, `/v2/<name>/manifests/<ref>`
//! and `/v2/<name>/blobs/<digest>`, with names, tags and digests checked
//! against the distribution spec grammar before anything is forwarded.
//! Everything else gets a registry-style error and causes no upstream call.

use std::sync::OnceLock;

use regex::Regex;

use crate::admin::metrics::RouteLabel;

/// A request the proxy may forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check (and auth challenge).
    Base,
    Manifest {
        name: String,
        reference: Reference,
    },
    Blob {
        name: String,
        digest: Digest,
    },
}

impl Route {
    /// The metrics label: a closed set, never text from the request (#13).
    pub fn class(&self) -> RouteLabel {
        match self {
            Route::Base => RouteLabel::Base,
            Route::Manifest {
                reference: Reference::Tag(_),
                ..
            } => RouteLabel::ManifestTag,
            Route::Manifest { .. } => RouteLabel::ManifestDigest,
            Route::Blob { .. } => RouteLabel::Blob,
        }
    }

    /// The same request for the repository under `prefix` (#20: a mirrored
    /// upstream's `library/alpine` is `mirror/docker.io/library/alpine` in
    /// the in-cluster registry).
    pub fn under(self, prefix: &str) -> Route {
        match self {
            Route::Base => Route::Base,
            Route::Manifest { name, reference } => Route::Manifest {
                name: format!("{prefix}/{name}"),
                reference,
            },
            Route::Blob { name, digest } => Route::Blob {
                name: format!("{prefix}/{name}"),
                digest,
            },
        }
    }

    /// The path sent upstream; rebuilt from validated parts, never copied.
    pub fn upstream_path(&self) -> String {
        match self {
            Route::Base => "/v2/".into(),
            Route::Manifest { name, reference } => format!("/v2/{name}/manifests/{reference}"),
            Route::Blob { name, digest } => format!("/v2/{name}/blobs/{digest}"),
        }
    }

    /// The content address, when the response is immutable and cacheable.
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            Route::Manifest {
                reference: Reference::Digest(d),
                ..
            }
            | Route::Blob { digest: d, .. } => Some(d),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// `algorithm:hex`, with sha256 (64 hex) or sha512 (128 hex).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    pub algorithm: &'static str,
    pub hex: String,
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl Digest {
    pub fn parse(s: &str) -> Option<Digest> {
        let (alg, hex) = s.split_once(':')?;
        let (algorithm, len) = match alg {
            "sha256" => ("sha256", 64),
            "sha512" => ("sha512", 128),
            _ => return None,
        };
        if hex.len() != len
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        Some(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

/// A refusal, rendered as the distribution API's error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn body(&self) -> String {
        serde_json::json!({
            "errors": [{"code": self.code, "message": self.message, "detail": null}]
        })
        .to_string()
    }
}

fn name_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // distribution/reference: path-component ( "/" path-component )*
    RE.get_or_init(|| {
        Regex::new(
            r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$",
        )
        .unwrap()
    })
}

fn tag_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$").unwrap())
}

/// Classify one request. `ns` is the `?ns=` query value containerd adds
/// when it talks to a mirror; `aliases` are the registry names we serve.
pub fn classify(
    method: &str,
    path: &str,
    ns: Option<&str>,
    aliases: &[String],
) -> Result<Route, Refusal> {
    if method != "GET" && method != "HEAD" {
        return Err(Refusal::new(
            405,
            "UNSUPPORTED",
            format!("{method} is not served: this is a read-only pull-through proxy"),
        ));
    }
    if let Some(ns) = ns {
        if !aliases.iter().any(|a| a == ns) {
            return Err(Refusal::new(
                403,
                "DENIED",
                format!("registry {ns:?} is not served by this proxy"),
            ));
        }
    }
    if path == "/v2/" || path == "/v2" {
        return Ok(Route::Base);
    }
    let rest = path
        .strip_prefix("/v2/")
        .ok_or_else(|| Refusal::new(404, "NOT_FOUND", "only /v2/ registry paths are served"))?;
    // The last two segments are the kind and the reference; what precedes
    // them is the repository name (which may itself contain "blobs").
    let mut parts = rest.rsplitn(3, '/');
    let (reference, kind, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(r), Some(k), Some(n)) => (r, k, n),
        _ => return Err(Refusal::new(404, "NOT_FOUND", "unknown registry API path")),
    };
    if kind != "manifests" && kind != "blobs" {
        return Err(Refusal::new(404, "NOT_FOUND", "unknown registry API path"));
    }
    if name.len() > 255 || !name_re().is_match(name) {
        return Err(Refusal::new(400, "NAME_INVALID", "invalid repository name"));
    }
    if kind == "blobs" {
        let digest = Digest::parse(reference)
            .ok_or_else(|| Refusal::new(400, "DIGEST_INVALID", "invalid digest"))?;
        return Ok(Route::Blob {
            name: name.into(),
            digest,
        });
    }
    let reference = if reference.contains(':') {
        Reference::Digest(
            Digest::parse(reference)
                .ok_or_else(|| Refusal::new(400, "DIGEST_INVALID", "invalid digest"))?,
        )
    } else if tag_re().is_match(reference) {
        Reference::Tag(reference.into())
    } else {
        return Err(Refusal::new(400, "TAG_INVALID", "invalid tag"));
    };
    Ok(Route::Manifest {
        name: name.into(),
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn a() -> Vec<String> {
        vec!["registry.shared-services:5000".into()]
    }

    #[test]
    fn allowed_routes() {
        assert_eq!(classify("GET", "/v2/", None, &a()), Ok(Route::Base));
        let r = classify(
            "HEAD",
            "/v2/team/app/manifests/v1.2",
            Some("registry.shared-services:5000"),
            &a(),
        )
        .unwrap();
        assert_eq!(r.class(), RouteLabel::ManifestTag);
        assert_eq!(r.upstream_path(), "/v2/team/app/manifests/v1.2");
        let r = classify("GET", &format!("/v2/app/blobs/{D}"), None, &a()).unwrap();
        assert_eq!(r.digest().unwrap().to_string(), D);
        // A repository may be called "blobs".
        let r = classify("GET", &format!("/v2/x/blobs/manifests/{D}"), None, &a()).unwrap();
        assert!(matches!(r, Route::Manifest { ref name, .. } if name == "x/blobs"));
    }

    #[test]
    fn refusals() {
        for (m, p, ns, status, code) in [
            ("PUT", "/v2/app/manifests/v1", None, 405, "UNSUPPORTED"),
            ("POST", "/v2/app/blobs/uploads/", None, 405, "UNSUPPORTED"),
            ("DELETE", "/v2/app/manifests/v1", None, 405, "UNSUPPORTED"),
            (
                "GET",
                "/v2/../etc/passwd/blobs/x",
                None,
                400,
                "NAME_INVALID",
            ),
            (
                "GET",
                "/v2/app/%2e%2e/manifests/v1",
                None,
                400,
                "NAME_INVALID",
            ),
            ("GET", "/v2/App/manifests/v1", None, 400, "NAME_INVALID"),
            (
                "GET",
                "/v2/app/blobs/sha256:xyz",
                None,
                400,
                "DIGEST_INVALID",
            ),
            ("GET", "/v2/app/manifests/-bad", None, 400, "TAG_INVALID"),
            ("GET", "/v2/_catalog", None, 404, "NOT_FOUND"),
            ("GET", "/v2/app/tags/list", None, 404, "NOT_FOUND"),
            ("GET", "/etc/passwd", None, 404, "NOT_FOUND"),
            ("GET", "/v2/", Some("evil.example:443"), 403, "DENIED"),
        ] {
            let e = classify(m, p, ns, &a()).unwrap_err();
            assert_eq!((e.status, e.code), (status, code), "{m} {p}");
            assert!(e.body().starts_with("{\"errors\":[{"), "{}", e.body());
        }
    }
}
