//! `vmoat test`: CMD_TEST (with the arguments appended, shell-quoted) in the worktree dir
//! inside the VM. Its output is the result, so it streams to stdout and stderr as the command
//! writes it, and its exit status is vmoat's.

use vmoat_agent::protocol::ExecRequest;

use crate::cli::TestArgs;
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};
use crate::vm::{self, Terminal};

/// Runs the worktree's tests in its VM.
pub fn run(ctx: &Context, args: TestArgs) -> CmdResult {
    let config = ctx.config()?;
    let worktree = ctx.worktree()?;
    let Some(cmd_test) = config.cmd_test.clone() else {
        return Err(CodedError::msg(
            Exit::Usage,
            format!(
                "no CMD_TEST in {}/vmoat.conf; set it to the command that runs the tests, e.g. \
                 CMD_TEST=\"make test\"",
                worktree.root.display()
            ),
        ));
    };

    // Fails fast, before any work, when the VM is not running.
    let (profile, client) = vm::running(ctx)?;

    let command = if args.args.is_empty() {
        cmd_test
    } else {
        format!("{cmd_test} {}", vmoat_ssh::shell_join(&args.args))
    };
    let request = ExecRequest {
        command,
        cwd: Some(worktree.root.clone()),
        ..ExecRequest::default()
    };

    let rt = vm::runtime()?;
    let exit = rt
        .block_on(vm::run_attached(&client, request, Terminal::detect()))
        .map_err(|e| vm::exec_error(&profile.name, e))?;
    Ok(Exit::Passthrough(exit.status()))
}
