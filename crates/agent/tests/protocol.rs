//! The agent's HTTP protocol end to end over a real unix socket, with a fake backend: routing,
//! event streaming, exec framing (stdout/stderr apart, stdin, exit status) and errors.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use vmoat_agent::client::{AgentClient, ClientError};
use vmoat_agent::events::EventLog;
use vmoat_agent::exec_client::{self, Stdio};
use vmoat_agent::frame::{self, Kind};
use vmoat_agent::protocol::*;
use vmoat_agent::server::{self, Backend, ExecIo};

#[derive(Default)]
struct Fake {
    events: EventLog,
    tunnels: Mutex<Vec<Tunnel>>,
}

impl Backend for Fake {
    fn info(&self) -> LimaInfo {
        LimaInfo {
            ssh_local_port: 60022,
        }
    }

    async fn status(&self) -> AgentStatus {
        AgentStatus {
            profile: "wt-fake".into(),
            agent_pid: std::process::id(),
            hypervisor_pid: None,
            phase: Phase::Ready,
            ssh_port: 60022,
            accel: "tcg".into(),
            started_at: 0,
            adopted: false,
            stages: vec![],
            docker_socket: None,
            tunnels: self.tunnels.lock().unwrap().clone(),
        }
    }

    fn events(&self) -> &EventLog {
        &self.events
    }

    /// Echoes stdin to stdout upper-cased, writes the command to stderr, exits with the
    /// number of stdin bytes.
    async fn exec(self: Arc<Self>, io: ExecIo) {
        let (mut reader, mut writer) = tokio::io::split(io);
        let start = frame::read(&mut reader).await.unwrap().unwrap();
        assert_eq!(start.kind, Kind::Start);
        let request: ExecRequest = start.parse().unwrap();
        if request.command == "refuse" {
            let error = ApiError {
                message: "no".into(),
                kind: "refused".into(),
            };
            frame::write(
                &mut writer,
                Kind::Error,
                &serde_json::to_vec(&error).unwrap(),
            )
            .await
            .unwrap();
            return;
        }
        frame::write(&mut writer, Kind::Stderr, request.command.as_bytes())
            .await
            .unwrap();

        let mut total = 0u32;
        if request.stdin {
            while let Some(f) = frame::read(&mut reader).await.unwrap() {
                match f.kind {
                    Kind::Stdin => {
                        total += f.payload.len() as u32;
                        let up = f.payload.to_ascii_uppercase();
                        frame::write(&mut writer, Kind::Stdout, &up).await.unwrap();
                    }
                    Kind::StdinEof => break,
                    _ => {}
                }
            }
        }
        let exit = ExecExit {
            code: Some(total),
            signal: None,
        };
        frame::write(&mut writer, Kind::Exit, &serde_json::to_vec(&exit).unwrap())
            .await
            .unwrap();
    }

    async fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().unwrap().clone()
    }

    async fn open_tunnel(self: Arc<Self>, request: TunnelRequest) -> Result<Tunnel, ApiError> {
        if request.guest_port == 1 {
            return Err(ApiError {
                message: "nothing listens".into(),
                kind: "unreachable".into(),
            });
        }
        let tunnel = Tunnel {
            guest_port: request.guest_port,
            host_port: 40000,
            url: "http://127.0.0.1:40000".into(),
        };
        self.tunnels.lock().unwrap().push(tunnel.clone());
        Ok(tunnel)
    }

    async fn close_tunnels(&self, guest_port: Option<u16>) -> Vec<Tunnel> {
        let mut tunnels = self.tunnels.lock().unwrap();
        let (closed, kept) = tunnels
            .drain(..)
            .partition(|t| guest_port.is_none_or(|p| p == t.guest_port));
        *tunnels = kept;
        closed
    }

    async fn probe(&self, request: ProbeRequest) -> ProbeResult {
        ProbeResult {
            status: Some(200),
            error: None,
            body_head: request.url,
        }
    }

    async fn stop(self: Arc<Self>, _request: StopRequest) -> Result<StopResult, ApiError> {
        self.events.push(Event::Stopped {
            reason: "asked".into(),
        });
        Ok(StopResult {
            forced: false,
            detail: "powered off".into(),
        })
    }
}

