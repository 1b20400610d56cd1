//! `vmoat version`: the version, as text or JSON.

use crate::context::Context;
use crate::exit::{CmdResult, Exit};
use crate::output;

/// Prints vmoat's version.
pub fn run(ctx: &Context) -> CmdResult {
    let version = env!("CARGO_PKG_VERSION");
    if ctx.json {
        output::json(&serde_json::json!({ "version": version }));
    } else {
        output::line(format!("vmoat {version}"));
    }
    Ok(Exit::Ok)
}
