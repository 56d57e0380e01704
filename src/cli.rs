//! The command line: clap types, the kubectl-plugin name, and dispatch of
//! each command to its program ([`crate::node`], [`crate::pki`],
//! [`crate::builds`]). Every failure is an [`Error`], whose exit code comes
//! from [`crate::ExitStatus`]; nothing here exits the process.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::builds::BuildError;
use crate::node::config::{AgentConfig, Overrides};
use crate::node::reconcile::{AgentError, Mode, NodePass};
use crate::pki::ensure::EnsureError;
use crate::pki::plan::{Names, Wanted};
use crate::pki::PkiError;
use crate::ExitStatus;

#[derive(Parser)]
#[command(
    name = "slipway",
    version,
    about = "Make an in-cluster registry pullable from every node"
)]
pub struct Cli {
    /// Log format: text (default on a terminal) or json (default otherwise)
    #[arg(long, global = true, env = "SLIPWAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the node agent: host configuration kept true, the pull-through
    /// proxy and the admin server (with --once: apply once and exit)
    Agent {
        /// Agent config file (TOML)
        #[arg(long, env = "SLIPWAY_CONFIG")]
        config: Option<PathBuf>,
        /// Apply the host configuration once and exit
        #[arg(long)]
        once: bool,
        /// Add config_path to containerd's config (keeps a backup; never restarts containerd)
        #[arg(long, env = "SLIPWAY_FIX_CONTAINERD_CONFIG")]
        fix_containerd_config: bool,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Run the registry's TLS front: reads pass, writes need a push
    /// account, the certificate reloads without a restart (#10)
    Gateway {
        /// Gateway config file (TOML, a [gateway] table)
        #[arg(long, env = "SLIPWAY_GATEWAY_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: crate::gateway::config::GatewayOverrides,
    },
    /// Make the registry CA and TLS certificate
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// Remove everything slipway wrote on this node and restore merged files
    Cleanup {
        #[arg(long, env = "SLIPWAY_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// The canary image the agent pulls to prove readiness
    Canary {
        #[command(subcommand)]
        cmd: CanaryCmd,
    },
    /// Build an image from a git revision in the cluster with Kaniko; prints REG/NAME@sha256:…
    Build(Box<crate::builds::BuildArgs>),
    /// Garbage-collect the registry: keep what the cluster uses, the last
    /// builds, recent pulls and fresh cache; a dry run unless --apply (#21)
    Gc(Box<crate::gc::GcArgs>),
    /// List builds with their status, commit, digest and age
    Builds {
        #[command(flatten)]
        settings: crate::builds::Settings,
        #[arg(long, value_enum, default_value_t = crate::builds::OutputFormat::Text)]
        output: crate::builds::OutputFormat,
    },
    /// Show a build's git and Kaniko logs (following a running build)
    Logs {
        /// Build name, as printed by slipway build --detach or slipway builds
        build: String,
        #[command(flatten)]
        settings: crate::builds::Settings,
    },
}

#[derive(Subcommand)]
pub enum PkiCmd {
    /// Write ca.crt, ca.key, tls.crt and tls.key into a directory
    Init {
        #[arg(long)]
        out_dir: PathBuf,
        /// DNS SAN for the registry certificate (repeatable)
        #[arg(long = "dns", required_unless_present = "ips")]
        dns: Vec<String>,
        /// IP SAN for the registry certificate (repeatable)
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// Overwrite existing files
        #[arg(long)]
        force: bool,
    },
    /// Create or renew the CA and TLS Secrets, the public CA ConfigMap and
    /// the push Secret in a namespace (run by the pki Job and CronJob);
    /// idempotent
    Ensure {
        /// Namespace of the registry; its Service names are always SANs
        #[arg(long, env = "SLIPWAY_PKI_NAMESPACE", default_value = "shared-services")]
        namespace: String,
        /// Extra DNS SAN, e.g. a LoadBalancer hostname (repeatable, or comma-separated)
        #[arg(long = "dns", env = "SLIPWAY_PKI_DNS", value_delimiter = ',')]
        dns: Vec<String>,
        /// Extra IP SAN, e.g. a LoadBalancer IP (repeatable, or comma-separated)
        #[arg(long = "ip", env = "SLIPWAY_PKI_IPS", value_delimiter = ',')]
        ips: Vec<String>,
        /// Secret with the CA key pair (ca.crt, ca.key)
        #[arg(long, default_value = "registry-ca")]
        ca_secret: String,
        /// kubernetes.io/tls Secret with the registry's certificate
        #[arg(long, default_value = "registry-tls")]
        tls_secret: String,
        /// ConfigMap with the public CA certificate (ca.crt)
        #[arg(long, default_value = "registry-ca")]
        configmap: String,
        /// Secret with the push account: password, htpasswd (for the
        /// gateway) and config.json (for Kaniko)
        #[arg(long, env = "SLIPWAY_PKI_PUSH_SECRET", default_value = "registry-push")]
        push_secret: String,
        /// The registry's port, as the names in config.json carry it
        #[arg(long, env = "SLIPWAY_PKI_REGISTRY_PORT", default_value_t = crate::pki::push::DEFAULT_REGISTRY_PORT)]
        registry_port: u16,
    },
}

#[derive(Subcommand)]
pub enum CanaryCmd {
    /// Push the tiny deterministic canary image; prints REG/REPO@sha256:…
    /// (the same digest every time)
    Push {
        /// The registry, https://host[:port]
        #[arg(long, env = "SLIPWAY_CANARY_UPSTREAM")]
        upstream: String,
        /// PEM CA bundle that signs the registry's certificate (the only roots trusted)
        #[arg(long, env = "SLIPWAY_CANARY_CA_FILE")]
        ca_file: PathBuf,
        /// Repository to push to
        #[arg(long, default_value = crate::node::canary_image::DEFAULT_REPO)]
        repo: String,
        /// Registry name to print instead of the upstream's host[:port]
        /// (the alias nodes pull it under, for agent.canary_image)
        #[arg(long)]
        name_as: Option<String>,
    },
}

/// Any command's failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Boxed: kube's errors are large, and this is every command's result.
    #[error(transparent)]
    Ensure(Box<EnsureError>),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Canary(#[from] crate::node::canary_image::PushError),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error(transparent)]
    Gc(#[from] crate::gc::GcError),
    #[error("{what}: {source}")]
    Runtime {
        what: &'static str,
        source: std::io::Error,
    },
}

impl ExitStatus for Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::Agent(e) => e.exit_code(),
            Error::Pki(e) => e.exit_code(),
            Error::Ensure(e) => EnsureError::exit_code(e),
            Error::Build(e) => ExitStatus::exit_code(e),
            Error::Canary(e) => e.exit_code(),
            Error::Gateway(e) => e.exit_code(),
            Error::Gc(e) => e.exit_code(),
            Error::Runtime { .. } => crate::EXIT_APPLY_FAILED,
        }
    }
}

