//! The HTTP server on `ha.sock`: routes requests of the [protocol](crate::protocol) to a
//! [`Backend`], which is the running agent in production and a fake in tests.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::events::EventLog;
use crate::protocol::{
    AgentStatus, ApiError, Event, LimaInfo, ProbeRequest, ProbeResult, StopRequest, StopResult,
    Tunnel, TunnelRequest,
};

/// The upgrade token of an exec session.
pub const EXEC_UPGRADE: &str = "vmoat-exec";

/// The largest request body the agent reads.
const MAX_BODY: usize = 64 * 1024;

/// An upgraded exec connection.
pub type ExecIo = TokioIo<hyper::upgrade::Upgraded>;

/// Response body type.
pub type Body = BoxBody<Bytes, Infallible>;

/// What the server asks of the agent.
pub trait Backend: Send + Sync + 'static {
    /// Lima's info (the SSH port).
    fn info(&self) -> LimaInfo;

    /// The agent's status.
    fn status(&self) -> impl Future<Output = AgentStatus> + Send;

    /// The event log.
    fn events(&self) -> &EventLog;

    /// Serves one exec session on an upgraded connection (frames, see `crate::frame`).
    fn exec(self: Arc<Self>, io: ExecIo) -> impl Future<Output = ()> + Send;

    /// Open tunnels.
    fn tunnels(&self) -> impl Future<Output = Vec<Tunnel>> + Send;

    /// Opens (or returns the existing) tunnel to a guest port.
    fn open_tunnel(
        self: Arc<Self>,
        request: TunnelRequest,
    ) -> impl Future<Output = Result<Tunnel, ApiError>> + Send;

    /// Closes one tunnel, or all of them; returns what was closed.
    fn close_tunnels(&self, guest_port: Option<u16>) -> impl Future<Output = Vec<Tunnel>> + Send;

    /// One HTTP probe from inside the guest's network.
    fn probe(&self, request: ProbeRequest) -> impl Future<Output = ProbeResult> + Send;

    /// Stops the VM; answers once the hypervisor has ended.
    fn stop(
        self: Arc<Self>,
        request: StopRequest,
    ) -> impl Future<Output = Result<StopResult, ApiError>> + Send;
}

/// Serves the protocol on `listener` until the task is dropped.
pub async fn serve<B: Backend>(listener: UnixListener, backend: Arc<B>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("ha.sock accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };

        let backend = backend.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let backend = backend.clone();
                async move { Ok::<_, Infallible>(route(backend, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(err) = conn.await {
                tracing::debug!("ha.sock connection ended: {err}");
            }
        });
    }
}

/// Binds `ha.sock`, replacing a stale socket file but never a live one or a non-socket.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; remove it by hand",
                    path.display()
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another agent answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }

    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn route<B: Backend>(backend: Arc<B>, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();

    match (&method, path.as_str()) {
        (&Method::GET, "/v1/info") => json(StatusCode::OK, &backend.info()),
        (&Method::GET, "/vmoat/v1/status") => json(StatusCode::OK, &backend.status().await),
        (&Method::GET, "/vmoat/v1/events") => events(backend, &query),
        (&Method::POST, "/vmoat/v1/exec") => {
            let wants_upgrade = req
                .headers()
                .get(UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(EXEC_UPGRADE.as_bytes()));
            if !wants_upgrade {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "exec needs an upgrade",
                );
            }
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(upgraded) => backend.exec(TokioIo::new(upgraded)).await,
                    Err(err) => tracing::warn!("exec upgrade failed: {err}"),
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(CONNECTION, "upgrade")
                .header(UPGRADE, EXEC_UPGRADE)
                .body(empty())
                .expect("static response")
        }
        (&Method::GET, "/vmoat/v1/tunnels") => json(StatusCode::OK, &backend.tunnels().await),
        (&Method::POST, "/vmoat/v1/tunnels") => match read_json::<TunnelRequest>(req).await {
            Ok(request) => match backend.open_tunnel(request).await {
                Ok(tunnel) => json(StatusCode::OK, &tunnel),
                Err(err) => json(StatusCode::CONFLICT, &err),
            },
            Err(resp) => resp,
        },
        (&Method::DELETE, "/vmoat/v1/tunnels") => {
            json(StatusCode::OK, &backend.close_tunnels(None).await)
        }
        (&Method::DELETE, p) if p.starts_with("/vmoat/v1/tunnels/") => {
            match p["/vmoat/v1/tunnels/".len()..].parse::<u16>() {
                Ok(port) => json(StatusCode::OK, &backend.close_tunnels(Some(port)).await),
                Err(_) => error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "bad port in the path",
                ),
            }
        }
        (&Method::POST, "/vmoat/v1/probe") => match read_json::<ProbeRequest>(req).await {
            Ok(request) => json(StatusCode::OK, &backend.probe(request).await),
            Err(resp) => resp,
        },
        (&Method::POST, "/vmoat/v1/stop") => match read_json::<StopRequest>(req).await {
            Ok(request) => match backend.stop(request).await {
                Ok(result) => json(StatusCode::OK, &result),
                Err(err) => json(StatusCode::CONFLICT, &err),
            },
            Err(resp) => resp,
        },
        _ => error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no endpoint {method} {path}"),
        ),
    }
}

fn events<B: Backend>(backend: Arc<B>, query: &str) -> Response<Body> {
    let from = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("from="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);

    // The stream ends after an event that ends a wait (ready, failed, stopped), so a client
    // simply reads to the end.
    let stream =
        futures_util::stream::unfold((backend, from, false), |(b, next, done)| async move {
            if done {
                return None;
            }
            let batch = b.events().next_from(next).await;
            if batch.is_empty() {
                return None;
            }
            let mut text = String::new();
            let mut finished = false;
            let mut sent = 0;
            for event in &batch {
                text.push_str(&serde_json::to_string(event).expect("JSON of plain data"));
                text.push('\n');
                sent += 1;
                if matches!(
                    event,
                    Event::Ready | Event::Failed { .. } | Event::Stopped { .. }
                ) {
                    finished = true;
                    break;
                }
            }
            let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(text)));
            Some((frame, (b, next + sent, finished)))
        });

    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/x-ndjson")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("static response")
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad-request", &e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad-request", &e.to_string()))
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON of plain data");
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response")
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    json(
        status,
        &ApiError {
            message: message.to_owned(),
            kind: kind.to_owned(),
        },
    )
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}
