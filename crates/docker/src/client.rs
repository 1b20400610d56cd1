//! The Docker API client on the forwarded socket: ping, running containers with ports and
//! health, and the published ports `vmoat tunnel` discovers.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, ContainerSummary, ContainerSummaryHealthStatusEnum, HealthStatusEnum,
    PortSummaryTypeEnum,
};
use bollard::query_parameters::ListContainersOptionsBuilder;
use serde::{Deserialize, Serialize};

/// Seconds bollard waits for any one API call.
const REQUEST_TIMEOUT_SECS: u64 = 60;

/// An error talking to the guest's Docker daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DockerError {
    /// The forwarded socket is not there.
    #[error(
        "docker socket {path} does not exist: the VM is not running or its agent is not \
         forwarding Docker (run `vmoat up`)"
    )]
    NoSocket {
        /// The socket path.
        path: PathBuf,
    },

    /// The socket path cannot be given to the HTTP client.
    #[error(
        "docker socket path {path} is not valid UTF-8; use a profile directory without such names"
    )]
    NotUtf8 {
        /// The socket path.
        path: PathBuf,
    },

    /// The client could not be set up for the socket.
    #[error("cannot use docker socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<bollard::errors::Error>,
    },

    /// An API call failed.
    #[error("Docker API call `{action}` on {path} failed: is dockerd running in the VM?")]
    Api {
        /// The socket path.
        path: PathBuf,
        /// The call, e.g. `GET /containers/json`.
        action: String,
        /// The cause.
        #[source]
        source: Box<bollard::errors::Error>,
    },
}

/// A container's health check state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The check has not passed yet.
    Starting,
    /// The last checks passed.
    Healthy,
    /// The check failed often enough.
    Unhealthy,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        })
    }
}

/// A port's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the only kind a tunnel can carry).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    fn parse(text: &str) -> Option<Protocol> {
        match text {
            "tcp" | "" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// A container port published on the VM's side.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The port on the VM (what a tunnel forwards to).
    pub host_port: u16,
    /// The port inside the container.
    pub container_port: u16,
    /// The protocol.
    pub protocol: Protocol,
    /// The VM address it is bound to (`0.0.0.0`, `127.0.0.1`, …), empty if unknown.
    pub host_ip: String,
}

impl fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}->{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

/// A container, as `vmoat status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// The full id.
    pub id: String,
    /// The name, without Docker's leading `/`.
    pub name: String,
    /// The image as it was asked for (`nginx:1.27`).
    pub image: String,
    /// The state (`running`, `exited`, …).
    pub state: String,
    /// Docker's status text (`Up 3 minutes (healthy)`); empty from inspect.
    pub status: String,
    /// The health check state; `None` without a health check.
    pub health: Option<Health>,
    /// Published ports, one per VM port, container port and protocol, sorted.
    pub ports: Vec<PublishedPort>,
}

/// A Docker API client bound to one unix socket.
#[derive(Debug, Clone)]
pub struct DockerClient {
    docker: Docker,
    socket: PathBuf,
}

