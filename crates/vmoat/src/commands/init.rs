//! `vmoat init`: writes a commented vmoat.conf with the detected CMD_UP and ports.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context, _args: crate::cli::InitArgs) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
