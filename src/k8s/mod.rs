//! Kubernetes helpers shared by the PKI ([`crate::pki`]) and the build
//! runner ([`crate::builds`]): object name validation, the labels on every
//! object slipway creates, and classification of API errors.
//!
//! Pure apart from reading a [`kube::Error`]; talks to no API server.

/// `app.kubernetes.io/managed-by`.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/part-of`.
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
/// The value of both labels above.
pub const SLIPWAY: &str = "slipway";
/// Labels on every object slipway creates.
pub const LABELS: &[(&str, &str)] = &[(LABEL_MANAGED_BY, SLIPWAY), (LABEL_PART_OF, SLIPWAY)];
/// The field manager of every write slipway makes (server-side ownership).
pub const FIELD_MANAGER: &str = "slipway";

/// An object name the API server would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    pub what: String,
    pub value: String,
    pub reason: &'static str,
}

fn name_error(what: &str, value: &str, reason: &'static str) -> NameError {
    NameError {
        what: what.into(),
        value: value.into(),
        reason,
    }
}

fn label_chars(v: &str) -> bool {
    v.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-')
}

/// RFC 1123 label, as Kubernetes requires of a namespace.
pub fn check_label(what: &str, v: &str) -> Result<(), NameError> {
    if v.is_empty() || v.len() > 63 {
        return Err(name_error(what, v, "must be 1 to 63 characters"));
    }
    if !label_chars(v) {
        return Err(name_error(
            what,
            v,
            "must be lowercase letters, digits and '-', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// RFC 1123 subdomain, as Kubernetes requires of most object names.
pub fn check_subdomain(what: &str, v: &str) -> Result<(), NameError> {
    if v.is_empty() || v.len() > 253 {
        return Err(name_error(what, v, "must be 1 to 253 characters"));
    }
    if !v.split('.').all(|p| !p.is_empty() && label_chars(p)) {
        return Err(name_error(
            what,
            v,
            "must be lowercase letters, digits, '-' and '.', each part starting and ending \
             with a letter or digit",
        ));
    }
    Ok(())
}

/// A Kubernetes qualified name (label and taint keys): an optional DNS
/// subdomain prefix and '/', then a name of 1 to 63 characters, letters,
/// digits, '-', '_' and '.', starting and ending with a letter or digit
/// (apimachinery `validation.IsQualifiedName`).
pub fn check_qualified_name(what: &str, v: &str) -> Result<(), NameError> {
    let (prefix, name) = match v.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, v),
    };
    if let Some(p) = prefix {
        check_subdomain(&format!("{what} prefix"), p).map_err(|e| name_error(what, v, e.reason))?;
    }
    if name.is_empty() || name.len() > 63 {
        return Err(name_error(what, v, "name part must be 1 to 63 characters"));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if !ok {
        return Err(name_error(
            what,
            v,
            "name part must be letters, digits, '-', '_' and '.', starting and ending with a letter or digit, after an optional DNS subdomain prefix and '/'",
        ));
    }
    Ok(())
}

/// What an API error means to a caller that must decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiClass {
    /// 404: the object (or its namespace) is not there.
    NotFound,
    /// 409: a create lost to another writer (AlreadyExists) or a replace
    /// carried a stale `resourceVersion` (Conflict). Read again and re-plan.
    Conflict,
    /// 401/403: the caller lacks the right.
    Denied,
    /// 422: the API server refused the object itself.
    Invalid,
    /// Any other status, or no status at all (transport, TLS, decoding).
    Other,
}

/// The HTTP status of an API error, if the server answered.
pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Classify an API error by its status code.
pub fn classify(e: &kube::Error) -> ApiClass {
    match api_code(e) {
        Some(404) => ApiClass::NotFound,
        Some(409) => ApiClass::Conflict,
        Some(401 | 403) => ApiClass::Denied,
        Some(422) => ApiClass::Invalid,
        _ => ApiClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_rfc_1123() {
        assert!(check_label("namespace", "shared-services").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", &"a".repeat(64)] {
            assert!(check_label("namespace", bad).is_err(), "{bad:?}");
        }
        assert!(check_subdomain("ConfigMap name", "registry-ca.v1").is_ok());
        for bad in ["", "a..b", ".a", "a_b", &"a".repeat(254)] {
            assert!(check_subdomain("ConfigMap name", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_label("namespace", "Shared_Services")
                .unwrap_err()
                .to_string(),
            "invalid namespace \"Shared_Services\": must be lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        );
    }
}
