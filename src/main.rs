//! The `slipway` binary: parse arguments, start tracing, call the library,
//! map the result to an exit code (64: bad configuration).
//!
//! Also a kubectl plugin: installed (or linked) as `kubectl-slipway`, it
//! runs as `kubectl slipway build …` (`ln -s $(command -v slipway)
//! /usr/local/bin/kubectl-slipway`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use slipway::node::config::{AgentConfig, Overrides};
use slipway::node::reconcile::{self as agent, AgentError, OnceOptions};
use slipway::pki::ensure::{self as pki_cluster, EnsureError};
use slipway::pki::plan::{Names, Wanted};
use slipway::pki::PkiError;

#[derive(Parser)]
#[command(
    name = "slipway",
    version,
    about = "Make an in-cluster registry pullable from every node"
)]
struct Cli {
    /// Log format: text (default on a terminal) or json (default otherwise)
    #[arg(long, global = true, env = "SLIPWAY_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Build an image from a git revision in the cluster with Kaniko; prints REG/NAME@sha256:…
    Build(Box<slipway::builds::BuildArgs>),
    /// List builds with their status, commit, digest and age
    Builds {
        #[command(flatten)]
        settings: slipway::builds::Settings,
        #[arg(long, value_enum, default_value_t = slipway::builds::OutputFormat::Text)]
        output: slipway::builds::OutputFormat,
    },
    /// Show a build's git and Kaniko logs (following a running build)
    Logs {
        /// Build name, as printed by slipway build --detach or slipway builds
        build: String,
        #[command(flatten)]
        settings: slipway::builds::Settings,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
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
    /// Create or renew the CA and TLS Secrets and the public CA ConfigMap
    /// in a namespace (run by the pki Job); idempotent
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
    },
}

fn init_tracing(fmt: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match fmt {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Parses the command line; as `kubectl-slipway`, help and errors say
/// `kubectl slipway`.
fn parse() -> Cli {
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

fn main() -> ExitCode {
    let cli = parse();
    init_tracing(cli.log_format);
    let code = match run(cli.cmd) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("slipway: {:#}", e);
            e.downcast_ref::<AgentError>()
                .map(AgentError::exit_code)
                .or_else(|| e.downcast_ref::<EnsureError>().map(EnsureError::exit_code))
                .or_else(|| e.downcast_ref::<PkiError>().map(PkiError::exit_code))
                .or_else(|| {
                    e.downcast_ref::<slipway::builds::BuildError>()
                        .map(slipway::builds::BuildError::exit_code)
                })
                .unwrap_or(slipway::EXIT_APPLY_FAILED)
        }
    };
    ExitCode::from(code as u8)
}

/// Runs an async build command on a fresh runtime.
fn block_on<T>(
    f: impl std::future::Future<Output = Result<T, slipway::builds::BuildError>>,
) -> anyhow::Result<T> {
    let rt = tokio::runtime::Runtime::new()?;
    Ok(rt.block_on(f)?)
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Agent {
            config,
            once,
            fix_containerd_config,
            overrides,
        } => {
            if !once {
                let code = slipway::node::daemon::run(slipway::node::daemon::DaemonOptions {
                    config,
                    overrides,
                    fix_containerd_config,
                })?;
                if code != 0 {
                    std::process::exit(code);
                }
                return Ok(());
            }
            let cfg = AgentConfig::load(config.as_deref(), &overrides).map_err(AgentError::from)?;
            let report = agent::run_once(
                &cfg,
                OnceOptions {
                    fix_containerd_config,
                },
            )?;
            for a in &report.aliases {
                println!("{a}");
            }
            agent::check(&report)?;
            Ok(())
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
            let sans = slipway::pki::Sans::new(&dns, &ips)?;
            for p in slipway::pki::write_files(&out_dir, &sans, force)? {
                println!("{}", p.display());
            }
            Ok(())
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
                },
        } => {
            let wanted = Names::new(&namespace, &ca_secret, &tls_secret, &configmap)
                .and_then(|names| Wanted::new(names, &dns, &ips))
                .map_err(EnsureError::from)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(pki_cluster::ensure_default(&wanted))?;
            println!("{report}");
            Ok(())
        }
        Cmd::Build(args) => block_on(slipway::builds::run::cli_build(&args)).map(|_| ()),
        Cmd::Builds { settings, output } => {
            block_on(slipway::builds::run::cli_builds(&settings, output))
        }
        Cmd::Logs { build, settings } => {
            block_on(slipway::builds::run::cli_logs(&settings, &build))
        }
        Cmd::Cleanup { config, overrides } => {
            let cfg = AgentConfig::load(config.as_deref(), &overrides).map_err(AgentError::from)?;
            let report = agent::cleanup(&cfg)?;
            for a in &report.aliases {
                println!("{a}");
            }
            agent::check(&report)?;
            Ok(())
        }
    }
}
