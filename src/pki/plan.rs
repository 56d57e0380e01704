//! `slipway pki ensure`, pure: from what the cluster holds to the writes that
//! make it hold the registry's CA, its serving certificate and the public CA.
//!
//! Objects, all in one namespace (names configurable, defaults below):
//! - Secret `registry-ca`, type `Opaque`, keys `ca.crt` and `ca.key`: the CA
//!   key pair. Created when absent; never replaced (every client trusts the CA
//!   it holds), so an unusable one is an error for the operator.
//! - Secret `registry-tls`, type `kubernetes.io/tls`, keys `tls.crt`,
//!   `tls.key` and `ca.crt`: the registry's certificate. Created when absent;
//!   replaced when less than a third of its lifetime is left, when its SANs
//!   differ from the wanted ones, when the CA did not sign it, or when its key
//!   or `ca.crt` is wrong.
//! - ConfigMap `registry-ca`, key `ca.crt`: the public CA certificate, which
//!   everything else (node agents, build pods) reads. Never the key.
//! - Secret `registry-push`, type `Opaque`: the push account for the
//!   gateway (`htpasswd`) and Kaniko (`config.json`), see [`super::push`]
//!   (#10). Created when absent; its password is kept, the rest rewritten
//!   when stale.
//!
//! - Secret `registry-http-secret`, type `Opaque`, key `secret`: 32 random
//!   bytes (base64url) for distribution's `http.secret`, which signs the
//!   state of an upload between its requests. Every replica of a scaled-out
//!   registry needs the same one, or an upload begun on one replica fails
//!   on the next with `BLOB_UPLOAD_INVALID` (#22). Created when absent, the
//!   key filled when empty; never replaced otherwise (a new secret voids the
//!   uploads in flight).
//!
//! [`plan`] returns [`Action`]s in the order they must be applied: CA Secret,
//! TLS Secret, ConfigMap, push Secret, http Secret, so that nothing is signed by, or
//! published for, a CA that is not stored yet. Replacements carry the observed
//! `metadata.resourceVersion`: the API server refuses them (409 Conflict) if
//! another writer changed the object since it was read.
//!
//! `Debug` of [`Observed`] and [`Action`] prints names, types, keys and
//! resource versions, never Secret data (k8s-openapi's derived `Debug` of a
//! `Secret` would print the key bytes).

use std::collections::BTreeMap;
use std::fmt;

use ::time::OffsetDateTime;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;

use super::push::{self, PushError, PushWhy};
use super::{
    inspect, issue_ca, issue_server, needs_reissue, CertInfo, Pair, PkiError, Reissue, Sans,
};

pub const DEFAULT_NAMESPACE: &str = "shared-services";
pub const DEFAULT_CA_SECRET: &str = "registry-ca";
pub const DEFAULT_TLS_SECRET: &str = "registry-tls";
pub const DEFAULT_CONFIGMAP: &str = "registry-ca";
pub use super::push::{DEFAULT_PUSH_SECRET, DEFAULT_REGISTRY_PORT};
pub const DEFAULT_HTTP_SECRET: &str = "registry-http-secret";
pub const KEY_HTTP_SECRET: &str = "secret";

pub const KEY_CA_CRT: &str = "ca.crt";
pub const KEY_CA_KEY: &str = "ca.key";
pub const KEY_TLS_CRT: &str = "tls.crt";
pub const KEY_TLS_KEY: &str = "tls.key";
pub const TYPE_OPAQUE: &str = "Opaque";
pub const TYPE_TLS: &str = "kubernetes.io/tls";

/// Labels on every object slipway creates.
pub use crate::k8s::LABELS;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Name(#[from] crate::k8s::NameError),
    #[error("secret {namespace}/{name}: {source}")]
    Push {
        namespace: String,
        name: String,
        source: PushError,
    },
    #[error("secret {namespace}/{name}: cannot draw a random http.secret: the system random source failed")]
    Random { namespace: String, name: String },
    /// The http Secret is slipway's only if it is `Opaque`.
    #[error(
        "secret {namespace}/{name} has type {found:?}, not {TYPE_OPAQUE:?}; slipway does not \
         take over a Secret it did not make: rename it"
    )]
    HttpSecretType {
        namespace: String,
        name: String,
        found: String,
    },
    /// The push Secret is slipway's only if it is `Opaque`: a
    /// `kubernetes.io/dockerconfigjson` one was made by someone else.
    #[error(
        "secret {namespace}/{name} has type {found:?}, not {TYPE_OPAQUE:?}; slipway does not \
         take over a Secret it did not make: rename it, or give --push-secret another name"
    )]
    PushSecretType {
        namespace: String,
        name: String,
        found: String,
    },
    /// The CA Secret exists but cannot sign. slipway never replaces a CA on
    /// its own: every node and build pod trusts the one that is there.
    #[error(
        "secret {namespace}/{name}: {reason}; slipway never replaces an existing CA: fix the Secret, \
         or delete it to make a new CA (then every client must trust the new one)"
    )]
    UnusableCa {
        namespace: String,
        name: String,
        reason: String,
    },
    /// A Secret's type cannot change on update (the API server answers 422).
    #[error(
        "secret {namespace}/{name} has type {found:?}, not {TYPE_TLS:?}; a Secret's type cannot \
         change: delete it and run again"
    )]
    TlsSecretType {
        namespace: String,
        name: String,
        found: String,
    },
}

