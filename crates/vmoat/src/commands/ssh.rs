//! `vmoat ssh [CMD…]`: an interactive shell in the worktree dir inside the VM, or one command
//! run there with its exit status passed through.
//!
//! One argument is a shell command line, as with ssh(1) (`vmoat ssh 'ls | wc -l'`); several
//! are argv words, each quoted (`vmoat ssh -- sh -c 'wc -c'`), as with `docker exec`.

use vmoat_agent::protocol::ExecRequest;

use crate::cli::SshArgs;
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};
use crate::vm::{self, Terminal};

/// Opens a shell or runs a command in the VM.
pub fn run(ctx: &Context, args: SshArgs) -> CmdResult {
    let worktree = ctx.worktree()?;

    // A usage error is one whatever state the VM is in, so it is found before the VM is asked.
    let (command, terminal) = match args.command.as_slice() {
        [] => {
            let terminal = Terminal::detect();
            if terminal != Terminal::Pty {
                return Err(CodedError::msg(
                    Exit::Usage,
                    "an interactive shell needs a terminal on stdin and stdout; give a \
                     command to run instead (vmoat ssh -- CMD)",
                ));
            }
            // A login shell in the worktree dir.
            (String::from("exec \"${SHELL:-/bin/sh}\" -l"), terminal)
        }
        [line] => (line.clone(), Terminal::detect()),
        words => (vmoat_ssh::shell_join(words), Terminal::detect()),
    };
    let (profile, client) = vm::running(ctx)?;

    let request = ExecRequest {
        command,
        cwd: Some(worktree.root.clone()),
        ..ExecRequest::default()
    };
    let rt = vm::runtime()?;
    let exit = rt
        .block_on(vm::run_attached(&client, request, terminal))
        .map_err(|e| vm::exec_error(&profile.name, e))?;
    Ok(Exit::Passthrough(exit.status()))
}
