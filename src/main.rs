//! The `dari-relay` binary: parses the command line, sets up logging and
//! hands over to the library, then turns the outcome into an exit code
//! (0 success, 2 bad usage/config/argument, 1 runtime failure).

use std::process::ExitCode;

use clap::Parser;
use dari_relay::cli::{self, Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its work at info; one-shot commands print their own
    // output and only log problems. RUST_LOG overrides both.
    let default_level = match cli.command {
        Command::Run(_) => "info",
        Command::Demo => "error",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    match cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error());
            ExitCode::from(failure.exit_code())
        }
    }
}
