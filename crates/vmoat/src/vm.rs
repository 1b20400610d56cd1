//! What the VM commands share: the async runtime, reaching the agent of this worktree's VM,
//! turning agent errors into exit codes, and running commands in the guest with their output
//! on stderr (for provisioning and CMD_UP, whose output is a log, not a result).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWrite;
use vmoat_agent::client::{AgentClient, ClientError};
use vmoat_agent::exec_client::{self, ExecError, Stdio};
use vmoat_agent::protocol::{ExecExit, ExecRequest, LastExit};
use vmoat_profile::status::{InstanceStatus, PidState, agent_state, instance_status};
use vmoat_profile::{ProfilePaths, Resolved};

use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};

/// A runtime for the async parts of a command.
pub fn runtime() -> CmdResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CodedError::msg(Exit::Failed, format!("cannot start a runtime: {e}")))
}

/// This worktree's VM when it runs, with a client of its agent; exit 3 otherwise, saying
/// what state it is in and why it stopped if the agent left a note.
pub fn running(ctx: &Context) -> CmdResult<(&Resolved, AgentClient)> {
    let profile = ctx.profile()?;
    let paths = &profile.paths;
    match instance_status(paths) {
        InstanceStatus::Running { .. } => Ok((profile, AgentClient::new(paths.ha_sock()))),
        InstanceStatus::Absent => Err(CodedError::msg(
            Exit::NotRunning,
            format!(
                "VM {} does not exist; create it with `vmoat up` (or `vmoat provision`)",
                profile.name
            ),
        )),
        InstanceStatus::Stopped => Err(CodedError::msg(
            Exit::NotRunning,
            format!(
                "VM {} is not running{}; start it with `vmoat up`",
                profile.name,
                last_exit_note(paths)
            ),
        )),
        InstanceStatus::Broken { reason } => Err(CodedError::msg(
            Exit::NotRunning,
            format!(
                "VM {} is not usable ({reason}){}; `vmoat up` repairs it",
                profile.name,
                last_exit_note(paths)
            ),
        )),
    }
}

/// Waits up to `limit` for the agent of `paths` to end. An agent that reported a failed boot
/// has stopped its VM and exits right after; a caller that returned at once would leave it
/// running for a moment, and a `vmoat up` run just then would attach to the dying agent.
pub async fn wait_agent_exit(paths: &ProfilePaths, limit: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while matches!(agent_state(paths), PidState::Alive(_)) && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// What the last agent recorded about why the VM stopped.
pub fn last_exit(paths: &ProfilePaths) -> Option<LastExit> {
    let text = std::fs::read(paths.agent_last_exit()).ok()?;
    serde_json::from_slice(&text).ok()
}

fn last_exit_note(paths: &ProfilePaths) -> String {
    match last_exit(paths) {
        Some(last) if !last.requested => format!(" (it stopped: {})", last.reason),
        _ => String::new(),
    }
}

/// An agent error as a command error: an agent that is gone is exit 3.
pub fn agent_error(profile: &str, err: ClientError) -> CodedError {
    match err {
        ClientError::Gone { .. } => CodedError::msg(
            Exit::NotRunning,
            format!("VM {profile}: {err}; start it with `vmoat up`"),
        ),
        other => CodedError::new(Exit::Failed, anyhow::Error::new(other)),
    }
}

/// An exec error as a command error.
pub fn exec_error(profile: &str, err: ExecError) -> CodedError {
    match err {
        ExecError::Client(client) => agent_error(profile, client),
        other => CodedError::new(Exit::Failed, anyhow::Error::new(other)),
    }
}

/// A command's output copied to stderr while the last lines are kept for an error message.
#[derive(Clone)]
pub struct TailingStderr {
    lines: Arc<Mutex<VecDeque<String>>>,
    partial: Arc<Mutex<Vec<u8>>>,
    keep: usize,
    echo: bool,
}

impl TailingStderr {
    /// Keeps the last `keep` lines; `echo` copies everything to stderr as it comes.
    pub fn new(keep: usize, echo: bool) -> TailingStderr {
        TailingStderr {
            lines: Arc::new(Mutex::new(VecDeque::new())),
            partial: Arc::new(Mutex::new(Vec::new())),
            keep,
            echo,
        }
    }

    /// The last lines seen.
    pub fn tail(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .lines
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect();
        let partial = self.partial.lock().expect("tail lock");
        if !partial.is_empty() {
            lines.push(String::from_utf8_lossy(&partial).into_owned());
        }
        let start = lines.len().saturating_sub(self.keep);
        lines.split_off(start)
    }

    fn take(&self, data: &[u8]) {
        let mut partial = self.partial.lock().expect("tail lock");
        partial.extend_from_slice(data);
        while let Some(end) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            let mut lines = self.lines.lock().expect("tail lock");
            lines.push_back(text);
            while lines.len() > self.keep {
                lines.pop_front();
            }
        }
    }
}