impl DockerClient {
    /// A client for the daemon behind `socket`, and nothing else: `DOCKER_HOST`,
    /// `DOCKER_CONTEXT` and the docker CLI's current context are ignored. No request is made
    /// yet; fails if the socket does not exist.
    pub fn connect(socket: &Path) -> Result<DockerClient, DockerError> {
        if !socket.exists() {
            return Err(DockerError::NoSocket {
                path: socket.to_owned(),
            });
        }
        let text = socket.to_str().ok_or_else(|| DockerError::NotUtf8 {
            path: socket.to_owned(),
        })?;

        // Requests go to unversioned paths, which the daemon serves at its own API version,
        // so one client works with every daemon version.
        let docker =
            Docker::connect_with_unix(text, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|source| DockerError::Connect {
                    path: socket.to_owned(),
                    source: Box::new(source),
                })?;
        Ok(DockerClient {
            docker,
            socket: socket.to_owned(),
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn api_error(&self, action: &str) -> impl FnOnce(bollard::errors::Error) -> DockerError {
        let path = self.socket.clone();
        let action = action.to_owned();
        move |source| DockerError::Api {
            path,
            action,
            source: Box::new(source),
        }
    }

    /// Whether the daemon answers (`GET /_ping`).
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker
            .ping()
            .await
            .map_err(self.api_error("GET /_ping"))?;
        Ok(())
    }

    /// The running containers, sorted by name.
    pub async fn containers(&self) -> Result<Vec<Container>, DockerError> {
        let options = ListContainersOptionsBuilder::default().all(false).build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(self.api_error("GET /containers/json"))?;

        let mut containers: Vec<Container> = list.into_iter().map(from_summary).collect();
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(containers)
    }

    /// One container by id or name, from `GET /containers/<id>/json` (authoritative state and
    /// health, e.g. for a health wait).
    pub async fn container(&self, id: &str) -> Result<Container, DockerError> {
        let action = format!("GET /containers/{id}/json");
        let inspect = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(self.api_error(&action))?;
        Ok(from_inspect(inspect))
    }

    /// The VM-side TCP ports published by running containers, deduplicated and sorted: what
    /// `vmoat tunnel` forwards when no ports are given. UDP and SCTP ports are left out (an
    /// SSH tunnel carries TCP only).
    pub async fn published_ports(&self) -> Result<Vec<u16>, DockerError> {
        let containers = self.containers().await?;
        let ports: BTreeSet<u16> = containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter(|p| p.protocol == Protocol::Tcp)
            .map(|p| p.host_port)
            .collect();
        Ok(ports.into_iter().collect())
    }
}

/// The name without Docker's leading `/`.
fn clean_name(name: &str) -> String {
    name.strip_prefix('/').unwrap_or(name).to_owned()
}

fn from_summary(summary: ContainerSummary) -> Container {
    let status = summary.status.unwrap_or_default();
    let health = match summary.health.and_then(|h| h.status) {
        Some(ContainerSummaryHealthStatusEnum::STARTING) => Some(Health::Starting),
        Some(ContainerSummaryHealthStatusEnum::HEALTHY) => Some(Health::Healthy),
        Some(ContainerSummaryHealthStatusEnum::UNHEALTHY) => Some(Health::Unhealthy),
        // Daemons before API 1.52 have no Health field: the status text carries it.
        _ => health_from_status(&status),
    };

    let ports = summary
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let protocol = match p.typ {
                Some(PortSummaryTypeEnum::UDP) => Protocol::Udp,
                Some(PortSummaryTypeEnum::SCTP) => Protocol::Sctp,
                _ => Protocol::Tcp,
            };
            Some(PublishedPort {
                host_port: p.public_port.filter(|&port| port != 0)?,
                container_port: p.private_port,
                protocol,
                host_ip: p.ip.unwrap_or_default(),
            })
        });

    Container {
        id: summary.id.unwrap_or_default(),
        name: summary
            .names
            .unwrap_or_default()
            .first()
            .map(|n| clean_name(n))
            .unwrap_or_default(),
        image: summary.image.unwrap_or_default(),
        state: summary.state.map(|s| s.to_string()).unwrap_or_default(),
        status,
        health,
        ports: dedup_ports(ports),
    }
}

