//! `vmoat down`: a graceful guest shutdown (ACPI power button), forced after a timeout. Tunnels
//! close with the agent; the disk, images and volumes stay.

use std::time::Duration;

use vmoat_agent::client::AgentClient;
use vmoat_profile::lock::{LockMode, ProfileLock};
use vmoat_profile::status::{InstanceStatus, clean_stale, find_stale, instance_status};

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit, WithExit};
use crate::output;
use crate::vm;

/// How long the guest may take to power off before it is forced.
pub const GRACE: Duration = Duration::from_secs(90);

/// How long `down` waits for another command holding the profile.
const LOCK_WAIT: Duration = Duration::from_secs(30 * 60);

/// Stops this worktree's VM.
pub fn run(ctx: &Context) -> CmdResult {
    let profile = ctx.profile()?;
    let _lock = ProfileLock::acquire(&profile.paths, LockMode::Exclusive, LOCK_WAIT, |w| {
        ctx.notice(w.to_string())
    })
    .exit_with(Exit::Failed)?;

    let outcome = stop(ctx, GRACE)?;
    if ctx.json {
        output::json(&serde_json::json!({ "name": profile.name, "result": outcome }));
    } else {
        ctx.notice(format!("VM {}: {outcome}", profile.name));
    }
    Ok(Exit::Ok)
}

/// Stops the VM whatever state it is in (the caller holds the lock), removes the pid and
/// socket files a dead run left, and says what happened.
pub fn stop(ctx: &Context, grace: Duration) -> CmdResult<String> {
    let outcome = stop_vm(ctx, grace)?;

    let paths = &ctx.profile()?.paths;
    let stale = find_stale(paths);
    if !stale.is_empty() {
        clean_stale(&stale).map_err(|e| CodedError::new(Exit::Failed, e))?;
    }
    Ok(outcome)
}

/// Stops the VM whatever state it is in (the caller holds the lock), deleting nothing, and
/// says what happened.
pub fn stop_vm(ctx: &Context, grace: Duration) -> CmdResult<String> {
    let profile = ctx.profile()?;
    let paths = &profile.paths;
    let rt = vm::runtime()?;

    let outcome = match instance_status(paths) {
        InstanceStatus::Absent => "does not exist".to_owned(),
        InstanceStatus::Stopped => "already stopped".to_owned(),
        InstanceStatus::Running { .. } => {
            let client = AgentClient::new(paths.ha_sock());
            let result = rt
                .block_on(client.stop(grace))
                .map_err(|e| vm::agent_error(&profile.name, e))?;
            wait_agent_gone(paths);
            result.detail
        }
        InstanceStatus::Broken { reason } => {
            ctx.notice(format!(
                "VM {} is broken ({reason}); stopping what runs",
                profile.name
            ));
            stop_orphan(paths, grace)?
        }
    };
    Ok(outcome)
}

/// A hypervisor whose agent died: take it over through the driver and stop it; an agent
/// whose hypervisor died: end it.
fn stop_orphan(paths: &vmoat_profile::ProfilePaths, grace: Duration) -> CmdResult<String> {
    use vmoat_driver::{Driver, RunningVm};

    let mut stopped = "cleaned up".to_owned();
    let (_, hypervisor) = vmoat_profile::status::driver_state(paths);
    let settings = vmoat_agent::settings::AgentSettings::read(&paths.vm_spec());
    if let (vmoat_profile::status::PidState::Alive(pid), Err(err)) = (&hypervisor, &settings) {
        // Without its settings the hypervisor cannot be taken over; saying "stopped" while it
        // runs on would be a lie.
        let exit = match err {
            vmoat_agent::settings::SettingsError::Invalid { .. } => Exit::Usage,
            _ => Exit::Failed,
        };
        return Err(CodedError::msg(
            exit,
            format!("the VM's hypervisor (pid {pid}) runs without its agent, and {err:#}"),
        ));
    }
    if let Ok(settings) = settings {
        let driver = crate::platform::driver();
        if let Some(mut vm) = driver
            .adopt(&settings.spec)
            .map_err(|e| CodedError::new(Exit::Failed, e))?
        {
            let info = vm
                .stop(grace)
                .map_err(|e| CodedError::new(Exit::Failed, e))?;
            stopped = format!("stopped the VM its agent had left: {info}");
        }
    }

    if let vmoat_profile::status::PidState::Alive(pid) = vmoat_profile::status::agent_state(paths) {
        // The agent answers nothing (hung); it is vmoat's own process, identified by its
        // recorded identity, so ending it is safe.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        stopped.push_str("; ended its unresponsive agent");
    }

    if let (_, vmoat_profile::status::PidState::Alive(pid)) =
        vmoat_profile::status::driver_state(paths)
    {
        return Err(CodedError::msg(
            Exit::Failed,
            format!(
                "the VM's hypervisor (pid {pid}, in {}) still runs: vmoat could not take it \
                 over; see {}",
                paths.qemu_pid().display(),
                paths.ha_stderr_log().display()
            ),
        ));
    }
    Ok(stopped)
}

/// Waits (briefly) for the agent to exit after a stop, so the next command sees it gone.
fn wait_agent_gone(paths: &vmoat_profile::ProfilePaths) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if matches!(
            vmoat_profile::status::agent_state(paths),
            vmoat_profile::status::PidState::None | vmoat_profile::status::PidState::Dead { .. }
        ) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
