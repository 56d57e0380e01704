//! Which upstream redirects the proxy follows (#13).
//!
//! Owns the redirect policy: by default a redirect is followed only to the
//! upstream's own origin (scheme, host and port). Other hosts must be listed
//! in `proxy.redirect_hosts`, by name, by `*.suffix`, or, for an IP literal,
//! by that literal: a suffix never matches an address. Only `https` is
//! followed. Without this, a 307 from a compromised or misconfigured
//! registry made every node fetch from any internal HTTPS service and hand
//! the body to containerd as the blob.

use std::net::IpAddr;
use std::path::PathBuf;

/// One entry of `proxy.redirect_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// A host name, lowercase, without a trailing dot.
    Name(String),
    /// `*.suffix`: any name ending in `.suffix` (not `suffix` itself).
    Suffix(String),
    /// An IP literal, listed as such.
    Ip(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{0:?} is empty")]
    Empty(String),
    #[error("{0:?} is not a host name, a *.suffix pattern or an IP address (no scheme, port, path or other wildcard)")]
    Malformed(String),
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl HostPattern {
    pub fn parse(raw: &str) -> Result<HostPattern, PatternError> {
        let s = raw.trim().to_ascii_lowercase();
        let s = s.trim_end_matches('.');
        if s.is_empty() {
            return Err(PatternError::Empty(raw.into()));
        }
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(HostPattern::Ip(ip));
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            if is_dns_name(suffix) {
                return Ok(HostPattern::Suffix(suffix.into()));
            }
        } else if is_dns_name(s) && !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Ok(HostPattern::Name(s.into()));
        }
        Err(PatternError::Malformed(raw.into()))
    }

    fn matches(&self, host: &url::Host<&str>) -> bool {
        match (self, host) {
            (HostPattern::Name(n), url::Host::Domain(d)) => n == d.trim_end_matches('.'),
            (HostPattern::Suffix(s), url::Host::Domain(d)) => d
                .trim_end_matches('.')
                .strip_suffix(s.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
            (HostPattern::Ip(ip), url::Host::Ipv4(a)) => *ip == IpAddr::V4(*a),
            (HostPattern::Ip(ip), url::Host::Ipv6(a)) => *ip == IpAddr::V6(*a),
            _ => false,
        }
    }
}

/// `proxy.redirect_hosts` and the trust for them (`proxy.redirect_ca_file`,
/// else the system roots).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedirectPolicy {
    pub hosts: Vec<HostPattern>,
    pub ca_file: Option<PathBuf>,
}

/// A scheme, host and port: what credentials and trust are bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    pub fn of(u: &url::Url) -> Origin {
        Origin {
            scheme: u.scheme().to_string(),
            host: u
                .host_str()
                .unwrap_or_default()
                .trim_end_matches('.')
                .to_string(),
            port: u.port_or_known_default(),
        }
    }
}

/// Where a redirect leads, when it may be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub url: url::Url,
    /// The upstream's own origin: same client, same credentials.
    pub same_origin: bool,
}

/// Why a redirect is not followed. Messages name the origin only: a
/// presigned object-storage URL carries credentials in its query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("upstream sent an unusable Location")]
    Malformed,
    #[error("upstream redirected to {0}, which is not https")]
    NotHttps(String),
    #[error("upstream redirected to {0}, an IP address not listed in proxy.redirect_hosts")]
    IpLiteral(String),
    #[error("upstream redirected to {0}, which is not listed in proxy.redirect_hosts")]
    NotListed(String),
}

