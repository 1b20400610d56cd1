//! The guest's Docker daemon through bollard, port discovery and the docker context.
//!
//! [`DockerClient`] talks to exactly one unix socket, the one the host agent forwards from the
//! guest (`~/.colima/<profile>/docker.sock`): it never reads `DOCKER_HOST`, `DOCKER_CONTEXT`
//! or the user's current context, so vmoat's own calls always reach the worktree's VM. It
//! answers readiness ([`DockerClient::ping`]), the running containers with their published
//! ports and health ([`DockerClient::containers`]), and the host-side ports `vmoat tunnel`
//! forwards ([`DockerClient::published_ports`]).
//!
//! [`write_context`] writes the docker CLI context `colima-<profile>` in the CLI's own on-disk
//! format so `docker --context colima-<profile>` works; it never activates it.

mod client;
mod context;

pub use client::{Container, DockerClient, DockerError, Health, Protocol, PublishedPort};
pub use context::{
    ContextError, RemoveOutcome, context_meta_dir, docker_config_dir, remove_context,
    remove_context_in, write_context, write_context_in,
};
