//! The `slipway` binary: parse arguments, start tracing, call the library,
//! map the result to an exit code (64: bad configuration) through
//! [`slipway::ExitStatus`].
//!
//! Also a kubectl plugin: installed (or linked) as `kubectl-slipway`, it
//! runs as `kubectl slipway build …` (`ln -s $(command -v slipway)
//! /usr/local/bin/kubectl-slipway`).

use std::io::IsTerminal;
use std::process::ExitCode;

use slipway::cli::{self, LogFormat};
use slipway::ExitStatus;

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
    let args = cli::parse();
    init_tracing(args.log_format);
    match cli::run(args.cmd) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e.exit_code();
            eprintln!("slipway: {}", slipway::report(&e));
            ExitCode::from(code)
        }
    }
}
