//! One S3 bucket over HTTP(S), path-style (`<endpoint>/<bucket>/<key>`),
//! every request signed with [`super::sign`]: the few calls that
//! `slipway gc` and the gateways' shared write fence need on a registry
//! whose storage is a bucket (#22): a paged list, `HEAD`, a bounded `GET`,
//! `PUT` and `DELETE`.
//!
//! Keys are full keys; [`Bucket::key`] puts distribution's
//! `rootdirectory` in front of a relative one. The keys come from the
//! shared credentials file distribution reads (`AWS_SHARED_CREDENTIALS_FILE`),
//! read once, at start. TLS trusts the system roots, which include
//! `SSL_CERT_FILE` and `SSL_CERT_DIR` (rustls-native-certs), as
//! distribution's Go does.
//!
//! Every request has a deadline ([`REQUEST_DEADLINE`]) and a bounded answer;
//! every error names the bucket and the key. Nothing is retried here: the
//! callers decide.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest as _, Sha256};

use super::{parse_credentials, parse_http_date, parse_list, Credentials, Listing, S3Error};

/// One request, from sending it to the last byte of its answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// A list page is at most 1,000 keys: well under this.
const MAX_LIST_PAGE: usize = 16 << 20;
/// An error body is kept for its message only.
const MAX_ERROR_BODY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("bucket {bucket}: cannot read the credentials file {path}: {source}")]
    CredentialsRead {
        bucket: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bucket {bucket}: {path}: {source}")]
    Credentials {
        bucket: String,
        path: PathBuf,
        source: S3Error,
    },
    #[error("bucket {bucket}: endpoint {endpoint:?} is not an http or https URL")]
    Endpoint { bucket: String, endpoint: String },
    #[error("bucket {bucket}: TLS: {message}")]
    Tls { bucket: String, message: String },
    #[error("bucket {bucket}: {method} {key}: {message}")]
    Request {
        bucket: String,
        method: Method,
        key: String,
        message: String,
    },
    #[error("bucket {bucket}: {method} {key}: the store answered {status}: {body}")]
    Status {
        bucket: String,
        method: Method,
        key: String,
        status: StatusCode,
        body: String,
    },
    #[error("bucket {bucket}: list {prefix}: {source}")]
    List {
        bucket: String,
        prefix: String,
        source: S3Error,
    },
    #[error("bucket {bucket}: more than {max} keys under {prefix:?}")]
    TooMany {
        bucket: String,
        prefix: String,
        max: usize,
    },
}

/// Where the bucket is and how to sign for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketConfig {
    /// `http(s)://host[:port]`; empty for AWS itself
    /// (`https://s3.<region>.amazonaws.com`).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// distribution's `rootdirectory` (no leading or trailing `/`).
    pub root: String,
    pub credentials_file: PathBuf,
    pub profile: String,
}

/// A `HEAD` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    /// `Last-Modified`, Unix seconds, by the store's clock.
    pub modified: u64,
    pub etag: String,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Bucket {
    scheme: &'static str,
    authority: String,
    bucket: String,
    root: String,
    creds: Credentials,
    client: HttpsClient,
}

