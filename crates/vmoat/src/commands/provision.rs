//! `vmoat provision` and `vmoat up`: create or start the VM, provision it, run CMD_UP.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context, _args: crate::cli::ProvisionArgs, _up: bool) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
