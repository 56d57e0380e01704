//! The cluster's registry PKI, pure: issue and inspect certificates.
//!
//! Owns the shape of the two certificates slipway makes with rcgen:
//! - the registry CA: ECDSA P-256, 10 years, `CA:true, pathlen:0`,
//!   keyCertSign + cRLSign;
//! - the registry server certificate: ECDSA P-256, 1 year, the given DNS and
//!   IP SANs, EKU serverAuth, signed by that CA.
//!
//! It also decides when a server certificate must be reissued (less than a
//! third of its lifetime left, a changed SAN list, or signed by another CA),
//! and [`plan`] turns what a cluster holds into the writes `slipway pki
//! ensure` makes. The shells are [`write_files`] (`slipway pki init`, writes
//! `ca.crt`, `ca.key`, `tls.crt`, `tls.key`) and [`crate::pki::ensure`]
//! (`slipway pki ensure`, writes three Secrets and a ConfigMap; the push
//! Secret's contents are [`push`]'s).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ::time::{Duration, OffsetDateTime};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

pub mod ensure;
pub mod plan;
pub mod push;

/// SANs the registry's certificate carries unless configured otherwise: the
/// names of the Service `registry` in `shared-services` (see [`default_dns`]).
pub const DEFAULT_DNS: &[&str] = &[
    "registry",
    "registry.shared-services",
    "registry.shared-services.svc",
    "registry.shared-services.svc.cluster.local",
];

/// The names of the Service `registry` in `namespace`, as pods (search path)
/// and the node agent (fully qualified) address it. [`DEFAULT_DNS`] is this
/// for `shared-services`.
pub fn default_dns(namespace: &str) -> Vec<String> {
    vec![
        "registry".to_string(),
        format!("registry.{namespace}"),
        format!("registry.{namespace}.svc"),
        format!("registry.{namespace}.svc.cluster.local"),
    ]
}

pub const CA_LIFETIME: Duration = Duration::days(3650);
pub const SERVER_LIFETIME: Duration = Duration::days(365);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot issue certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("{what}: not a PEM certificate")]
    NotPem { what: String },
    #[error("{what}: does not parse: {message}")]
    Parse { what: String, message: String },
    #[error("{what}: not a PEM private key: {message}")]
    BadKey { what: String, message: String },
    #[error("{path}: exists; pass --force to overwrite")]
    Exists { path: PathBuf },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("invalid SAN {value:?}: {reason}")]
    San { value: String, reason: &'static str },
}

impl PkiError {
    /// 64 for a SAN the operator must fix (a bad `--dns` or `--ip`), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            PkiError::San { .. } => crate::EXIT_BAD_CONFIG,
            _ => crate::EXIT_APPLY_FAILED,
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Pair {
    // Never print key material, not even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("cert_pem", &format!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The SAN list of a server certificate, normalised (sorted, deduplicated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sans {
    pub dns: BTreeSet<String>,
    pub ips: BTreeSet<IpAddr>,
}

impl Sans {
    pub fn new(dns: &[String], ips: &[IpAddr]) -> Result<Self, PkiError> {
        let mut out = Sans::default();
        for d in dns {
            let d = d.trim().to_ascii_lowercase();
            if d.is_empty() || d.contains(['/', ' ', ':']) || d.starts_with('.') || d.ends_with('.')
            {
                return Err(PkiError::San {
                    value: d,
                    reason: "not a DNS name",
                });
            }
            out.dns.insert(d);
        }
        out.ips.extend(ips.iter().copied());
        if out.dns.is_empty() && out.ips.is_empty() {
            return Err(PkiError::San {
                value: String::new(),
                reason: "at least one --dns or --ip is needed",
            });
        }
        Ok(out)
    }

    pub fn defaults_with(extra_dns: &[String], ips: &[IpAddr]) -> Result<Self, PkiError> {
        Sans::for_namespace("shared-services", extra_dns, ips)
    }

    /// The registry Service's names in `namespace` ([`default_dns`]) plus
    /// `extra_dns` and `ips`.
    pub fn for_namespace(
        namespace: &str,
        extra_dns: &[String],
        ips: &[IpAddr],
    ) -> Result<Self, PkiError> {
        let mut dns = default_dns(namespace);
        dns.extend(extra_dns.iter().cloned());
        Sans::new(&dns, ips)
    }

