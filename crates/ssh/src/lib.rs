//! In-process SSH to the guest with russh: keys, pinned host key, exec, PTY, forwards.
//!
//! # Keys
//! [`ensure_user_key`] returns the key pair Lima and vmoat share in `<LIMA_HOME>/_config`
//! (`user`, `user.pub`; ed25519, comment `lima`), creating it atomically on first use.
//! [`generate_host_key`] makes the guest's host key on the host; it goes to the guest through
//! cidata and its public half is pinned, so the very first connection is already verified.
//!
//! # Sessions
//! [`Session::connect`] dials the guest's forwarded SSH port, refuses any host key but the
//! pinned one ([`SshError::HostKeyMismatch`]), and logs in with the user key. A `Session` is a
//! cheap handle: clone it into every task; all channels share the one connection, and
//! keepalives notice a dead guest ([`Session::closed`]).
//!
//! # Exec
//! [`Session::exec`] runs an [`ExecRequest`] (command, environment, working directory,
//! optional PTY) and returns an [`Exec`]: stdin to write and close, stdout and stderr as they
//! stream, [`ExecControl`] for window changes and signals, and [`ExitStatus`] with the code or
//! the killing signal. A connection lost mid-command is an error, never a silent exit 0. The
//! directory and environment are set by wrapping the command ([`shell_quote`]) because a stock
//! sshd refuses `setenv`.
//!
//! # Interactive terminals
//! [`RawTerminal`] and [`WindowChanges`] work on the CLI's own terminal and are independent of
//! the session, so the CLI can use them while the agent holds the connection.
//!
//! # Forwards
//! [`Session::direct_tcpip`] and [`Session::direct_streamlocal`] give a [`TunnelStream`];
//! [`forward_tcp`] and [`forward_unix`] serve a local listener like `ssh -L`, one channel per
//! connection, with backpressure and half-close. [`PrivateUnixListener`] makes the 0600 socket
//! used for the guest's Docker socket.
//!
//! # Flow control caveat
//! russh 0.65 delivers all channels of a connection from one loop and replenishes a channel's
//! SSH window when data arrives, not when it is read. A channel whose reader stops reading
//! therefore holds up every other channel of the connection once its buffer (about 100
//! packets) is full. Everything in this crate keeps reading; forwards drop a local peer that
//! refuses data for [`LOCAL_STALL_LIMIT`]; callers of [`Exec`] and [`TunnelStream`] must keep
//! reading too (or drop what they do not want).

mod channel_io;
mod error;
mod exec;
mod forward;
mod keys;
mod quote;
mod session;
mod terminal;
#[cfg(feature = "test-sshd")]
pub mod testing;

pub use channel_io::{ChannelReader, ChannelWriter};
pub use error::{KeyError, SshError, Stage, TerminalError};
pub use exec::{
    Exec, ExecControl, ExecRequest, ExecStdin, ExitFuture, ExitStatus, Output, OutputStream,
    PtyRequest, PtySize, signal_number,
};
pub use forward::{
    ForwardOptions, LOCAL_STALL_LIMIT, PrivateUnixListener, SessionSource, TunnelReader,
    TunnelStream, TunnelWriter, forward_tcp, forward_tcp_with, forward_unix, forward_unix_with,
    pump, pump_with,
};
pub use keys::{
    HostKeyPair, PublicKey, USER_KEY_COMMENT, USER_KEY_FILE, USER_PUBLIC_KEY_FILE, UserKey,
    ensure_user_key, generate_host_key,
};
pub use quote::{is_env_name, shell_join, shell_quote};
pub use session::{ConnectOptions, Session};
pub use terminal::{RawTerminal, WindowChanges, terminal_size};
