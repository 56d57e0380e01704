//! The registry CA bundle as slipway ships it to containerd.
//!
//! Owns validation of `registry.ca_file` (PEM, parseable X.509, inside its
//! validity window) and the bytes of `slipway-ca.crt` that hostconfig writes
//! beside each `hosts.toml`. Pure: callers pass the file's bytes and "now".

use std::path::{Path, PathBuf};

use x509_parser::prelude::*;

/// First line of every CA file slipway writes. containerd (Go's
/// `x509.CertPool.AppendCertsFromPEM`) skips text before `-----BEGIN`, so the
/// marker does not disturb parsing, and it lets us tell our file from one an
/// administrator put there.
pub const CA_MARKER: &str =
    "# slipway: managed file, do not edit; copied from the cluster registry CA.";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("registry.ca_file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry.ca_file {path}: not a PEM certificate bundle (no CERTIFICATE block found)")]
    NotPem { path: PathBuf },
    #[error("registry.ca_file {path}: certificate {index} does not parse: {message}")]
    BadCert {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("registry.ca_file {path}: certificate {index} ({subject}) expired at {not_after}")]
    Expired {
        path: PathBuf,
        index: usize,
        subject: String,
        not_after: String,
    },
    #[error(
        "registry.ca_file {path}: certificate {index} ({subject}) is not valid before {not_before}"
    )]
    NotYetValid {
        path: PathBuf,
        index: usize,
        subject: String,
        not_before: String,
    },
}

/// A validated CA bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaBundle {
    /// The certificates re-encoded as PEM, in file order.
    pub pem: String,
    /// Earliest `notAfter` across the bundle, seconds since the epoch.
    pub not_after_unix: i64,
    pub subjects: Vec<String>,
}

impl CaBundle {
    /// Validate PEM bytes read from `path` at time `now_unix`.
    pub fn parse(path: &Path, bytes: &[u8], now_unix: i64) -> Result<Self, CaError> {
        let mut reader = std::io::BufReader::new(bytes);
        let ders: Vec<_> = rustls_pemfile::certs(&mut reader)
            .collect::<Result<_, _>>()
            .map_err(|_| CaError::NotPem {
                path: path.to_path_buf(),
            })?;
        if ders.is_empty() {
            return Err(CaError::NotPem {
                path: path.to_path_buf(),
            });
        }
        let mut pem = String::new();
        let mut not_after_unix = i64::MAX;
        let mut subjects = Vec::new();
        for (index, der) in ders.iter().enumerate() {
            let (_, cert) =
                X509Certificate::from_der(der.as_ref()).map_err(|e| CaError::BadCert {
                    path: path.to_path_buf(),
                    index,
                    message: e.to_string(),
                })?;
            let subject = cert.subject().to_string();
            let v = cert.validity();
            if v.not_after.timestamp() < now_unix {
                return Err(CaError::Expired {
                    path: path.to_path_buf(),
                    index,
                    subject,
                    not_after: v.not_after.to_string(),
                });
            }
            if v.not_before.timestamp() > now_unix {
                return Err(CaError::NotYetValid {
                    path: path.to_path_buf(),
                    index,
                    subject,
                    not_before: v.not_before.to_string(),
                });
            }
            not_after_unix = not_after_unix.min(v.not_after.timestamp());
            subjects.push(subject);
            pem.push_str(&pem_encode(der.as_ref()));
        }
        Ok(CaBundle {
            pem,
            not_after_unix,
            subjects,
        })
    }

    /// Bytes of the `slipway-ca.crt` file written beside `hosts.toml`.
    pub fn file_content(&self) -> String {
        format!("{CA_MARKER}\n{}", self.pem)
    }
}

/// Whether `bytes` is a CA file slipway wrote.
pub fn is_ours(bytes: &[u8]) -> bool {
    bytes.starts_with(CA_MARKER.as_bytes())
}

fn pem_encode(der: &[u8]) -> String {
    ::pem::encode_config(
        &::pem::Pem::new("CERTIFICATE", der.to_vec()),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

/// Seconds since the epoch, for callers in the shell.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem(not_before: (i32, u8), not_after: (i32, u8)) -> String {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "test ca");
        p.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, 1);
        p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().pem()
    }

    const NOW: i64 = 1_790_000_000; // 2026-09

    #[test]
    fn accepts_valid_bundle_and_marks_file() {
        let pem = ca_pem((2025, 1), (2035, 1));
        let b = CaBundle::parse(Path::new("/x/ca.crt"), pem.as_bytes(), NOW).unwrap();
        assert_eq!(b.subjects, vec!["CN=test ca".to_string()]);
        assert!(is_ours(b.file_content().as_bytes()));
        assert!(b.file_content().contains("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn rejects_non_pem() {
        let e = CaBundle::parse(Path::new("/x/ca.crt"), b"hello", NOW).unwrap_err();
        assert_eq!(
            e.to_string(),
            "registry.ca_file /x/ca.crt: not a PEM certificate bundle (no CERTIFICATE block found)"
        );
    }

    #[test]
    fn rejects_expired() {
        let pem = ca_pem((2020, 1), (2021, 1));
        let e = CaBundle::parse(Path::new("/x/ca.crt"), pem.as_bytes(), NOW).unwrap_err();
        assert!(e.to_string().contains("expired at"), "{e}");
        assert!(
            e.to_string().starts_with("registry.ca_file /x/ca.crt"),
            "{e}"
        );
    }

    #[test]
    fn rejects_garbage_inside_pem() {
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = CaBundle::parse(Path::new("/x/ca.crt"), bad.as_bytes(), NOW).unwrap_err();
        assert!(e.to_string().contains("does not parse"), "{e}");
    }
}
