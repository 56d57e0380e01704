//! The write guard's decision, pure: method, path and the `Authorization`
//! header in, a [`Verdict`] out.
//!
//! One read is guarded too: the API version check `GET /v2/`. Clients
//! decide from that ping whether to send credentials at all:
//! go-containerregistry (Kaniko) takes a `200` to mean "anonymous" and then
//! never answers a later `401` on the upload, and containers/image (skopeo)
//! only sends Basic credentials for a challenge it saw there. distribution's
//! own htpasswd auth answers the ping with `401` and a Basic challenge;
//! so does the gateway, and with the right credentials it relays the ping
//! (which is how `docker login` checks a password). Every other read passes. No I/O; the bcrypt check itself is the
//! shell's ([`super::htpasswd::Verifier`]).
//!
//! #10: the registry took a push from anyone who could reach it, and
//! Kaniko trusts a `cache/<app>` layer by its key, so one anonymous write
//! poisoned every later build. Reads stay open because nodes and the agent
//! pull without credentials.

use base64::Engine as _;
use http::Method;

/// A request's method class, as a metric label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum MethodClass {
    /// `GET` and `HEAD`: the pull API.
    Read,
    /// Every other method, on any path.
    Write,
}

impl MethodClass {
    pub const ALL: [MethodClass; 2] = [MethodClass::Read, MethodClass::Write];

    pub fn of(method: &Method) -> MethodClass {
        if method == Method::GET || method == Method::HEAD {
            MethodClass::Read
        } else {
            MethodClass::Write
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MethodClass::Read => "read",
            MethodClass::Write => "write",
        }
    }
}

/// What the guard made of a request, as a metric label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed to the upstream.
    Allowed,
    /// A write without (usable) credentials: `401`.
    Unauthenticated,
    /// A write whose credentials match no htpasswd entry: `401` too, as
    /// distribution's htpasswd auth answers, but counted apart.
    Denied,
    /// A write whose credentials could not be checked because too many
    /// checks were waiting: `503` with `Retry-After` (#18 point 7).
    Busy,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Allowed,
        Outcome::Unauthenticated,
        Outcome::Denied,
        Outcome::Busy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Denied => "denied",
            Outcome::Busy => "busy",
        }
    }
}

/// HTTP Basic credentials from a request. `Debug` hides the password so
/// that no log line can carry it (#10).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The guard's first look at a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A pull: relay without looking at credentials.
    Pass,
    /// Basic credentials on a guarded request: allowed if they verify.
    Check(Credentials),
    /// A guarded request with no, or unparseable, credentials.
    Unauthenticated,
}

/// Whether `path` is the API version check, `/v2/` (or `/v2`).
pub fn is_ping(path: &str) -> bool {
    path == "/v2/" || path == "/v2"
}

/// Decide what a request needs. `authorization` is the raw header value.
pub fn decide(method: &Method, path: &str, authorization: Option<&[u8]>) -> Verdict {
    if MethodClass::of(method) == MethodClass::Read && !is_ping(path) {
        return Verdict::Pass;
    }
    match authorization.and_then(parse_basic) {
        Some(c) => Verdict::Check(c),
        None => Verdict::Unauthenticated,
    }
}

/// `Basic base64(user:password)` (RFC 7617); the scheme is
/// case-insensitive. `None` for any other scheme or a malformed value.
pub fn parse_basic(value: &[u8]) -> Option<Credentials> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    Some(Credentials {
        user: user.to_string(),
        password: password.to_string(),
    })
}

/// The challenge every refused write gets; docker, containerd, skopeo and
/// Kaniko answer it by retrying with their configured Basic credentials.
pub const CHALLENGE: &str = "Basic realm=\"slipway-registry\"";

/// The registry-style JSON body of a refused write (distribution's
/// `UNAUTHORIZED` error code, so clients print a familiar message).
pub fn unauthorized_body(outcome: Outcome) -> String {
    let message = match outcome {
        Outcome::Denied => "authentication required: the credentials match no push account",
        _ => "authentication required: writes to this registry need push credentials (pulls need none)",
    };
    serde_json::json!({
        "errors": [{"code": "UNAUTHORIZED", "message": message, "detail": null}]
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
        .into_bytes()
    }

    #[test]
    fn reads_pass_without_credentials() {
        for path in [
            "/v2/app/manifests/v1",
            "/v2/app/blobs/sha256:00",
            "/v2/_catalog",
        ] {
            assert_eq!(decide(&Method::GET, path, None), Verdict::Pass);
            assert_eq!(decide(&Method::HEAD, path, None), Verdict::Pass);
            // Credentials on a pull are ignored, not checked (containers/image
            // sends `Basic Og==`, empty ones, when it has none).
            assert_eq!(
                decide(&Method::GET, path, Some(b"Basic Og==")),
                Verdict::Pass
            );
        }
    }

    #[test]
    fn the_ping_challenges_so_clients_send_credentials() {
        assert_eq!(decide(&Method::GET, "/v2/", None), Verdict::Unauthenticated);
        assert_eq!(
            decide(&Method::GET, "/v2", Some(b"Basic Og==")),
            Verdict::Unauthenticated
        );
        assert!(matches!(
            decide(&Method::GET, "/v2/", Some(&basic("push:pw"))),
            Verdict::Check(_)
        ));
    }

    #[test]
    fn every_other_method_needs_credentials() {
        for m in [
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
            Method::from_bytes(b"PROPFIND").unwrap(),
        ] {
            let path = "/v2/app/blobs/uploads/";
            assert_eq!(decide(&m, path, None), Verdict::Unauthenticated, "{m}");
            assert_eq!(
                decide(&m, "/anything", Some(b"Bearer abc")),
                Verdict::Unauthenticated,
                "{m}"
            );
            assert_eq!(
                decide(&m, path, Some(&basic("push:s3cret"))),
                Verdict::Check(Credentials {
                    user: "push".into(),
                    password: "s3cret".into()
                }),
                "{m}"
            );
        }
    }

    #[test]
    fn basic_parsing() {
        assert_eq!(
            parse_basic(&basic("u:p:with:colons")).map(|c| c.password),
            Some("p:with:colons".into())
        );
        assert!(
            parse_basic(b"basic dTpw").is_some(),
            "scheme is case-insensitive"
        );
        assert_eq!(parse_basic(&basic(":nouser")), None);
        assert_eq!(parse_basic(&basic("nocolon")), None);
        assert_eq!(parse_basic(b"Basic not-base64!"), None);
        assert_eq!(parse_basic(b"Basic"), None);
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = parse_basic(&basic("push:hunter2")).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn refusal_body_is_registry_style() {
        let v: serde_json::Value =
            serde_json::from_str(&unauthorized_body(Outcome::Unauthenticated)).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAUTHORIZED");
    }
}
