//! The push credential, pure: Secret `registry-push` and what it must hold
//! (#10).
//!
//! Keys of the Secret (type `Opaque`):
//!
//! | key | read by | content |
//! | --- | --- | --- |
//! | `username` | people | the push account, [`PUSH_USER`] |
//! | `password` | people | 32 random bytes, base64url (43 characters) |
//! | `htpasswd` | `slipway gateway` (`gateway.push_htpasswd`) | `user:$2b$04$…`, bcrypt at [`BCRYPT_COST`] |
//! | `config.json` | Kaniko (`/kaniko/.docker/config.json`) | `{"auths":{"HOST:PORT":{"auth":…}}}` |
//!
//! `config.json` names every registry address the certificate is valid for
//! (its DNS and IP SANs) with the registry's port: Kaniko (through
//! go-containerregistry's Docker keychain) looks credentials up by the
//! destination's `host:port` exactly, so a build that pushes to any of the
//! registry's names finds them.
//!
//! The password is kept across runs; only a missing password makes a new
//! one. An `htpasswd` entry that no longer verifies the password (bcrypt) or
//! a `config.json` that differs from the one rendered for the current names
//! is rewritten from the password already there, so renewals and SAN changes
//! never break running pushes. Keys slipway does not own are kept.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;

use super::Sans;

pub const DEFAULT_PUSH_SECRET: &str = "registry-push";
/// The registry port the aliases in `config.json` carry.
pub const DEFAULT_REGISTRY_PORT: u16 = 5000;
pub const KEY_USERNAME: &str = "username";
pub const KEY_PASSWORD: &str = "password";
pub const KEY_HTPASSWD: &str = "htpasswd";
pub const KEY_DOCKER_CONFIG: &str = "config.json";
/// The account Kaniko pushes as.
pub const PUSH_USER: &str = "slipway-push";
/// bcrypt cost of the entry: 4, the least bcrypt allows (#18 point 7).
/// A slow hash protects passwords people choose, which can be guessed
/// offline from a leaked hash; this one is 256 random bits, out of reach
/// at any cost, so the cost buys nothing but CPU an anonymous client can
/// make the gateway spend (about 60 ms per check at cost 10, 1 ms at 4).
/// distribution reads the same file, and Go's bcrypt accepts 4 to 31.
pub const BCRYPT_COST: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("cannot draw a random push password: the system random source failed")]
    Random,
    #[error("cannot hash the push password with bcrypt: {0}")]
    Bcrypt(#[source] bcrypt::BcryptError),
}

/// Why the push Secret is rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushWhy {
    /// No `password` (or an empty one): a new password, and everything
    /// derived from it.
    NoPassword,
    /// `htpasswd` has no entry for the user that verifies the password, or
    /// one at another cost than [`BCRYPT_COST`] (entries written at cost 10
    /// before #18 are rewritten from the same password).
    StaleHtpasswd,
    /// `config.json` is not the one for the current names and password.
    StaleDockerConfig,
}

impl fmt::Display for PushWhy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushWhy::NoPassword => write!(f, "no {KEY_PASSWORD}: a new push password"),
            PushWhy::StaleHtpasswd => write!(
                f,
                "{KEY_HTPASSWD} does not verify {KEY_PASSWORD} at bcrypt cost {BCRYPT_COST}"
            ),
            PushWhy::StaleDockerConfig => write!(
                f,
                "{KEY_DOCKER_CONFIG} does not name the registry's current addresses"
            ),
        }
    }
}

/// Every `host:port` the registry is reached by over TLS: its certificate's
/// SANs with `port` (IPv6 in brackets), sorted.
pub fn registries(sans: &Sans, port: u16) -> Vec<String> {
    let mut out: Vec<String> = sans
        .dns
        .iter()
        .map(|d| format!("{d}:{port}"))
        .chain(sans.ips.iter().map(|ip| match ip {
            std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        }))
        .collect();
    out.sort();
    out
}

/// The Docker `config.json` for `user`/`password` at every registry: the
/// same bytes for the same inputs (sorted keys), so a rerun compares it.
pub fn docker_config(user: &str, password: &str, registries: &[String]) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let auths: BTreeMap<&str, serde_json::Value> = registries
        .iter()
        .map(|r| (r.as_str(), serde_json::json!({ "auth": auth })))
        .collect();
    let mut s = serde_json::to_string_pretty(&serde_json::json!({ "auths": auths }))
        .expect("a map of strings serializes");
    s.push('\n');
    s
}

