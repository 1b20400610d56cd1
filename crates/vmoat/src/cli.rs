//! The command line, declared once: every command, flag and help text lives here, and
//! `--help`, the man page and shell completions are generated from it.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::exit::EXIT_CODES_HELP;

/// One Linux VM, with its own kernel and Docker daemon, per git worktree.
///
/// Run it in any worktree: `vmoat up` brings that worktree's stack up in its own VM, `vmoat
/// test` runs its tests there and `vmoat tunnel` prints host URLs for its ports. Results go to
/// stdout; logs and progress go to stderr.
#[derive(Debug, Parser)]
#[command(name = "vmoat", version, after_help = EXIT_CODES_HELP, max_term_width = 100)]
pub struct Cli {
    /// Act on the worktree containing DIR instead of the current directory.
    #[arg(short = 'C', long = "directory", global = true, value_name = "DIR")]
    pub directory: Option<PathBuf>,

    /// Print results as JSON (one document on stdout).
    #[arg(long, global = true)]
    pub json: bool,

    /// More log output on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less output on stderr: errors only.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Every vmoat command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented vmoat.conf for this worktree, with the detected CMD_UP and ports.
    Init(InitArgs),

    /// Create the VM if absent, start it if stopped, then install packages, run the
    /// provision script and copy seed files. Safe to run again.
    Provision(ProvisionArgs),

    /// Provision, run CMD_UP in the worktree dir inside the VM, then wait for HEALTH_URL.
    Up(ProvisionArgs),

    /// Run CMD_TEST (with ARGS appended) in the worktree dir inside the VM; exits with its
    /// status.
    Test(TestArgs),

    /// Forward guest ports to free 127.0.0.1 host ports and print one URL per port.
    ///
    /// Ports come from the arguments, else EXPOSE_PORTS, else the published ports of running
    /// containers. Tunnels are held by the VM's host agent and outlive this command.
    Tunnel(PortsArgs),

    /// Close the given tunnels, or all tunnels of this worktree's VM.
    Untunnel(PortsArgs),

    /// Show the VM's state, sizing, containers, health and tunnels.
    Status,

    /// List every vmoat and Colima profile on this host.
    List,

    /// Open a shell in the worktree dir inside the VM, or run CMD there and exit with its
    /// status.
    Ssh(SshArgs),

    /// Shut the VM down gracefully (forced after a timeout); the disk is kept.
    Down,

    /// Stop and delete the VM and its profile. Asks on a terminal; otherwise needs -f.
    Destroy(DestroyArgs),

    /// Check that this host can run vmoat's VMs and say what to fix.
    Doctor,

    /// Print the VM (and Colima profile) name of this worktree.
    Name,

    /// Manage guest images: build vmoat's own, list, remove and prune the cache.
    #[command(subcommand)]
    Image(ImageCommand),

    /// Print vmoat's version.
    Version,

    /// Print a shell completion script.
    Completions(CompletionsArgs),

    /// Run the host agent of a profile (started by `up`; not for direct use).
    #[command(hide = true)]
    Agent(AgentArgs),
}

/// `init` options.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Overwrite an existing vmoat.conf.
    #[arg(short, long)]
    pub force: bool,
}

/// `provision` and `up` options.
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// Keep what a failed VM creation made (disk, seed, logs) for inspection.
    #[arg(long)]
    pub keep_failed: bool,
}

/// `test` arguments.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Arguments appended to CMD_TEST, shell-quoted.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// `tunnel` and `untunnel` arguments.
#[derive(Debug, Args)]
pub struct PortsArgs {
    /// Guest ports (1-65535).
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
}

/// `ssh` arguments.
#[derive(Debug, Args)]
pub struct SshArgs {
    /// The command to run; a shell when absent.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `destroy` options.
#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// Do not ask; required when stdin or stderr is not a terminal.
    #[arg(short, long)]
    pub force: bool,
}

/// `image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build vmoat's own Debian image (cached by the recipe's hash).
    Build(ImageBuildArgs),
    /// List cached images and the VMs using them.
    List,
    /// Remove a cached image (refused while a VM uses it).
    Rm(ImageRmArgs),
    /// Remove every cached image no VM uses.
    Prune,
}

/// `image build` options.
#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// The image to build.
    #[arg(default_value = "debian")]
    pub name: String,
    /// Rebuild even when the cache holds this recipe's image.
    #[arg(long)]
    pub force: bool,
}

/// `image rm` arguments.
#[derive(Debug, Args)]
pub struct ImageRmArgs {
    /// Images to remove, as `image list` names them.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// The shells `completions` supports.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Shell {
    /// GNU bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
}

/// `completions` arguments.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: Shell,
}

/// `agent` arguments.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The profile whose VM the agent runs.
    pub profile: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_args_keep_hyphens() {
        let cli = Cli::parse_from(["vmoat", "test", "--quick", "-k", "x"]);
        match cli.command {
            Command::Test(t) => assert_eq!(t.args, ["--quick", "-k", "x"]),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn port_zero_is_refused() {
        assert!(Cli::try_parse_from(["vmoat", "tunnel", "0"]).is_err());
        assert!(Cli::try_parse_from(["vmoat", "tunnel", "65536"]).is_err());
    }
}
