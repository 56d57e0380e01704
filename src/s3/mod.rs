//! The S3 API, pure: what `slipway gc` needs to read and prune a registry
//! whose storage is an S3-compatible bucket (#22), without an SDK.
//!
//! - [`sign`]: AWS Signature Version 4 for one request (the `Authorization`
//!   value), checked against the examples of the S3 API reference.
//! - [`parse_list`]: a `ListObjectsV2` answer (`ListBucketResult` XML) into
//!   keys with size and time, common prefixes, and the continuation token.
//! - [`parse_http_date`]: `Last-Modified` of a `HEAD`.
//! - [`parse_credentials`]: an AWS shared credentials file (the one
//!   distribution's s3 driver reads through `AWS_SHARED_CREDENTIALS_FILE`).
//! - [`bucket`]: the async shell that sends these requests.
//!
//! Nothing here does I/O. Errors name what was malformed.

pub mod bucket;

use ring::hmac;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum S3Error {
    #[error("the store's list answer is not a ListBucketResult: {0}")]
    NotAList(String),
    #[error("the store's list answer has a malformed {what}: {value:?}")]
    Malformed { what: &'static str, value: String },
    #[error("the store's date {0:?} is not an HTTP date")]
    Date(String),
    #[error("credentials file: {0}")]
    Credentials(String),
}

/// The hex SHA-256 of an empty payload, which every body-less request
/// signs.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The credentials and the region requests are signed for.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

impl std::fmt::Debug for Credentials {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("region", &self.region)
            .finish()
    }
}

/// One request to sign. `path` is the decoded path (`/bucket/key`), `query`
/// the decoded parameters, `headers` every header to sign (`host` and
/// `x-amz-content-sha256` included; `x-amz-date` is added).
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    pub headers: &'a [(&'a str, &'a str)],
    pub payload_sha256: &'a str,
}

/// `x-amz-date` for `now`: `YYYYMMDDTHHMMSSZ`.
pub fn amz_date(now: OffsetDateTime) -> String {
    let t = now.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// RFC 3986 encoding as SigV4 wants it: everything but `A-Za-z0-9-._~`,
/// and `/` too unless `keep_slash`.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The canonical query string: parameters encoded, sorted by name then
/// value, `a=b` joined by `&`.
pub fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    q.sort();
    q.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// The `Authorization` header value for `req` at `now`, and the
/// `x-amz-date` value that must go with it.
pub fn sign(req: &Request, creds: &Credentials, now: OffsetDateTime) -> (String, String) {
    let date_time = amz_date(now);
    let date = &date_time[..8];
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    headers.push(("x-amz-date".into(), date_time.clone()));
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canonical = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed}\n{}",
        req.method,
        uri_encode(req.path, true),
        canonical_query(req.query),
        req.payload_sha256
    );
    let scope = format!("{date}/{}/s3/aws4_request", creds.region);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k = hmac_sha256(
        format!("AWS4{}", creds.secret_key).as_bytes(),
        date.as_bytes(),
    );
    let k = hmac_sha256(&k, creds.region.as_bytes());
    let k = hmac_sha256(&k, b"s3");
    let k = hmac_sha256(&k, b"aws4_request");
    let signature = hex::encode(hmac_sha256(&k, to_sign.as_bytes()));
    (
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope},SignedHeaders={signed},Signature={signature}",
            creds.access_key
        ),
        date_time,
    )
}

/// One object of a list answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
    /// `LastModified`, Unix seconds.
    pub modified: u64,
}

/// A `ListObjectsV2` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<Object>,
    /// `CommonPrefixes` (with a delimiter): the "directories".
    pub prefixes: Vec<String>,
    /// Set when the answer is truncated: ask again with it.
    pub next: Option<String>,
}

/// The text of each `<tag>…</tag>` in `xml`, in order (not nested in
/// itself, as S3's elements never are).
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

