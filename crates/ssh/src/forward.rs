//! Local forwards over the guest's SSH: a byte stream to a guest TCP port (direct-tcpip) or
//! unix socket (direct-streamlocal), and servers that accept local connections and carry each
//! one over its own channel, as `ssh -L` does.
//!
//! Each forwarded connection copies both directions independently: EOF in one direction is
//! passed on (half-close) while the other keeps flowing, and the connection ends when both
//! have ended or either fails. Writes wait for the SSH window (backpressure).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use russh::Channel;
use russh::client::Msg;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::channel_io::{ChannelReader, ChannelState, ChannelWriter, CloseGuard};
use crate::error::SshError;
use crate::session::Session;

/// How long a local peer may refuse our writes before its connection is dropped. While it
/// refuses, the channel's data backs up into the SSH connection, which then holds up every
/// other channel (see the crate docs), so a peer that stopped reading must not keep it forever.
pub const LOCAL_STALL_LIMIT: Duration = Duration::from_secs(30);

/// How a forward treats its connections.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// How long a local peer may refuse data before its connection is dropped; see
    /// [`LOCAL_STALL_LIMIT`] for why there is a limit at all.
    pub stall_limit: Duration,
}

impl Default for ForwardOptions {
    fn default() -> ForwardOptions {
        ForwardOptions {
            stall_limit: LOCAL_STALL_LIMIT,
        }
    }
}

/// The upload chunk: an SSH packet's worth, so reads map onto packets.
const CHUNK: usize = 32 * 1024;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A byte stream over one SSH channel to a guest port or socket.
///
/// Reads end at the guest side's EOF; [`AsyncWriteExt::shutdown`] sends EOF and keeps reading
/// (half-close). Dropping it (or both halves of [`TunnelStream::into_split`]) closes the
/// channel. Keep reading it: unread data holds up the whole SSH connection (crate docs).
pub struct TunnelStream {
    reader: TunnelReader,
    writer: TunnelWriter,
}

/// The reading half of a [`TunnelStream`].
#[derive(Debug)]
pub struct TunnelReader {
    inner: ChannelReader,
    _guard: Arc<CloseGuard>,
}

/// The writing half of a [`TunnelStream`].
#[derive(Debug)]
pub struct TunnelWriter {
    inner: ChannelWriter,
    _guard: Arc<CloseGuard>,
}

impl TunnelStream {
    fn new(channel: Channel<Msg>) -> TunnelStream {
        let (read, write) = channel.split();
        let state = ChannelState::new(Arc::new(write));
        let guard = Arc::new(CloseGuard::new(Arc::clone(&state)));
        TunnelStream {
            reader: TunnelReader {
                inner: ChannelReader::new(read, &state),
                _guard: Arc::clone(&guard),
            },
            writer: TunnelWriter {
                inner: ChannelWriter::new(&state),
                _guard: guard,
            },
        }
    }

    /// Split into halves that can move to different tasks; the channel closes when both are
    /// dropped.
    pub fn into_split(self) -> (TunnelReader, TunnelWriter) {
        (self.reader, self.writer)
    }
}

impl fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelStream").finish_non_exhaustive()
    }
}

impl TunnelReader {
    /// The next chunk as it arrived, or `None` at EOF.
    pub async fn recv(&mut self) -> io::Result<Option<bytes::Bytes>> {
        self.inner.recv().await
    }
}

impl AsyncRead for TunnelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

impl Session {
    /// A stream to `host:port` as the guest sees it (e.g. `127.0.0.1:8080` for a port
    /// published inside the VM).
    pub async fn direct_tcpip(&self, host: &str, port: u16) -> Result<TunnelStream, SshError> {
        let channel = self.open_direct_tcpip(host, port, None).await?;
        Ok(TunnelStream::new(channel))
    }

    /// A stream to the guest's unix socket at `path` (e.g. `/var/run/docker.sock`).
    pub async fn direct_streamlocal(&self, path: &str) -> Result<TunnelStream, SshError> {
        let channel = self.open_direct_streamlocal(path).await?;
        Ok(TunnelStream::new(channel))
    }
}