impl Bucket {
    pub fn new(cfg: &BucketConfig) -> Result<Bucket, BucketError> {
        let bucket = cfg.bucket.clone();
        let text = std::fs::read_to_string(&cfg.credentials_file).map_err(|source| {
            BucketError::CredentialsRead {
                bucket: bucket.clone(),
                path: cfg.credentials_file.clone(),
                source,
            }
        })?;
        let (access_key, secret_key) =
            parse_credentials(&text, &cfg.profile).map_err(|source| BucketError::Credentials {
                bucket: bucket.clone(),
                path: cfg.credentials_file.clone(),
                source,
            })?;
        let endpoint = if cfg.endpoint.is_empty() {
            format!("https://s3.{}.amazonaws.com", cfg.region)
        } else {
            cfg.endpoint.trim_end_matches('/').to_string()
        };
        let bad = || BucketError::Endpoint {
            bucket: bucket.clone(),
            endpoint: cfg.endpoint.clone(),
        };
        let uri: Uri = endpoint.parse().map_err(|_| bad())?;
        let scheme = match uri.scheme_str() {
            Some("http") => "http",
            Some("https") => "https",
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?.to_string();
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad());
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let tls = crate::proxy::tls_config(roots).map_err(|message| BucketError::Tls {
            bucket: bucket.clone(),
            message,
        })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .pool_timer(TokioTimer::new())
            .build(https);
        let root = cfg.root.trim_matches('/');
        Ok(Bucket {
            scheme,
            authority,
            root: if root.is_empty() {
                String::new()
            } else {
                format!("{root}/")
            },
            bucket,
            creds: Credentials {
                access_key,
                secret_key,
                region: cfg.region.clone(),
            },
            client,
        })
    }

    pub fn name(&self) -> &str {
        &self.bucket
    }

    /// The full key of `rel` (relative to distribution's `rootdirectory`).
    pub fn key(&self, rel: &str) -> String {
        format!("{}{}", self.root, rel.trim_start_matches('/'))
    }

    fn request_error(&self, method: &Method, key: &str, message: String) -> BucketError {
        BucketError::Request {
            bucket: self.bucket.clone(),
            method: method.clone(),
            key: key.to_string(),
            message,
        }
    }

    /// Send one signed request; the status, headers and body (at most
    /// `max` bytes, or `None` when longer).
    async fn send(
        &self,
        method: Method,
        key: &str,
        query: &[(&str, &str)],
        body: Bytes,
        max: usize,
    ) -> Result<(StatusCode, HeaderMap, Option<Bytes>), BucketError> {
        let path = if key.is_empty() {
            format!("/{}", self.bucket)
        } else {
            format!("/{}/{key}", self.bucket)
        };
        let payload = if body.is_empty() {
            super::EMPTY_SHA256.to_string()
        } else {
            hex::encode(Sha256::digest(&body))
        };
        let (auth, date) = super::sign(
            &super::Request {
                method: method.as_str(),
                path: &path,
                query,
                headers: &[
                    ("host", &self.authority),
                    ("x-amz-content-sha256", &payload),
                ],
                payload_sha256: &payload,
            },
            &self.creds,
            time::OffsetDateTime::now_utc(),
        );
        let q = super::canonical_query(query);
        let uri = format!(
            "{}://{}{}{}{q}",
            self.scheme,
            self.authority,
            super::uri_encode(&path, true),
            if q.is_empty() { "" } else { "?" }
        );
        let req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header("host", &self.authority)
            .header("x-amz-date", date)
            .header("x-amz-content-sha256", payload)
            .header("authorization", auth)
            .body(Full::new(body))
            .map_err(|e| self.request_error(&method, key, e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| self.request_error(&method, key, crate::report(&e)))?;
            let (parts, body) = resp.into_parts();
            let limit = if parts.status.is_success() {
                max
            } else {
                MAX_ERROR_BODY
            };
            let body = match Limited::new(body, limit).collect().await {
                Ok(b) => Some(b.to_bytes()),
                Err(e)
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some() =>
                {
                    None
                }
                Err(e) => return Err(self.request_error(&method, key, e.to_string())),
            };
            Ok((parts.status, parts.headers, body))
        };
        tokio::time::timeout(REQUEST_DEADLINE, exchange)
            .await
            .map_err(|_| {
                self.request_error(
                    &method,
                    key,
                    format!("no whole answer within {} s", REQUEST_DEADLINE.as_secs()),
                )
            })?
    }