impl PlanError {
    /// 64 for names and SANs the operator must fix, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            PlanError::Pki(e) => e.exit_code(),
            PlanError::Name(_) => crate::EXIT_BAD_CONFIG,
            _ => crate::EXIT_APPLY_FAILED,
        }
    }
}

/// Where the objects live and what they are called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub namespace: String,
    pub ca_secret: String,
    pub tls_secret: String,
    pub configmap: String,
    pub push_secret: String,
    /// distribution's `http.secret` (#22).
    pub http_secret: String,
}

impl Names {
    pub fn new(
        namespace: &str,
        ca_secret: &str,
        tls_secret: &str,
        configmap: &str,
    ) -> Result<Self, PlanError> {
        crate::k8s::check_label("namespace", namespace)?;
        for (what, v) in [
            ("Secret name", ca_secret),
            ("Secret name", tls_secret),
            ("ConfigMap name", configmap),
        ] {
            crate::k8s::check_subdomain(what, v)?;
        }
        if ca_secret == tls_secret {
            return Err(PlanError::Name(crate::k8s::NameError {
                what: "Secret name".into(),
                value: tls_secret.into(),
                reason: "the CA and the TLS Secret need different names",
            }));
        }
        Ok(Names {
            namespace: namespace.into(),
            ca_secret: ca_secret.into(),
            tls_secret: tls_secret.into(),
            configmap: configmap.into(),
            push_secret: DEFAULT_PUSH_SECRET.into(),
            http_secret: DEFAULT_HTTP_SECRET.into(),
        })
    }

    /// The same names with the push Secret called `name`.
    pub fn with_push_secret(mut self, name: &str) -> Result<Self, PlanError> {
        crate::k8s::check_subdomain("Secret name", name)?;
        if name == self.ca_secret || name == self.tls_secret || name == self.http_secret {
            return Err(PlanError::Name(crate::k8s::NameError {
                what: "Secret name".into(),
                value: name.into(),
                reason: "the push Secret needs a name of its own",
            }));
        }
        self.push_secret = name.into();
        Ok(self)
    }

    /// The default object names in `namespace`.
    pub fn in_namespace(namespace: &str) -> Result<Self, PlanError> {
        Names::new(
            namespace,
            DEFAULT_CA_SECRET,
            DEFAULT_TLS_SECRET,
            DEFAULT_CONFIGMAP,
        )
    }
}

/// What `slipway pki ensure` is asked to make true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub names: Names,
    /// The registry Service's names in the namespace, plus the extra ones.
    pub sans: Sans,
    /// Every `host:port` of the registry: the SANs with its port; the
    /// push Secret's `config.json` names each.
    pub registries: Vec<String>,
}

impl Wanted {
    /// `dns` and `ips` are added to the registry Service's own names
    /// ([`super::default_dns`] of the namespace). Empty entries are ignored:
    /// `SLIPWAY_PKI_IPS=""` in a manifest, or a trailing comma, means none.
    pub fn new(names: Names, dns: &[String], ips: &[String]) -> Result<Self, PlanError> {
        let given = |v: &[String]| -> Vec<String> {
            v.iter().filter(|s| !s.trim().is_empty()).cloned().collect()
        };
        let ips = Sans::parse_ips(&given(ips))?;
        let sans = Sans::for_namespace(&names.namespace, &given(dns), &ips)?;
        let registries = push::registries(&sans, DEFAULT_REGISTRY_PORT);
        Ok(Wanted {
            names,
            sans,
            registries,
        })
    }

    /// The same, for a registry on `port` instead of 5000.
    pub fn with_registry_port(mut self, port: u16) -> Self {
        self.registries = push::registries(&self.sans, port);
        self
    }
}

/// The five objects as the API server returned them (`None`: 404).
#[derive(Clone, Default)]
pub struct Observed {
    pub ca_secret: Option<Secret>,
    pub tls_secret: Option<Secret>,
    pub configmap: Option<ConfigMap>,
    pub push_secret: Option<Secret>,
    pub http_secret: Option<Secret>,
}

impl fmt::Debug for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rv = |m: Option<&ObjectMeta>| m.map(|m| m.resource_version.clone().unwrap_or_default());
        f.debug_struct("Observed")
            .field(
                "ca_secret",
                &rv(self.ca_secret.as_ref().map(|s| &s.metadata)),
            )
            .field(
                "tls_secret",
                &rv(self.tls_secret.as_ref().map(|s| &s.metadata)),
            )
            .field(
                "configmap",
                &rv(self.configmap.as_ref().map(|c| &c.metadata)),
            )
            .field(
                "push_secret",
                &rv(self.push_secret.as_ref().map(|s| &s.metadata)),
            )
            .field(
                "http_secret",
                &rv(self.http_secret.as_ref().map(|s| &s.metadata)),
            )
            .finish()
    }
}

/// Why an object is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    Absent,
    /// The server certificate must be reissued.
    Reissue(Reissue),
    /// `tls.crt` is missing or does not parse.
    UnreadableCert(String),
    /// `tls.key` is missing or is not the key of `tls.crt`.
    KeyMismatch,
    /// `ca.crt` is not the CA's certificate.
    StaleCa,
    /// The push Secret's contents (#10).
    Push(PushWhy),
    /// The http Secret has no `secret`, or an empty one (#22).
    NoHttpSecret,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Absent => f.write_str("absent"),
            Why::Reissue(Reissue::NearExpiry { remaining_secs }) => write!(
                f,
                "less than a third of its lifetime left ({} days)",
                remaining_secs.div_euclid(86_400)
            ),
            Why::Reissue(Reissue::SansChanged) => {
                f.write_str("its SAN list differs from the wanted one")
            }
            Why::Reissue(Reissue::WrongIssuer) => f.write_str("not signed by the CA"),
            Why::UnreadableCert(e) => write!(f, "{KEY_TLS_CRT} unreadable: {e}"),
            Why::KeyMismatch => write!(f, "{KEY_TLS_KEY} missing or not the key of {KEY_TLS_CRT}"),
            Why::StaleCa => write!(f, "{KEY_CA_CRT} is not the CA's certificate"),
            Why::Push(w) => w.fmt(f),
            Why::NoHttpSecret => write!(f, "no {KEY_HTTP_SECRET}: a new http.secret"),
        }
    }
}

