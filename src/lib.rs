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
//! | [`build::job`], [`build::log`], [`build::status`] | [`build::run`] creates, follows and cancels Kaniko Jobs |
//!
//! Data flows one way: config → plan → apply → report.
#![forbid(unsafe_code)]

pub mod agent;
pub mod apply;
pub mod build;
pub mod ca;
pub mod config;
pub mod containerd;
pub mod crio;
pub mod fsutil;
pub mod hostconfig;
pub mod pki;

/// Exit code for bad configuration (sysexits.h `EX_CONFIG` is 78, but the
/// project contract is `EX_USAGE`-style 64 for "the operator must fix input").
pub const EXIT_BAD_CONFIG: i32 = 64;
/// Exit code when configuration was valid but applying it failed somewhere.
pub const EXIT_APPLY_FAILED: i32 = 1;
