//! `vmoat agent PROFILE`: the detached host agent of one VM (started by `up`). It runs until
//! the VM stops; its log is the instance's `ha.stderr.log`.

use vmoat_driver::Arch;

use crate::cli::AgentArgs;
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

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

    #[cfg(target_os = "macos")]
    {
        let driver = vmoat_vz::VzDriver::new();
        vmoat_agent::runner::Agent::run(paths, driver, "vz".into())
            .map_err(|e| CodedError::new(Exit::Failed, e))?;
    }

    #[cfg(not(target_os = "macos"))]
    {
        let driver = vmoat_qemu::QemuDriver::from_env();
        let accel = driver
            .accel(Arch::host())
            .accel
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| "none".into());
        vmoat_agent::runner::Agent::run(paths, driver, accel)
            .map_err(|e| CodedError::new(Exit::Failed, e))?;
    }
    let _ = Arch::host();
    Ok(Exit::Ok)
}