/// One write. Replacements carry the observed `metadata.resourceVersion`.
#[derive(Clone, PartialEq)]
pub enum Action {
    CreateSecret(Secret, Why),
    ReplaceSecret(Secret, Why),
    CreateConfigMap(ConfigMap, Why),
    ReplaceConfigMap(ConfigMap, Why),
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::CreateSecret(..) | Action::ReplaceSecret(..) => "secret",
            Action::CreateConfigMap(..) | Action::ReplaceConfigMap(..) => "configmap",
        }
    }

    pub fn verb(&self) -> &'static str {
        match self {
            Action::CreateSecret(..) | Action::CreateConfigMap(..) => "create",
            Action::ReplaceSecret(..) | Action::ReplaceConfigMap(..) => "replace",
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Action::CreateSecret(s, _) | Action::ReplaceSecret(s, _) => &s.metadata,
            Action::CreateConfigMap(c, _) | Action::ReplaceConfigMap(c, _) => &c.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }

    /// The version a replacement is conditional on.
    pub fn resource_version(&self) -> Option<&str> {
        self.meta().resource_version.as_deref()
    }

    pub fn why(&self) -> &Why {
        match self {
            Action::CreateSecret(_, w)
            | Action::ReplaceSecret(_, w)
            | Action::CreateConfigMap(_, w)
            | Action::ReplaceConfigMap(_, w) => w,
        }
    }

    /// Data keys written (values never shown).
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Action::CreateSecret(s, _) | Action::ReplaceSecret(s, _) => {
                s.data.iter().flatten().map(|(k, _)| k.as_str()).collect()
            }
            Action::CreateConfigMap(c, _) | Action::ReplaceConfigMap(c, _) => {
                c.data.iter().flatten().map(|(k, _)| k.as_str()).collect()
            }
        }
    }
}

impl fmt::Debug for Action {
    // Never print Secret data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Action")
            .field("verb", &self.verb())
            .field("kind", &self.kind())
            .field("name", &self.name())
            .field("resource_version", &self.resource_version())
            .field("keys", &self.keys())
            .field("why", self.why())
            .finish()
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}: {}",
            self.verb(),
            self.kind(),
            self.name(),
            self.why()
        )
    }
}

/// The writes to make, and what the result will hold.
#[derive(Debug, Clone)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The CA that is, or will be, in the CA Secret and the ConfigMap.
    pub ca: CertInfo,
    /// The server certificate that is, or will be, in the TLS Secret.
    pub tls: CertInfo,
}

/// Decide the writes that make `observed` hold a usable CA, a server
/// certificate for `wanted.sans` signed by it, and the public CA in the
/// ConfigMap. Issues new keys where needed (rcgen); `now` decides expiry.
pub fn plan(observed: &Observed, wanted: &Wanted, now: OffsetDateTime) -> Result<Plan, PlanError> {
    let names = &wanted.names;
    let mut actions = Vec::new();

    let ca = match &observed.ca_secret {
        None => {
            let pair = issue_ca(now)?;
            let secret = new_secret(names, &names.ca_secret, TYPE_OPAQUE, ca_data(&pair));
            actions.push(Action::CreateSecret(secret, Why::Absent));
            pair
        }
        Some(s) => read_ca(names, s, now)?,
    };
    let ca_info = inspect("CA certificate", &ca.cert_pem)?;

    let tls_cert_pem = match &observed.tls_secret {
        None => {
            let pair = issue_server(&ca, &wanted.sans, now)?;
            let data = tls_data(&pair, &ca.cert_pem);
            let secret = new_secret(names, &names.tls_secret, TYPE_TLS, data);
            actions.push(Action::CreateSecret(secret, Why::Absent));
            pair.cert_pem
        }
        Some(s) => {
            let found = s.type_.as_deref().unwrap_or(TYPE_OPAQUE);
            if found != TYPE_TLS {
                return Err(PlanError::TlsSecretType {
                    namespace: names.namespace.clone(),
                    name: names.tls_secret.clone(),
                    found: found.into(),
                });
            }
            match assess_tls(s, &ca_info, &wanted.sans, now) {
                Some(why) => {
                    let pair = issue_server(&ca, &wanted.sans, now)?;
                    let secret = replaced_secret(s, tls_data(&pair, &ca.cert_pem));
                    actions.push(Action::ReplaceSecret(secret, why));
                    pair.cert_pem
                }
                None => {
                    let cert = secret_str(s, KEY_TLS_CRT).unwrap_or_default().to_string();
                    if secret_str(s, KEY_CA_CRT) != Some(ca.cert_pem.as_str()) {
                        // Same certificate and key; only the CA beside them
                        // (read by clients that mount this Secret) is updated.
                        let mut data = s.data.clone().unwrap_or_default();
                        data.insert(
                            KEY_CA_CRT.into(),
                            ByteString(ca.cert_pem.clone().into_bytes()),
                        );
                        actions.push(Action::ReplaceSecret(
                            replaced_secret(s, data),
                            Why::StaleCa,
                        ));
                    }
                    cert
                }
            }
        }
    };
    let tls = inspect("server certificate", &tls_cert_pem)?;

    actions.extend(plan_ca_configmap(
        &names.namespace,
        &names.configmap,
        observed.configmap.as_ref(),
        &ca.cert_pem,
        &BTreeMap::new(),
    ));
    actions.extend(plan_push(names, observed.push_secret.as_ref(), wanted)?);
    actions.extend(plan_http_secret(names, observed.http_secret.as_ref())?);

    Ok(Plan {
        actions,
        ca: ca_info,
        tls,
    })
}

