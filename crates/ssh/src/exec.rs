//! Running commands in the guest: exec with streamed stdout/stderr, stdin, an optional PTY,
//! window-size changes, signals, and the exit status or exit signal.
//!
//! Each [`Exec`] owns one session channel. A task per channel drains it (so one exec never
//! holds up the connection's other channels by leaving replies unread) and hands data to the
//! `stdout` / `stderr` streams. Read both (or drop them) before awaiting the exit: a stream
//! nobody reads fills, and the connection then waits for it (see the crate docs).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::channel_io::{ChannelState, ChannelWriter, CloseGuard, put_pending};
use crate::error::SshError;
use crate::quote;
use crate::session::Session;

/// Chunks buffered per output stream before the channel waits for the reader.
const OUTPUT_QUEUE: usize = 32;

/// The SSH extended-data code of stderr (RFC 4254 §5.2).
const STDERR_EXT: u32 = 1;

/// What to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The command line, run by the user's login shell; `None` starts an interactive login
    /// shell (use with a PTY).
    pub command: Option<String>,
    /// Variables added to the command's environment, in order.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The directory to run in; `None` is the user's home.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// A pseudo-terminal for the command (stderr then arrives merged into stdout).
    #[serde(default)]
    pub pty: Option<PtyRequest>,
}

impl ExecRequest {
    /// Run `command` (a shell command line; see [`crate::shell_join`] for argv words).
    pub fn command(command: impl Into<String>) -> ExecRequest {
        ExecRequest {
            command: Some(command.into()),
            ..ExecRequest::default()
        }
    }

    /// An interactive login shell.
    pub fn shell() -> ExecRequest {
        ExecRequest::default()
    }

    /// Add an environment variable.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> ExecRequest {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Run in `dir`.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> ExecRequest {
        self.cwd = Some(dir.into());
        self
    }

    /// Run on a pseudo-terminal.
    pub fn pty(mut self, pty: PtyRequest) -> ExecRequest {
        self.pty = Some(pty);
        self
    }

    /// The exact string sent in the SSH exec request, or `None` for a plain shell request.
    ///
    /// Fails on what a shell cannot carry: NUL bytes, variable names that are not
    /// `[A-Za-z_][A-Za-z0-9_]*`, a working directory that is not UTF-8.
    pub fn remote_command(&self) -> Result<Option<String>, SshError> {
        let invalid = |reason: String| SshError::InvalidRequest { reason };

        if self.command.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err(invalid("the command contains a NUL byte".to_owned()));
        }
        for (name, value) in &self.env {
            if !quote::is_env_name(name) {
                return Err(invalid(format!(
                    "environment variable name {name:?} is not [A-Za-z_][A-Za-z0-9_]*"
                )));
            }
            if value.contains('\0') {
                return Err(invalid(format!("the value of {name} contains a NUL byte")));
            }
        }
        let cwd = match &self.cwd {
            Some(dir) => Some(dir.to_str().filter(|d| !d.contains('\0')).ok_or_else(|| {
                invalid(format!(
                    "working directory {} is not valid UTF-8",
                    dir.display()
                ))
            })?),
            None => None,
        };

        Ok(quote::wrap(self.command.as_deref(), cwd, &self.env))
    }
}

/// A pseudo-terminal request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    /// The `TERM` value (`xterm-256color`).
    pub term: String,
    /// The initial size.
    pub size: PtySize,
}