impl AsyncWrite for TailingStderr {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        self.take(buf);
        if self.echo {
            let _ = std::io::stderr().write_all(buf);
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::io::Write;
        let _ = std::io::stderr().flush();
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Runs a command in the guest with its stdout and stderr both going to our stderr (echoed
/// unless `quiet`), keeping the last lines for a failure message.
pub async fn run_logged(
    client: &AgentClient,
    command: String,
    cwd: Option<&Path>,
    quiet: bool,
) -> Result<(ExecExit, Vec<String>), ExecError> {
    let tail = TailingStderr::new(20, !quiet);
    let mut out = tail.clone();
    let mut err = tail.clone();
    let request = ExecRequest {
        command,
        cwd: cwd.map(Path::to_path_buf),
        ..ExecRequest::default()
    };
    let exit = exec_client::run(
        client,
        request,
        Stdio {
            stdin: None,
            stdout: &mut out,
            stderr: &mut err,
            resize: None,
        },
    )
    .await?;
    Ok((exit, tail.tail()))
}

/// How a command's terminal is set up when it runs with the user's own stdio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terminal {
    /// A PTY in the guest, the local terminal in raw mode (interactive use).
    Pty,
    /// Plain pipes; stdin is passed through when `stdin` is set.
    Pipes {
        /// Whether local stdin goes to the command.
        stdin: bool,
    },
}

impl Terminal {
    /// The choice for this process: a PTY when stdin and stdout are both terminals (as
    /// `docker exec -it` would be asked), else pipes, passing stdin when it is not a terminal
    /// (a pipe or a file someone meant for the command).
    pub fn detect() -> Terminal {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
            Terminal::Pty
        } else {
            Terminal::Pipes {
                stdin: !std::io::stdin().is_terminal(),
            }
        }
    }
}

/// Runs a command in the guest with this process's stdin, stdout and stderr, as if it ran
/// here; returns how it ended.
pub async fn run_attached(
    client: &AgentClient,
    mut request: ExecRequest,
    terminal: Terminal,
) -> Result<ExecExit, ExecError> {
    use std::os::fd::AsFd;

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();

    match terminal {
        Terminal::Pipes { stdin } => {
            let input: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>> =
                stdin.then(|| Box::new(tokio::io::stdin()) as _);
            exec_client::run(
                client,
                request,
                Stdio {
                    stdin: input,
                    stdout: &mut stdout,
                    stderr: &mut stderr,
                    resize: None,
                },
            )
            .await
        }
        Terminal::Pty => {
            let stdin_fd = std::io::stdin();
            let size = vmoat_ssh::terminal_size(stdin_fd.as_fd());
            request.pty = Some(vmoat_agent::protocol::PtySize {
                cols: size.map_or(80, |s| s.cols),
                rows: size.map_or(24, |s| s.rows),
                term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
            });

            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let changes = vmoat_ssh::WindowChanges::new(stdin_fd.as_fd());
            let term = request
                .pty
                .as_ref()
                .map(|p| p.term.clone())
                .unwrap_or_default();
            let watcher = tokio::spawn(async move {
                let Ok(mut changes) = changes else { return };
                while let Some(size) = changes.next().await {
                    let size = vmoat_agent::protocol::PtySize {
                        cols: size.cols,
                        rows: size.rows,
                        term: term.clone(),
                    };
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
            });

            // Raw mode for the session's whole life; the guard puts the terminal back on
            // every way out, panics and signals included.
            let raw = vmoat_ssh::RawTerminal::enter(stdin_fd.as_fd());
            let outcome = exec_client::run(
                client,
                request,
                Stdio {
                    stdin: Some(Box::new(tokio::io::stdin())),
                    stdout: &mut stdout,
                    stderr: &mut stderr,
                    resize: Some(rx),
                },
            )
            .await;
            drop(raw);
            watcher.abort();
            outcome
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let tail = TailingStderr::new(2, false);
        tail.take(b"one\ntwo\nthr");
        tail.take(b"ee\nfour");
        assert_eq!(tail.tail(), ["three", "four"]);
    }
}