/// The write, if any, that makes the push Secret hold a password, its
/// htpasswd entry and a `config.json` for `wanted.registries`.
fn plan_push(
    names: &Names,
    observed: Option<&Secret>,
    wanted: &Wanted,
) -> Result<Option<Action>, PlanError> {
    let push_err = |source| PlanError::Push {
        namespace: names.namespace.clone(),
        name: names.push_secret.clone(),
        source,
    };
    let Some(s) = observed else {
        let data = push::new_data(&wanted.registries).map_err(push_err)?;
        let secret = new_secret(names, &names.push_secret, TYPE_OPAQUE, data);
        return Ok(Some(Action::CreateSecret(secret, Why::Absent)));
    };
    let found = s.type_.as_deref().unwrap_or(TYPE_OPAQUE);
    if found != TYPE_OPAQUE {
        return Err(PlanError::PushSecretType {
            namespace: names.namespace.clone(),
            name: names.push_secret.clone(),
            found: found.into(),
        });
    }
    Ok(push::assess(s, &wanted.registries)
        .map_err(push_err)?
        .map(|(data, why)| Action::ReplaceSecret(replaced_secret(s, data), Why::Push(why))))
}

/// The write, if any, that makes the http Secret hold a non-empty `secret`.
/// One that has it is left alone whatever it holds: distribution takes any
/// string, and a new one would void every upload in flight.
fn plan_http_secret(names: &Names, observed: Option<&Secret>) -> Result<Option<Action>, PlanError> {
    let fresh = || -> Result<BTreeMap<String, ByteString>, PlanError> {
        let v = push::new_password().map_err(|_| PlanError::Random {
            namespace: names.namespace.clone(),
            name: names.http_secret.clone(),
        })?;
        Ok(BTreeMap::from([(
            KEY_HTTP_SECRET.to_string(),
            ByteString(v.into_bytes()),
        )]))
    };
    let Some(s) = observed else {
        let secret = new_secret(names, &names.http_secret, TYPE_OPAQUE, fresh()?);
        return Ok(Some(Action::CreateSecret(secret, Why::Absent)));
    };
    let found = s.type_.as_deref().unwrap_or(TYPE_OPAQUE);
    if found != TYPE_OPAQUE {
        return Err(PlanError::HttpSecretType {
            namespace: names.namespace.clone(),
            name: names.http_secret.clone(),
            found: found.into(),
        });
    }
    let mut data = s.data.clone().unwrap_or_default();
    if data.get(KEY_HTTP_SECRET).is_some_and(|v| !v.0.is_empty()) {
        return Ok(None);
    }
    data.extend(fresh()?);
    Ok(Some(Action::ReplaceSecret(
        replaced_secret(s, data),
        Why::NoHttpSecret,
    )))
}

/// A new ConfigMap `namespace/name` holding `ca_pem` as `ca.crt`, with
/// slipway's labels and `annotations`: what [`plan_ca_configmap`] creates,
/// and what `slipway build --render` prints.
pub fn ca_configmap(
    namespace: &str,
    name: &str,
    ca_pem: &str,
    annotations: &BTreeMap<String, String>,
) -> ConfigMap {
    let mut metadata = new_meta(namespace, name);
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations.clone());
    }
    ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(
            KEY_CA_CRT.to_string(),
            ca_pem.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// The write, if one is needed, that makes ConfigMap `namespace/name` hold
/// exactly `ca_pem` under `ca.crt`: a create when it is absent, a replace
/// conditional on the observed resourceVersion when its `ca.crt` differs
/// (other keys and annotations kept, `annotations` set over them), nothing
/// when it already holds that CA. Shared by `slipway pki ensure` (the
/// published CA) and `slipway build` (its copy in a build namespace, #12).
pub fn plan_ca_configmap(
    namespace: &str,
    name: &str,
    observed: Option<&ConfigMap>,
    ca_pem: &str,
    annotations: &BTreeMap<String, String>,
) -> Option<Action> {
    let Some(cm) = observed else {
        return Some(Action::CreateConfigMap(
            ca_configmap(namespace, name, ca_pem, annotations),
            Why::Absent,
        ));
    };
    let current = cm.data.as_ref().and_then(|d| d.get(KEY_CA_CRT));
    if current.map(String::as_str) == Some(ca_pem) {
        return None;
    }
    let mut data = cm.data.clone().unwrap_or_default();
    data.insert(KEY_CA_CRT.into(), ca_pem.into());
    let mut metadata = replaced_meta(&cm.metadata);
    if !annotations.is_empty() {
        metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .extend(annotations.clone());
    }
    Some(Action::ReplaceConfigMap(
        ConfigMap {
            metadata,
            data: Some(data),
            ..cm.clone()
        },
        Why::StaleCa,
    ))
}

fn secret_str<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    let b = s.data.as_ref()?.get(key)?;
    std::str::from_utf8(&b.0).ok()
}

