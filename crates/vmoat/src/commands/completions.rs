//! `vmoat completions SHELL`: a completion script generated from the command definitions.

use clap::CommandFactory;
use clap_complete::Shell as Target;

use crate::cli::{Cli, CompletionsArgs, Shell};
use crate::exit::{CmdResult, Exit};
use crate::output;

/// Prints the completion script for the chosen shell.
pub fn run(args: CompletionsArgs) -> CmdResult {
    let target = match args.shell {
        Shell::Bash => Target::Bash,
        Shell::Zsh => Target::Zsh,
        Shell::Fish => Target::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(target, &mut Cli::command(), "vmoat", &mut script);
    output::raw(&script);
    Ok(Exit::Ok)
}
