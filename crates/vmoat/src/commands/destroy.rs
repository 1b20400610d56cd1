//! `vmoat destroy`: stop and delete the VM and its profile.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context, _args: crate::cli::DestroyArgs) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