/// A new password: 32 bytes from the system's random source, base64url
/// without padding (no `:` or newline, safe in htpasswd and Basic auth).
pub fn new_password() -> Result<String, PushError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PushError::Random)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// `user:<bcrypt>\n`, the line distribution and `slipway gateway` read.
pub fn htpasswd_line(user: &str, password: &str) -> Result<String, PushError> {
    let hash = bcrypt::hash(password, BCRYPT_COST).map_err(PushError::Bcrypt)?;
    Ok(format!("{user}:{hash}\n"))
}

/// Whether `htpasswd` has an entry for `user` whose bcrypt hash, at
/// [`BCRYPT_COST`], verifies `password`. Read with the gateway's parser, so
/// an entry `slipway gateway` would refuse is rewritten here.
pub fn htpasswd_verifies(htpasswd: &str, user: &str, password: &str) -> bool {
    let path = std::path::Path::new("Secret key htpasswd");
    crate::gateway::htpasswd::Htpasswd::parse(path, htpasswd)
        .ok()
        .and_then(|h| h.hash_of(user).map(str::to_string))
        .is_some_and(|hash| {
            crate::gateway::htpasswd::cost(&hash) == BCRYPT_COST
                && bcrypt::verify(password, &hash).unwrap_or(false)
        })
}

/// A push Secret's data.
pub type Data = BTreeMap<String, ByteString>;

fn text<'a>(data: &'a BTreeMap<String, ByteString>, key: &str) -> Option<&'a str> {
    data.get(key)
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .filter(|s| !s.is_empty())
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

/// The data a new push Secret holds.
pub fn new_data(registries: &[String]) -> Result<BTreeMap<String, ByteString>, PushError> {
    let password = new_password()?;
    data_for(PUSH_USER, &password, registries)
}

fn data_for(
    user: &str,
    password: &str,
    registries: &[String],
) -> Result<BTreeMap<String, ByteString>, PushError> {
    Ok(BTreeMap::from([
        (KEY_USERNAME.into(), bytes(user)),
        (KEY_PASSWORD.into(), bytes(password)),
        (KEY_HTPASSWD.into(), bytes(&htpasswd_line(user, password)?)),
        (
            KEY_DOCKER_CONFIG.into(),
            bytes(&docker_config(user, password, registries)),
        ),
    ]))
}

