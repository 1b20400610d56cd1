//! `vmoat test`: CMD_TEST in the worktree dir inside the VM.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context, _args: crate::cli::TestArgs) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
