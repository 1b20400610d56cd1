//! `vmoat tunnel [PORT…]` and `vmoat untunnel [PORT…]`: host URLs for guest ports, held by
//! the VM's agent so they outlive this command. Each forward is proven with a connection
//! before its URL is printed.

use std::collections::BTreeSet;

use crate::cli::PortsArgs;
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};
use crate::output;
use crate::vm;

/// Opens (`open`) or closes tunnels.
pub fn run(ctx: &Context, args: PortsArgs, open: bool) -> CmdResult {
    let (profile, client) = vm::running(ctx)?;
    let rt = vm::runtime()?;

    if !open {
        let ports: Vec<Option<u16>> = if args.ports.is_empty() {
            vec![None]
        } else {
            args.ports.iter().copied().map(Some).collect()
        };
        let mut closed = Vec::new();
        for port in ports {
            let done = rt
                .block_on(client.close_tunnels(port))
                .map_err(|e| vm::agent_error(&profile.name, e))?;
            if done.is_empty()
                && let Some(port) = port
            {
                ctx.notice(format!("no tunnel to guest port {port} was open"));
            }
            closed.extend(done);
        }
        for tunnel in &closed {
            ctx.notice(format!(
                "closed {} (guest port {})",
                tunnel.url, tunnel.guest_port
            ));
        }
        if ctx.json {
            output::json(&closed);
        }
        return Ok(Exit::Ok);
    }

    let ports = ports_to_open(ctx, &args, &rt, &profile.paths.docker_sock())?;
    let mut opened = Vec::new();
    let mut failed = Vec::new();
    for port in ports {
        match rt.block_on(client.open_tunnel(port)) {
            Ok(tunnel) => {
                if !ctx.json {
                    output::line(&tunnel.url);
                }
                opened.push(tunnel);
            }
            Err(vmoat_agent::client::ClientError::Refused { error }) => {
                ctx.notice(format!("guest port {port}: {}", error.message));
                failed.push(port);
            }
            Err(err) => return Err(vm::agent_error(&profile.name, err)),
        }
    }
    if ctx.json {
        output::json(&opened);
    }

    if failed.is_empty() {
        Ok(Exit::Ok)
    } else {
        Err(CodedError::msg(
            Exit::Failed,
            format!(
                "no tunnel for guest port(s) {}: nothing listens there in VM {}",
                failed
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                profile.name
            ),
        ))
    }
}

/// The ports: the arguments, else EXPOSE_PORTS, else the published ports of the running
/// containers. Order kept, duplicates dropped.
fn ports_to_open(
    ctx: &Context,
    args: &PortsArgs,
    rt: &tokio::runtime::Runtime,
    docker_sock: &std::path::Path,
) -> CmdResult<Vec<u16>> {
    let chosen: Vec<u16> = if !args.ports.is_empty() {
        args.ports.clone()
    } else if !ctx.config()?.expose_ports.is_empty() {
        ctx.config()?.expose_ports.clone()
    } else {
        let docker = vmoat_docker::DockerClient::connect(docker_sock)
            .map_err(|e| CodedError::new(Exit::Failed, e))?;
        let published = rt
            .block_on(docker.published_ports())
            .map_err(|e| CodedError::new(Exit::Failed, e))?;
        if published.is_empty() {
            return Err(CodedError::msg(
                Exit::Usage,
                "no ports to tunnel: give them as arguments, set EXPOSE_PORTS in vmoat.conf, \
                 or publish ports from a running container",
            ));
        }
        published
    };

    let mut seen = BTreeSet::new();
    Ok(chosen.into_iter().filter(|p| seen.insert(*p)).collect())
}