    /// Parse IP SANs given as text (flags, environment), naming the bad one.
    pub fn parse_ips(ips: &[String]) -> Result<Vec<IpAddr>, PkiError> {
        ips.iter()
            .map(|s| {
                s.trim().parse().map_err(|_| PkiError::San {
                    value: s.clone(),
                    reason: "not an IP address",
                })
            })
            .collect()
    }
}

fn key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// Issue a new CA valid from `now` for ten years.
pub fn issue_ca(now: OffsetDateTime) -> Result<Pair, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "slipway registry CA");
    dn.push(DnType::OrganizationName, "slipway");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + CA_LIFETIME;
    let k = key()?;
    let cert = p.self_signed(&k)?;
    Ok(Pair {
        cert_pem: cert.pem(),
        key_pem: k.serialize_pem(),
    })
}

/// Issue a server certificate for `sans`, signed by `ca`.
pub fn issue_server(ca: &Pair, sans: &Sans, now: OffsetDateTime) -> Result<Pair, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| PkiError::BadKey {
        what: "CA key".into(),
        message: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|e| PkiError::Parse {
        what: "CA certificate".into(),
        message: e.to_string(),
    })?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let cn = sans
        .dns
        .iter()
        .max_by_key(|d| d.len())
        .cloned()
        .unwrap_or_else(|| "registry".into());
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.subject_alt_names = sans
        .dns
        .iter()
        .map(|d| Ok(SanType::DnsName(d.clone().try_into()?)))
        .chain(sans.ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
        .collect::<Result<_, rcgen::Error>>()?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + SERVER_LIFETIME;
    let k = key()?;
    let cert = p.signed_by(&k, &issuer)?;
    Ok(Pair {
        cert_pem: cert.pem(),
        key_pem: k.serialize_pem(),
    })
}

/// What slipway needs to know about an issued certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub sans: Sans,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    pub server_auth: bool,
    pub ecdsa_p256: bool,
    pub issuer: String,
    pub subject: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
}

impl CertInfo {
    /// `sha256:<hex>` of the certificate's DER: what logs and reports name a
    /// certificate by (never by its key).
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(&self.der)))
    }

    /// Whether `key_pem` is the private key of this certificate's public key.
    pub fn matches_key(&self, key_pem: &str) -> bool {
        let Ok(key) = KeyPair::from_pem(key_pem) else {
            return false;
        };
        X509Certificate::from_der(&self.der)
            .is_ok_and(|(_, c)| c.public_key().subject_public_key.data == key.public_key_raw())
    }

    /// Whether `ca`'s key signed this certificate. Two CAs made by slipway
    /// have the same subject name, so comparing names is not enough.
    pub fn signed_by(&self, ca: &CertInfo) -> bool {
        let (Ok((_, c)), Ok((_, issuer))) = (
            X509Certificate::from_der(&self.der),
            X509Certificate::from_der(&ca.der),
        ) else {
            return false;
        };
        c.verify_signature(Some(issuer.public_key())).is_ok()
    }
}

impl std::fmt::Debug for CertInfo {
    // The DER as a fingerprint: hundreds of numbers help nobody.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertInfo")
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .field("sans", &self.sans)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("is_ca", &self.is_ca)
            .field("path_len", &self.path_len)
            .field("server_auth", &self.server_auth)
            .field("ecdsa_p256", &self.ecdsa_p256)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// Parse the first certificate of a PEM string.
pub fn inspect(what: &str, pem: &str) -> Result<CertInfo, PkiError> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| PkiError::NotPem { what: what.into() })?
        .map_err(|_| PkiError::NotPem { what: what.into() })?;
    let (_, c) = X509Certificate::from_der(der.as_ref()).map_err(|e| PkiError::Parse {
        what: what.into(),
        message: e.to_string(),
    })?;
    let mut sans = Sans::default();
    if let Ok(Some(ext)) = c.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => {
                    sans.dns.insert(d.to_string());
                }
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*b).expect("len 4")),
                        16 => IpAddr::from(<[u8; 16]>::try_from(*b).expect("len 16")),
                        _ => continue,
                    };
                    sans.ips.insert(ip);
                }
                _ => {}
            }
        }
    }
    let (is_ca, path_len) = match c.basic_constraints() {
        Ok(Some(bc)) => (bc.value.ca, bc.value.path_len_constraint),
        _ => (false, None),
    };
    let server_auth = matches!(c.extended_key_usage(), Ok(Some(e)) if e.value.server_auth);
    let spki = c.public_key();
    let ecdsa_p256 = spki.algorithm.algorithm
        == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|o| o == x509_parser::oid_registry::OID_EC_P256);
    Ok(CertInfo {
        sans,
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        is_ca,
        path_len,
        server_auth,
        ecdsa_p256,
        issuer: c.issuer().to_string(),
        subject: c.subject().to_string(),
        der: der.as_ref().to_vec(),
    })
}

