//! `vmoat list`: every vmoat and Colima profile on this host.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
