//! `vmoat image build|list|rm|prune`: the guest image cache.

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// Runs the command.
pub fn run(_ctx: &Context, _cmd: crate::cli::ImageCommand) -> CmdResult {
    Err(CodedError::msg(Exit::Failed, "this command is not built yet"))
}