impl From<EnsureError> for Error {
    fn from(e: EnsureError) -> Self {
        Error::Ensure(Box::new(e))
    }
}

impl ExitStatus for PkiError {
    fn exit_code(&self) -> u8 {
        PkiError::exit_code(self)
    }
}

impl ExitStatus for EnsureError {
    fn exit_code(&self) -> u8 {
        EnsureError::exit_code(self)
    }
}

impl ExitStatus for BuildError {
    fn exit_code(&self) -> u8 {
        BuildError::exit_code(self) as u8
    }
}

/// Parses the command line; as `kubectl-slipway`, help and errors say
/// `kubectl slipway`. Exits on `--help` and usage errors, as clap does.
pub fn parse() -> Cli {
    let plugin = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "kubectl-slipway"))
        .unwrap_or(false);
    let mut cmd = Cli::command();
    if plugin {
        cmd = cmd.name("kubectl slipway").bin_name("kubectl slipway");
    }
    Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit())
}

fn runtime(multi: bool) -> Result<tokio::runtime::Runtime, Error> {
    let mut b = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().map_err(|source| Error::Runtime {
        what: "cannot start the tokio runtime",
        source,
    })
}

/// Runs one command. `Ok` carries the exit code of a command that ran to
/// its end (the agent exits 130 on a second signal while draining).
pub fn run(cmd: Cmd) -> Result<u8, Error> {
    match cmd {
        Cmd::Agent {
            config,
            once: false,
            fix_containerd_config,
            overrides,
        } => Ok(crate::node::daemon::run(
            crate::node::daemon::DaemonOptions {
                config,
                overrides,
                fix_containerd_config,
            },
        )?),
        Cmd::Agent {
            config,
            once: true,
            fix_containerd_config,
            overrides,
        } => {
            let cfg = AgentConfig::load(config.as_deref(), &overrides).map_err(AgentError::from)?;
            let mode = Mode::Apply {
                hosts: crate::node::reconcile::host_entries(&cfg),
                fix_containerd_config,
            };
            one_shot(&cfg, &mode)
        }
        Cmd::Gateway { config, overrides } => Ok(crate::gateway::run(config, overrides)?),
        Cmd::Cleanup { config, overrides } => {
            let cfg = AgentConfig::load(config.as_deref(), &overrides).map_err(AgentError::from)?;
            one_shot(&cfg, &Mode::Cleanup)
        }
        Cmd::Pki {
            cmd:
                PkiCmd::Init {
                    out_dir,
                    dns,
                    ips,
                    force,
                },
        } => {
            let sans = crate::pki::Sans::new(&dns, &ips)?;
            for p in crate::pki::write_files(&out_dir, &sans, force)? {
                println!("{}", p.display());
            }
            Ok(0)
        }
        Cmd::Pki {
            cmd:
                PkiCmd::Ensure {
                    namespace,
                    dns,
                    ips,
                    ca_secret,
                    tls_secret,
                    configmap,
                    push_secret,
                    registry_port,
                },
        } => {
            let wanted = Names::new(&namespace, &ca_secret, &tls_secret, &configmap)
                .and_then(|names| names.with_push_secret(&push_secret))
                .and_then(|names| Wanted::new(names, &dns, &ips))
                .map(|w| w.with_registry_port(registry_port))
                .map_err(EnsureError::from)?;
            let report = runtime(false)?.block_on(crate::pki::ensure::ensure_default(&wanted))?;
            println!("{report}");
            Ok(0)
        }
        Cmd::Build(args) => {
            let rt = runtime(true)?;
            rt.block_on(async {
                let mut signals =
                    crate::signal::Signals::install().map_err(|source| Error::Runtime {
                        what: "cannot install signal handlers",
                        source,
                    })?;
                crate::builds::run::cli_build(&args, signals.terminated()).await?;
                Ok(0)
            })
        }
        Cmd::Gc(args) => {
            let report = runtime(false)?.block_on(crate::gc::run(&args))?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serialises")
                );
            } else {
                print!("{}", report.text());
            }
            Ok(0)
        }
        Cmd::Builds { settings, output } => {
            runtime(true)?.block_on(crate::builds::run::cli_builds(&settings, output))?;
            Ok(0)
        }
        Cmd::Canary {
            cmd:
                CanaryCmd::Push {
                    upstream,
                    ca_file,
                    repo,
                    name_as,
                },
        } => {
            let args = crate::node::canary_image::PushArgs {
                upstream,
                ca_file,
                repo,
                name_as,
            };
            let reference = runtime(false)?.block_on(crate::node::canary_image::push(&args))?;
            println!("{reference}");
            Ok(0)
        }
        Cmd::Logs { build, settings } => {
            runtime(true)?.block_on(crate::builds::run::cli_logs(&settings, &build))?;
            Ok(0)
        }
    }
}

/// `--once` and `cleanup`: one node pass, a line per alias on stdout.
fn one_shot(cfg: &AgentConfig, mode: &Mode) -> Result<u8, Error> {
    let mut pass = NodePass::new(std::sync::Arc::new(crate::node::fs::RealFs));
    let status = pass.run(cfg, mode);
    crate::node::status::log(
        &status,
        &cfg.containerd.certs_dir,
        &mut Default::default(),
        std::time::Instant::now(),
    );
    for a in &status.aliases {
        println!("{a}");
    }
    status.into_result(cfg.aliases.len())?;
    Ok(0)
}