    fn status_error(
        &self,
        method: Method,
        key: &str,
        status: StatusCode,
        body: Option<Bytes>,
    ) -> BucketError {
        let body = body
            .map(|b| String::from_utf8_lossy(&b).chars().take(300).collect())
            .unwrap_or_default();
        BucketError::Status {
            bucket: self.bucket.clone(),
            method,
            key: key.to_string(),
            status,
            body,
        }
    }

    /// Every key under `prefix` (with `delimiter`, the first level only:
    /// keys and common prefixes), all pages, at most `max` keys.
    pub async fn list(
        &self,
        prefix: &str,
        delimiter: bool,
        max: usize,
    ) -> Result<Listing, BucketError> {
        let mut all = Listing::default();
        let mut token: Option<String> = None;
        loop {
            let mut q: Vec<(&str, &str)> = vec![("list-type", "2"), ("prefix", prefix)];
            if delimiter {
                q.push(("delimiter", "/"));
            }
            if let Some(t) = &token {
                q.push(("continuation-token", t));
            }
            let (status, _, body) = self
                .send(Method::GET, "", &q, Bytes::new(), MAX_LIST_PAGE)
                .await?;
            if !status.is_success() {
                return Err(self.status_error(Method::GET, prefix, status, body));
            }
            let body = body.ok_or_else(|| {
                self.request_error(&Method::GET, prefix, "list answer too large".into())
            })?;
            let page = parse_list(&String::from_utf8_lossy(&body)).map_err(|source| {
                BucketError::List {
                    bucket: self.bucket.clone(),
                    prefix: prefix.to_string(),
                    source,
                }
            })?;
            all.objects.extend(page.objects);
            all.prefixes.extend(page.prefixes);
            if all.objects.len() + all.prefixes.len() > max {
                return Err(BucketError::TooMany {
                    bucket: self.bucket.clone(),
                    prefix: prefix.to_string(),
                    max,
                });
            }
            match page.next {
                // A store that repeats its token would loop: stop.
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    /// Size, time and ETag of `key`; `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<Head>, BucketError> {
        let (status, headers, body) = self
            .send(Method::HEAD, key, &[], Bytes::new(), MAX_ERROR_BODY)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.status_error(Method::HEAD, key, status, body));
        }
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let modified = parse_http_date(&header("last-modified"))
            .map_err(|e| self.request_error(&Method::HEAD, key, e.to_string()))?;
        Ok(Some(Head {
            size: header("content-length").parse().unwrap_or(0),
            modified,
            etag: header("etag"),
        }))
    }

    /// The content of `key` if it exists and is at most `max` bytes.
    pub async fn get(&self, key: &str, max: usize) -> Result<Option<Bytes>, BucketError> {
        Ok(self.get_tagged(key, max).await?.and_then(|(b, _)| b))
    }

    /// [`Bucket::get`] with the object's ETag: `None` if it does not
    /// exist, a `None` body if it is larger than `max`.
    pub async fn get_tagged(
        &self,
        key: &str,
        max: usize,
    ) -> Result<Option<(Option<Bytes>, String)>, BucketError> {
        let (status, headers, body) = self.send(Method::GET, key, &[], Bytes::new(), max).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.status_error(Method::GET, key, status, body));
        }
        let etag = headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(Some((body, etag)))
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), BucketError> {
        let (status, _, b) = self
            .send(Method::PUT, key, &[], body, MAX_ERROR_BODY)
            .await?;
        if !status.is_success() {
            return Err(self.status_error(Method::PUT, key, status, b));
        }
        Ok(())
    }

    /// Delete `key`; one that does not exist is not an error (S3 answers
    /// 204 for both).
    pub async fn delete(&self, key: &str) -> Result<(), BucketError> {
        let (status, _, b) = self
            .send(Method::DELETE, key, &[], Bytes::new(), MAX_ERROR_BODY)
            .await?;
        if !status.is_success() && status != StatusCode::NOT_FOUND {
            return Err(self.status_error(Method::DELETE, key, status, b));
        }
        Ok(())
    }
}