fn unescape(s: &str) -> Result<String, S3Error> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(j) = after.find(';') else {
            return Err(S3Error::Malformed {
                what: "entity",
                value: s.into(),
            });
        };
        let entity = &after[..j];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match c {
            Some(c) => out.push(c),
            None => {
                return Err(S3Error::Malformed {
                    what: "entity",
                    value: entity.into(),
                })
            }
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn one<'a>(xml: &'a str, tag: &'static str) -> Option<&'a str> {
    elements(xml, tag).into_iter().next()
}

/// A `ListObjectsV2` answer body.
pub fn parse_list(xml: &str) -> Result<Listing, S3Error> {
    if !xml.contains("<ListBucketResult") {
        let head: String = xml.chars().take(200).collect();
        return Err(S3Error::NotAList(head));
    }
    let mut listing = Listing::default();
    for c in elements(xml, "Contents") {
        let key = unescape(one(c, "Key").ok_or(S3Error::Malformed {
            what: "Contents (no Key)",
            value: c.into(),
        })?)?;
        let size = one(c, "Size")
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| S3Error::Malformed {
                what: "Size",
                value: c.into(),
            })?;
        let modified = one(c, "LastModified")
            .map(str::trim)
            .ok_or_else(|| S3Error::Malformed {
                what: "LastModified",
                value: c.into(),
            })?;
        let modified =
            OffsetDateTime::parse(modified, &time::format_description::well_known::Rfc3339)
                .map_err(|_| S3Error::Malformed {
                    what: "LastModified",
                    value: modified.into(),
                })?;
        listing.objects.push(Object {
            key,
            size,
            modified: modified.unix_timestamp().max(0) as u64,
        });
    }
    for p in elements(xml, "CommonPrefixes") {
        if let Some(prefix) = one(p, "Prefix") {
            listing.prefixes.push(unescape(prefix)?);
        }
    }
    if one(xml, "IsTruncated").map(str::trim) == Some("true") {
        let next = one(xml, "NextContinuationToken").ok_or(S3Error::Malformed {
            what: "truncated answer (no NextContinuationToken)",
            value: String::new(),
        })?;
        listing.next = Some(unescape(next)?);
    }
    Ok(listing)
}

/// An HTTP date (`Last-Modified: Wed, 12 Oct 2009 17:50:00 GMT`) as Unix
/// seconds.
pub fn parse_http_date(s: &str) -> Result<u64, S3Error> {
    httpdate::parse_http_date(s.trim())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .ok_or_else(|| S3Error::Date(s.into()))
}

