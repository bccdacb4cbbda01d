//! The `dari-relay` binary: parses the command line and hands over to the
//! library (which sets up logging once it knows the format), then turns the
//! outcome into an exit code (0 success, 2 bad usage/config/argument, 1
//! runtime failure), printing a failure's causes once each (`cli::print_error`).

use std::process::ExitCode;

use clap::Parser;
use dari_relay::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::execute(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            cli::print_error(&failure);
            ExitCode::from(failure.exit_code())
        }
    }
}