/// A terminal size in characters (and, optionally, pixels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
    /// Width in pixels, 0 if unknown.
    #[serde(default)]
    pub pixel_width: u32,
    /// Height in pixels, 0 if unknown.
    #[serde(default)]
    pub pixel_height: u32,
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when the command exited.
    pub code: Option<u32>,
    /// The signal that killed it, as SSH names it without `SIG` (`KILL`, `TERM`).
    pub signal: Option<String>,
    /// Whether the killed command dumped core.
    #[serde(default)]
    pub core_dumped: bool,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.signal.is_none() && self.code == Some(0)
    }

    /// The status a shell would report: the code (low 8 bits), or 128 + the signal number for a
    /// killed command (255 for a signal without a known number).
    pub fn shell_code(&self) -> i32 {
        if let Some(signal) = &self.signal {
            return signal_number(signal).map_or(255, |n| 128 + n);
        }
        self.code.map_or(255, |c| (c & 0xff) as i32)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.signal, self.code) {
            (Some(signal), _) => {
                write!(f, "killed by signal {signal}")?;
                if self.core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
            (None, Some(code)) => write!(f, "exit status {code}"),
            (None, None) => f.write_str("no exit status"),
        }
    }
}

/// The Linux number of an SSH signal name (`KILL` → 9), also accepting `SIG` prefixes and
/// OpenSSH's `NAME@openssh.com` form.
pub fn signal_number(name: &str) -> Option<i32> {
    let name = name.strip_suffix("@openssh.com").unwrap_or(name);
    let name = name.strip_prefix("SIG").unwrap_or(name);
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "TRAP" => 5,
        "ABRT" => 6,
        "BUS" => 7,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => return None,
    })
}

fn sig_name(sig: &Sig) -> String {
    let name = match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(other) => other.as_str(),
    };
    name.to_owned()
}

fn sig_from_name(name: &str) -> Sig {
    match name.strip_prefix("SIG").unwrap_or(name) {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_owned()),
    }
}

/// Everything a command printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error (empty with a PTY: the terminal merges it into stdout).
    pub stderr: Vec<u8>,
}

/// A running remote command. Move the parts into the tasks that need them.
#[derive(Debug)]
pub struct Exec {
    /// The command's standard input; shutting it down (or [`ExecStdin::close`]) sends EOF.
    pub stdin: ExecStdin,
    /// The command's standard output, as it streams.
    pub stdout: OutputStream,
    /// The command's standard error, as it streams.
    pub stderr: OutputStream,
    /// Window-size changes, signals and closing, usable from any task.
    pub control: ExecControl,
    /// Resolves to how the command ended once the channel has closed. Dropping it before then
    /// closes the channel (the remote command sees its input, output or terminal go away).
    pub exit: ExitFuture,
}

impl Exec {
    /// Send EOF on stdin, collect stdout and stderr to the end, and wait for the exit.
    pub async fn wait_with_output(self) -> Result<Output, SshError> {
        let Exec {
            mut stdin,
            mut stdout,
            mut stderr,
            control: _control,
            exit,
        } = self;

        // A command that already closed its input makes the EOF fail; that is fine.
        let _ = stdin.shutdown().await;
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (read_out, read_err) =
            tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        // The streams never fail: they end when the channel does.
        let _ = (read_out, read_err);

        let status = exit.await?;
        Ok(Output {
            status,
            stdout: out,
            stderr: err,
        })
    }
}

