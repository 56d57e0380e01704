//! The one writer of a pass's [`NodeStatus`]: log lines, readiness checks
//! and metrics. Nothing else sets `slipway_hostconfig_state`,
//! `slipway_containerd_config_path_covered`, `slipway_ca_*` or the
//! `hostconfig_applied` and `containerd_config_path_covers_certs_dir`
//! readiness checks.
//!
//! A persistent problem (a bad file an operator has not fixed yet) is
//! logged once when it appears, once when its message changes, and then at
//! most once a minute, counted in `slipway_hostconfig_errors_total`: a
//! reconcile every 100 ms used to write 99 identical ERROR lines in 10 s
//! (#13).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::admin::metrics::{AliasOnly, HostState, Metrics};
use crate::admin::readiness::{Check, Readiness};
use crate::node::ca_bundle::CaBundle;
use crate::node::reconcile::{AliasState, CaState, Fix, NodeStatus};

/// How often a problem that has not changed is logged again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// Which lines were logged when, per subject.
#[derive(Debug, Default)]
pub struct LogGate {
    last: HashMap<String, (String, Instant)>,
    seen: std::collections::HashSet<String>,
}

impl LogGate {
    /// Whether to log `message` about `subject` now.
    pub fn allow(&mut self, subject: &str, message: &str, now: Instant) -> bool {
        match self.last.get(subject) {
            Some((m, at)) if m == message && now.duration_since(*at) < REPEAT_EVERY => false,
            _ => {
                self.last
                    .insert(subject.to_string(), (message.to_string(), now));
                true
            }
        }
    }
    /// True when `message` differs from the last one for `subject`
    /// (information that is worth a line only when it changes).
    pub fn changed(&mut self, subject: &str, message: &str) -> bool {
        let key = format!("{subject} (changes only)");
        match self.last.get(&key) {
            Some((m, _)) if m == message => false,
            _ => {
                self.last.insert(key, (message.to_string(), Instant::now()));
                true
            }
        }
    }

    /// True only the first time `subject` is asked about.
    pub fn first(&mut self, subject: &str) -> bool {
        self.seen.insert(subject.to_string())
    }

    /// The problem is gone: log it again if it comes back.
    pub fn clear(&mut self, subject: &str) -> bool {
        self.last.remove(subject).is_some()
    }
}

/// Log what a pass found; problems go through `gate`.
pub fn log(status: &NodeStatus, certs_dir: &Path, gate: &mut LogGate, now: Instant) {
    match &status.ca {
        CaState::Rotated { subjects } => {
            info!(?subjects, "registry CA rotated; rolling out the new bundle")
        }
        CaState::Kept(e) => {
            let m = format!("{e}; keeping the CA loaded before");
            if gate.allow("ca", &m, now) {
                error!("{m}");
            }
        }
        CaState::Missing(e) => {
            let m = format!("{e}; no usable registry CA, host configuration not applied");
            if gate.allow("ca", &m, now) {
                error!("{m}");
            }
        }
        CaState::Loaded | CaState::NotNeeded => {
            if gate.clear("ca") {
                info!("registry CA readable again");
            }
        }
    }
    match status.containerd.advice(certs_dir) {
        Some(a) => {
            if gate.allow("containerd", &a, now) {
                warn!("{a}");
            }
        }
        None => {
            // Once at start, and again after a problem cleared.
            if gate.clear("containerd") | gate.first("containerd covered") {
                if let crate::node::reconcile::Coverage::Covered { config_path } =
                    &status.containerd
                {
                    info!(%config_path, "containerd reads {}", certs_dir.display());
                }
            }
        }
    }
    match &status.fix {
        Some(Fix::Patched { file, backup }) => warn!(
            file = %file.display(),
            backup = %backup.display(),
            "containerd config patched; containerd must be restarted to read config_path (slipway never restarts it)"
        ),
        Some(Fix::Failed(e)) => error!("--fix-containerd-config: {e}"),
        None => {}
    }
    if let Some(c) = status.crio.as_ref().filter(|c| gate.changed("crio", c)) {
        for line in c.lines() {
            info!("CRI-O: {line}");
        }
    }
    if let Some(e) = &status.certs_dir_error {
        let m = e.to_string();
        if gate.allow("certs_dir", &m, now) {
            error!("{m}");
        }
    } else {
        gate.clear("certs_dir");
    }
    for a in &status.aliases {
        let subject = format!("alias {}", a.alias);
        for w in &a.warnings {
            if gate.allow(&format!("{subject} warning {w}"), w, now) {
                warn!(alias = %a.alias, "{w}");
            }
        }
        match &a.state {
            AliasState::Error(e) => {
                let m = e.to_string();
                if gate.allow(&subject, &m, now) {
                    error!(alias = %a.alias, "{m}");
                }
            }
            AliasState::Conflict(m) => {
                if gate.allow(&subject, m, now) {
                    warn!(alias = %a.alias, "{m}");
                }
            }
            AliasState::Applied { changes } if !changes.is_empty() => {
                gate.clear(&subject);
                info!(alias = %a.alias, dir = %a.dir.display(), changes = %changes.join(", "), "applied")
            }
            AliasState::Drifted { changes } => {
                gate.clear(&subject);
                warn!(alias = %a.alias, changes = %changes.join(", "), "host configuration drifted; restored")
            }
            AliasState::Removed { changes } if !changes.is_empty() => {
                info!(alias = %a.alias, dir = %a.dir.display(), changes = %changes.join(", "), "removed")
            }
            _ => {
                if gate.clear(&subject) {
                    info!(alias = %a.alias, "host configuration applied again");
                }
            }
        }
    }
}

