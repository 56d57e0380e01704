//! `slipway pki ensure`: the cluster shell around [`crate::pki::plan`].
//!
//! Reads, plans, applies, reports, against the Kubernetes API (kube-rs), in
//! one namespace:
//!
//! | request | object |
//! | --- | --- |
//! | `GET /api/v1/namespaces/NS/secrets/NAME` | Secret `registry-ca`, then Secret `registry-tls` |
//! | `GET /api/v1/namespaces/NS/configmaps/NAME` | ConfigMap `registry-ca` |
//! | `GET /api/v1/namespaces/NS/secrets/NAME` | Secret `registry-push` (#10) |
//! | `GET /api/v1/namespaces/NS/secrets/NAME` | Secret `registry-http-secret` (#22) |
//! | `POST /api/v1/namespaces/NS/{secrets,configmaps}?fieldManager=slipway` | an absent object |
//! | `PUT /api/v1/namespaces/NS/{secrets,configmaps}/NAME?fieldManager=slipway` | a replacement, with the `metadata.resourceVersion` that was read |
//!
//! Idempotent: when everything is right it makes the five GETs and no write.
//!
//! Races: two ensures (a Job retried while its first pod still runs, two
//! installs) must end with one CA. Every write is conditional: a create
//! fails with 409 AlreadyExists if the object appeared since it was read, a
//! replace with 409 Conflict if it changed (its resourceVersion moved on), or
//! 404 if it was deleted. On any of those the rest of the plan is dropped
//! and the objects are read and planned again, so the loser of a race over
//! the CA Secret uses the winner's CA. At most [`MAX_ATTEMPTS`] rounds.
//!
//! Logs and reports name objects and certificate fingerprints (sha256 of the
//! DER), never key material, the push password or the http.secret: Secrets are only ever held in types whose
//! `Debug` leaves their data out.

use std::collections::BTreeMap;
use std::fmt;

use ::time::OffsetDateTime;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::{info, warn};

use crate::k8s::{classify, ApiClass};
use crate::pki::plan::{self, Action, Names, Observed, PlanError, Wanted, Why};
use crate::pki::CertInfo;

/// Rounds of read → plan → apply before giving up on a contended object.
pub const MAX_ATTEMPTS: usize = 5;

/// `fieldManager` of every write: `kubectl get -o yaml --show-managed-fields`
/// shows slipway as the writer.
pub use crate::k8s::FIELD_MANAGER;

// The kube errors are in the messages, not exposed as `source`: kube's own
// Display already repeats its inner errors, and main prints the whole chain
// (`{:#}`), which would print each of them three times.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "cannot configure a Kubernetes client (in-cluster service account or kubeconfig): {0}"
    )]
    Client(kube::Error),
    #[error("{verb} {kind} {namespace}/{name}: {error}")]
    Api {
        verb: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        error: kube::Error,
    },
    #[error(
        "{kind} {namespace}/{name} kept changing while slipway wrote it: gave up after \
         {attempts} attempts; run again"
    )]
    Contended {
        kind: &'static str,
        namespace: String,
        name: String,
        attempts: usize,
    },
}

impl EnsureError {
    /// 64 for a bad namespace, object name or SAN; 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            EnsureError::Plan(e) => e.exit_code(),
            _ => crate::EXIT_APPLY_FAILED,
        }
    }
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Created(Why),
    Replaced(Why),
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub kind: &'static str,
    pub name: String,
    pub change: Change,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Created(why) => write!(f, "created ({why})"),
            Change::Replaced(why) => write!(f, "replaced ({why})"),
            Change::Unchanged => f.write_str("unchanged"),
        }
    }
}

/// The result of an ensure: one outcome per object, and the certificates the
/// cluster now holds.
#[derive(Debug, Clone)]
pub struct Report {
    pub namespace: String,
    /// Rounds of read → plan → apply it took (more than 1 after a race).
    pub attempts: usize,
    /// CA Secret, TLS Secret, ConfigMap, push Secret, http Secret, in that
    /// order.
    pub outcomes: Vec<Outcome>,
    pub ca: CertInfo,
    pub tls: CertInfo,
    /// The push Secret's name, and the registries its `config.json` names.
    pub push_secret: String,
    pub registries: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for o in &self.outcomes {
            writeln!(f, "{} {}/{}: {}", o.kind, self.namespace, o.name, o.change)?;
        }
        writeln!(f, "ca {} {}", self.ca.fingerprint(), self.ca.subject)?;
        let names: Vec<String> = (self.tls.sans.dns.iter().cloned())
            .chain(self.tls.sans.ips.iter().map(|i| i.to_string()))
            .collect();
        let until = OffsetDateTime::from_unix_timestamp(self.tls.not_after)
            .map(|t| t.date().to_string())
            .unwrap_or_default();
        writeln!(
            f,
            "tls {} until {until} for {}",
            self.tls.fingerprint(),
            names.join(", ")
        )?;
        write!(
            f,
            "push {}/{} user {} for {}",
            self.namespace,
            self.push_secret,
            crate::pki::push::PUSH_USER,
            self.registries.join(", ")
        )
    }
}