impl Session {
    /// Start `request` on a new channel of this session.
    ///
    /// Fails if the request is invalid, the channel cannot be opened, or the server refuses the
    /// PTY or the command. The returned [`Exec`] streams until the command ends.
    pub async fn exec(&self, request: ExecRequest) -> Result<Exec, SshError> {
        let command = request.remote_command()?;
        let shown = command
            .clone()
            .unwrap_or_else(|| "<login shell>".to_owned());

        let channel = self.open_session().await?;
        let (mut read, write) = channel.split();
        let write = Arc::new(write);

        // Send the PTY and exec requests back to back, then take both replies in order: one
        // round trip instead of two.
        let mut pending = VecDeque::new();
        if let Some(pty) = &request.pty {
            let s = pty.size;
            let sent = write
                .request_pty(
                    true,
                    &pty.term,
                    s.cols,
                    s.rows,
                    s.pixel_width,
                    s.pixel_height,
                    &[],
                )
                .await;
            sent.map_err(|e| self.channel_error("request a PTY", e))?;
            pending.push_back("allocate a PTY");
        }
        match &command {
            Some(line) => {
                let sent = write.exec(true, line.as_bytes()).await;
                sent.map_err(|e| self.channel_error(&format!("run `{line}`"), e))?;
                pending.push_back("run the command");
            }
            None => {
                let sent = write.request_shell(true).await;
                sent.map_err(|e| self.channel_error("start a shell", e))?;
                pending.push_back("start a shell");
            }
        }

        let early = self
            .await_replies(&mut read, &write, pending, &shown)
            .await?;

        let state = ChannelState::new(write);
        let (stdout_tx, stdout_rx) = mpsc::channel(OUTPUT_QUEUE);
        let (stderr_tx, stderr_rx) = mpsc::channel(OUTPUT_QUEUE);
        let (status_tx, status_rx) = oneshot::channel();
        let pump = Pump {
            session: self.clone(),
            command: shown,
            stdout: Some(stdout_tx),
            stderr: Some(stderr_tx),
            status: None,
            eof: false,
        };
        tokio::spawn(pump.run(read, early, Arc::clone(&state), status_tx));

        Ok(Exec {
            stdin: ChannelWriter::new(&state),
            stdout: OutputStream::new(stdout_rx),
            stderr: OutputStream::new(stderr_rx),
            exit: ExitFuture {
                status: status_rx,
                guard: Some(CloseGuard::new(Arc::clone(&state))),
                session: self.clone(),
            },
            control: ExecControl {
                state,
                session: self.clone(),
            },
        })
    }

    /// Run `request` with no input and collect everything it prints.
    pub async fn output(&self, request: ExecRequest) -> Result<Output, SshError> {
        self.exec(request).await?.wait_with_output().await
    }

    /// Take the replies to the requests in `pending`, keeping any other message for the pump.
    async fn await_replies(
        &self,
        read: &mut ChannelReadHalf,
        write: &ChannelWriteHalf<Msg>,
        mut pending: VecDeque<&'static str>,
        shown: &str,
    ) -> Result<Vec<ChannelMsg>, SshError> {
        let mut early = Vec::new();
        while let Some(action) = pending.front().copied() {
            match read.wait().await {
                Some(ChannelMsg::Success) => {
                    pending.pop_front();
                }
                Some(ChannelMsg::Failure) => {
                    let _ = write.close().await;
                    return Err(self.refused(&format!("{action} for `{shown}`"), "request denied"));
                }
                Some(ChannelMsg::Close) | None => {
                    return Err(self.lost(&format!("waiting for the server to {action}")));
                }
                Some(other) => early.push(other),
            }
        }
        Ok(early)
    }
}

/// The task that drains one exec channel.
struct Pump {
    session: Session,
    command: String,
    stdout: Option<mpsc::Sender<Bytes>>,
    stderr: Option<mpsc::Sender<Bytes>>,
    status: Option<ExitStatus>,
    eof: bool,
}

impl Pump {
    async fn run(
        mut self,
        mut read: ChannelReadHalf,
        early: Vec<ChannelMsg>,
        state: Arc<ChannelState>,
        status_tx: oneshot::Sender<Result<ExitStatus, SshError>>,
    ) {
        let mut closed = false;
        for msg in early {
            closed |= self.handle(msg, &state).await;
        }

        // Closed from our side, russh delivers nothing more for the channel: stop on that too.
        let mut closed_here = state.done();
        let mut lost = false;
        while !closed {
            tokio::select! {
                msg = read.wait() => match msg {
                    Some(msg) => closed = self.handle(msg, &state).await,
                    None => {
                        lost = true;
                        break;
                    }
                },
                () = &mut closed_here => break,
            }
        }

        // Readers see the end of their streams; stdin writes fail from now on.
        self.stdout = None;
        self.stderr = None;
        state.mark_done();

        let result = match self.status.take() {
            // With EOF or a clean close, all output has arrived.
            Some(status) if closed || self.eof => Ok(status),
            _ if lost => Err(self.session.lost(&format!("running `{}`", self.command))),
            _ if closed => Err(self.session.no_exit_status(&self.command)),
            _ => Err(self.session.closed_here(&self.command)),
        };
        let _ = status_tx.send(result);
    }