impl RedirectPolicy {
    /// Decide on `location`, relative to the URL that answered with it.
    /// `upstream` are the origins that count as the upstream's own.
    pub fn next_hop(
        &self,
        upstream: &[Origin],
        current: &url::Url,
        location: &str,
    ) -> Result<Hop, Refused> {
        let url = current.join(location).map_err(|_| Refused::Malformed)?;
        let host = url.host().ok_or(Refused::Malformed)?;
        let shown = match url.port() {
            Some(p) => format!("{}://{host}:{p}", url.scheme()),
            None => format!("{}://{host}", url.scheme()),
        };
        if url.scheme() != "https" {
            return Err(Refused::NotHttps(shown));
        }
        if upstream.contains(&Origin::of(&url)) {
            return Ok(Hop {
                url,
                same_origin: true,
            });
        }
        if self.hosts.iter().any(|p| p.matches(&host)) {
            return Ok(Hop {
                url,
                same_origin: false,
            });
        }
        Err(match host {
            url::Host::Domain(_) => Refused::NotListed(shown),
            _ => Refused::IpLiteral(shown),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str]) -> RedirectPolicy {
        RedirectPolicy {
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            ca_file: None,
        }
    }

    fn hop(p: &RedirectPolicy, loc: &str) -> Result<bool, Refused> {
        let up = url::Url::parse("https://registry.svc:5000/v2/a/blobs/x").unwrap();
        p.next_hop(&[Origin::of(&up)], &up, loc)
            .map(|h| h.same_origin)
    }

    #[test]
    fn patterns_parse_and_refuse_what_they_are_not() {
        assert_eq!(
            HostPattern::parse("S3.Example.COM."),
            Ok(HostPattern::Name("s3.example.com".into()))
        );
        assert_eq!(
            HostPattern::parse("*.s3.amazonaws.com"),
            Ok(HostPattern::Suffix("s3.amazonaws.com".into()))
        );
        assert_eq!(
            HostPattern::parse("[::1]"),
            Ok(HostPattern::Ip("::1".parse().unwrap()))
        );
        for bad in [
            "https://s3.example.com",
            "s3.example.com:443",
            "*",
            "*.",
            "a.*.com",
            "s3/x",
            "-a.com",
            "10.0.0",
        ] {
            assert!(
                matches!(HostPattern::parse(bad), Err(PatternError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            HostPattern::parse(" "),
            Err(PatternError::Empty(_))
        ));
    }

    #[test]
    fn default_follows_only_the_upstream_origin() {
        let p = RedirectPolicy::default();
        assert_eq!(hop(&p, "/v2/a/blobs/y?sig=1"), Ok(true));
        assert_eq!(hop(&p, "https://REGISTRY.svc:5000/x"), Ok(true));
        // Another port is another origin.
        assert_eq!(
            hop(&p, "https://registry.svc:5001/x"),
            Err(Refused::NotListed("https://registry.svc:5001".into()))
        );
        assert_eq!(
            hop(&p, "https://registry.svc/x"),
            Err(Refused::NotListed("https://registry.svc".into()))
        );
        assert_eq!(
            hop(&p, "http://registry.svc:5000/x"),
            Err(Refused::NotHttps("http://registry.svc:5000".into()))
        );
        assert!(matches!(
            hop(&p, "https://10.0.0.1/x"),
            Err(Refused::IpLiteral(_))
        ));
        // WHATWG host parsing turns other spellings of an address into one.
        assert!(matches!(
            hop(&p, "https://0x7f.1/x"),
            Err(Refused::IpLiteral(_))
        ));
    }

    #[test]
    fn listed_hosts_suffixes_and_literals() {
        let p = policy(&["storage.example", "*.s3.amazonaws.com", "127.0.0.1"]);
        assert_eq!(
            hop(&p, "https://storage.example/b?X-Amz-Signature=s"),
            Ok(false)
        );
        assert_eq!(hop(&p, "https://bucket.s3.amazonaws.com/b"), Ok(false));
        assert_eq!(hop(&p, "https://a.b.s3.amazonaws.com:8443/b"), Ok(false));
        assert!(hop(&p, "https://s3.amazonaws.com/b").is_err());
        assert!(hop(&p, "https://evils3.amazonaws.com/b").is_err());
        assert!(hop(&p, "https://sub.storage.example/b").is_err());
        assert_eq!(hop(&p, "https://127.0.0.1:9/b"), Ok(false));
        assert_eq!(hop(&p, "https://0x7f.0.0.1:9/b"), Ok(false));
        assert!(matches!(
            hop(&p, "https://127.0.0.2/b"),
            Err(Refused::IpLiteral(_))
        ));
        // A suffix never matches an address.
        let p = policy(&["*.0.0.1"]);
        assert!(hop(&p, "https://127.0.0.1/b").is_err());
    }
}
