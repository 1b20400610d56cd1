//! `vmoat tunnel` and `vmoat untunnel`: host URLs for guest ports, held by the agent.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context, _args: crate::cli::PortsArgs, _open: bool) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
