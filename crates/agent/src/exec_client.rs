//! Running a command in the guest from the CLI, through the agent's exec endpoint: the
//! client's half of the [frame](crate::frame) protocol.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::client::{AgentClient, ClientError};
use crate::frame::{self, Kind};
use crate::protocol::{ApiError, ExecExit, ExecRequest, PtySize};

/// Why an exec session failed (as opposed to the command failing, which is an [`ExecExit`]).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The agent could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The agent could not run the command.
    #[error("{}", .0.message)]
    Refused(ApiError),
    /// The session broke before the command's exit status arrived.
    #[error("the exec session broke before the command ended: {0}")]
    Broken(#[source] std::io::Error),
    /// Writing the command's output locally failed.
    #[error("writing the command's output failed: {0}")]
    Output(#[source] std::io::Error),
}

/// What a captured command printed and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub exit: ExecExit,
}

impl Captured {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.exit.code == Some(0)
    }

    /// stdout as text, trimmed.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_owned()
    }
}

/// The local ends of a command's standard streams.
pub struct Stdio<'a> {
    /// Where stdin comes from; `None` closes the command's stdin at once.
    pub stdin: Option<Box<dyn AsyncRead + Unpin + Send>>,
    /// Where stdout goes.
    pub stdout: &'a mut (dyn AsyncWrite + Unpin + Send),
    /// Where stderr goes.
    pub stderr: &'a mut (dyn AsyncWrite + Unpin + Send),
    /// Terminal resizes to pass on (interactive sessions).
    pub resize: Option<mpsc::Receiver<PtySize>>,
}

/// Runs a command and streams its output to `stdio`, returning how it ended.
pub async fn run(
    client: &AgentClient,
    mut request: ExecRequest,
    stdio: Stdio<'_>,
) -> Result<ExecExit, ExecError> {
    let io = client.exec().await?;
    let (mut reader, mut writer) = tokio::io::split(io);

    request.stdin = stdio.stdin.is_some();
    let start = serde_json::to_vec(&request).expect("JSON of plain data");
    frame::write(&mut writer, Kind::Start, &start)
        .await
        .map_err(ExecError::Broken)?;

    // stdin and resizes travel on their own task so a command that never reads its stdin
    // cannot stall its output.
    let pump = tokio::spawn(pump_input(writer, stdio.stdin, stdio.resize));

    let outcome = async {
        loop {
            let Some(frame) = frame::read(&mut reader).await.map_err(ExecError::Broken)? else {
                return Err(ExecError::Broken(std::io::ErrorKind::UnexpectedEof.into()));
            };
            match frame.kind {
                Kind::Stdout => write_out(stdio.stdout, &frame.payload).await?,
                Kind::Stderr => write_out(stdio.stderr, &frame.payload).await?,
                Kind::Exit => return frame.parse::<ExecExit>().map_err(ExecError::Broken),
                Kind::Error => {
                    let error = frame.parse::<ApiError>().map_err(ExecError::Broken)?;
                    return Err(ExecError::Refused(error));
                }
                other => {
                    return Err(ExecError::Broken(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("unexpected {other:?} frame from the agent"),
                    )));
                }
            }
        }
    }
    .await;

    pump.abort();
    outcome
}

/// Runs a command with no stdin and returns what it printed.
pub async fn capture(client: &AgentClient, request: ExecRequest) -> Result<Captured, ExecError> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let exit = run(
        client,
        request,
        Stdio {
            stdin: None,
            stdout: &mut stdout,
            stderr: &mut stderr,
            resize: None,
        },
    )
    .await?;
    Ok(Captured {
        stdout,
        stderr,
        exit,
    })
}

async fn write_out(
    out: &mut (dyn AsyncWrite + Unpin + Send),
    data: &[u8],
) -> Result<(), ExecError> {
    out.write_all(data).await.map_err(ExecError::Output)?;
    out.flush().await.map_err(ExecError::Output)
}

async fn pump_input<W: AsyncWrite + Unpin>(
    mut writer: W,
    stdin: Option<Box<dyn AsyncRead + Unpin + Send>>,
    mut resize: Option<mpsc::Receiver<PtySize>>,
) -> std::io::Result<()> {
    let Some(mut stdin) = stdin else {
        // No stdin: keep passing resizes until the session ends.
        while let Some(size) = next_resize(&mut resize).await {
            frame::write(&mut writer, Kind::Resize, &serde_json::to_vec(&size)?).await?;
        }
        return Ok(());
    };

    let mut buf = vec![0u8; 32 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            read = stdin.read(&mut buf), if stdin_open => {
                let n = read?;
                if n == 0 {
                    frame::write(&mut writer, Kind::StdinEof, &[]).await?;
                    stdin_open = false;
                    if resize.is_none() {
                        return Ok(());
                    }
                } else {
                    frame::write(&mut writer, Kind::Stdin, &buf[..n]).await?;
                }
            }
            size = next_resize(&mut resize), if resize.is_some() => {
                match size {
                    Some(size) => {
                        let payload = serde_json::to_vec(&size)?;
                        frame::write(&mut writer, Kind::Resize, &payload).await?;
                    }
                    None => resize = None,
                }
                if !stdin_open && resize.is_none() {
                    return Ok(());
                }
            }
        }
    }
}

async fn next_resize(resize: &mut Option<mpsc::Receiver<PtySize>>) -> Option<PtySize> {
    match resize {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