/// Why a server certificate must be reissued, if it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reissue {
    NearExpiry { remaining_secs: i64 },
    SansChanged,
    WrongIssuer,
}

/// Reissue when less than a third of the lifetime is left, when the SANs
/// differ from the wanted list, or when another CA signed it.
pub fn needs_reissue(server: &CertInfo, ca: &CertInfo, wanted: &Sans, now: i64) -> Option<Reissue> {
    if server.issuer != ca.subject || !server.signed_by(ca) {
        return Some(Reissue::WrongIssuer);
    }
    if &server.sans != wanted {
        return Some(Reissue::SansChanged);
    }
    let lifetime = server.not_after - server.not_before;
    let remaining = server.not_after - now;
    if remaining * 3 < lifetime {
        return Some(Reissue::NearExpiry {
            remaining_secs: remaining,
        });
    }
    None
}

/// `slipway pki init`: write ca.crt, ca.key, tls.crt, tls.key into `dir`.
/// Keys are 0600. Existing files are kept unless `force`.
pub fn write_files(dir: &Path, sans: &Sans, force: bool) -> Result<Vec<PathBuf>, PkiError> {
    let io = |path: &Path, op: &'static str| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, op, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir, "cannot create directory"))?;
    let names = ["ca.crt", "ca.key", "tls.crt", "tls.key"];
    if !force {
        for n in names {
            let p = dir.join(n);
            if p.exists() {
                return Err(PkiError::Exists { path: p });
            }
        }
    }
    let now = OffsetDateTime::now_utc();
    let ca = issue_ca(now)?;
    let server = issue_server(&ca, sans, now)?;
    let contents = [
        (&ca.cert_pem, 0o644),
        (&ca.key_pem, 0o600),
        (&server.cert_pem, 0o644),
        (&server.key_pem, 0o600),
    ];
    let mut written = Vec::new();
    for (n, (content, mode)) in names.iter().zip(contents) {
        let p = dir.join(n);
        let r = if force {
            crate::atomic::replace(&p, content.as_bytes(), mode)
        } else {
            crate::atomic::create_new(&p, content.as_bytes(), mode)
        };
        r.map_err(io(&p, "cannot write"))?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn ca_has_constraints_key_type_and_lifetime() {
        let ca = issue_ca(now()).unwrap();
        let i = inspect("ca", &ca.cert_pem).unwrap();
        assert!(i.is_ca);
        assert_eq!(i.path_len, Some(0));
        assert!(i.ecdsa_p256);
        let days = (i.not_after - i.not_before) / 86400;
        assert!((3650..=3651).contains(&days), "{days}");
        assert!(ca.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn server_has_sans_eku_and_one_year() {
        let ca = issue_ca(now()).unwrap();
        let sans = Sans::defaults_with(
            &["registry.example".into()],
            &["203.0.113.7".parse().unwrap()],
        )
        .unwrap();
        let s = issue_server(&ca, &sans, now()).unwrap();
        let i = inspect("tls", &s.cert_pem).unwrap();
        let cai = inspect("ca", &ca.cert_pem).unwrap();
        assert_eq!(i.sans, sans);
        assert!(i
            .sans
            .dns
            .contains("registry.shared-services.svc.cluster.local"));
        assert!(i.server_auth);
        assert!(!i.is_ca);
        assert!(i.ecdsa_p256);
        assert_eq!(i.issuer, cai.subject);
        let days = (i.not_after - i.not_before) / 86400;
        assert_eq!(days, 365);
        assert_eq!(needs_reissue(&i, &cai, &sans, now().unix_timestamp()), None);
    }

    #[test]
    fn reissue_rules() {
        let ca = issue_ca(now()).unwrap();
        let cai = inspect("ca", &ca.cert_pem).unwrap();
        let sans = Sans::new(&["registry".into()], &[]).unwrap();
        let s = inspect("tls", &issue_server(&ca, &sans, now()).unwrap().cert_pem).unwrap();
        let t = now().unix_timestamp();
        // 250 days later: less than a third of 365 days remains.
        assert!(matches!(
            needs_reissue(&s, &cai, &sans, t + 250 * 86400),
            Some(Reissue::NearExpiry { .. })
        ));
        assert_eq!(needs_reissue(&s, &cai, &sans, t + 200 * 86400), None);
        let more = Sans::new(&["registry".into()], &["203.0.113.7".parse().unwrap()]).unwrap();
        assert_eq!(
            needs_reissue(&s, &cai, &more, t),
            Some(Reissue::SansChanged)
        );
        // Another slipway CA has the very same subject name: only the
        // signature tells them apart.
        let other = issue_ca(now()).unwrap();
        let otheri = inspect("ca2", &other.cert_pem).unwrap();
        assert_eq!(otheri.subject, cai.subject);
        assert!(s.signed_by(&cai));
        assert!(!s.signed_by(&otheri));
        assert_eq!(
            needs_reissue(&s, &otheri, &sans, t),
            Some(Reissue::WrongIssuer)
        );
    }

    #[test]
    fn default_names_follow_the_namespace() {
        assert_eq!(default_dns("shared-services"), DEFAULT_DNS);
        assert_eq!(
            default_dns("builds"),
            [
                "registry",
                "registry.builds",
                "registry.builds.svc",
                "registry.builds.svc.cluster.local"
            ]
        );
        let s = Sans::for_namespace("builds", &["Registry.Example".into()], &[]).unwrap();
        assert!(s.dns.contains("registry.example"));
        assert_eq!(s.dns.len(), 5);
    }

    #[test]
    fn ip_sans_parse_and_name_the_bad_one() {
        let ips = Sans::parse_ips(&["203.0.113.7".into(), " 2001:db8::1".into()]).unwrap();
        assert_eq!(ips.len(), 2);
        let e = Sans::parse_ips(&["203.0.113.300".into()]).unwrap_err();
        assert_eq!(e.exit_code(), crate::EXIT_BAD_CONFIG);
        assert!(e.to_string().contains("203.0.113.300"), "{e}");
        let e = Sans::new(&["a b".into()], &[]).unwrap_err();
        assert_eq!(e.exit_code(), crate::EXIT_BAD_CONFIG);
    }

    #[test]
    fn key_matching_and_fingerprints() {
        let ca = issue_ca(now()).unwrap();
        let sans = Sans::new(&["registry".into()], &[]).unwrap();
        let s = issue_server(&ca, &sans, now()).unwrap();
        let i = inspect("tls", &s.cert_pem).unwrap();
        assert!(i.matches_key(&s.key_pem));
        assert!(!i.matches_key(&ca.key_pem));
        assert!(!i.matches_key("not a key"));
        let fp = i.fingerprint();
        assert_eq!(fp.len(), "sha256:".len() + 64);
        let der = rustls_pemfile::certs(&mut s.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(fp, format!("sha256:{}", hex::encode(Sha256::digest(&der))));
        assert!(format!("{i:?}").contains(&fp));
    }

    #[test]
    fn files_are_0600_and_never_overwritten_without_force() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let sans = Sans::new(&["registry".into()], &[]).unwrap();
        write_files(d.path(), &sans, false).unwrap();
        let mode = |n: &str| {
            std::fs::metadata(d.path().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("tls.key"), 0o600);
        assert_eq!(mode("ca.crt"), 0o644);
        let before = std::fs::read(d.path().join("ca.key")).unwrap();
        let e = write_files(d.path(), &sans, false).unwrap_err();
        assert!(e.to_string().contains("pass --force"), "{e}");
        assert_eq!(std::fs::read(d.path().join("ca.key")).unwrap(), before);
        write_files(d.path(), &sans, true).unwrap();
        assert_ne!(std::fs::read(d.path().join("ca.key")).unwrap(), before);
    }
}