    /// Handle one message; `true` once the channel has closed.
    async fn handle(&mut self, msg: ChannelMsg, state: &ChannelState) -> bool {
        match msg {
            ChannelMsg::Data { data } => forward(&mut self.stdout, data).await,
            ChannelMsg::ExtendedData {
                data,
                ext: STDERR_EXT,
            } => forward(&mut self.stderr, data).await,
            ChannelMsg::Eof => {
                self.eof = true;
                state.mark_got_eof();
                self.stdout = None;
                self.stderr = None;
            }
            ChannelMsg::ExitStatus { exit_status } => {
                let status = self.status.get_or_insert_with(empty_status);
                status.code = Some(exit_status);
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                ..
            } => {
                let status = self.status.get_or_insert_with(empty_status);
                status.signal = Some(sig_name(&signal_name));
                status.core_dumped = core_dumped;
            }
            ChannelMsg::Close => return true,
            _ => {}
        }
        false
    }
}

fn empty_status() -> ExitStatus {
    ExitStatus {
        code: None,
        signal: None,
        core_dumped: false,
    }
}

/// Pass `data` to a stream's reader; a reader that went away stops receiving.
async fn forward(stream: &mut Option<mpsc::Sender<Bytes>>, data: Bytes) {
    if let Some(tx) = stream
        && tx.send(data).await.is_err()
    {
        *stream = None;
    }
}

/// A stream of a remote command's output. Ends (reads return 0) at the command's EOF, or when
/// the channel or connection ends.
pub struct OutputStream {
    rx: mpsc::Receiver<Bytes>,
    pending: Bytes,
}

impl OutputStream {
    fn new(rx: mpsc::Receiver<Bytes>) -> OutputStream {
        OutputStream {
            rx,
            pending: Bytes::new(),
        }
    }

    /// The next chunk as it arrived, or `None` at the end.
    pub async fn recv(&mut self) -> Option<Bytes> {
        if !self.pending.is_empty() {
            return Some(std::mem::take(&mut self.pending));
        }
        self.rx.recv().await
    }
}

impl fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputStream")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl AsyncRead for OutputStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(chunk) => self.pending = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        put_pending(&mut self.pending, buf)
    }
}

/// A remote command's standard input; see [`ChannelWriter`].
pub type ExecStdin = ChannelWriter;

/// Control of a running command, cheap to clone and usable from any task.
#[derive(Clone)]
pub struct ExecControl {
    state: Arc<ChannelState>,
    session: Session,
}

impl fmt::Debug for ExecControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecControl")
            .field("state", &self.state)
            .finish()
    }
}

impl ExecControl {
    /// Tell the command's PTY its new size (the command gets SIGWINCH).
    pub async fn window_change(&self, size: PtySize) -> Result<(), SshError> {
        let sent = self
            .state
            .write_half()
            .window_change(size.cols, size.rows, size.pixel_width, size.pixel_height)
            .await;
        sent.map_err(|e| self.session.channel_error("send a window change", e))
    }

    /// Ask sshd to send the command a signal (`TERM`, `INT`, `KILL`, …). OpenSSH honours this
    /// since 7.9; older servers ignore it silently.
    pub async fn signal(&self, name: &str) -> Result<(), SshError> {
        let sent = self.state.write_half().signal(sig_from_name(name)).await;
        sent.map_err(|e| {
            self.session
                .channel_error(&format!("send signal {name}"), e)
        })
    }

    /// Close the channel: the command loses its input, output and terminal, and the exit
    /// resolves at once (to [`SshError::ClosedHere`] unless the status had already arrived).
    pub async fn close(&self) -> Result<(), SshError> {
        let sent = self.state.close().await;
        sent.map_err(|e| self.session.channel_error("close the channel", e))
    }
}

