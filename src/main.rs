//! The `slipway` binary: parse arguments, start tracing, call the library,
//! map the result to an exit code (64: bad configuration).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slipway::agent::{self, AgentError, OnceOptions};
use slipway::config::{AgentConfig, Overrides};

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let code = match run(cli.cmd) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("slipway: {:#}", e);
            e.downcast_ref::<AgentError>()
                .map(AgentError::exit_code)
                .unwrap_or(slipway::EXIT_APPLY_FAILED)
        }
    };
    ExitCode::from(code as u8)
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
                let code = slipway::daemon::run(slipway::daemon::DaemonOptions {
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
