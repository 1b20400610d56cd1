//! Dispatch from a parsed command line to the module that runs the command. One module per
//! command; each owns its output.

mod agent;
mod completions;
mod destroy;
mod doctor;
mod down;
mod image;
mod init;
mod list;
mod name;
mod provision;
mod ssh;
mod status;
mod test;
mod tunnel;
mod version;

use crate::cli::{Cli, Command};
use crate::context::Context;
use crate::exit::{CmdResult, Exit, WithExit};

/// Runs the command of `cli` and returns the exit status to end with.
pub fn run(cli: Cli) -> CmdResult {
    let ctx = Context::from_cli(&cli)
        .map_err(|e| anyhow::anyhow!("cannot read the current directory: {e}"))
        .exit_with(Exit::Usage)?;

    match cli.command {
        Command::Init(args) => init::run(&ctx, args),
        Command::Provision(args) => provision::run(&ctx, args, false),
        Command::Up(args) => provision::run(&ctx, args, true),
        Command::Test(args) => test::run(&ctx, args),
        Command::Tunnel(args) => tunnel::run(&ctx, args, true),
        Command::Untunnel(args) => tunnel::run(&ctx, args, false),
        Command::Status => status::run(&ctx),
        Command::List => list::run(&ctx),
        Command::Ssh(args) => ssh::run(&ctx, args),
        Command::Down => down::run(&ctx),
        Command::Destroy(args) => destroy::run(&ctx, args),
        Command::Doctor => doctor::run(&ctx),
        Command::Name => name::run(&ctx),
        Command::Image(cmd) => image::run(&ctx, cmd),
        Command::Version => version::run(&ctx),
        Command::Completions(args) => completions::run(args),
        Command::Agent(args) => agent::run(&ctx, args),
    }
}
