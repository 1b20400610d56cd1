//! The errors of the SSH crate: one enum for sessions and channels, one for keys, one for the
//! terminal. Each message names the address, user, path or value involved and, where there is
//! one, what to do next; the cause travels in `#[source]`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The step of reaching the guest that failed, named in errors and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Opening the TCP connection.
    Connect,
    /// Version exchange, key exchange and the host key check.
    Handshake,
    /// Public-key authentication.
    Auth,
    /// Opening a channel or sending a request on one.
    Channel,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Handshake => "handshake",
            Stage::Auth => "auth",
            Stage::Channel => "channel",
        })
    }
}

/// An error of an SSH session, a channel on it, or a forward using it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The TCP connection could not be made.
    #[error(
        "cannot connect to SSH at {addr} as {user} (stage connect): is the VM running and its \
         SSH port forwarded?"
    )]
    Connect {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },

    /// A stage did not finish in time.
    #[error(
        "SSH to {addr} as {user} timed out after {}s (stage {stage}): the guest may still be \
         booting, or its sshd is stuck",
        timeout.as_secs_f32()
    )]
    Timeout {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// The stage that was still running.
        stage: Stage,
        /// The time allowed for the whole connect.
        timeout: Duration,
    },

    /// The SSH protocol failed before authentication (version or key exchange).
    #[error("SSH handshake with {addr} as {user} failed (stage handshake)")]
    Handshake {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// The protocol error.
        #[source]
        source: Box<russh::Error>,
    },

    /// The server's host key is not the pinned one; the connection was refused.
    #[error(
        "host key of {addr} does not match the pinned key: expected {expected}, offered \
         {offered} (stage handshake); refusing to connect. Something other than this VM may be \
         answering on that port, or the VM was recreated: recreate it with vmoat so its key is \
         pinned again"
    )]
    HostKeyMismatch {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The SHA256 fingerprint of the pinned key.
        expected: String,
        /// The SHA256 fingerprint of the key the server offered.
        offered: String,
    },

    /// The server did not accept our key.
    #[error(
        "SSH server {addr} refused the key {key} for user {user} (stage auth): the guest's \
         authorized_keys must hold that key's .pub (it is written through cidata when the VM \
         is created)"
    )]
    AuthRejected {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// The private key file offered.
        key: PathBuf,
    },

    /// Authentication failed for a protocol reason.
    #[error("SSH authentication to {addr} as {user} failed (stage auth)")]
    Auth {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// The protocol error.
        #[source]
        source: Box<russh::Error>,
    },

    /// A channel could not be opened or a request could not be sent on it.
    #[error("SSH to {addr} as {user}: cannot {action} (stage channel)")]
    Channel {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// What was being done, e.g. `open direct-tcpip to 127.0.0.1:8080`.
        action: String,
        /// The protocol error.
        #[source]
        source: Box<russh::Error>,
    },

    /// The server answered a channel open or request with a refusal.
    #[error("SSH server {addr} (user {user}) refused to {action} (stage channel): {reason}")]
    Refused {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// What was refused.
        action: String,
        /// The server's reason, in words.
        reason: String,
    },

    /// The SSH connection ended while a channel was in use.
    #[error(
        "SSH connection to {addr} (user {user}) was lost while {action}: the VM may have \
         stopped or its sshd restarted"
    )]
    ConnectionLost {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// What was in progress.
        action: String,
    },

    /// The channel closed without reporting how the command ended.
    #[error(
        "SSH server {addr} (user {user}) closed the channel of `{command}` without an exit \
         status: the command's session was killed in the guest"
    )]
    NoExitStatus {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// The command, as sent.
        command: String,
    },

    /// The command's channel was closed from this side before the command reported its end.
    #[error(
        "the channel of `{command}` on {addr} (user {user}) was closed by vmoat before the \
         command reported how it ended"
    )]
    ClosedHere {
        /// The SSH server's address.
        addr: SocketAddr,
        /// The user we log in as.
        user: String,
        /// The command, as sent.
        command: String,
    },

    /// An exec request that cannot be expressed (e.g. a bad environment variable name).
    #[error("invalid exec request: {reason}")]
    InvalidRequest {
        /// What is wrong and what to do.
        reason: String,
    },

    /// A local socket of a forward could not be prepared.
    #[error("cannot {action} {path}")]
    LocalSocket {
        /// What was being done.
        action: &'static str,
        /// The local socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A local path is in the way of a forward's socket and is not a socket.
    #[error(
        "{path} exists and is not a socket: refusing to replace it with the forwarded socket; \
         move it away"
    )]
    NotASocket {
        /// The path in the way.
        path: PathBuf,
    },
}

impl SshError {
    /// The stage of reaching the guest this error belongs to, if it is one: a caller waiting
    /// for a booting guest retries `Connect` and `Handshake` failures and timeouts, but not a
    /// host key mismatch or a refused key.
    pub fn stage(&self) -> Option<Stage> {
        match self {
            SshError::Connect { .. } => Some(Stage::Connect),
            SshError::Timeout { stage, .. } => Some(*stage),
            SshError::Handshake { .. } | SshError::HostKeyMismatch { .. } => Some(Stage::Handshake),
            SshError::AuthRejected { .. } | SshError::Auth { .. } => Some(Stage::Auth),
            SshError::Channel { .. } | SshError::Refused { .. } => Some(Stage::Channel),
            _ => None,
        }
    }
}

/// An error about an SSH key: the user key pair, a host key, or a public key string.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done (`create directory`, `read`, `write`, …).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A private key file is not an unencrypted OpenSSH private key.
    #[error(
        "{path} is not an unencrypted OpenSSH private key: Lima and vmoat share this key; \
         move it (and its .pub) away and a new pair is created, then recreate the VMs that \
         used the old one"
    )]
    ParsePrivate {
        /// The key file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: russh::keys::ssh_key::Error,
    },

    /// A public key string could not be parsed.
    #[error("not an OpenSSH public key (`ssh-ed25519 AAAA… comment`): {value:?}")]
    ParsePublic {
        /// The start of the offending value.
        value: String,
        /// The parse error.
        #[source]
        source: russh::keys::ssh_key::Error,
    },

    /// Generating or encoding a key failed.
    #[error("cannot {action} an ed25519 key")]
    Crypto {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: russh::keys::ssh_key::Error,
    },
}

/// An error of the interactive terminal helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TerminalError {
    /// The file descriptor is not a terminal.
    #[error("file descriptor {fd} is not a terminal: run without a PTY or attach a terminal")]
    NotATerminal {
        /// The descriptor.
        fd: i32,
    },

    /// A termios or signal call failed.
    #[error("cannot {action} on terminal fd {fd}")]
    Sys {
        /// What was being done.
        action: &'static str,
        /// The descriptor.
        fd: i32,
        /// The OS error.
        #[source]
        source: nix::Error,
    },

    /// Another guard already holds a terminal in raw mode.
    #[error("terminal fd {fd}: another raw-mode guard is already active in this process")]
    AlreadyRaw {
        /// The descriptor.
        fd: i32,
    },

    /// No tokio runtime to watch signals on.
    #[error("the terminal guard needs a tokio runtime to watch SIGINT/SIGTERM/SIGHUP/SIGWINCH")]
    NoRuntime,
}