/// The CA key pair from an existing Secret, or why it cannot sign.
fn read_ca(names: &Names, s: &Secret, now: OffsetDateTime) -> Result<Pair, PlanError> {
    let unusable = |reason: String| PlanError::UnusableCa {
        namespace: names.namespace.clone(),
        name: names.ca_secret.clone(),
        reason,
    };
    let cert = secret_str(s, KEY_CA_CRT).ok_or_else(|| unusable(format!("no {KEY_CA_CRT}")))?;
    let key = secret_str(s, KEY_CA_KEY).ok_or_else(|| unusable(format!("no {KEY_CA_KEY}")))?;
    let info = inspect(KEY_CA_CRT, cert).map_err(|e| unusable(e.to_string()))?;
    if !info.is_ca {
        return Err(unusable(format!("{KEY_CA_CRT} is not a CA certificate")));
    }
    if info.not_after <= now.unix_timestamp() {
        return Err(unusable(format!("{KEY_CA_CRT} has expired")));
    }
    if !info.matches_key(key) {
        return Err(unusable(format!(
            "{KEY_CA_KEY} is not the key of {KEY_CA_CRT}"
        )));
    }
    Ok(Pair {
        cert_pem: cert.into(),
        key_pem: key.into(),
    })
}

/// Why the server certificate in `s` must be reissued, if it must.
fn assess_tls(s: &Secret, ca: &CertInfo, wanted: &Sans, now: OffsetDateTime) -> Option<Why> {
    let Some(cert) = secret_str(s, KEY_TLS_CRT) else {
        return Some(Why::UnreadableCert(format!("no {KEY_TLS_CRT}")));
    };
    let info = match inspect(KEY_TLS_CRT, cert) {
        Ok(i) => i,
        Err(e) => return Some(Why::UnreadableCert(e.to_string())),
    };
    if let Some(r) = needs_reissue(&info, ca, wanted, now.unix_timestamp()) {
        return Some(Why::Reissue(r));
    }
    if !secret_str(s, KEY_TLS_KEY).is_some_and(|k| info.matches_key(k)) {
        return Some(Why::KeyMismatch);
    }
    None
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn ca_data(ca: &Pair) -> BTreeMap<String, ByteString> {
    BTreeMap::from([
        (KEY_CA_CRT.into(), bytes(&ca.cert_pem)),
        (KEY_CA_KEY.into(), bytes(&ca.key_pem)),
    ])
}

fn tls_data(server: &Pair, ca_cert_pem: &str) -> BTreeMap<String, ByteString> {
    BTreeMap::from([
        (KEY_TLS_CRT.into(), bytes(&server.cert_pem)),
        (KEY_TLS_KEY.into(), bytes(&server.key_pem)),
        (KEY_CA_CRT.into(), bytes(ca_cert_pem)),
    ])
}

fn new_meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        labels: Some(
            LABELS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..ObjectMeta::default()
    }
}

/// The observed metadata for an update: same name, namespace, labels,
/// annotations and, above all, resourceVersion (the update is conditional on
/// it). managedFields are left to the API server.
fn replaced_meta(observed: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        managed_fields: None,
        ..observed.clone()
    }
}

fn new_secret(
    names: &Names,
    name: &str,
    type_: &str,
    data: BTreeMap<String, ByteString>,
) -> Secret {
    Secret {
        metadata: new_meta(&names.namespace, name),
        type_: Some(type_.into()),
        data: Some(data),
        ..Secret::default()
    }
}

