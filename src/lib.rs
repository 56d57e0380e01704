//! slipway: makes an in-cluster container registry pullable from every node.
//!
//! The crate is split into a pure, synchronous core that turns inputs into
//! plans and a thin shell that performs I/O:
//!
//! | core (pure)            | shell (I/O)                         |
//! |------------------------|-------------------------------------|
//! | [`config`]             | reads the agent's TOML, env, flags  |
//! | [`hostconfig`]         | [`apply`] writes `certs.d/<host>/`  |
//! | [`containerd`]         | [`agent`] reads containerd's config |
//! | [`ca`]                 |                                     |
//! | [`pki`], [`pki::plan`] | [`pki_cluster`] writes its Secrets  |
//! | [`build::job`], [`build::log`], [`build::status`] | [`build::run`] creates, follows and cancels Kaniko Jobs |
//!
//! Data flows one way: config → plan → apply → report.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod apply;
pub mod build;
pub mod ca;
pub mod cache;
pub mod config;
pub mod containerd;
pub mod crio;
pub mod daemon;
pub mod fsutil;
pub mod hostconfig;
pub mod metrics;
pub mod pki;
pub mod pki_cluster;
pub mod proxy;

/// Exit code for bad configuration (sysexits.h `EX_CONFIG` is 78, but the
/// project contract is `EX_USAGE`-style 64 for "the operator must fix input").
pub const EXIT_BAD_CONFIG: i32 = 64;
/// Exit code when configuration was valid but applying it failed somewhere.
pub const EXIT_APPLY_FAILED: i32 = 1;
