//! slipway: makes an in-cluster container registry pullable from every node.
//!
//! slipway is three programs in one binary; each has a folder:
//!
//! | module | program | core (pure) | shell (I/O) |
//! |--------|---------|-------------|-------------|
//! | [`node`] | `slipway agent`, `slipway cleanup` | config, hostconfig, containerd and CRI-O inspection, CA bundle, status | host files, apply, the node pass, the daemon loop |
//! | [`proxy`] | the agent's pull-through proxy | route classification | forwarding, the blob cache |
//! | [`admin`] | the agent's admin server | readiness, metrics | `/metrics`, `/healthz`, `/readyz` |
//! | [`gateway`] | `slipway gateway` | the write guard, htpasswd, config | the TLS server, relay, certificate reload |
//! | [`pki`] | `slipway pki` | certificates, the ensure plan | `pki init` files, `pki ensure` API calls |
//! | [`builds`] | `slipway build`, `builds`, `logs` | Job, log and status readers | the build runner's API calls |
//! | [`gc`] | `slipway gc` | the keep set, closure and deletions; the `[gc]` settings | distribution's storage tree, the API lists, the call to the gateway |
//! | [`mirror`] | shared by agent, gateway and build | the `[mirror]` table, mirror names, tag records (#20) | |
//! | [`s3`] | for `slipway gc` on a bucket (#22) | SigV4 signing, list answers, dates | |
//! | [`k8s`] | shared | name validators, labels, API error classes | |
//! | [`canary_image`] | `slipway canary push` | the canary image's bytes | its registry API pushes |
//! | [`cli`] | the command line | clap types | dispatch to the programs |
//! | [`serve`] | shared | | the accept loop and HTTP/1 settings of the proxy and the gateway |
//! | [`signal`] | shared | | one shutdown stream for the daemon and the build runner |
//!
//! Data flows one way: config → plan → apply → report.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub(crate) mod atomic;
pub mod builds;
pub mod cli;
pub mod gateway;
pub mod gc;
pub(crate) mod idle;
pub(crate) mod k8s;
pub mod mirror;
pub mod node;
pub mod pki;
pub mod proxy;
pub mod s3;
pub(crate) mod signal;

/// Exit code for bad configuration (sysexits.h `EX_CONFIG` is 78, but the
/// project contract is `EX_USAGE`-style 64 for "the operator must fix input").
pub const EXIT_BAD_CONFIG: u8 = 64;
/// Exit code when configuration was valid but applying it failed somewhere.
pub const EXIT_APPLY_FAILED: u8 = 1;

/// How a failure maps to the process exit code: [`EXIT_BAD_CONFIG`] for
/// input the operator must fix, other codes per program.
pub trait ExitStatus {
    fn exit_code(&self) -> u8;
}

/// An error and its sources as one line of report, each cause once: many
/// variants print their `{source}` in their own message and also keep it
/// as the source, and printing the chain as well said `… No such file or
/// directory (os error 2): No such file or directory (os error 2)` (#18
/// point 13). A source whose text the report already holds is left out.
/// Messages keep their own lines (a TOML parse error's caret under the
/// column).
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::report;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read config file {path}: {source}")]
        Says {
            path: String,
            source: std::io::Error,
        },
        #[error("cannot start")]
        Hides {
            #[source]
            source: std::io::Error,
        },
    }

    fn enoent() -> std::io::Error {
        std::io::Error::from_raw_os_error(2)
    }

    #[test]
    fn each_cause_once() {
        let e = Outer::Says {
            path: "/nonexistent".into(),
            source: enoent(),
        };
        let r = report(&e);
        assert_eq!(r.matches("os error 2").count(), 1, "{r}");
        assert!(
            r.starts_with("cannot read config file /nonexistent: "),
            "{r}"
        );
        // A source the message does not print is still reported.
        let r = report(&Outer::Hides { source: enoent() });
        assert!(r.starts_with("cannot start: "), "{r}");
        assert_eq!(r.matches("os error 2").count(), 1, "{r}");
    }
}
