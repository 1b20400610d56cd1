//! `vmoat agent PROFILE`: the detached host agent of one VM.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context, _args: crate::cli::AgentArgs) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
