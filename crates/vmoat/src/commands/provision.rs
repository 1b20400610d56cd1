//! `vmoat provision` and `vmoat up`: create or start the VM, provision it (packages, script,
//! seed files), and for `up` run CMD_UP in the worktree dir and wait for HEALTH_URL.

use std::time::{Duration, Instant};

use vmoat_agent::client::AgentClient;
use vmoat_agent::exec_client;
use vmoat_agent::protocol::ExecRequest;
use vmoat_config::Config;

use crate::cli::ProvisionArgs;
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};
use crate::lifecycle::{self, Running};
use crate::output;
use crate::progress::Progress;
use crate::seed;
use crate::vm;

/// How long the package step may take before it is called stuck (apt's own network timeouts
/// are set lower, so an unreachable mirror fails well before this).
const APT_LIMIT: Duration = Duration::from_secs(900);

/// Runs `provision`, or `up` when `up` is set.
pub fn run(ctx: &Context, args: ProvisionArgs, up: bool) -> CmdResult {
    let config = ctx.config()?;
    let worktree = ctx.worktree()?;

    // Settle what `up` will run before any VM work, so a project with nothing to start fails
    // at once rather than after a boot.
    let cmd_up = if up { Some(cmd_up(ctx, config)?) } else { None };
    seed::check_seeds(&worktree.main_root, &worktree.root, &config.provision_seed)
        .map_err(|e| CodedError::new(seed_exit(&e), e))?;

    let progress = Progress::new(ctx.quiet);
    let Running { client, lock, .. } = lifecycle::ensure_running(ctx, args.keep_failed, progress)?;
    let profile = ctx.profile()?;
    let rt = vm::runtime()?;

    rt.block_on(provision(ctx, &client, config, progress))?;
    let seeds = seed::copy_seeds(&worktree.main_root, &worktree.root, &config.provision_seed)
        .map_err(|e| CodedError::new(seed_exit(&e), e))?;
    for path in &seeds.copied {
        ctx.notice(format!("seeded {} from the main worktree", path.display()));
    }
    for entry in &seeds.missing {
        ctx.notice(format!(
            "PROVISION_SEED entry {entry:?} is not in the main worktree {}; skipped",
            worktree.main_root.display()
        ));
    }

    // Set-up is done; CMD_UP and the health wait may run alongside other commands.
    drop(lock);

    if let Some(command) = cmd_up {
        rt.block_on(run_cmd_up(ctx, &client, &command, progress))?;
        if let Some(url) = &config.health_url {
            rt.block_on(wait_healthy(&client, url, config.health_timeout, progress))?;
        }
    }

    if ctx.json {
        output::json(&serde_json::json!({
            "name": profile.name,
            "docker_host": format!("unix://{}", profile.paths.docker_sock().display()),
        }));
    } else {
        output::line(&profile.name);
    }
    Ok(Exit::Ok)
}

/// A seed entry that escapes the worktree is a config error; a failed copy is not.
fn seed_exit(err: &seed::SeedError) -> Exit {
    match err {
        seed::SeedError::Escapes { .. } => Exit::Usage,
        seed::SeedError::Copy { .. } => Exit::Failed,
    }
}

/// CMD_UP from the config, else detected from the worktree's files; exit 2 with what was
/// looked for when there is neither.
fn cmd_up(ctx: &Context, config: &Config) -> CmdResult<String> {
    if let Some(command) = &config.cmd_up {
        return Ok(command.clone());
    }
    let worktree = ctx.worktree()?;
    match vmoat_config::detect_cmd_up(&worktree.root) {
        Some(found) => {
            ctx.notice(format!("CMD_UP: `{}` (from {})", found.command, found.file));
            Ok(found.command)
        }
        None => Err(CodedError::msg(
            Exit::Usage,
            format!(
                "nothing to start in {}: no CMD_UP in vmoat.conf and none detected (no \
                 compose.yaml, docker-compose.yml, Makefile with `up:`, or package.json with a \
                 `dev` script); set CMD_UP in vmoat.conf, or use `vmoat provision` for the VM \
                 alone",
                worktree.root.display()
            ),
        )),
    }
}

