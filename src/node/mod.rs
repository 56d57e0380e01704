//! The node agent: everything `slipway agent` and `slipway cleanup` do on a
//! node.
//!
//! | module | core (pure) or shell (I/O) | owns |
//! | --- | --- | --- |
//! | [`config`] | core | the agent's TOML, `SLIPWAY_*` env and flags |
//! | [`hostconfig`] | core | what slipway wants in `certs.d/<alias>/` |
//! | [`containerd`] | core | does containerd read our directory; the opt-in fix |
//! | [`crio`] | core | which CRI-O registry entry an alias resolves to |
//! | [`ca_bundle`] | core | validation of the registry CA file |
//! | [`fs`] | shell | every host file call, behind the [`fs::NodeFs`] trait |
//! | [`apply`] | shell | executes host configuration plans through [`fs::NodeFs`] |
//! | [`reconcile`] | shell | the one node pass: inspect → advise → fix → apply → status |
//! | [`daemon`] | shell | the long-running agent's event loop |
//! | [`status`] | core | the node status, and the one writer of readiness and metrics |
//! | [`canary`] | shell | the canary pull through CRI, its readiness check and metrics |
//! | [`taint`] | core + shell | the startup taint's JSON patch, and its removal from our Node |
//!
//! Data flows one way: config → plan → apply → report.

pub mod apply;
pub mod ca_bundle;
pub mod canary;
pub mod canary_image;
pub mod config;
pub mod containerd;
pub mod crio;
pub(crate) mod daemon;
pub mod fs;
pub mod hostconfig;
pub mod reconcile;
pub(crate) mod status;
pub mod taint;