/// Turns each pass's status into logs, readiness and metrics.
pub struct StatusWriter {
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    gate: LogGate,
    /// Aliases with metric series, to drop those no longer configured.
    series: BTreeSet<String>,
}

impl StatusWriter {
    pub fn new(metrics: Arc<Metrics>, ready: Arc<Readiness>) -> Self {
        StatusWriter {
            metrics,
            ready,
            gate: LogGate::default(),
            series: BTreeSet::new(),
        }
    }

    pub fn write(
        &mut self,
        status: &NodeStatus,
        ca: Option<&CaBundle>,
        certs_dir: &Path,
        now: Instant,
    ) {
        log(status, certs_dir, &mut self.gate, now);
        let m = &self.metrics;
        if let Some(ca) = ca {
            m.ca_expiry.set(ca.not_after_unix as f64);
        }
        if matches!(status.ca, CaState::Rotated { .. }) {
            m.ca_rotations.inc();
        }
        m.config_path_covered
            .set(i64::from(status.containerd.covered()));
        self.ready.set(
            Check::ConfigPathCovered,
            status.containerd.advice(certs_dir).map_or(Ok(()), Err),
        );

        let mut now_configured = BTreeSet::new();
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        for a in status.aliases.iter().filter(|a| a.configured) {
            let state = match &a.state {
                AliasState::Conflict(e) => {
                    notes.push(format!("{}: {e}", a.alias));
                    HostState::Conflict
                }
                AliasState::Applied { .. } | AliasState::Removed { .. } => HostState::Applied,
                AliasState::Drifted { .. } => HostState::Drifted,
                AliasState::Error(e) => {
                    problems.push(format!("{}: {e}", a.alias));
                    m.hostconfig_errors
                        .get_or_create(&AliasOnly {
                            alias: a.alias.clone(),
                        })
                        .inc();
                    HostState::Error
                }
            };
            m.set_alias_state(&a.alias, state);
            now_configured.insert(a.alias.clone());
        }
        for a in status
            .aliases
            .iter()
            .filter(|a| !a.configured && a.failed())
        {
            if let AliasState::Error(e) = &a.state {
                problems.push(format!("{} (no longer configured): {e}", a.alias));
            }
        }
        if let Some(e) = &status.certs_dir_error {
            problems.push(e.to_string());
        }
        // A bad new CA file while the CA loaded before is still served is
        // logged, but the node still pulls: not a readiness failure.
        if let CaState::Missing(e) = &status.ca {
            problems.push(e.to_string());
        }
        // Without a usable CA or certs_dir, no alias was even tried.
        let applied_nothing =
            status.certs_dir_error.is_some() || matches!(status.ca, CaState::Missing(_));
        if !applied_nothing {
            for gone in self.series.difference(&now_configured) {
                m.remove_alias(gone);
            }
            self.series = now_configured;
        }
        self.ready.set_notes(notes);
        self.ready.set(
            Check::HostconfigApplied,
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems.join("; "))
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_persistent_problem_is_logged_once_a_minute() {
        let mut g = LogGate::default();
        let t0 = Instant::now();
        let mut logged = 0;
        // 100 passes in 10 s with the same error.
        for i in 0..100 {
            if g.allow("alias a", "bad toml", t0 + Duration::from_millis(100 * i)) {
                logged += 1;
            }
        }
        assert_eq!(logged, 1);
        assert!(g.allow("alias a", "another error", t0 + Duration::from_secs(11)));
        assert!(!g.allow("alias a", "another error", t0 + Duration::from_secs(12)));
        assert!(g.allow("alias a", "another error", t0 + Duration::from_secs(72)));
        assert!(g.clear("alias a"));
        assert!(g.allow("alias a", "another error", t0 + Duration::from_secs(73)));
    }
}
