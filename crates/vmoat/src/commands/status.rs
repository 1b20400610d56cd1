//! `vmoat status [--json]`: the VM's state and why, sizing, accelerator, image, uptime, the
//! guest's disk use, containers with their ports and health, the HEALTH_URL result and the
//! tunnels that really exist.

use std::time::Duration;

use serde::Serialize;
use vmoat_agent::client::AgentClient;
use vmoat_agent::protocol::{AgentStatus, LastExit, Phase, ProbeResult, Tunnel};
use vmoat_profile::OwnerRecord;
use vmoat_profile::status::{InstanceStatus, broken_files, find_stale, instance_status};

use crate::context::Context;
use crate::disk_use::{GuestDisk, guest_disk};
use crate::exit::{CmdResult, Exit};
use crate::output;
use crate::vm;

/// Everything `status` reports, as its JSON.
#[derive(Debug, Serialize)]
struct Report {
    name: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    worktree: String,
    cpus: u32,
    memory_mib: u64,
    disk_gib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uptime_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh_port: Option<u16>,
    docker_host: String,
    docker_context: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_disk: Option<GuestDisk>,
    containers: Vec<vmoat_docker::Container>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<Health>,
    tunnels: Vec<Tunnel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_exit: Option<LastExit>,
    stale_files: Vec<String>,
    /// Profile files that exist but cannot be read (edited by hand, cut short), each with why.
    broken_files: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Health {
    url: String,
    #[serde(flatten)]
    result: ProbeResult,
}

/// Shows the VM's status.
pub fn run(ctx: &Context) -> CmdResult {
    let profile = ctx.profile()?;
    let config = ctx.config()?;
    let worktree = ctx.worktree()?;
    let paths = &profile.paths;

    let status = instance_status(paths);
    let mut report = Report {
        name: profile.name.clone(),
        state: match status {
            InstanceStatus::Absent => "absent",
            InstanceStatus::Stopped => "stopped",
            InstanceStatus::Running { .. } => "running",
            InstanceStatus::Broken { .. } => "broken",
        },
        reason: match &status {
            InstanceStatus::Broken { reason } => Some(reason.clone()),
            _ => None,
        },
        worktree: worktree.root.display().to_string(),
        cpus: config.vm_cpu,
        memory_mib: config.vm_memory_mib,
        disk_gib: config.vm_disk_gib,
        image: OwnerRecord::read(paths)
            .ok()
            .flatten()
            .and_then(|o| o.image),
        accel: None,
        uptime_secs: None,
        ssh_port: None,
        docker_host: format!("unix://{}", paths.docker_sock().display()),
        docker_context: paths.id.clone(),
        guest_disk: None,
        containers: Vec::new(),
        health: None,
        tunnels: Vec::new(),
        last_exit: None,
        stale_files: find_stale(paths).iter().map(|s| s.to_string()).collect(),
        broken_files: broken_files(paths)
            .into_iter()
            .map(|e| format!("{:#}", anyhow::Error::new(e)))
            .collect(),
    };

    if status.is_running() {
        let rt = vm::runtime()?;
        let client = AgentClient::new(paths.ha_sock());
        rt.block_on(fill_running(
            &client,
            config.health_url.as_deref(),
            &mut report,
        ));
    } else if status != InstanceStatus::Absent {
        report.last_exit = vm::last_exit(paths);
    }

    if ctx.json {
        output::json(&report);
    } else {
        print_text(&report);
    }
    Ok(Exit::Ok)
}

async fn fill_running(client: &AgentClient, health_url: Option<&str>, report: &mut Report) {
    match client.status().await {
        Ok(agent) => apply_agent(&agent, report),
        Err(err) => report.reason = Some(format!("the agent does not answer: {err}")),
    }

    report.guest_disk = guest_disk(client).await;
    if let Some(note) = report.guest_disk.as_ref().and_then(GuestDisk::full_note) {
        report.reason = Some(note);
    }

    let socket = report.docker_host.trim_start_matches("unix://").to_owned();
    if let Ok(docker) = vmoat_docker::DockerClient::connect(std::path::Path::new(&socket)) {
        let listed = tokio::time::timeout(Duration::from_secs(10), docker.containers()).await;
        if let Ok(Ok(containers)) = listed {
            report.containers = containers;
        }
    }

    if let Some(url) = health_url {
        let result = match client.probe(url, Duration::from_secs(5)).await {
            Ok(result) => result,
            Err(err) => vmoat_agent::probe::failure(err.to_string()),
        };
        report.health = Some(Health {
            url: url.to_owned(),
            result,
        });
    }
}

fn apply_agent(agent: &AgentStatus, report: &mut Report) {
    report.accel = Some(agent.accel.clone());
    report.ssh_port = Some(agent.ssh_port);
    report.tunnels = agent.tunnels.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    report.uptime_secs = Some(now.saturating_sub(agent.started_at));
    if agent.phase != Phase::Ready {
        report.state = "starting";
        report.reason = Some(phase_text(&agent.phase));
    }
}

/// What the agent is doing, for a VM that is not ready: the boot stage and what it waits on.
fn phase_text(phase: &Phase) -> String {
    match phase {
        Phase::Booting { stage } => format!(
            "booting: stage {}, waiting for {}",
            stage.as_str(),
            stage.waiting_on()
        ),
        Phase::Ready => "ready".to_owned(),
        Phase::Stopping => "stopping".to_owned(),
        Phase::Failed { reason, .. } => format!("failed: {reason}"),
    }
}

fn print_text(report: &Report) {
    let mut lines = vec![format!("name:      {}", report.name)];
    let state = match &report.reason {
        Some(reason) => format!("{} ({reason})", report.state),
        None => report.state.to_owned(),
    };
    lines.push(format!("state:     {state}"));
    lines.push(format!("worktree:  {}", report.worktree));
    lines.push(format!(
        "size:      {} CPUs, {} MiB memory, {} GiB disk",
        report.cpus, report.memory_mib, report.disk_gib
    ));
    if let Some(image) = &report.image {
        lines.push(format!("image:     {image}"));
    }
    if let Some(accel) = &report.accel {
        lines.push(format!("accel:     {accel}"));
    }
    if let Some(uptime) = report.uptime_secs {
        lines.push(format!("uptime:    {}", human_duration(uptime)));
    }
    if let Some(disk) = &report.guest_disk {
        lines.push(format!(
            "disk use:  {} % ({} MiB free of {} MiB)",
            disk.used_percent,
            disk.free_bytes >> 20,
            disk.size_bytes >> 20
        ));
    }
    lines.push(format!(
        "docker:    {} (context {})",
        report.docker_host, report.docker_context
    ));
    for c in &report.containers {
        let ports: Vec<String> = c.ports.iter().map(|p| p.to_string()).collect();
        let health = c
            .health
            .as_ref()
            .map(|h| format!(" {h}"))
            .unwrap_or_default();
        lines.push(format!(
            "container: {} ({}) {}{health} {}",
            c.name,
            c.image,
            c.state,
            ports.join(", ")
        ));
    }
    if let Some(health) = &report.health {
        let result = match (&health.result.status, &health.result.error) {
            (Some(code), _) => format!("HTTP {code}"),
            (None, Some(error)) => error.clone(),
            (None, None) => "no answer".into(),
        };
        lines.push(format!("health:    {} → {result}", health.url));
    }
    for t in &report.tunnels {
        lines.push(format!(
            "tunnel:    {} → guest port {}",
            t.url, t.guest_port
        ));
    }
    if let Some(last) = &report.last_exit {
        lines.push(format!("stopped:   {}", last.reason));
        for line in last.serial_tail.iter().rev().take(5).rev() {
            lines.push(format!("           | {line}"));
        }
    }
    for broken in &report.broken_files {
        lines.push(format!("broken:    {broken}"));
    }
    for stale in &report.stale_files {
        lines.push(format!(
            "stale:     {stale} (the next `vmoat up` cleans it)"
        ));
    }
    output::line(lines.join("\n"));
}

fn human_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        _ => format!("{} h {} min", secs / 3600, (secs % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use vmoat_agent::protocol::Stage;

    use super::*;

    #[test]
    fn a_booting_vm_says_which_stage_it_waits_on() {
        let text = phase_text(&Phase::Booting { stage: Stage::Ssh });
        assert_eq!(
            text,
            format!(
                "booting: stage ssh, waiting for {}",
                Stage::Ssh.waiting_on()
            )
        );
        assert_eq!(phase_text(&Phase::Stopping), "stopping");
    }
}
