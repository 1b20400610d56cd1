//! Forwards against a real OpenSSH server on 127.0.0.1: many concurrent connections, 1 GiB with
//! its digest checked, half-close, refused targets, and the unix socket forward used for the
//! guest's Docker socket (mode 0600, stale socket replaced, anything else left alone).

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::{Noise, sha256_hex, sshd, within};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use vmoat_ssh::{
    ExecRequest, ForwardOptions, PrivateUnixListener, SshError, forward_tcp, forward_tcp_with,
    forward_unix,
};

/// Serve `conn` as an echo, then close.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S) {
    let (mut r, mut w) = tokio::io::split(&mut conn);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// A TCP echo server on 127.0.0.1; returns its port.
async fn tcp_echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(echo(conn));
        }
    });
    port
}

/// Start `forward_tcp` on a fresh local port towards `guest_port`; returns the local port.
async fn start_forward(
    session: vmoat_ssh::Session,
    guest_port: u16,
) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(forward_tcp(listener, session, "127.0.0.1", guest_port));
    (port, task)
}

/// Send `data`, half-close, and read everything back.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(conn: S, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(conn);
    let send = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::with_capacity(data.len());
    let recv = r.read_to_end(&mut back);
    let ((), read) = tokio::join!(send, recv);
    read.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_connections_through_one_forward() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let echo_port = tcp_echo_server().await;
    let (port, forward) = start_forward(session, echo_port).await;

    let clients: Vec<_> = (0..100u64)
        .map(|i| {
            tokio::spawn(async move {
                let data = Noise::bytes(i, 200_000 + i as usize * 997);
                let conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let back = round_trip(conn, &data).await;
                assert_eq!(back.len(), data.len(), "connection {i}");
                assert!(back == data, "connection {i}: echoed bytes differ");
            })
        })
        .collect();
    within("100 connections", async {
        for client in clients {
            client.await.unwrap();
        }
    })
    .await;
    forward.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_through_a_forward_keeps_its_digest() {
    const SIZE: u64 = 1 << 30;
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();

    // The source streams 1 GiB of noise and reports the digest of what it sent.
    let source = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source_port = source.local_addr().unwrap().port();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut conn, _) = source.accept().await.unwrap();
        let mut noise = Noise::new(42);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = SIZE;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            noise.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            conn.write_all(&buf[..n]).await.unwrap();
            left -= n as u64;
        }
        conn.shutdown().await.unwrap();
        let _ = sent_tx.send(hex::encode(hasher.finalize()));
    });
    let (port, forward) = start_forward(session, source_port).await;

    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    within("1 GiB", async {
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
    })
    .await;

    assert_eq!(total, SIZE);
    let sent = within("source digest", sent_rx).await.unwrap();
    assert_eq!(hex::encode(hasher.finalize()), sent);
    forward.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_eof_and_keeps_the_other_direction() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();

    // Reads to EOF, then answers with the digest of what it read: only works if our EOF
    // arrives while its reply can still travel back.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                conn.read_to_end(&mut got).await.unwrap();
                conn.write_all(sha256_hex(&got).as_bytes()).await.unwrap();
                conn.shutdown().await.unwrap();
            });
        }
    });
    let (port, forward) = start_forward(session.clone(), sink_port).await;

    let data = Noise::bytes(3, 8 * 1024 * 1024);
    let conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let reply = within("half-close via forward", round_trip(conn, &data)).await;
    assert_eq!(String::from_utf8(reply).unwrap(), sha256_hex(&data));

    // The same through a direct stream, as the agent would use one.
    let stream = session.direct_tcpip("127.0.0.1", sink_port).await.unwrap();
    let reply = within("half-close via stream", round_trip(stream, &data)).await;
    assert_eq!(String::from_utf8(reply).unwrap(), sha256_hex(&data));
    forward.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_guest_port_is_refused_and_the_forward_keeps_serving() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);

    let err = session
        .direct_tcpip("127.0.0.1", closed_port)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::Refused { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{closed_port}")),
        "{err}"
    );

    // Through a forward, the local connection is just closed; the forward goes on.
    let (port, forward) = start_forward(session.clone(), closed_port).await;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = Vec::new();
    let read = within("refused", conn.read_to_end(&mut buf)).await;
    assert!(read.is_err() || buf.is_empty());
    assert!(!forward.is_finished());

    let echo_port = tcp_echo_server().await;
    let stream = session.direct_tcpip("127.0.0.1", echo_port).await.unwrap();
    assert_eq!(
        within("echo", round_trip(stream, b"still fine")).await,
        b"still fine"
    );
    forward.abort();
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_forward_like_the_docker_socket() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The "guest" socket, served by the test.
    let guest_path = dir.path().join("guest.sock");
    let guest = UnixListener::bind(&guest_path).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = guest.accept().await {
            tokio::spawn(echo(conn));
        }
    });
    let guest_path = guest_path.to_str().unwrap().to_owned();

    // A stale socket (its server is gone) sits where the host socket goes.
    let host_path = dir.path().join("profile/docker.sock");
    std::fs::create_dir_all(host_path.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&host_path).unwrap());
    assert!(
        std::fs::symlink_metadata(&host_path)
            .unwrap()
            .file_type()
            .is_socket()
    );

    let listener = PrivateUnixListener::bind(&host_path).unwrap();
    assert_eq!(mode(&host_path), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(host_path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["docker.sock"]);

    // A second agent cannot take over a socket that is being served.
    let taken = PrivateUnixListener::bind(&host_path).unwrap_err();
    assert!(taken.to_string().contains("another process"), "{taken}");

    let forward = tokio::spawn(forward_unix(listener, session.clone(), guest_path.clone()));
    let clients: Vec<_> = (0..20u64)
        .map(|i| {
            let host_path = host_path.clone();
            tokio::spawn(async move {
                let data = Noise::bytes(100 + i, 300_000);
                let conn = UnixStream::connect(&host_path).await.unwrap();
                assert!(round_trip(conn, &data).await == data, "unix connection {i}");
            })
        })
        .collect();
    within("unix forward", async {
        for client in clients {
            client.await.unwrap();
        }
    })
    .await;

    // The direct stream works too.
    let stream = session.direct_streamlocal(&guest_path).await.unwrap();
    assert_eq!(
        within("streamlocal", round_trip(stream, b"ping")).await,
        b"ping"
    );

    // Cancelling the forward removes its socket.
    forward.abort();
    let _ = forward.await;
    assert!(!host_path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_socket_in_the_way_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker.sock");
    std::fs::write(&path, "precious").unwrap();
    let err = PrivateUnixListener::bind(&path).unwrap_err();
    assert!(matches!(err, SshError::NotASocket { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_peer_that_stops_reading_is_dropped_so_the_session_flows_again() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();

    // A source that sends for as long as anyone takes its bytes.
    let source = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source_port = source.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = source.accept().await {
            tokio::spawn(async move {
                let block = Noise::bytes(9, 1 << 20);
                while conn.write_all(&block).await.is_ok() {}
            });
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let options = ForwardOptions {
        stall_limit: Duration::from_secs(2),
    };
    let forward = tokio::spawn(forward_tcp_with(
        listener,
        session.clone(),
        "127.0.0.1",
        source_port,
        options,
    ));

    // Connect and read nothing: the socket buffers fill, then the channel's, then the
    // connection's loop waits on this channel (russh), which would hold up this exec forever.
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        session.output(ExecRequest::command("echo flowing")),
    )
    .await
    .expect("the exec stayed blocked behind the stalled forward")
    .unwrap();
    assert_eq!(out.stdout, b"flowing\n");

    // The stalled connection was dropped: reading it now ends (EOF or reset), finitely.
    let mut sink = vec![0u8; 1 << 20];
    let drained = within("drain the dropped connection", async {
        let mut total = 0usize;
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break total,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(
        drained < 1 << 30,
        "{drained} bytes: the connection was never dropped"
    );
    forward.abort();
}
