//! One authenticated SSH connection to a guest, shared by every channel that uses it.
//!
//! `Session::connect` dials, checks the server's host key against the pinned key (a mismatch is
//! refused, never accepted), authenticates with the user key, and returns a cheap-to-clone
//! handle. Exec, PTY and forward channels are opened on it concurrently.
//!
//! Flow control caveat (russh 0.65): the connection delivers every channel's data from one
//! loop, and a channel whose reader stops draining blocks that loop once its buffer (about 100
//! packets) is full, which stalls every other channel of the connection until it drains. Every
//! reader in this crate keeps draining; callers must read what they ask for (or drop it).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle, Msg};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelOpenFailure, cipher};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{SshError, Stage};
use crate::keys::{PublicKey, UserKey};

/// Bytes read from the socket at once.
const READ_BUFFER: usize = 256 * 1024;

/// The receive window per channel: how much the server may send before we acknowledge. Large
/// enough that a busy host's scheduling delays do not stall a forward.
const WINDOW: u32 = 8 * 1024 * 1024;

/// How a connection is made and kept alive.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Time allowed for TCP connect, handshake and authentication together.
    pub timeout: Duration,
    /// Send a keepalive after this long without traffic from the server.
    pub keepalive_interval: Duration,
    /// Close the connection after this many unanswered keepalives.
    pub keepalive_max: usize,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 4,
        }
    }
}