/// Where a forward gets its session for each new connection: one fixed session, or the latest
/// one an agent publishes (so forwards survive a reconnect without rebinding their port).
#[derive(Clone, Debug)]
pub enum SessionSource {
    /// Always this session.
    Fixed(Session),
    /// The current value of this channel; `None` while reconnecting.
    Latest(watch::Receiver<Option<Session>>),
}

impl SessionSource {
    fn current(&self) -> Option<Session> {
        match self {
            SessionSource::Fixed(session) => Some(session.clone()),
            SessionSource::Latest(rx) => rx.borrow().clone(),
        }
    }
}

impl From<Session> for SessionSource {
    fn from(session: Session) -> SessionSource {
        SessionSource::Fixed(session)
    }
}

impl From<watch::Receiver<Option<Session>>> for SessionSource {
    fn from(rx: watch::Receiver<Option<Session>>) -> SessionSource {
        SessionSource::Latest(rx)
    }
}

/// Where a forward's connections go in the guest.
#[derive(Clone, Debug)]
enum Target {
    Tcp(String, u16),
    Unix(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(host, port) => write!(f, "{host}:{port}"),
            Target::Unix(path) => f.write_str(path),
        }
    }
}

/// Serve `listener`: every accepted connection is carried to `guest_host:guest_port` in the
/// guest over its own direct-tcpip channel, concurrently.
///
/// Runs until the returned future is dropped (cancelled), which also ends every connection it
/// carries. A guest port that refuses a connection closes just that local connection.
pub async fn forward_tcp(
    listener: TcpListener,
    sessions: impl Into<SessionSource>,
    guest_host: impl Into<String>,
    guest_port: u16,
) {
    let options = ForwardOptions::default();
    forward_tcp_with(listener, sessions, guest_host, guest_port, options).await;
}

/// [`forward_tcp`] with explicit [`ForwardOptions`].
pub async fn forward_tcp_with(
    listener: TcpListener,
    sessions: impl Into<SessionSource>,
    guest_host: impl Into<String>,
    guest_port: u16,
    options: ForwardOptions,
) {
    let sessions = sessions.into();
    let target = Target::Tcp(guest_host.into(), guest_port);
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (sessions, target) = (sessions.clone(), target.clone());
                    let task = carry(stream, Some(peer), sessions, target, options.clone());
                    connections.spawn(task);
                }
                Err(e) => accept_failed(&local, e).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A unix listener whose socket file is private (mode 0600) and removed when the listener is
/// dropped (if it is still the same file).
#[derive(Debug)]
pub struct PrivateUnixListener {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl PrivateUnixListener {
    /// Bind a socket at `path` with mode 0600, creating the parent directory if needed.
    ///
    /// A stale socket left by a process that died is removed first. A socket someone still
    /// serves is an error (another agent owns it), and so is anything at `path` that is not a
    /// socket: it is never removed. The socket is bound in a private directory and renamed into
    /// place, so it is never reachable with looser permissions.
    pub fn bind(path: &Path) -> Result<PrivateUnixListener, SshError> {
        let local = |action, source| SshError::LocalSocket {
            action,
            path: path.to_owned(),
            source,
        };
        remove_stale_socket(path)?;

        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| local("create the directory of", e))?;
        let staging = parent.join(format!(
            ".vmoat-sock.{}.{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| local("create a staging directory beside", e))?;
        let staged = staging.join("s");

        let bound = (|| {
            let listener = std::os::unix::net::UnixListener::bind(&staged)?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&staged, path)?;
            listener.set_nonblocking(true)?;
            Ok::<_, io::Error>(listener)
        })();
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&staging);
        let listener = bound.map_err(|e| local("bind", e))?;