async fn start() -> (tempfile::TempDir, AgentClient, Arc<Fake>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ha.sock");
    let listener = server::bind(&sock).unwrap();
    let fake = Arc::new(Fake::default());
    tokio::spawn(server::serve(listener, fake.clone()));
    (dir, AgentClient::new(sock), fake)
}

#[tokio::test]
async fn info_and_status() {
    let (_dir, client, _) = start().await;
    assert_eq!(client.info().await.unwrap().ssh_local_port, 60022);
    let status = client.status().await.unwrap();
    assert_eq!(status.profile, "wt-fake");
    assert_eq!(status.phase, Phase::Ready);
}

#[tokio::test]
async fn events_stream_until_ready() {
    let (_dir, client, fake) = start().await;
    fake.events.push(Event::StageStarted {
        stage: Stage::Ssh,
        timeout_secs: 9,
    });

    let pusher = {
        let fake = fake.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            fake.events.push(Event::StageDone {
                stage: Stage::Ssh,
                elapsed_ms: 5,
            });
            fake.events.push(Event::Ready);
            fake.events.push(Event::Note {
                message: "after".into(),
            });
        })
    };

    let mut seen = Vec::new();
    let n = client
        .follow_events(0, |e| seen.push(e.clone()))
        .await
        .unwrap();
    pusher.await.unwrap();
    assert_eq!(n, 3);
    assert_eq!(seen.last(), Some(&Event::Ready));

    // A reader that starts after the end still gets what followed.
    let mut late = Vec::new();
    let reader = client.clone();
    let follow = tokio::spawn(async move {
        reader
            .follow_events(3, |e| late.push(e.clone()))
            .await
            .map(|_| late)
    });
    fake.events.push(Event::Stopped { reason: "x".into() });
    let late = follow.await.unwrap().unwrap();
    assert_eq!(late.len(), 2);
}

#[tokio::test]
async fn exec_keeps_streams_apart_and_passes_stdin() {
    let (_dir, client, _) = start().await;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let (mut tx, rx) = tokio::io::duplex(1024);
    let feeder = tokio::spawn(async move {
        tx.write_all(b"hello ").await.unwrap();
        tx.write_all(b"world").await.unwrap();
    });

    let request = ExecRequest {
        command: "wc -c".into(),
        ..Default::default()
    };
    let exit = exec_client::run(
        &client,
        request,
        Stdio {
            stdin: Some(Box::new(rx)),
            stdout: &mut stdout,
            stderr: &mut stderr,
            resize: None,
        },
    )
    .await
    .unwrap();
    feeder.await.unwrap();

    assert_eq!(stdout, b"HELLO WORLD");
    assert_eq!(stderr, b"wc -c");
    assert_eq!(exit.code, Some(11));
}

#[tokio::test]
async fn exec_without_stdin_and_refusal() {
    let (_dir, client, _) = start().await;
    let out = exec_client::capture(
        &client,
        ExecRequest {
            command: "true".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(out.success());

    let err = exec_client::capture(
        &client,
        ExecRequest {
            command: "refuse".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no"), "{err}");
}

#[tokio::test]
async fn tunnels_and_errors() {
    let (_dir, client, _) = start().await;
    let t = client.open_tunnel(8080).await.unwrap();
    assert_eq!(t.url, "http://127.0.0.1:40000");
    assert_eq!(client.tunnels().await.unwrap().len(), 1);

    match client.open_tunnel(1).await {
        Err(ClientError::Refused { error }) => assert_eq!(error.kind, "unreachable"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(client.close_tunnels(Some(8080)).await.unwrap().len(), 1);
    assert!(client.tunnels().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_missing_agent_is_gone_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let client = AgentClient::new(dir.path().join("ha.sock"));
    assert!(matches!(
        client.status().await,
        Err(ClientError::Gone { .. })
    ));
}

#[tokio::test]
async fn bind_refuses_a_live_socket_and_replaces_a_stale_one() {
    let (dir, _client, _) = start().await;
    let sock = dir.path().join("ha.sock");
    assert!(
        server::bind(&sock).is_err(),
        "a live agent's socket must not be taken over"
    );

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    server::bind(&stale).unwrap();

    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(server::bind(&file).is_err());
    assert!(file.exists());
}