async fn provision(
    ctx: &Context,
    client: &AgentClient,
    config: &Config,
    progress: Progress,
) -> CmdResult<()> {
    let profile = ctx.profile()?;
    let user_is_root = guest_user_is_root(ctx);
    let sudo = if user_is_root { "" } else { "sudo " };

    if !config.provision_apt.is_empty() {
        let packages = config.provision_apt.join(" ");
        let line = progress.stage(
            "provision",
            &format!("packages: {packages}"),
            Some(APT_LIMIT),
        );

        let probe =
            format!("for p in {packages}; do dpkg -s \"$p\" >/dev/null 2>&1 || echo \"$p\"; done");
        let missing = exec_client::capture(
            client,
            ExecRequest {
                command: probe,
                ..ExecRequest::default()
            },
        )
        .await
        .map_err(|e| vm::exec_error(&profile.name, e))?
        .stdout_text();

        if missing.is_empty() {
            line.done("every package is already installed");
        } else {
            let missing: Vec<&str> = missing.split_whitespace().collect();
            line.update(&format!("apt-get install {}", missing.join(" ")));
            // Short network timeouts so an unreachable mirror fails in about a minute.
            let net = "-o Acquire::Retries=1 -o Acquire::http::Timeout=20 \
                       -o Acquire::https::Timeout=20";
            let command = format!(
                "export DEBIAN_FRONTEND=noninteractive; {sudo}apt-get {net} update -q && \
                 {sudo}apt-get {net} install -y -q --no-install-recommends {}",
                missing.join(" ")
            );
            let run = vm::run_logged(client, command, None, ctx.quiet);
            let outcome = tokio::time::timeout(APT_LIMIT, run).await;
            let (exit, tail) = match outcome {
                Ok(result) => result.map_err(|e| vm::exec_error(&profile.name, e))?,
                Err(_) => {
                    line.failed();
                    return Err(CodedError::msg(
                        Exit::Timeout,
                        format!(
                            "provision: installing {} (PROVISION_APT) did not finish within {} s",
                            missing.join(" "),
                            APT_LIMIT.as_secs()
                        ),
                    ));
                }
            };
            if exit.code != Some(0) {
                line.failed();
                return Err(CodedError::msg(
                    Exit::Failed,
                    format!(
                        "provision: installing {} (PROVISION_APT) failed with status {}:\n{}",
                        missing.join(" "),
                        exit.status(),
                        tail.join("\n")
                    ),
                ));
            }
            line.done(&format!("installed {}", missing.join(" ")));
        }
    }

    if let Some(script) = &config.provision_script {
        let worktree = ctx.worktree()?;
        let line = progress.stage("provision", "PROVISION_SCRIPT", None);
        let command = format!("bash -lc {}", vmoat_ssh::shell_quote(script));
        let (exit, tail) = vm::run_logged(client, command, Some(&worktree.root), ctx.quiet)
            .await
            .map_err(|e| vm::exec_error(&profile.name, e))?;
        if exit.code != Some(0) {
            line.failed();
            return Err(CodedError::msg(
                Exit::Failed,
                format!(
                    "provision: PROVISION_SCRIPT failed with status {}; its last lines:\n{}",
                    exit.status(),
                    tail.join("\n")
                ),
            ));
        }
        line.done("PROVISION_SCRIPT done");
    }
    Ok(())
}

fn guest_user_is_root(ctx: &Context) -> bool {
    ctx.host().uid == 0
}

async fn run_cmd_up(
    ctx: &Context,
    client: &AgentClient,
    command: &str,
    progress: Progress,
) -> CmdResult<()> {
    let profile = ctx.profile()?;
    let worktree = ctx.worktree()?;
    let line = progress.stage("up", &format!("`{command}`"), None);

    let (exit, tail) = vm::run_logged(client, command.to_owned(), Some(&worktree.root), ctx.quiet)
        .await
        .map_err(|e| vm::exec_error(&profile.name, e))?;
    if exit.code != Some(0) {
        line.failed();
        return Err(CodedError::msg(
            Exit::Failed,
            format!(
                "CMD_UP `{command}` failed in VM {} with status {}; its last lines:\n{}",
                profile.name,
                exit.status(),
                tail.join("\n")
            ),
        ));
    }
    line.done(&format!("`{command}` done"));
    Ok(())
}

/// Polls HEALTH_URL from inside the VM until it answers 2xx, with a heartbeat; exit 4 with
/// the last answer or error when the time is up.
async fn wait_healthy(
    client: &AgentClient,
    url: &str,
    limit: Duration,
    progress: Progress,
) -> CmdResult<()> {
    let line = progress.stage("health", &format!("{url} to answer 2xx"), Some(limit));
    let started = Instant::now();
    let mut last = String::from("no answer yet");

    loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            line.failed();
            return Err(CodedError::msg(
                Exit::Timeout,
                format!(
                    "HEALTH_URL {url} did not answer 2xx within {} s (HEALTH_TIMEOUT); last: {last}",
                    limit.as_secs()
                ),
            ));
        }

        let attempt = Duration::from_secs(5).min(left.max(Duration::from_millis(100)));
        match client.probe(url, attempt).await {
            Ok(result) if result.healthy() => {
                line.done(&format!("{url} answered {}", result.status.unwrap_or(0)));
                return Ok(());
            }
            Ok(result) => {
                last = match (result.status, result.error) {
                    (Some(code), _) => format!("HTTP {code} {}", result.body_head.trim()),
                    (None, Some(error)) => error,
                    (None, None) => "no answer".into(),
                };
                line.update(&format!("{url} to answer 2xx (last: {last})"));
            }
            Err(err) => {
                line.failed();
                return Err(CodedError::new(Exit::Failed, err));
            }
        }

        let pause = Duration::from_secs(2).min(limit.saturating_sub(started.elapsed()));
        tokio::time::sleep(pause).await;
    }
}