/// Resolves to the [`ExitStatus`] once the command's channel has closed; an error if the
/// connection was lost first or the channel closed without a status.
pub struct ExitFuture {
    status: oneshot::Receiver<Result<ExitStatus, SshError>>,
    guard: Option<CloseGuard>,
    session: Session,
}

impl fmt::Debug for ExitFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitFuture")
            .field("done", &self.guard.is_none())
            .finish()
    }
}

impl Future for ExitFuture {
    type Output = Result<ExitStatus, SshError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(Pin::new(&mut self.status).poll(cx));
        // The channel has closed: nothing left for the guard to close.
        if let Some(mut guard) = self.guard.take() {
            guard.disarm();
        }
        Poll::Ready(match result {
            Ok(result) => result,
            Err(_) => Err(self.session.lost("waiting for the command to end")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_command_wraps_only_when_needed() {
        let plain = ExecRequest::command("ls -l");
        assert_eq!(plain.remote_command().unwrap().as_deref(), Some("ls -l"));
        assert_eq!(ExecRequest::shell().remote_command().unwrap(), None);

        let wrapped = ExecRequest::command("make").cwd("/w t").env("A", "1");
        assert_eq!(
            wrapped.remote_command().unwrap().as_deref(),
            Some("cd -- '/w t' && exec env -- A=1 \"${SHELL:-/bin/sh}\" -c make")
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let bad_name = ExecRequest::command("true").env("A-B", "1");
        let err = bad_name.remote_command().unwrap_err().to_string();
        assert!(err.contains("\"A-B\""), "{err}");

        let nul = ExecRequest::command("a\0b");
        assert!(
            nul.remote_command()
                .unwrap_err()
                .to_string()
                .contains("NUL")
        );
    }

    #[test]
    fn exit_status_shell_codes_and_text() {
        let exited = ExitStatus {
            code: Some(3),
            signal: None,
            core_dumped: false,
        };
        assert_eq!(exited.shell_code(), 3);
        assert!(!exited.success());
        assert_eq!(exited.to_string(), "exit status 3");

        let killed = ExitStatus {
            code: None,
            signal: Some("KILL".into()),
            core_dumped: true,
        };
        assert_eq!(killed.shell_code(), 137);
        assert_eq!(killed.to_string(), "killed by signal KILL (core dumped)");

        assert_eq!(signal_number("USR2@openssh.com"), Some(12));
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("WEIRD"), None);
    }

    #[test]
    fn signal_names_round_trip() {
        for name in ["TERM", "INT", "KILL", "HUP", "USR2"] {
            assert_eq!(sig_name(&sig_from_name(name)), name);
        }
    }

    #[test]
    fn requests_and_statuses_serialise_for_the_agent_protocol() {
        let request = ExecRequest::command("make test")
            .cwd("/w")
            .env("A", "1")
            .pty(PtyRequest {
                term: "xterm".into(),
                size: PtySize {
                    cols: 80,
                    rows: 24,
                    ..PtySize::default()
                },
            });
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(serde_json::from_str::<ExecRequest>(&json).unwrap(), request);

        let minimal: ExecRequest = serde_json::from_str(r#"{"command":"true"}"#).unwrap();
        assert_eq!(minimal, ExecRequest::command("true"));

        let status = ExitStatus {
            code: None,
            signal: Some("TERM".into()),
            core_dumped: false,
        };
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<ExitStatus>(&json).unwrap(), status);
    }

    /// Compile-time check: the agent moves these into its own tasks.
    #[test]
    fn parts_can_move_between_tasks() {
        fn movable<T: Send + 'static>() {}
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        movable::<Exec>();
        movable::<ExitFuture>();
        movable::<crate::TunnelStream>();
        movable::<crate::TunnelReader>();
        movable::<crate::TunnelWriter>();
        shareable::<Session>();
        shareable::<ExecControl>();
    }
}
