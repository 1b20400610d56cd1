//! The per-VM host agent, and the CLI's client of it.
//!
//! `vmoat up` never keeps a VM as its own child: it starts `vmoat agent <profile>` detached,
//! and that agent starts the hypervisor through a platform driver, walks the boot stages,
//! holds the one SSH connection to the guest, forwards the guest's Docker socket, holds the
//! tunnels and serves all of it on `ha.sock` ([`protocol`]). CLI commands are clients
//! ([`client`], [`exec_client`]); they start in milliseconds because they reuse the agent's
//! SSH connection instead of making their own.

pub mod client;
pub mod events;
pub mod exec_client;
mod exec_server;
pub mod frame;
pub mod probe;
pub mod protocol;
pub mod runner;
pub mod serial;
pub mod server;
pub mod settings;
pub mod spawn;