/// What an existing push Secret must become, if anything: its data with
/// slipway's keys made right (other keys kept) and the first reason.
pub fn assess(
    observed: &Secret,
    registries: &[String],
) -> Result<Option<(Data, PushWhy)>, PushError> {
    let mut data = observed.data.clone().unwrap_or_default();
    let user = text(&data, KEY_USERNAME)
        .filter(|u| !u.contains([':', '\n', '\r']))
        .unwrap_or(PUSH_USER)
        .to_string();
    let Some(password) = text(&data, KEY_PASSWORD).map(str::to_string) else {
        data.extend(new_data(registries)?);
        return Ok(Some((data, PushWhy::NoPassword)));
    };
    let mut why = None;
    if text(&data, KEY_USERNAME) != Some(user.as_str()) {
        data.insert(KEY_USERNAME.into(), bytes(&user));
    }
    if !text(&data, KEY_HTPASSWD).is_some_and(|h| htpasswd_verifies(h, &user, &password)) {
        data.insert(
            KEY_HTPASSWD.into(),
            bytes(&htpasswd_line(&user, &password)?),
        );
        why.get_or_insert(PushWhy::StaleHtpasswd);
    }
    let config = docker_config(&user, &password, registries);
    if text(&data, KEY_DOCKER_CONFIG) != Some(config.as_str()) {
        data.insert(KEY_DOCKER_CONFIG.into(), bytes(&config));
        why.get_or_insert(PushWhy::StaleDockerConfig);
    }
    Ok(why.map(|w| (data, w)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn sans() -> Sans {
        Sans::new(
            &["registry.shared-services".into(), "registry".into()],
            &[
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap(),
            ],
        )
        .unwrap()
    }

    fn secret(data: BTreeMap<String, ByteString>) -> Secret {
        Secret {
            data: Some(data),
            ..Secret::default()
        }
    }

    fn get(d: &BTreeMap<String, ByteString>, k: &str) -> String {
        String::from_utf8(d[k].0.clone()).unwrap()
    }

    #[test]
    fn registries_are_every_san_with_the_port() {
        assert_eq!(
            registries(&sans(), 5000),
            [
                "10.0.0.5:5000",
                "[fd00::5]:5000",
                "registry.shared-services:5000",
                "registry:5000"
            ]
        );
    }

    #[test]
    fn docker_config_is_basic_auth_for_each_registry() {
        let c = docker_config("u", "p", &["a:1".into(), "b:2".into()]);
        let v: serde_json::Value = serde_json::from_str(&c).unwrap();
        // base64("u:p") worked out by hand: "dTpw".
        assert_eq!(
            v,
            serde_json::json!({"auths": {"a:1": {"auth": "dTpw"}, "b:2": {"auth": "dTpw"}}})
        );
    }

    #[test]
    fn a_new_secret_is_consistent_and_then_left_alone() {
        let regs = registries(&sans(), 5000);
        let d = new_data(&regs).unwrap();
        let pw = get(&d, KEY_PASSWORD);
        assert_eq!(pw.len(), 43);
        assert_eq!(get(&d, KEY_USERNAME), PUSH_USER);
        assert!(htpasswd_verifies(&get(&d, KEY_HTPASSWD), PUSH_USER, &pw));
        assert!(!htpasswd_verifies(
            &get(&d, KEY_HTPASSWD),
            PUSH_USER,
            "wrong"
        ));
        assert!(get(&d, KEY_HTPASSWD).starts_with("slipway-push:$2"));
        assert_eq!(assess(&secret(d), &regs).unwrap(), None);
        assert_ne!(new_password().unwrap(), pw);
    }

    #[test]
    fn a_san_change_rewrites_config_json_with_the_same_password() {
        let regs = registries(&sans(), 5000);
        let d = new_data(&regs).unwrap();
        let pw = get(&d, KEY_PASSWORD);
        let more: Vec<String> = regs
            .iter()
            .cloned()
            .chain(["lb.example:5000".into()])
            .collect();
        let (d2, why) = assess(&secret(d.clone()), &more).unwrap().unwrap();
        assert_eq!(why, PushWhy::StaleDockerConfig);
        assert_eq!(get(&d2, KEY_PASSWORD), pw);
        assert_eq!(get(&d2, KEY_HTPASSWD), get(&d, KEY_HTPASSWD));
        assert!(get(&d2, KEY_DOCKER_CONFIG).contains("lb.example:5000"));
    }

    #[test]
    fn a_wrong_htpasswd_is_rehashed_and_other_keys_kept() {
        let regs = registries(&sans(), 5000);
        let mut d = new_data(&regs).unwrap();
        let pw = get(&d, KEY_PASSWORD);
        d.insert(
            KEY_HTPASSWD.into(),
            bytes(&htpasswd_line(PUSH_USER, "other").unwrap()),
        );
        d.insert("note".into(), bytes("the operator's"));
        let (d2, why) = assess(&secret(d), &regs).unwrap().unwrap();
        assert_eq!(why, PushWhy::StaleHtpasswd);
        assert!(htpasswd_verifies(&get(&d2, KEY_HTPASSWD), PUSH_USER, &pw));
        assert_eq!(get(&d2, "note"), "the operator's");
    }

    /// #18 point 7: an entry written at cost 10 before verifies, but is
    /// rewritten at [`BCRYPT_COST`] from the same password.
    #[test]
    fn an_entry_at_the_old_cost_is_rehashed_with_the_same_password() {
        let regs = registries(&sans(), 5000);
        let mut d = new_data(&regs).unwrap();
        let pw = get(&d, KEY_PASSWORD);
        let old = format!("{PUSH_USER}:{}\n", bcrypt::hash(&pw, 10).unwrap());
        d.insert(KEY_HTPASSWD.into(), bytes(&old));
        let (d2, why) = assess(&secret(d), &regs).unwrap().unwrap();
        assert_eq!(why, PushWhy::StaleHtpasswd);
        assert_eq!(get(&d2, KEY_PASSWORD), pw);
        let new = get(&d2, KEY_HTPASSWD);
        assert!(new.starts_with(&format!("{PUSH_USER}:$2b$04$")), "{new}");
        assert!(htpasswd_verifies(&new, PUSH_USER, &pw));
    }

    #[test]
    fn no_password_makes_a_new_one() {
        let regs = registries(&sans(), 5000);
        let (d, why) = assess(&secret(BTreeMap::new()), &regs).unwrap().unwrap();
        assert_eq!(why, PushWhy::NoPassword);
        let pw = get(&d, KEY_PASSWORD);
        assert!(htpasswd_verifies(&get(&d, KEY_HTPASSWD), PUSH_USER, &pw));
    }
}
