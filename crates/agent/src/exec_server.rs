//! The agent's half of an exec session: frames from the CLI become an SSH exec on the held
//! connection, and the command's output and exit come back as frames.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use vmoat_ssh::{OutputStream, Session};

use crate::frame::{self, Kind};
use crate::protocol::{ApiError, ExecExit, ExecRequest, PtySize};

/// Serves one exec session on `io` over `session`. Returns when the command has ended or the
/// client has gone. `explain` turns an SSH failure into the message the client gets (the
/// agent knows when the cause is the hypervisor's end rather than the connection).
pub async fn serve<IO, E, F>(
    io: IO,
    session: Option<Session>,
    not_ready: impl FnOnce() -> String,
    explain: E,
) where
    IO: AsyncRead + AsyncWrite + Send + 'static,
    E: FnOnce(String) -> F,
    F: Future<Output = String>,
{
    let (mut reader, writer) = tokio::io::split(io);
    let writer = Arc::new(Mutex::new(writer));

    let request = match frame::read(&mut reader).await {
        Ok(Some(f)) if f.kind == Kind::Start => match f.parse::<ExecRequest>() {
            Ok(request) => request,
            Err(err) => return refuse(&writer, "bad-request", err.to_string()).await,
        },
        Ok(_) => return refuse(&writer, "bad-request", "expected a start frame".into()).await,
        Err(err) => return tracing::debug!("exec client went away before starting: {err}"),
    };

    let Some(session) = session else {
        return refuse(&writer, "not-ready", not_ready()).await;
    };

    let exec = match session.exec(to_ssh(&request)).await {
        Ok(exec) => exec,
        Err(err) => {
            let message = explain(err.to_string()).await;
            return refuse(&writer, "exec-failed", message).await;
        }
    };
    let vmoat_ssh::Exec {
        mut stdin,
        stdout,
        stderr,
        control,
        exit,
    } = exec;

    if !request.stdin {
        let _ = stdin.shutdown().await;
    }

    // Input: stdin bytes, EOF and resizes, until the client is done with them. A client that
    // disconnects before the command ends (Ctrl-C on `vmoat test`) gets the command ended too.
    let input = {
        let control = control.clone();
        async move {
            loop {
                match frame::read(&mut reader).await {
                    Ok(Some(f)) => match f.kind {
                        Kind::Stdin => {
                            // A command that closed its stdin just does not get the rest.
                            let _ = stdin.write_all(&f.payload).await;
                        }
                        Kind::StdinEof => {
                            let _ = stdin.shutdown().await;
                        }
                        Kind::Resize => {
                            if let Ok(size) = f.parse::<PtySize>() {
                                let _ = control.window_change(pty_size(&size)).await;
                            }
                        }
                        _ => {}
                    },
                    Ok(None) | Err(_) => {
                        let _ = control.signal("HUP").await;
                        let _ = control.close().await;
                        return;
                    }
                }
            }
        }
    };
    let input = tokio::spawn(input);

    let out = tokio::spawn(relay(stdout, Kind::Stdout, writer.clone()));
    let err = tokio::spawn(relay(stderr, Kind::Stderr, writer.clone()));
    let _ = tokio::join!(out, err);

    let ending = match exit.await {
        Ok(status) => {
            let exit = ExecExit {
                code: status.code,
                signal: status.signal.clone(),
            };
            (Kind::Exit, serde_json::to_vec(&exit))
        }
        Err(err) => {
            let error = ApiError {
                message: explain(err.to_string()).await,
                kind: "exec-broken".into(),
            };
            (Kind::Error, serde_json::to_vec(&error))
        }
    };
    input.abort();

    let mut writer = writer.lock().await;
    let payload = ending.1.expect("JSON of plain data");
    let _ = frame::write(&mut *writer, ending.0, &payload).await;
    let _ = writer.shutdown().await;
}

/// How long a client may refuse output before it counts as gone.
const CLIENT_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

async fn relay<W: AsyncWrite + Unpin>(mut stream: OutputStream, kind: Kind, writer: Arc<Mutex<W>>) {
    // Keep reading even when the client is gone or stalled: an unread channel holds up every
    // channel of its SSH connection (see vmoat_ssh's flow-control note).
    let mut client_alive = true;
    while let Some(chunk) = stream.recv().await {
        if client_alive {
            let mut w = writer.lock().await;
            let write = frame::write_chunked(&mut *w, kind, &chunk);
            client_alive = matches!(
                tokio::time::timeout(CLIENT_STALL_LIMIT, write).await,
                Ok(Ok(()))
            );
            if !client_alive {
                tracing::warn!("an exec client stopped reading; dropping the rest of its output");
            }
        }
    }
}

async fn refuse<W: AsyncWrite + Unpin>(writer: &Arc<Mutex<W>>, kind: &str, message: String) {
    let error = ApiError {
        message,
        kind: kind.to_owned(),
    };
    let mut w = writer.lock().await;
    let _ = frame::write(
        &mut *w,
        Kind::Error,
        &serde_json::to_vec(&error).expect("JSON"),
    )
    .await;
    let _ = w.shutdown().await;
}

fn to_ssh(request: &ExecRequest) -> vmoat_ssh::ExecRequest {
    let command = (!request.command.is_empty()).then(|| request.command.clone());
    let mut ssh = vmoat_ssh::ExecRequest {
        command,
        env: request.env.clone(),
        cwd: request.cwd.clone(),
        pty: None,
    };
    if let Some(pty) = &request.pty {
        ssh.pty = Some(vmoat_ssh::PtyRequest {
            term: pty.term.clone(),
            size: pty_size(pty),
        });
    }
    ssh
}

fn pty_size(size: &PtySize) -> vmoat_ssh::PtySize {
    vmoat_ssh::PtySize {
        cols: size.cols,
        rows: size.rows,
        pixel_width: 0,
        pixel_height: 0,
    }
}
