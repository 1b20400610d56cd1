//! `vmoat name`: prints the effective VM (and Colima profile) name of the worktree and nothing
//! else, so scripts can use it (`colima ssh -p "$(vmoat name)"`). Notes about the name (a
//! collision suffix, a shortened name) go to stderr.

use crate::context::Context;
use crate::exit::{CmdResult, Exit};
use crate::output;

/// Runs the command.
pub fn run(ctx: &Context) -> CmdResult {
    let profile = ctx.profile()?;

    if ctx.json {
        output::json(&serde_json::json!({ "name": profile.name }));
    } else {
        output::line(&profile.name);
    }
    Ok(Exit::Ok)
}