/// `slipway pki ensure` with the client from the environment (the pod's
/// service account in a Job, else the kubeconfig).
pub async fn ensure_default(wanted: &Wanted) -> Result<Report, EnsureError> {
    let client = Client::try_default().await.map_err(EnsureError::Client)?;
    ensure(client, wanted, OffsetDateTime::now_utc()).await
}

/// Make the namespace hold a CA, a server certificate for `wanted.sans`
/// signed by it, and the public CA in the ConfigMap. `now` decides expiry.
pub async fn ensure(
    client: Client,
    wanted: &Wanted,
    now: OffsetDateTime,
) -> Result<Report, EnsureError> {
    let names = &wanted.names;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(client, &names.namespace);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let mut last_race = None;
    // Across rounds: a write that succeeded before a race still happened.
    let mut outcomes = vec![
        (names.ca_secret.as_str(), "secret", Change::Unchanged),
        (names.tls_secret.as_str(), "secret", Change::Unchanged),
        (names.configmap.as_str(), "configmap", Change::Unchanged),
        (names.push_secret.as_str(), "secret", Change::Unchanged),
        (names.http_secret.as_str(), "secret", Change::Unchanged),
    ];
    for attempt in 1..=MAX_ATTEMPTS {
        let observed = read(&secrets, &configmaps, names).await?;
        let plan = plan::plan(&observed, wanted, now)?;
        let mut raced = None;
        for action in &plan.actions {
            match write(&secrets, &configmaps, &pp, action).await {
                Ok(()) => {
                    // The certificate the object now holds: the server's in
                    // the TLS Secret, none in the push Secret, the CA's in
                    // the other two.
                    let is_secret = action.kind() == "secret";
                    let cert = if is_secret && action.name() == names.tls_secret {
                        plan.tls.fingerprint()
                    } else if is_secret
                        && (action.name() == names.push_secret
                            || action.name() == names.http_secret)
                    {
                        String::new()
                    } else {
                        plan.ca.fingerprint()
                    };
                    info!(
                        namespace = %names.namespace,
                        kind = action.kind(),
                        name = action.name(),
                        keys = ?action.keys(),
                        cert = %cert,
                        reason = %action.why(),
                        "{}d",
                        action.verb()
                    );
                    let change = match action {
                        Action::CreateSecret(_, w) | Action::CreateConfigMap(_, w) => {
                            Change::Created(w.clone())
                        }
                        Action::ReplaceSecret(_, w) | Action::ReplaceConfigMap(_, w) => {
                            Change::Replaced(w.clone())
                        }
                    };
                    if let Some(o) = outcomes
                        .iter_mut()
                        .find(|(n, k, _)| *n == action.name() && *k == action.kind())
                    {
                        o.2 = change;
                    }
                }
                Err(Write::Raced(status)) => {
                    warn!(
                        namespace = %names.namespace,
                        kind = action.kind(),
                        name = action.name(),
                        attempt,
                        "{} answered {status}: another writer got there first; reading again",
                        action.verb()
                    );
                    raced = Some((action.kind(), action.name().to_string()));
                    break;
                }
                Err(Write::Failed(error)) => {
                    return Err(EnsureError::Api {
                        verb: action.verb(),
                        kind: action.kind(),
                        namespace: names.namespace.clone(),
                        name: action.name().into(),
                        error,
                    })
                }
            }
        }
        if raced.is_some() {
            last_race = raced;
            continue;
        }
        info!(
            namespace = %names.namespace,
            ca = %plan.ca.fingerprint(),
            tls = %plan.tls.fingerprint(),
            tls_not_after = plan.tls.not_after,
            writes = plan.actions.len(),
            attempt,
            "registry PKI is in place"
        );
        return Ok(Report {
            namespace: names.namespace.clone(),
            attempts: attempt,
            outcomes: outcomes
                .into_iter()
                .map(|(name, kind, change)| Outcome {
                    kind,
                    name: name.into(),
                    change,
                })
                .collect(),
            ca: plan.ca,
            tls: plan.tls,
            push_secret: names.push_secret.clone(),
            registries: wanted.registries.clone(),
        });
    }
    let (kind, name) = last_race.unwrap_or(("secret", names.ca_secret.clone()));
    Err(EnsureError::Contended {
        kind,
        namespace: names.namespace.clone(),
        name,
        attempts: MAX_ATTEMPTS,
    })
}