fn replaced_secret(observed: &Secret, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: replaced_meta(&observed.metadata),
        type_: observed.type_.clone(),
        data: Some(data),
        immutable: observed.immutable,
        string_data: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::time::Duration;

    fn wanted() -> Wanted {
        Wanted::new(Names::in_namespace("shared-services").unwrap(), &[], &[]).unwrap()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// What the API server would hold after applying `plan` to `observed`.
    fn applied(observed: &Observed, plan: &Plan) -> Observed {
        let mut out = observed.clone();
        for (i, a) in plan.actions.iter().enumerate() {
            let rv = Some(format!("{}", 100 + i));
            match a {
                Action::CreateSecret(s, _) | Action::ReplaceSecret(s, _) => {
                    let mut s = s.clone();
                    s.metadata.resource_version = rv;
                    match s.metadata.name.as_deref() {
                        Some(DEFAULT_CA_SECRET) => out.ca_secret = Some(s),
                        Some(DEFAULT_PUSH_SECRET) => out.push_secret = Some(s),
                        Some(DEFAULT_HTTP_SECRET) => out.http_secret = Some(s),
                        _ => out.tls_secret = Some(s),
                    }
                }
                Action::CreateConfigMap(c, _) | Action::ReplaceConfigMap(c, _) => {
                    let mut c = c.clone();
                    c.metadata.resource_version = rv;
                    out.configmap = Some(c);
                }
            }
        }
        out
    }

    fn verbs(p: &Plan) -> Vec<String> {
        p.actions
            .iter()
            .map(|a| format!("{} {} {}", a.verb(), a.kind(), a.name()))
            .collect()
    }

    /// #22: one http.secret for every replica, made once and then kept;
    /// an empty key is filled, other keys kept; a foreign type refused.
    #[test]
    fn the_http_secret_is_made_once_filled_when_empty_and_otherwise_kept() {
        let w = wanted();
        let first = plan(&Observed::default(), &w, now()).unwrap();
        let done = applied(&Observed::default(), &first);
        let made = done.http_secret.clone().unwrap();
        let value = made.data.as_ref().unwrap()[KEY_HTTP_SECRET].0.clone();
        assert_eq!(value.len(), 43, "32 random bytes, base64url");
        assert_eq!(made.type_.as_deref(), Some(TYPE_OPAQUE));
        assert!(plan(&done, &w, now()).unwrap().actions.is_empty());
        // Someone else's keys stay, an existing value stays.
        let mut kept = done.clone();
        let s = kept.http_secret.as_mut().unwrap();
        s.data
            .as_mut()
            .unwrap()
            .insert("note".into(), ByteString(b"mine".to_vec()));
        assert!(plan(&kept, &w, now()).unwrap().actions.is_empty());
        // Emptied: filled, the other key kept, conditional on the version.
        let s = kept.http_secret.as_mut().unwrap();
        s.data
            .as_mut()
            .unwrap()
            .insert(KEY_HTTP_SECRET.into(), ByteString(vec![]));
        let p = plan(&kept, &w, now()).unwrap();
        assert_eq!(verbs(&p), ["replace secret registry-http-secret"]);
        let Action::ReplaceSecret(r, Why::NoHttpSecret) = &p.actions[0] else {
            panic!("{:?}", p.actions)
        };
        let data = r.data.as_ref().unwrap();
        assert_eq!(data["note"].0, b"mine");
        assert_eq!(data[KEY_HTTP_SECRET].0.len(), 43);
        assert_ne!(data[KEY_HTTP_SECRET].0, value);
        assert_eq!(
            r.metadata.resource_version,
            kept.http_secret.as_ref().unwrap().metadata.resource_version
        );
        // A Secret of another type is not slipway's.
        let mut foreign = done;
        foreign.http_secret.as_mut().unwrap().type_ = Some(TYPE_TLS.into());
        let e = plan(&foreign, &w, now()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("secret shared-services/registry-http-secret has type"),
            "{e}"
        );
    }

    #[test]
    fn empty_cluster_gets_everything_in_order_then_nothing() {
        let w = wanted();
        let p = plan(&Observed::default(), &w, now()).unwrap();
        assert_eq!(
            verbs(&p),
            [
                "create secret registry-ca",
                "create secret registry-tls",
                "create configmap registry-ca",
                "create secret registry-push",
                "create secret registry-http-secret"
            ]
        );
        let Action::CreateSecret(push, _) = &p.actions[3] else {
            panic!()
        };
        assert_eq!(push.type_.as_deref(), Some(TYPE_OPAQUE));
        assert_eq!(
            push.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["config.json", "htpasswd", "password", "username"]
        );
        let Action::CreateSecret(ca, _) = &p.actions[0] else {
            panic!()
        };
        assert_eq!(ca.type_.as_deref(), Some(TYPE_OPAQUE));
        assert_eq!(
            ca.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["ca.crt", "ca.key"]
        );
        assert_eq!(ca.metadata.namespace.as_deref(), Some("shared-services"));
        assert_eq!(ca.metadata.resource_version, None);
        let Action::CreateSecret(tls, _) = &p.actions[1] else {
            panic!()
        };
        assert_eq!(tls.type_.as_deref(), Some(TYPE_TLS));
        assert_eq!(
            tls.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["ca.crt", "tls.crt", "tls.key"]
        );
        let Action::CreateConfigMap(cm, _) = &p.actions[2] else {
            panic!()
        };
        let cm_ca = &cm.data.as_ref().unwrap()["ca.crt"];
        assert!(!cm_ca.contains("PRIVATE KEY"));
        assert_eq!(inspect("cm", cm_ca).unwrap(), p.ca);
        assert!(p.tls.signed_by(&p.ca));
        assert_eq!(p.tls.sans, w.sans);

        let again = plan(&applied(&Observed::default(), &p), &w, now()).unwrap();
        assert!(again.actions.is_empty(), "{:?}", again.actions);
        assert_eq!(again.ca, p.ca);
        assert_eq!(again.tls, p.tls);
    }

    #[test]
    fn near_expiry_and_san_change_replace_only_the_tls_secret() {
        let w = wanted();
        let t0 = now();
        let first = plan(&Observed::default(), &w, t0).unwrap();
        let cluster = applied(&Observed::default(), &first);
        let tls_rv = cluster
            .tls_secret
            .as_ref()
            .unwrap()
            .metadata
            .resource_version
            .clone();

        // 200 days in: 165 of 365 left, more than a third.
        let p = plan(&cluster, &w, t0 + Duration::days(200)).unwrap();
        assert!(p.actions.is_empty());
        // 250 days in: 115 left, less than a third.
        let p = plan(&cluster, &w, t0 + Duration::days(250)).unwrap();
        assert_eq!(verbs(&p), ["replace secret registry-tls"]);
        assert!(matches!(
            p.actions[0].why(),
            Why::Reissue(Reissue::NearExpiry { .. })
        ));
        assert_eq!(p.actions[0].resource_version(), tls_rv.as_deref());
        assert_eq!(p.ca, first.ca);
        assert_ne!(p.tls, first.tls);
        assert!(p.tls.not_after > first.tls.not_after);

        let more = Wanted::new(w.names.clone(), &[], &["203.0.113.7".into()]).unwrap();
        let p = plan(&cluster, &more, t0).unwrap();
        // The new address also reaches the push Secret's config.json.
        assert_eq!(
            verbs(&p),
            [
                "replace secret registry-tls",
                "replace secret registry-push"
            ]
        );
        assert_eq!(p.actions[0].why(), &Why::Reissue(Reissue::SansChanged));
        assert!(p.tls.sans.ips.contains(&"203.0.113.7".parse().unwrap()));
    }

    /// What the first ensure leaves in an empty namespace.
    fn created(w: &Wanted, t: OffsetDateTime) -> Observed {
        applied(
            &Observed::default(),
            &plan(&Observed::default(), w, t).unwrap(),
        )
    }

    #[test]
    fn foreign_or_broken_tls_is_reissued_and_stale_ca_copies_are_fixed() {
        let w = wanted();
        let t = now();
        let cluster = created(&w, t);

        // Signed by another CA (same subject name).
        let other = issue_ca(t).unwrap();
        let foreign = issue_server(&other, &w.sans, t).unwrap();
        let mut c = cluster.clone();
        let tls = c.tls_secret.as_mut().unwrap();
        tls.data = Some(tls_data(&foreign, &other.cert_pem));
        let p = plan(&c, &w, t).unwrap();
        assert_eq!(p.actions[0].why(), &Why::Reissue(Reissue::WrongIssuer));

        // Key swapped.
        let mut c = cluster.clone();
        let d = c.tls_secret.as_mut().unwrap().data.as_mut().unwrap();
        d.insert(KEY_TLS_KEY.into(), bytes(&other.key_pem));
        assert_eq!(plan(&c, &w, t).unwrap().actions[0].why(), &Why::KeyMismatch);

        // Garbage certificate.
        let mut c = cluster.clone();
        let d = c.tls_secret.as_mut().unwrap().data.as_mut().unwrap();
        d.insert(KEY_TLS_CRT.into(), bytes("junk"));
        assert!(matches!(
            plan(&c, &w, t).unwrap().actions[0].why(),
            Why::UnreadableCert(_)
        ));

        // ca.crt beside the certificate, and the ConfigMap, out of date:
        // rewritten, certificate and key kept.
        let mut c = cluster.clone();
        let d = c.tls_secret.as_mut().unwrap().data.as_mut().unwrap();
        d.insert(KEY_CA_CRT.into(), bytes(&other.cert_pem));
        let cm = c.configmap.as_mut().unwrap();
        cm.data
            .as_mut()
            .unwrap()
            .insert(KEY_CA_CRT.into(), other.cert_pem.clone());
        cm.data
            .as_mut()
            .unwrap()
            .insert("note".into(), "kept".into());
        let p = plan(&c, &w, t).unwrap();
        assert_eq!(
            verbs(&p),
            [
                "replace secret registry-tls",
                "replace configmap registry-ca"
            ]
        );
        let Action::ReplaceSecret(s, Why::StaleCa) = &p.actions[0] else {
            panic!("{p:?}")
        };
        let before = cluster.tls_secret.as_ref().unwrap().data.as_ref().unwrap();
        let after = s.data.as_ref().unwrap();
        assert_eq!(after[KEY_TLS_CRT], before[KEY_TLS_CRT]);
        assert_eq!(after[KEY_TLS_KEY], before[KEY_TLS_KEY]);
        assert_eq!(after[KEY_CA_CRT], before[KEY_CA_CRT]);
        let Action::ReplaceConfigMap(cm, Why::StaleCa) = &p.actions[1] else {
            panic!()
        };
        assert_eq!(cm.data.as_ref().unwrap()["note"], "kept");
        assert_eq!(
            cm.metadata.resource_version,
            c.configmap.as_ref().unwrap().metadata.resource_version
        );
    }

    #[test]
    fn an_unusable_ca_is_an_error_never_replaced() {
        let w = wanted();
        let t = now();
        let cluster = created(&w, t);
        let other = issue_ca(t).unwrap();
        let cases: [(&str, Option<&str>, &str); 4] = [
            (KEY_CA_KEY, None, "no ca.key"),
            (
                KEY_CA_KEY,
                Some(other.key_pem.as_str()),
                "ca.key is not the key of ca.crt",
            ),
            (KEY_CA_CRT, Some("junk"), "not a PEM certificate"),
            (KEY_CA_CRT, None, "no ca.crt"),
        ];
        for (key, value, expect) in cases {
            let mut c = cluster.clone();
            let d = c.ca_secret.as_mut().unwrap().data.as_mut().unwrap();
            match value {
                Some(v) => d.insert(key.into(), bytes(v)),
                None => d.remove(key),
            };
            let e = plan(&c, &w, t).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(expect), "{msg}");
            assert!(
                msg.starts_with("secret shared-services/registry-ca: "),
                "{msg}"
            );
            assert!(!msg.contains("PRIVATE"), "{msg}");
            assert_eq!(e.exit_code(), crate::EXIT_APPLY_FAILED);
        }
        // Expired: ten years and a day later.
        let e = plan(&cluster, &w, t + Duration::days(3651)).unwrap_err();
        assert!(e.to_string().contains("has expired"), "{e}");
    }

    #[test]
    fn tls_secret_of_another_type_is_an_error() {
        let w = wanted();
        let t = now();
        let mut c = applied(
            &Observed::default(),
            &plan(&Observed::default(), &w, t).unwrap(),
        );
        c.tls_secret.as_mut().unwrap().type_ = Some("Opaque".into());
        let e = plan(&c, &w, t).unwrap_err();
        assert!(e.to_string().contains("has type \"Opaque\""), "{e}");
    }

    #[test]
    fn ca_configmap_copy_is_created_replaced_with_its_version_or_left() {
        let pem = "-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n";
        let ann = BTreeMap::from([("slipway.dev/copied-from".to_string(), "a/b".to_string())]);
        let Some(Action::CreateConfigMap(cm, Why::Absent)) =
            plan_ca_configmap("team-a", "registry-ca", None, pem, &ann)
        else {
            panic!("absent: a create")
        };
        assert_eq!(cm.metadata.annotations.as_ref(), Some(&ann));
        assert_eq!(cm.metadata.labels.as_ref().unwrap().len(), LABELS.len());
        assert_eq!(cm.data.as_ref().unwrap()[KEY_CA_CRT], pem);

        let mut held = cm.clone();
        held.metadata.resource_version = Some("7".into());
        assert!(plan_ca_configmap("team-a", "registry-ca", Some(&held), pem, &ann).is_none());

        let mut stale = held.clone();
        let d = stale.data.as_mut().unwrap();
        d.insert(KEY_CA_CRT.into(), "OLD".into());
        d.insert("other".into(), "kept".into());
        stale.metadata.annotations = Some(BTreeMap::from([("x".to_string(), "y".to_string())]));
        let Some(Action::ReplaceConfigMap(cm, Why::StaleCa)) =
            plan_ca_configmap("team-a", "registry-ca", Some(&stale), pem, &ann)
        else {
            panic!("stale: a replace")
        };
        assert_eq!(cm.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(cm.data.as_ref().unwrap()[KEY_CA_CRT], pem);
        assert_eq!(cm.data.as_ref().unwrap()["other"], "kept");
        let a = cm.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            (a["x"].as_str(), a["slipway.dev/copied-from"].as_str()),
            ("y", "a/b")
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(Names::in_namespace("shared-services").is_ok());
        for bad in ["", "Shared", "-x", "a_b", &"a".repeat(64)] {
            let e = Names::in_namespace(bad).unwrap_err();
            assert_eq!(e.exit_code(), crate::EXIT_BAD_CONFIG, "{bad}");
        }
        assert!(Names::new("ns", "ca", "ca", "ca").is_err());
        assert!(Names::new("ns", "my.ca", "tls", "x").is_ok());
        assert!(Names::new("ns", "my..ca", "tls", "x").is_err());
        let w = Wanted::new(
            Names::in_namespace("ns").unwrap(),
            &["".into(), "extra.example".into()],
            &[" ".into()],
        )
        .unwrap();
        assert_eq!(w.sans.dns.len(), 5);
        assert!(w.sans.ips.is_empty());
        let e = Wanted::new(Names::in_namespace("ns").unwrap(), &[], &["nope".into()]).unwrap_err();
        assert_eq!(e.exit_code(), crate::EXIT_BAD_CONFIG);
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let w = wanted();
        let p = plan(&Observed::default(), &w, now()).unwrap();
        let c = applied(&Observed::default(), &p);
        for text in [
            format!("{p:?}"),
            format!("{c:?}"),
            format!("{:?}", p.actions),
        ] {
            assert!(!text.contains("PRIVATE"), "{text}");
            assert!(!text.contains("BEGIN"), "{text}");
        }
        // The bytes of the key would show as numbers in a derived Debug.
        let Action::CreateSecret(s, _) = &p.actions[0] else {
            panic!()
        };
        let key = &s.data.as_ref().unwrap()[KEY_CA_KEY].0;
        let as_numbers = format!("{:?}", &key[..8]);
        assert!(!format!("{:?}", p.actions).contains(&as_numbers[1..as_numbers.len() - 1]));
    }

    #[test]
    fn a_push_secret_slipway_did_not_make_is_refused_not_taken_over() {
        let w = wanted();
        let first = plan(&Observed::default(), &w, now()).unwrap();
        let mut c = applied(&Observed::default(), &first);
        c.push_secret.as_mut().unwrap().type_ = Some("kubernetes.io/dockerconfigjson".into());
        let e = plan(&c, &w, now()).unwrap_err();
        assert!(matches!(e, PlanError::PushSecretType { .. }), "{e}");
        assert!(
            e.to_string().starts_with(
                "secret shared-services/registry-push has type \"kubernetes.io/dockerconfigjson\""
            ),
            "{e}"
        );
    }

    #[test]
    fn a_new_lb_address_rewrites_only_config_json_beside_the_reissue() {
        let w = wanted();
        let t = now();
        let first = plan(&Observed::default(), &w, t).unwrap();
        let c = applied(&Observed::default(), &first);
        let w2 = Wanted::new(w.names.clone(), &[], &["203.0.113.7".into()])
            .unwrap()
            .with_registry_port(5443);
        let p = plan(&c, &w2, t).unwrap();
        assert_eq!(
            verbs(&p),
            [
                "replace secret registry-tls",
                "replace secret registry-push"
            ]
        );
        let Action::ReplaceSecret(s, Why::Push(PushWhy::StaleDockerConfig)) = &p.actions[1] else {
            panic!("{p:?}")
        };
        let before = c.push_secret.as_ref().unwrap().data.as_ref().unwrap();
        let after = s.data.as_ref().unwrap();
        assert_eq!(after["password"], before["password"]);
        let config = std::str::from_utf8(&after["config.json"].0).unwrap();
        assert!(config.contains("\"203.0.113.7:5443\""), "{config}");
        assert!(!config.contains(":5000\""), "{config}");
    }
}
