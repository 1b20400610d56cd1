//! `vmoat agent PROFILE`: the detached host agent of one VM (started by `up`). It runs until
//! the VM stops; its log is the instance's `ha.stderr.log`.

use crate::cli::AgentArgs;
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};
use crate::platform;

/// Runs the agent in this process until its VM ends.
pub fn run(ctx: &Context, args: AgentArgs) -> CmdResult {
    let home = ctx.home()?;
    let paths = home.profile(&args.profile);
    if !paths.vm_spec().exists() {
        return Err(CodedError::msg(
            Exit::Usage,
            format!(
                "profile {} has no agent settings ({}); the agent is started by `vmoat up`",
                args.profile,
                paths.vm_spec().display()
            ),
        ));
    }

    let driver = platform::driver();
    let accel = platform::accel(&driver);
    vmoat_agent::runner::Agent::run(paths, driver, accel)
        .map_err(|e| CodedError::new(Exit::Failed, e))?;
    Ok(Exit::Ok)
}
