//! The CLI's side of the protocol: one HTTP request per call over the agent's socket.
//!
//! Every call opens its own connection, so a hung request never blocks another, and a dead
//! agent shows up as [`ClientError::Gone`] at once instead of a hang.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::protocol::{
    AgentStatus, ApiError, Event, LimaInfo, ProbeRequest, ProbeResult, StopRequest, StopResult,
    Tunnel, TunnelRequest,
};
use crate::server::{EXEC_UPGRADE, ExecIo};

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket: the agent is not running.
    #[error("the VM's host agent is not running (nothing answers on {})", .socket.display())]
    Gone {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or the answer made no sense.
    #[error("talking to the host agent on {} failed: {detail}", .socket.display())]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The agent refused the request.
    #[error("{}", .error.message)]
    Refused {
        /// The agent's answer.
        error: ApiError,
    },
    /// No answer in time.
    #[error("the host agent on {} did not answer within {} s", .socket.display(), .after.as_secs())]
    Timeout {
        /// The socket.
        socket: PathBuf,
        /// The limit.
        after: Duration,
    },
}

/// A client of one agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    socket: PathBuf,
}

impl AgentClient {
    /// A client of the agent listening on `socket` (`ha.sock`).
    pub fn new(socket: impl Into<PathBuf>) -> AgentClient {
        AgentClient {
            socket: socket.into(),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Lima's `/v1/info`.
    pub async fn info(&self) -> Result<LimaInfo, ClientError> {
        self.call(Method::GET, "/v1/info", None::<&()>, Duration::from_secs(3))
            .await
    }

    /// The agent's status.
    pub async fn status(&self) -> Result<AgentStatus, ClientError> {
        self.call(
            Method::GET,
            "/vmoat/v1/status",
            None::<&()>,
            Duration::from_secs(5),
        )
        .await
    }

    /// Open tunnels.
    pub async fn tunnels(&self) -> Result<Vec<Tunnel>, ClientError> {
        self.call(
            Method::GET,
            "/vmoat/v1/tunnels",
            None::<&()>,
            Duration::from_secs(5),
        )
        .await
    }

    /// Opens a tunnel to a guest port (or returns the open one).
    pub async fn open_tunnel(&self, guest_port: u16) -> Result<Tunnel, ClientError> {
        let request = TunnelRequest { guest_port };
        self.call(
            Method::POST,
            "/vmoat/v1/tunnels",
            Some(&request),
            Duration::from_secs(30),
        )
        .await
    }

    /// Closes one tunnel, or all.
    pub async fn close_tunnels(&self, guest_port: Option<u16>) -> Result<Vec<Tunnel>, ClientError> {
        let path = match guest_port {
            Some(port) => format!("/vmoat/v1/tunnels/{port}"),
            None => "/vmoat/v1/tunnels".to_owned(),
        };
        self.call(Method::DELETE, &path, None::<&()>, Duration::from_secs(10))
            .await
    }

    /// One HTTP probe from inside the guest.
    pub async fn probe(&self, url: &str, timeout: Duration) -> Result<ProbeResult, ClientError> {
        let request = ProbeRequest {
            url: url.to_owned(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let limit = timeout + Duration::from_secs(5);
        self.call(Method::POST, "/vmoat/v1/probe", Some(&request), limit)
            .await
    }

    /// Stops the VM; returns when the hypervisor has ended.
    pub async fn stop(&self, grace: Duration) -> Result<StopResult, ClientError> {
        let request = StopRequest {
            grace_secs: grace.as_secs(),
        };
        let limit = grace + Duration::from_secs(60);
        self.call(Method::POST, "/vmoat/v1/stop", Some(&request), limit)
            .await
    }

    /// Follows the event log from index `from`, calling `each` per event, until the agent
    /// sends an event that ends a wait (ready, failed, stopped) or the connection ends.
    /// Returns how many events were read.
    pub async fn follow_events(
        &self,
        from: usize,
        mut each: impl FnMut(&Event),
    ) -> Result<usize, ClientError> {
        let mut sender = self.connect().await?;
        let req = self.request(Method::GET, &format!("/vmoat/v1/events?from={from}"), None)?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        if response.status() != StatusCode::OK {
            return Err(self.protocol(format!("events answered {}", response.status())));
        }

        let mut body = response.into_body();
        let mut pending = Vec::new();
        let mut count = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.protocol(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let event: Event = serde_json::from_slice(&line)
                    .map_err(|e| self.protocol(format!("bad event: {e}")))?;
                count += 1;
                each(&event);
            }
        }
        Ok(count)
    }

    /// Opens an exec session; the caller speaks frames on the returned connection.
    pub async fn exec(&self) -> Result<ExecIo, ClientError> {
        let mut sender = self.connect().await?;
        let mut req = self.request(Method::POST, "/vmoat/v1/exec", None)?;
        req.headers_mut()
            .insert(CONNECTION, "upgrade".parse().expect("static header"));
        req.headers_mut()
            .insert(UPGRADE, EXEC_UPGRADE.parse().expect("static header"));

        let response = sender
            .send_request(req)
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.protocol(format!("exec answered {}", response.status())));
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        Ok(TokioIo::new(upgraded))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        limit: Duration,
    ) -> Result<T, ClientError> {
        let work = async {
            let mut sender = self.connect().await?;
            let body = body.map(|b| serde_json::to_vec(b).expect("JSON of plain data"));
            let req = self.request(method, path, body)?;
            let response = sender
                .send_request(req)
                .await
                .map_err(|e| self.protocol(e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.protocol(e.to_string()))?
                .to_bytes();

            if !status.is_success() {
                let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or(ApiError {
                    message: format!("the agent answered {status}"),
                    kind: "http".into(),
                });
                return Err(ClientError::Refused { error });
            }
            serde_json::from_slice(&bytes).map_err(|e| self.protocol(format!("bad answer: {e}")))
        };

        tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                socket: self.socket.clone(),
                after: limit,
            })
        })
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Gone {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!("agent connection ended: {err}");
            }
        });
        Ok(sender)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "lima-hostagent");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.protocol(e.to_string()))
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            detail,
        }
    }
}
