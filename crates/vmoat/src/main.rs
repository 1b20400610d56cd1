//! The `vmoat` binary: parses the command line, sets up logging, runs one command and turns
//! its outcome into an exit status. Each command lives in its own module under `commands/`.

mod cli;
mod commands;
mod context;
mod disk_use;
mod exit;
mod interrupt;
mod lifecycle;
mod logging;
mod output;
mod platform;
mod progress;
mod seed;
mod vm;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::exit::Exit;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // clap prints help and version to stdout and usage errors to stderr itself.
            let _ = err.print();
            return match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(Exit::Usage.code()),
            };
        }
    };

    logging::init(cli.verbose, cli.quiet);

    match commands::run(cli) {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(err) => {
            output::error(&err.error);
            ExitCode::from(err.exit.code())
        }
    }
}