/// Make ConfigMap `namespace/name` hold exactly
/// `ca_pem` as `ca.crt`, with `annotations`, by the same read → plan →
/// conditional write as [`ensure`]: a create that loses to another writer
/// (409 AlreadyExists) or a replace whose resourceVersion moved on (409
/// Conflict, or 404) reads the object again and re-plans, at most
/// [`MAX_ATTEMPTS`] rounds. `slipway build` copies the registry CA into its
/// namespace with it, so two builds that start together in a new namespace
/// both succeed (#12).
pub async fn ensure_ca_configmap(
    client: Client,
    namespace: &str,
    name: &str,
    ca_pem: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Change, EnsureError> {
    // The same writer as `ensure`; it only touches Secrets for Secret actions,
    // which this plan never has.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(client, namespace);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    for attempt in 1..=MAX_ATTEMPTS {
        let observed = configmaps
            .get_opt(name)
            .await
            .map_err(|error| EnsureError::Api {
                verb: "get",
                kind: "configmap",
                namespace: namespace.into(),
                name: name.into(),
                error,
            })?;
        let Some(action) =
            plan::plan_ca_configmap(namespace, name, observed.as_ref(), ca_pem, annotations)
        else {
            return Ok(Change::Unchanged);
        };
        match write(&secrets, &configmaps, &pp, &action).await {
            Ok(()) => {
                info!(
                    namespace,
                    kind = action.kind(),
                    name,
                    reason = %action.why(),
                    attempt,
                    "{}d",
                    action.verb()
                );
                return Ok(match action {
                    Action::CreateConfigMap(_, w) | Action::CreateSecret(_, w) => {
                        Change::Created(w)
                    }
                    Action::ReplaceConfigMap(_, w) | Action::ReplaceSecret(_, w) => {
                        Change::Replaced(w)
                    }
                });
            }
            Err(Write::Raced(status)) => warn!(
                namespace,
                kind = action.kind(),
                name,
                attempt,
                "{} answered {status}: another writer got there first; reading again",
                action.verb()
            ),
            Err(Write::Failed(error)) => {
                return Err(EnsureError::Api {
                    verb: action.verb(),
                    kind: action.kind(),
                    namespace: namespace.into(),
                    name: name.into(),
                    error,
                })
            }
        }
    }
    Err(EnsureError::Contended {
        kind: "configmap",
        namespace: namespace.into(),
        name: name.into(),
        attempts: MAX_ATTEMPTS,
    })
}

async fn read(
    secrets: &Api<Secret>,
    configmaps: &Api<ConfigMap>,
    names: &Names,
) -> Result<Observed, EnsureError> {
    let get_err = |kind: &'static str, name: &str| {
        let (namespace, name) = (names.namespace.clone(), name.to_string());
        move |error| EnsureError::Api {
            verb: "get",
            kind,
            namespace,
            name,
            error,
        }
    };
    Ok(Observed {
        ca_secret: secrets
            .get_opt(&names.ca_secret)
            .await
            .map_err(get_err("secret", &names.ca_secret))?,
        tls_secret: secrets
            .get_opt(&names.tls_secret)
            .await
            .map_err(get_err("secret", &names.tls_secret))?,
        configmap: configmaps
            .get_opt(&names.configmap)
            .await
            .map_err(get_err("configmap", &names.configmap))?,
        push_secret: secrets
            .get_opt(&names.push_secret)
            .await
            .map_err(get_err("secret", &names.push_secret))?,
        http_secret: secrets
            .get_opt(&names.http_secret)
            .await
            .map_err(get_err("secret", &names.http_secret))?,
    })
}

enum Write {
    /// 409 (AlreadyExists, Conflict) or 404 on a replace: read again.
    Raced(String),
    Failed(kube::Error),
}

async fn write(
    secrets: &Api<Secret>,
    configmaps: &Api<ConfigMap>,
    pp: &PostParams,
    action: &Action,
) -> Result<(), Write> {
    let result = match action {
        Action::CreateSecret(s, _) => secrets.create(pp, s).await.map(drop),
        Action::ReplaceSecret(s, _) => secrets.replace(action.name(), pp, s).await.map(drop),
        Action::CreateConfigMap(c, _) => configmaps.create(pp, c).await.map(drop),
        Action::ReplaceConfigMap(c, _) => configmaps.replace(action.name(), pp, c).await.map(drop),
    };
    raced(result, action)
}

/// A write's result, with the answers that mean "another writer got there
/// first" told apart: 409 (AlreadyExists, Conflict), or 404 on a replace.
fn raced(result: kube::Result<()>, action: &Action) -> Result<(), Write> {
    match result {
        Ok(()) => Ok(()),
        Err(e) => match (classify(&e), action.verb(), e) {
            (ApiClass::Conflict, _, kube::Error::Api(s))
            | (ApiClass::NotFound, "replace", kube::Error::Api(s)) => {
                Err(Write::Raced(format!("{} {}", s.code, s.reason)))
            }
            (_, _, e) => Err(Write::Failed(e)),
        },
    }
}
