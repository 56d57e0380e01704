//! What `/readyz` answers: a set of named checks, each passing or failing
//! with the reason an operator reads in the response body.
//!
//! The node's checks are written by one writer, [`crate::node::status`]
//! (from each pass's [`crate::node::reconcile::NodeStatus`]), and by the
//! daemon for the proxy and the upstream probe, and by the canary
//! ([`crate::node::canary`]) for the `canary` check. Another program (the
//! gateway, #10) brings its own set of checks through [`ReadyCheck`].

use std::fmt;
use std::sync::RwLock;

/// One readiness check. Its name is part of the `/readyz` body contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    /// Every alias directory holds the wanted host configuration.
    HostconfigApplied,
    /// containerd's `config_path` covers the directory slipway writes.
    ConfigPathCovered,
    /// The proxy is listening.
    ProxyBound,
    /// The upstream registry answered `/v2/` at least once.
    UpstreamAnswered,
    /// The latest canary pull through CRI succeeded (passes when no
    /// canary is configured).
    Canary,
}

impl Check {
    pub const ALL: [Check; 5] = [
        Check::HostconfigApplied,
        Check::ConfigPathCovered,
        Check::ProxyBound,
        Check::UpstreamAnswered,
        Check::Canary,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::HostconfigApplied => "hostconfig_applied",
            Check::ConfigPathCovered => "containerd_config_path_covers_certs_dir",
            Check::ProxyBound => "proxy_bound",
            Check::UpstreamAnswered => "upstream_answered",
            Check::Canary => "canary",
        }
    }
}

/// A program's set of readiness checks: a closed enum whose names are
/// part of its `/readyz` body contract.
pub trait ReadyCheck: Copy + Eq + fmt::Display + Send + Sync + 'static {
    /// Every check, in the order `/readyz` lists them.
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|c| *c == self)
            .expect("a check is in ALL")
    }
}

impl ReadyCheck for Check {
    const ALL: &'static [Check] = &Check::ALL;
    fn name(self) -> &'static str {
        Check::name(self)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The checks and their state. Each starts failing with "not checked yet".
pub struct Readiness<C: ReadyCheck = Check> {
    checks: RwLock<Vec<Option<String>>>,
    /// Lines `/readyz` adds that do not make it fail (#20: a mirrored
    /// upstream left to an administrator's hosts.toml).
    notes: RwLock<Vec<String>>,
    _checks: std::marker::PhantomData<C>,
}

impl<C: ReadyCheck> Default for Readiness<C> {
    fn default() -> Self {
        Readiness {
            checks: RwLock::new(
                C::ALL
                    .iter()
                    .map(|_| Some("not checked yet".into()))
                    .collect(),
            ),
            notes: RwLock::new(vec![]),
            _checks: std::marker::PhantomData,
        }
    }
}

impl<C: ReadyCheck> Readiness<C> {
    /// Record a check: `Ok` passes, `Err` fails with the reason.
    pub fn set(&self, check: C, result: Result<(), String>) {
        self.checks.write().expect("readiness lock")[check.index()] = result.err();
    }

    /// The failing checks with their reasons, in [`Check::ALL`] order.
    pub fn failing(&self) -> Vec<(C, String)> {
        let checks = self.checks.read().expect("readiness lock");
        C::ALL
            .iter()
            .filter_map(|c| checks[c.index()].clone().map(|r| (*c, r)))
            .collect()
    }

    /// Replace the notes: detail that does not fail readiness.
    pub fn set_notes(&self, notes: Vec<String>) {
        *self.notes.write().expect("readiness lock") = notes;
    }

    /// `(ready, body)` for `/readyz`: the first line names the failing
    /// checks, then one line per check with its reason, then a `note:`
    /// line per note.
    pub fn report(&self) -> (bool, String) {
        let (ready, mut body) = self.checks_report();
        for n in self.notes.read().expect("readiness lock").iter() {
            body.push_str(&format!("note: {n}\n"));
        }
        (ready, body)
    }

    fn checks_report(&self) -> (bool, String) {
        let failing = self.failing();
        if failing.is_empty() {
            return (true, "ready\n".into());
        }
        let names: Vec<&str> = failing.iter().map(|(c, _)| c.name()).collect();
        let mut body = format!("not ready: {}\n", names.join(", "));
        for (c, reason) in &failing {
            body.push_str(&format!("{c}: {reason}\n"));
        }
        (false, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_starts_failing_and_names_its_reason() {
        let r: Readiness = Readiness::default();
        assert_eq!(r.failing().len(), 5);
        for c in Check::ALL {
            r.set(c, Ok(()));
        }
        assert_eq!(r.report(), (true, "ready\n".to_string()));
        r.set(
            Check::HostconfigApplied,
            Err("a:5000: /x/hosts.toml: cannot read: is a FIFO".into()),
        );
        let (ready, body) = r.report();
        assert!(!ready);
        assert_eq!(
            body,
            "not ready: hostconfig_applied\nhostconfig_applied: a:5000: /x/hosts.toml: cannot read: is a FIFO\n"
        );
        r.set(Check::HostconfigApplied, Ok(()));
        r.set_notes(vec!["docker.io: conflict".into()]);
        assert_eq!(
            r.report(),
            (true, "ready\nnote: docker.io: conflict\n".to_string())
        );
    }
}