fn from_inspect(inspect: ContainerInspectResponse) -> Container {
    let state = inspect.state.unwrap_or_default();
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Some(Health::Starting),
        Some(HealthStatusEnum::HEALTHY) => Some(Health::Healthy),
        Some(HealthStatusEnum::UNHEALTHY) => Some(Health::Unhealthy),
        _ => None,
    };

    let port_map = inspect
        .network_settings
        .and_then(|n| n.ports)
        .unwrap_or_default();
    let ports = port_map.into_iter().flat_map(|(key, bindings)| {
        // Keys look like `80/tcp`.
        let (port, proto) = key.split_once('/').unwrap_or((key.as_str(), "tcp"));
        let container_port = port.parse::<u16>().ok();
        let protocol = Protocol::parse(proto);
        bindings
            .unwrap_or_default()
            .into_iter()
            .filter_map(move |b| {
                Some(PublishedPort {
                    host_port: b.host_port?.parse::<u16>().ok().filter(|&p| p != 0)?,
                    container_port: container_port?,
                    protocol: protocol?,
                    host_ip: b.host_ip.unwrap_or_default(),
                })
            })
    });

    Container {
        id: inspect.id.unwrap_or_default(),
        name: clean_name(&inspect.name.unwrap_or_default()),
        image: inspect
            .config
            .and_then(|c| c.image)
            .or(inspect.image)
            .unwrap_or_default(),
        state: state.status.map(|s| s.to_string()).unwrap_or_default(),
        status: String::new(),
        health,
        ports: dedup_ports(ports),
    }
}

/// Docker lists a port once per address family (`0.0.0.0` and `::`): keep one per VM port,
/// container port and protocol, preferring the IPv4 address.
fn dedup_ports(ports: impl Iterator<Item = PublishedPort>) -> Vec<PublishedPort> {
    let mut ports: Vec<PublishedPort> = ports.collect();
    ports.sort_by(|a, b| {
        (
            a.host_port,
            a.container_port,
            a.protocol,
            a.host_ip.contains(':'),
        )
            .cmp(&(
                b.host_port,
                b.container_port,
                b.protocol,
                b.host_ip.contains(':'),
            ))
    });
    ports.dedup_by(|later, earlier| {
        (later.host_port, later.container_port, later.protocol)
            == (earlier.host_port, earlier.container_port, earlier.protocol)
    });
    ports
}

/// The health in Docker's status text: `Up 5 minutes (healthy)`, `(unhealthy)`,
/// `(health: starting)`.
fn health_from_status(status: &str) -> Option<Health> {
    if status.contains("(health: starting)") {
        Some(Health::Starting)
    } else if status.contains("(unhealthy)") {
        Some(Health::Unhealthy)
    } else if status.contains("(healthy)") {
        Some(Health::Healthy)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_from_the_status_text() {
        assert_eq!(
            health_from_status("Up 3 minutes (healthy)"),
            Some(Health::Healthy)
        );
        assert_eq!(
            health_from_status("Up 3 minutes (unhealthy)"),
            Some(Health::Unhealthy)
        );
        assert_eq!(
            health_from_status("Up 1 second (health: starting)"),
            Some(Health::Starting)
        );
        assert_eq!(health_from_status("Up 3 minutes"), None);
    }

    #[test]
    fn ports_are_deduplicated_across_address_families() {
        let port = |ip: &str, host, container, protocol| PublishedPort {
            host_port: host,
            container_port: container,
            protocol,
            host_ip: ip.to_owned(),
        };
        let ports = dedup_ports(
            [
                port("::", 8080, 80, Protocol::Tcp),
                port("0.0.0.0", 8080, 80, Protocol::Tcp),
                port("0.0.0.0", 53, 53, Protocol::Udp),
                port("0.0.0.0", 53, 53, Protocol::Tcp),
            ]
            .into_iter(),
        );
        assert_eq!(
            ports,
            [
                port("0.0.0.0", 53, 53, Protocol::Tcp),
                port("0.0.0.0", 53, 53, Protocol::Udp),
                port("0.0.0.0", 8080, 80, Protocol::Tcp),
            ]
        );
    }

    #[test]
    fn a_missing_socket_says_to_start_the_vm() {
        let err = DockerClient::connect(Path::new("/nonexistent/vmoat/docker.sock")).unwrap_err();
        assert!(matches!(err, DockerError::NoSocket { .. }));
        assert!(err.to_string().contains("/nonexistent/vmoat/docker.sock"));
        assert!(err.to_string().contains("vmoat up"));
    }
}