/// The access and secret key of `profile` in an AWS shared credentials
/// file (INI: `[profile]`, then `aws_access_key_id = …` and
/// `aws_secret_access_key = …`). Errors never quote a value.
pub fn parse_credentials(text: &str, profile: &str) -> Result<(String, String), S3Error> {
    let (mut section, mut access, mut secret) = (None::<String>, None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(S3Error::Credentials(format!(
                "line {} is neither [profile] nor key = value",
                n + 1
            )));
        };
        if section.as_deref() != Some(profile) {
            continue;
        }
        match k.trim() {
            "aws_access_key_id" => access = Some(v.trim().to_string()),
            "aws_secret_access_key" => secret = Some(v.trim().to_string()),
            _ => {}
        }
    }
    match (access, secret) {
        (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => Ok((a, s)),
        _ => Err(S3Error::Credentials(format!(
            "profile [{profile}] has no aws_access_key_id and aws_secret_access_key"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_creds() -> Credentials {
        // The S3 API reference's example account (sig-v4-header-based-auth).
        Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            region: "us-east-1".into(),
        }
    }

    fn may_24_2013() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_369_353_600).unwrap()
    }

    /// The reference's "GET Object" example: a ranged GET of test.txt.
    #[test]
    fn signs_the_reference_get_object_example() {
        let (auth, date) = sign(
            &Request {
                method: "GET",
                path: "/test.txt",
                query: &[],
                headers: &[
                    ("Host", "examplebucket.s3.amazonaws.com"),
                    ("Range", "bytes=0-9"),
                    ("x-amz-content-sha256", EMPTY_SHA256),
                ],
                payload_sha256: EMPTY_SHA256,
            },
            &example_creds(),
            may_24_2013(),
        );
        assert_eq!(date, "20130524T000000Z");
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,\
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The reference's "GET Bucket (List Objects)" example.
    #[test]
    fn signs_the_reference_list_objects_example() {
        let (auth, _) = sign(
            &Request {
                method: "GET",
                path: "/",
                query: &[("max-keys", "2"), ("prefix", "J")],
                headers: &[
                    ("Host", "examplebucket.s3.amazonaws.com"),
                    ("x-amz-content-sha256", EMPTY_SHA256),
                ],
                payload_sha256: EMPTY_SHA256,
            },
            &example_creds(),
            may_24_2013(),
        );
        assert!(
            auth.ends_with(
                "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
            ),
            "{auth}"
        );
    }

    #[test]
    fn encodes_as_sigv4_wants() {
        assert_eq!(uri_encode("/a b/$c~.-_", true), "/a%20b/%24c~.-_");
        assert_eq!(
            uri_encode("docker/registry/", false),
            "docker%2Fregistry%2F"
        );
        assert_eq!(
            canonical_query(&[("prefix", "a/b"), ("list-type", "2"), ("delimiter", "/")]),
            "delimiter=%2F&list-type=2&prefix=a%2Fb"
        );
    }

    #[test]
    fn parses_a_list_answer() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>registry</Name><Prefix>docker/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
  <Delimiter>/</Delimiter><IsTruncated>true</IsTruncated>
  <NextContinuationToken>1ue&amp;Gr</NextContinuationToken>
  <Contents><Key>docker/a&amp;b</Key><LastModified>2009-10-12T17:50:30.000Z</LastModified>
    <ETag>"fba9dede5f27731c9771645a39863328"</ETag><Size>434234</Size><StorageClass>STANDARD</StorageClass></Contents>
  <CommonPrefixes><Prefix>docker/registry/</Prefix></CommonPrefixes>
</ListBucketResult>"#;
        let l = parse_list(xml).unwrap();
        assert_eq!(
            l.objects,
            [Object {
                key: "docker/a&b".into(),
                size: 434_234,
                modified: 1_255_369_830,
            }]
        );
        assert_eq!(l.prefixes, ["docker/registry/"]);
        assert_eq!(l.next.as_deref(), Some("1ue&Gr"));
        let done =
            parse_list("<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>")
                .unwrap();
        assert_eq!(done, Listing::default());
    }

    #[test]
    fn refuses_what_is_not_a_list() {
        let e = parse_list("<Error><Code>NoSuchBucket</Code></Error>").unwrap_err();
        assert!(e.to_string().contains("NoSuchBucket"), "{e}");
        let e = parse_list(
            "<ListBucketResult><Contents><Key>k</Key><Size>x</Size></Contents></ListBucketResult>",
        )
        .unwrap_err();
        assert!(matches!(e, S3Error::Malformed { what: "Size", .. }), "{e}");
        let e = parse_list("<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>")
            .unwrap_err();
        assert!(e.to_string().contains("NextContinuationToken"), "{e}");
    }

    #[test]
    fn parses_http_dates() {
        assert_eq!(
            parse_http_date("Mon, 12 Oct 2009 17:50:30 GMT").unwrap(),
            1_255_369_830
        );
        assert!(parse_http_date("yesterday").is_err());
    }

    #[test]
    fn the_shared_credentials_file_is_read_by_profile() {
        let text = "# keys\n[other]\naws_access_key_id = X\n\n[default]\n aws_access_key_id=AK \naws_secret_access_key = S/K=\n";
        assert_eq!(
            parse_credentials(text, "default").unwrap(),
            ("AK".to_string(), "S/K=".to_string())
        );
        let e = parse_credentials(text, "other").unwrap_err().to_string();
        assert!(e.contains("profile [other]"), "{e}");
        assert!(!e.contains('X'), "never quotes a value: {e}");
        let e = parse_credentials("[default]\nsecret\n", "default")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