        let meta = std::fs::symlink_metadata(path).map_err(|e| local("inspect", e))?;
        let listener = UnixListener::from_std(listener).map_err(|e| local("listen on", e))?;
        Ok(PrivateUnixListener {
            listener,
            path: path.to_owned(),
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateUnixListener {
    fn drop(&mut self) {
        // Only remove the file if it is still ours: a new agent may have replaced it.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.inode
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Remove a socket file nobody serves; refuse a live socket or a non-socket.
fn remove_stale_socket(path: &Path) -> Result<(), SshError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SshError::LocalSocket {
                action: "inspect",
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SshError::NotASocket {
            path: path.to_owned(),
        });
    }

    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(SshError::LocalSocket {
            action: "take over the socket (another process is serving it; stop it first)",
            path: path.to_owned(),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        });
    }
    tracing::debug!(path = %path.display(), "removing a stale socket");
    std::fs::remove_file(path).map_err(|source| SshError::LocalSocket {
        action: "remove the stale socket",
        path: path.to_owned(),
        source,
    })
}

/// Serve `listener`: every accepted connection is carried to the guest's unix socket
/// `guest_path` over its own direct-streamlocal channel (e.g. the guest's
/// `/var/run/docker.sock` to `~/.colima/<profile>/docker.sock`).
///
/// Runs until the returned future is dropped, which ends every connection and removes the
/// socket file.
pub async fn forward_unix(
    listener: PrivateUnixListener,
    sessions: impl Into<SessionSource>,
    guest_path: impl Into<String>,
) {
    forward_unix_with(listener, sessions, guest_path, ForwardOptions::default()).await;
}

/// [`forward_unix`] with explicit [`ForwardOptions`].
pub async fn forward_unix_with(
    listener: PrivateUnixListener,
    sessions: impl Into<SessionSource>,
    guest_path: impl Into<String>,
    options: ForwardOptions,
) {
    let sessions = sessions.into();
    let target = Target::Unix(guest_path.into());
    let local = listener.path.display().to_string();
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (sessions, target) = (sessions.clone(), target.clone());
                    connections.spawn(carry(stream, None, sessions, target, options.clone()));
                }
                Err(e) => accept_failed(&local, e).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn accept_failed(local: &str, error: io::Error) {
    // Usually EMFILE or ECONNABORTED: transient, so keep serving after a pause.
    tracing::warn!(listener = local, %error, "accept failed; retrying");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Carry one local connection to `target` over a new channel.
async fn carry<S>(
    local: S,
    peer: Option<SocketAddr>,
    sessions: SessionSource,
    target: Target,
    options: ForwardOptions,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(session) = sessions.current().filter(|s| !s.is_closed()) else {
        tracing::warn!(%target, "no SSH session to the guest; dropping a forwarded connection");
        return;
    };

    let opened = match &target {
        Target::Tcp(host, port) => session.open_direct_tcpip(host, *port, peer).await,
        Target::Unix(path) => session.open_direct_streamlocal(path).await,
    };
    let tunnel = match opened {
        Ok(channel) => TunnelStream::new(channel),
        Err(error) => {
            tracing::warn!(%target, error = %error, "cannot open a forwarded connection");
            return;
        }
    };

    match pump_with(local, tunnel, options.stall_limit).await {
        Ok((up, down)) => tracing::debug!(%target, up, down, "forwarded connection done"),
        Err(error) if error.kind() == io::ErrorKind::TimedOut => {
            tracing::warn!(%target, %error, "dropped a forwarded connection");
        }
        Err(error) => tracing::debug!(%target, %error, "forwarded connection ended with an error"),
    }
}

/// Copy both directions between `local` and `tunnel` with half-close; returns the bytes sent
/// up (to the guest) and down. A local peer that refuses data for [`LOCAL_STALL_LIMIT`] ends
/// it with `TimedOut`.
pub async fn pump<S>(local: S, tunnel: TunnelStream) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pump_with(local, tunnel, LOCAL_STALL_LIMIT).await
}

/// [`pump`] with an explicit stall limit.
pub async fn pump_with<S>(
    local: S,
    tunnel: TunnelStream,
    stall_limit: Duration,
) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut local_read, mut local_write) = tokio::io::split(local);
    let (mut tunnel_read, mut tunnel_write) = tunnel.into_split();

    let up = async {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = local_read.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            tunnel_write.write_all(&buf[..n]).await?;
            total += n as u64;
        }
        tunnel_write.shutdown().await?;
        Ok::<_, io::Error>(total)
    };

    let down = async {
        let mut total = 0u64;
        while let Some(chunk) = tunnel_read.recv().await? {
            let write = local_write.write_all(&chunk);
            match tokio::time::timeout(stall_limit, write).await {
                Ok(written) => written?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the local peer stopped reading; dropping it so other channels flow",
                    ));
                }
            }
            total += chunk.len() as u64;
        }
        local_write.shutdown().await?;
        Ok::<_, io::Error>(total)
    };

    tokio::try_join!(up, down)
}
