//! `vmoat down`: graceful shutdown, disk kept.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
