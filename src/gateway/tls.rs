//! The gateway's TLS certificate, reloaded without a restart.
//!
//! Reads `gateway.tls_cert` and `gateway.tls_key` (PEM). distribution reads
//! its certificate only at start, so renewing it meant restarting the
//! registry by hand (#10); the gateway instead re-reads both files every
//! [`POLL`] and, when they hold a new valid pair, serves it to every new
//! connection ([`CertStore`] is the rustls `ResolvesServerCert`). Existing
//! connections keep the certificate they shook hands with. An invalid pair
//! (unparseable, or a key that does not match) is logged and the old one
//! kept. Polling the bytes rather than watching mtimes also covers a
//! kubelet Secret volume update, which swaps a `..data` symlink and leaves
//! the files' own mtimes alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

/// How often the files are re-read; the issue asks for a new certificate
/// within 5 s of the files changing.
pub const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read gateway.tls_cert file {path}: {source}")]
    ReadCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read gateway.tls_key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gateway.tls_cert file {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("gateway.tls_key file {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("gateway.tls_key file {key} does not match the certificate in gateway.tls_cert file {cert}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot build the TLS server configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// A parsed, matching certificate chain and key.
#[derive(Debug, Clone)]
pub struct Pair {
    pub key: Arc<CertifiedKey>,
    /// The leaf's notAfter, Unix seconds.
    pub not_after: i64,
    /// The leaf's serial number, hex: what a log line names.
    pub serial: String,
}

/// Parse a PEM pair; pure (bytes in). The paths only name the files in errors.
pub fn parse_pair(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Pair, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert_path.to_path_buf(),
        message,
    };
    let key_err = |message: String| TlsError::Key {
        path: key_path.to_path_buf(),
        message,
    };
    let chain: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("bad PEM: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| cert_err("no CERTIFICATE block".into()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| cert_err(format!("bad certificate: {e}")))?;
    let not_after = x509.validity().not_after.timestamp();
    let serial = x509.raw_serial_as_string();
    let der = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| key_err(format!("bad PEM: {e}")))?
        .ok_or_else(|| key_err("no PRIVATE KEY block".into()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| key_err(format!("unsupported key: {e}")))?;
    let key = CertifiedKey::new(chain, signer);
    key.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(Pair {
        key: Arc::new(key),
        not_after,
        serial,
    })
}

/// Read and parse the pair from its files.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Pair, TlsError> {
    let (cert_pem, key_pem) = read_pair(cert, key)?;
    parse_pair(cert, &cert_pem, key, &key_pem)
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let cert_pem = super::read_input(cert).map_err(|source| TlsError::ReadCert {
        path: cert.to_path_buf(),
        source,
    })?;
    let key_pem = super::read_input(key).map_err(|source| TlsError::ReadKey {
        path: key.to_path_buf(),
        source,
    })?;
    Ok((cert_pem, key_pem))
}

/// The certificate new connections get.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Pair>,
}

impl CertStore {
    pub fn new(pair: Pair) -> CertStore {
        CertStore {
            current: RwLock::new(pair),
        }
    }

    pub fn current(&self) -> Pair {
        self.current.read().expect("cert lock").clone()
    }

    fn set(&self, pair: Pair) {
        *self.current.write().expect("cert lock") = pair;
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("cert lock").key.clone())
    }
}

/// The rustls server configuration over a [`CertStore`] (ring, HTTP/1.1:
/// the registry API clients, containerd, skopeo and Kaniko's go-containerregistry,
/// all speak it).
pub fn server_config(store: Arc<CertStore>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Re-read the files every [`POLL`] until the task is dropped; swap in a
/// new valid pair, keep the old one otherwise. `on_change` is called with
/// each pair taken (the expiry metric).
pub async fn watch(
    store: Arc<CertStore>,
    cert: PathBuf,
    key: PathBuf,
    on_change: impl Fn(&Pair, bool) + Send + 'static,
) {
    // What was last looked at, loaded or not: a bad pair is logged once,
    // not every second.
    let mut seen = read_pair(&cert, &key).ok();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (c, k) = (cert.clone(), key.clone());
        let Ok(read) = tokio::task::spawn_blocking(move || read_pair(&c, &k)).await else {
            continue;
        };
        let now = match read {
            Ok(bytes) => bytes,
            Err(e) => {
                // Mid-update (one file replaced, the other not yet) or
                // removed: keep serving the old pair.
                if seen.is_some() {
                    warn!(error = %e, "gateway: TLS files unreadable; keeping the current certificate");
                    seen = None;
                }
                continue;
            }
        };
        if seen.as_ref() == Some(&now) {
            continue;
        }
        match parse_pair(&cert, &now.0, &key, &now.1) {
            Ok(pair) => {
                let old = store.current().serial;
                info!(old_serial = %old, serial = %pair.serial, not_after = pair.not_after, "gateway: TLS certificate reloaded");
                store.set(pair.clone());
                on_change(&pair, true);
            }
            Err(e) => {
                warn!(error = %e, "gateway: new TLS files are not a valid pair; keeping the current certificate");
                on_change(&store.current(), false);
            }
        }
        seen = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let k = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&k)
            .unwrap();
        (c.pem(), k.serialize_pem())
    }

    #[test]
    fn a_matching_pair_parses_and_a_mismatch_names_both_files() {
        let (c1, k1) = pair("a");
        let (_, k2) = pair("b");
        let (cp, kp) = (Path::new("/tls/tls.crt"), Path::new("/tls/tls.key"));
        let p = parse_pair(cp, c1.as_bytes(), kp, k1.as_bytes()).unwrap();
        assert!(p.not_after > 0);
        let e = parse_pair(cp, c1.as_bytes(), kp, k2.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/tls/tls.key") && e.contains("/tls/tls.crt"),
            "{e}"
        );
        let e = parse_pair(cp, b"junk", kp, k1.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("gateway.tls_cert file /tls/tls.crt: no CERTIFICATE"),
            "{e}"
        );
        let e = parse_pair(cp, c1.as_bytes(), kp, b"")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("gateway.tls_key file /tls/tls.key: no PRIVATE KEY"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn watch_swaps_a_valid_pair_and_keeps_the_old_on_an_invalid_one() {
        let d = tempfile::tempdir().unwrap();
        let (cp, kp) = (d.path().join("tls.crt"), d.path().join("tls.key"));
        let (c1, k1) = pair("one");
        std::fs::write(&cp, &c1).unwrap();
        std::fs::write(&kp, &k1).unwrap();
        let store = Arc::new(CertStore::new(load_pair(&cp, &kp).unwrap()));
        let first = store.current().serial;
        let task = tokio::spawn(watch(store.clone(), cp.clone(), kp.clone(), |_, _| {}));
        // An invalid pair: a new certificate with the old key.
        let (c2, k2) = pair("two");
        std::fs::write(&cp, &c2).unwrap();
        tokio::time::sleep(POLL * 3).await;
        assert_eq!(
            store.current().serial,
            first,
            "a mismatched pair is not taken"
        );
        std::fs::write(&kp, &k2).unwrap();
        let mut swapped = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if store.current().serial != first {
                swapped = true;
                break;
            }
        }
        task.abort();
        assert!(swapped, "the new pair was not taken within 5 s");
    }
}