/// An authenticated SSH connection. Clone it freely: clones share the one connection, and
/// channels opened from any clone run concurrently over it.
///
/// The connection stays up while any clone or channel uses it; [`Session::disconnect`] ends
/// it for all. [`Session::closed`] resolves when it has ended for any reason (keepalive
/// timeout, guest shutdown), which is the cue to reconnect.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    handle: Handle<ClientHandler>,
    addr: SocketAddr,
    user: String,
    closed: watch::Receiver<bool>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("addr", &self.inner.addr)
            .field("user", &self.inner.user)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Session {
    /// Connect to `addr`, require the server to present `pinned` as its host key, and log in
    /// as `user` with `key`. `timeout` bounds the whole connect; keepalives use the defaults
    /// of [`ConnectOptions`].
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        key: &UserKey,
        pinned: &PublicKey,
        timeout: Duration,
    ) -> Result<Session, SshError> {
        let options = ConnectOptions {
            timeout,
            ..ConnectOptions::default()
        };
        Session::connect_with(addr, user, key, pinned, &options).await
    }

    /// [`Session::connect`] with every option spelled out.
    pub async fn connect_with(
        addr: SocketAddr,
        user: &str,
        key: &UserKey,
        pinned: &PublicKey,
        options: &ConnectOptions,
    ) -> Result<Session, SshError> {
        let deadline = Instant::now() + options.timeout;
        let timed_out = |stage| SshError::Timeout {
            addr,
            user: user.to_owned(),
            stage,
            timeout: options.timeout,
        };

        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out(Stage::Connect))?
            .map_err(|source| SshError::Connect {
                addr,
                user: user.to_owned(),
                source,
            })?;
        // Small packets (keystrokes, exec requests) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        // russh reads each packet with two exact reads (length block, then body); a read
        // buffer turns those into one syscall per many packets. Writes stay unbuffered.
        let stream = BufReader::with_capacity(READ_BUFFER, stream);

        let (closed_tx, closed_rx) = watch::channel(false);
        let offered = Arc::new(Mutex::new(None));
        let handler = ClientHandler {
            pinned: pinned.clone(),
            offered: Arc::clone(&offered),
            closed: closed_tx,
        };
        let config = Arc::new(client_config(pinned, options));
        let handshake = client::connect_stream(config, stream, handler);
        let handshake = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| timed_out(Stage::Handshake))?;
        let mut handle = match handshake {
            Ok(handle) => handle,
            Err(source) => {
                let offered = offered.lock().map(|mut o| o.take()).unwrap_or(None);
                return Err(match offered {
                    Some(offered) => SshError::HostKeyMismatch {
                        addr,
                        expected: pinned.fingerprint(),
                        offered: offered.fingerprint(),
                    },
                    None => SshError::Handshake {
                        addr,
                        user: user.to_owned(),
                        source: Box::new(source),
                    },
                });
            }
        };

        let credential = PrivateKeyWithHashAlg::new(key.private(), None);
        let auth =
            tokio::time::timeout_at(deadline, handle.authenticate_publickey(user, credential))
                .await
                .map_err(|_| timed_out(Stage::Auth))?
                .map_err(|source| SshError::Auth {
                    addr,
                    user: user.to_owned(),
                    source: Box::new(source),
                })?;
        if !auth.success() {
            return Err(SshError::AuthRejected {
                addr,
                user: user.to_owned(),
                key: key.path().to_owned(),
            });
        }

        tracing::debug!(%addr, user, "SSH session established");
        Ok(Session {
            inner: Arc::new(Inner {
                handle,
                addr,
                user: user.to_owned(),
                closed: closed_rx,
            }),
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The user this session is logged in as.
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow() || self.inner.handle.is_closed()
    }

    /// Resolves once the connection has ended, for whatever reason.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closed = self.inner.closed.clone();
        async move {
            // An error means the handler (and so the connection) is gone: also closed.
            let _ = closed.wait_for(|c| *c).await;
        }
    }

    /// Ask the server to end the connection; every channel on it ends too.
    pub async fn disconnect(&self) {
        let _ = self
            .inner
            .handle
            .disconnect(russh::Disconnect::ByApplication, "vmoat disconnect", "en")
            .await;
    }

    /// Open a session channel (for exec and shells).
    pub(crate) async fn open_session(&self) -> Result<Channel<Msg>, SshError> {
        let opened = self.inner.handle.channel_open_session().await;
        opened.map_err(|e| self.channel_error("open a session channel", e))
    }

    /// Open a direct-tcpip channel to `host:port` as seen from the guest.
    pub(crate) async fn open_direct_tcpip(
        &self,
        host: &str,
        port: u16,
        originator: Option<SocketAddr>,
    ) -> Result<Channel<Msg>, SshError> {
        let (orig_host, orig_port) = match originator {
            Some(o) => (o.ip().to_string(), u32::from(o.port())),
            None => ("127.0.0.1".to_owned(), 0),
        };
        let opened = self
            .inner
            .handle
            .channel_open_direct_tcpip(host, u32::from(port), orig_host, orig_port)
            .await;
        opened.map_err(|e| self.channel_error(&format!("open direct-tcpip to {host}:{port}"), e))
    }

    /// Open a direct-streamlocal channel to the guest's unix socket `path`.
    pub(crate) async fn open_direct_streamlocal(
        &self,
        path: &str,
    ) -> Result<Channel<Msg>, SshError> {
        let opened = self
            .inner
            .handle
            .channel_open_direct_streamlocal(path)
            .await;
        opened.map_err(|e| self.channel_error(&format!("open direct-streamlocal to {path}"), e))
    }

    /// Turn a russh error on a channel operation into the matching [`SshError`].
    pub(crate) fn channel_error(&self, action: &str, error: russh::Error) -> SshError {
        let addr = self.inner.addr;
        let user = self.inner.user.clone();
        let action = action.to_owned();
        match error {
            russh::Error::ChannelOpenFailure(reason) => SshError::Refused {
                addr,
                user,
                action,
                reason: open_failure_text(&reason),
            },
            russh::Error::SendError
            | russh::Error::RecvError
            | russh::Error::Disconnect
            | russh::Error::HUP => SshError::ConnectionLost { addr, user, action },
            _ if self.is_closed() => SshError::ConnectionLost { addr, user, action },
            source => SshError::Channel {
                addr,
                user,
                action,
                source: Box::new(source),
            },
        }
    }

    /// The error for a request the server answered with failure.
    pub(crate) fn refused(&self, action: &str, reason: &str) -> SshError {
        SshError::Refused {
            addr: self.inner.addr,
            user: self.inner.user.clone(),
            action: action.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// The error for a connection that ended while `action` was in progress.
    pub(crate) fn lost(&self, action: &str) -> SshError {
        SshError::ConnectionLost {
            addr: self.inner.addr,
            user: self.inner.user.clone(),
            action: action.to_owned(),
        }
    }

    /// The error for a command whose channel we closed before it reported its end.
    pub(crate) fn closed_here(&self, command: &str) -> SshError {
        SshError::ClosedHere {
            addr: self.inner.addr,
            user: self.inner.user.clone(),
            command: command.to_owned(),
        }
    }

    /// The error for a channel that closed without an exit status.
    pub(crate) fn no_exit_status(&self, command: &str) -> SshError {
        SshError::NoExitStatus {
            addr: self.inner.addr,
            user: self.inner.user.clone(),
            command: command.to_owned(),
        }
    }
}

/// The reason of a refused channel open, in words that say what to check.
fn open_failure_text(reason: &ChannelOpenFailure) -> String {
    match reason {
        ChannelOpenFailure::ConnectFailed => {
            "the guest could not connect there (nothing listening?)".to_owned()
        }
        ChannelOpenFailure::AdministrativelyProhibited => {
            "forwarding is disabled by the guest's sshd configuration".to_owned()
        }
        ChannelOpenFailure::UnknownChannelType => "the channel type is not supported".to_owned(),
        ChannelOpenFailure::ResourceShortage => "the guest's sshd is out of resources".to_owned(),
        ChannelOpenFailure::Other { code, reason } => format!("{reason} (code {code})"),
    }
}

/// The client configuration: keepalives, no Nagle, the pinned key's algorithm only, and AES-GCM
/// first (hardware AES is the fastest cipher for forwards on every host vmoat runs on).
fn client_config(pinned: &PublicKey, options: &ConnectOptions) -> client::Config {
    let preferred = russh::Preferred {
        key: vec![pinned.inner().algorithm()].into(),
        cipher: vec![
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]
        .into(),
        compression: vec![russh::compression::NONE].into(),
        ..russh::Preferred::default()
    };

    client::Config {
        keepalive_interval: Some(options.keepalive_interval),
        keepalive_max: options.keepalive_max,
        nodelay: true,
        window_size: WINDOW,
        preferred,
        ..client::Config::default()
    }
}

/// The russh callbacks: the host key check, and the signal that the connection ended.
struct ClientHandler {
    pinned: PublicKey,
    offered: Arc<Mutex<Option<PublicKey>>>,
    closed: watch::Sender<bool>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let offered = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(cert) => {
                russh::keys::PublicKey::new(cert.public_key().clone(), "")
            }
        };
        let offered = PublicKey::from_inner(offered);
        if offered == self.pinned {
            return Ok(true);
        }

        tracing::warn!(
            expected = %self.pinned.fingerprint(),
            offered = %offered.fingerprint(),
            "host key mismatch; refusing the connection"
        );
        if let Ok(mut slot) = self.offered.lock() {
            *slot = Some(offered);
        }
        Ok(false)
    }
}

impl Drop for ClientHandler {
    fn drop(&mut self) {
        // The handler lives exactly as long as the connection's event loop.
        let _ = self.closed.send(true);
    }
}
