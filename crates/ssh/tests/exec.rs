//! Exec against a real OpenSSH server on 127.0.0.1: exit codes and signals, large output,
//! stdin, working directory and environment, PTYs, a lost connection, and host key pinning.

mod common;

use std::future::Future;
use std::io::Write as _;

use common::{Noise, sha256_hex, sshd, within};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmoat_ssh::{ExecRequest, PtyRequest, PtySize, Session, SshError, generate_host_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_a_signal_are_reported() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();

    for (command, code) in [("true", 0), ("false", 1), ("exit 255", 255), ("exit 7", 7)] {
        let out = within(command, session.output(ExecRequest::command(command)))
            .await
            .unwrap();
        assert_eq!(out.status.code, Some(code), "{command}");
        assert_eq!(out.status.signal, None, "{command}");
        assert_eq!(out.status.success(), code == 0);
    }

    let killed = session.output(ExecRequest::command("kill -9 $$"));
    let killed = within("kill -9", killed).await.unwrap();
    assert_eq!(
        killed.status.signal.as_deref(),
        Some("KILL"),
        "{:?}",
        killed.status
    );
    assert_eq!(killed.status.code, None);
    assert_eq!(killed.status.shell_code(), 137);

    let termed = session.output(ExecRequest::command("kill -TERM $$"));
    let termed = within("kill -TERM", termed).await.unwrap();
    assert_eq!(termed.status.signal.as_deref(), Some("TERM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_of_output_arrive_intact() {
    // `seq 1 12500000` prints 101,388,895 bytes of distinct lines.
    const LAST: u32 = 12_500_000;
    let mut expected = Sha256::new();
    let mut expected_len = 0usize;
    let mut line = Vec::with_capacity(16);
    for i in 1..=LAST {
        line.clear();
        writeln!(line, "{i}").unwrap();
        expected.update(&line);
        expected_len += line.len();
    }
    let expected = hex::encode(expected.finalize());

    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let mut exec = session
        .exec(ExecRequest::command(format!(
            "seq 1 {LAST}; echo finished >&2"
        )))
        .await
        .unwrap();

    let mut hasher = Sha256::new();
    let mut total = 0usize;
    let mut stderr = Vec::new();
    let read_out = async {
        while let Some(chunk) = exec.stdout.recv().await {
            hasher.update(&chunk);
            total += chunk.len();
        }
    };
    let read_err = exec.stderr.read_to_end(&mut stderr);
    within("100 MB of output", async {
        tokio::join!(read_out, read_err)
    })
    .await
    .1
    .unwrap();
    let status = within("exit", exec.exit).await.unwrap();

    assert!(status.success(), "{status}");
    assert_eq!(total, expected_len);
    assert!(expected_len > 100_000_000);
    assert_eq!(hex::encode(hasher.finalize()), expected);
    assert_eq!(stderr, b"finished\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_piped_through_and_eof_ends_it() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();

    let data = Noise::bytes(7, 5 * 1024 * 1024 + 3);
    let mut exec = session
        .exec(ExecRequest::command("sh -c 'wc -c'"))
        .await
        .unwrap();
    let writer = async {
        exec.stdin.write_all(&data).await.unwrap();
        exec.stdin.close().await.unwrap();
    };
    let mut out = String::new();
    let reader = exec.stdout.read_to_string(&mut out);
    within("stdin", async { tokio::join!(writer, reader) })
        .await
        .1
        .unwrap();
    assert_eq!(out.trim(), data.len().to_string());
    assert!(within("exit", exec.exit).await.unwrap().success());

    // And the bytes themselves arrive unchanged.
    let mut exec = session
        .exec(ExecRequest::command("sha256sum"))
        .await
        .unwrap();
    let data = Noise::bytes(8, 1024 * 1024);
    exec.stdin.write_all(&data).await.unwrap();
    let out = within("sha256sum", exec.wait_with_output()).await.unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.split_whitespace().next(),
        Some(sha256_hex(&data).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cwd_and_env_with_awkward_values() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("it's a \"$dir\" with spaces");
    std::fs::create_dir(&odd).unwrap();

    let request = ExecRequest::command("printf '%s|' \"$A\" \"$B\" \"$C\"; pwd")
        .cwd(&odd)
        .env("A", "two words")
        .env("B", "it's $HOME and `id` and \"q\" and \\")
        .env("C", "");
    let out = within("cwd/env", session.output(request)).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "two words|it's $HOME and `id` and \"q\" and \\||{}\n",
            odd.display()
        )
    );

    let missing = ExecRequest::command("echo ran").cwd("/nonexistent/vmoat-dir");
    let out = within("missing cwd", session.output(missing))
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vmoat-dir"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_has_its_size_and_sees_window_changes() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let pty = PtyRequest {
        term: "xterm-256color".into(),
        size: PtySize {
            cols: 100,
            rows: 40,
            ..PtySize::default()
        },
    };

    let request = ExecRequest::command("stty size; tty; echo \"$TERM\"").pty(pty.clone());
    let out = within("pty", session.output(request)).await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    assert_eq!(lines.first(), Some(&"40 100"), "{text:?}");
    assert!(
        lines.get(1).is_some_and(|l| l.starts_with("/dev/pts/")),
        "{text:?}"
    );
    assert_eq!(lines.get(2), Some(&"xterm-256color"), "{text:?}");

    let watcher = "trap 'stty size' WINCH; echo ready; while :; do sleep 0.1; done";
    let mut exec = session
        .exec(ExecRequest::command(watcher).pty(pty))
        .await
        .unwrap();
    let mut seen = String::new();
    within("ready", async {
        while !seen.contains("ready") {
            seen.push_str(&String::from_utf8_lossy(&exec.stdout.recv().await.unwrap()));
        }
    })
    .await;
    let bigger = PtySize {
        cols: 120,
        rows: 50,
        ..PtySize::default()
    };
    exec.control.window_change(bigger).await.unwrap();
    within("window change", async {
        while !seen.contains("50 120") {
            seen.push_str(&String::from_utf8_lossy(&exec.stdout.recv().await.unwrap()));
        }
    })
    .await;

    // A signal request ends the loop, and the exit reports that signal.
    exec.control.signal("KILL").await.unwrap();
    let status = within("signal", exec.exit).await.unwrap();
    assert_eq!(status.signal.as_deref(), Some("KILL"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_ends_its_command_and_its_waiters() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let mut exec = session
        .exec(ExecRequest::command("echo started; sleep 600"))
        .await
        .unwrap();
    let first = within("first output", exec.stdout.recv()).await.unwrap();
    assert_eq!(&first[..], b"started\n");

    exec.control.close().await.unwrap();
    let ended = within("exit after close", exec.exit).await;
    assert!(
        matches!(ended, Err(SshError::ClosedHere { .. })),
        "{ended:?}"
    );
    assert_eq!(within("stdout end", exec.stdout.recv()).await, None);
    let write = exec.stdin.write_all(b"late").await;
    assert_eq!(write.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);

    // The connection itself is fine.
    let out = within(
        "after close",
        session.output(ExecRequest::command("echo ok")),
    )
    .await;
    assert_eq!(out.unwrap().stdout, b"ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_shell_runs_typed_commands() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyRequest {
        term: "dumb".into(),
        size: PtySize {
            cols: 80,
            rows: 24,
            ..PtySize::default()
        },
    };

    let mut exec = session
        .exec(ExecRequest::shell().cwd(dir.path()).pty(pty.clone()))
        .await
        .unwrap();
    exec.stdin
        .write_all(b"echo \"in:$(pwd)\"; exit 3\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    within("shell", exec.stdout.read_to_end(&mut out))
        .await
        .unwrap();
    let status = within("exit", exec.exit).await.unwrap();
    assert_eq!(status.code, Some(3));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains(&format!("in:{}", dir.path().display())),
        "{text}"
    );

    // Without a directory or variables it is sshd's own shell request.
    let mut exec = session.exec(ExecRequest::shell().pty(pty)).await.unwrap();
    exec.stdin.write_all(b"exit 4\n").await.unwrap();
    let mut out = Vec::new();
    within("plain shell", exec.stdout.read_to_end(&mut out))
        .await
        .unwrap();
    assert_eq!(within("exit", exec.exit).await.unwrap().code, Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_execs_share_one_connection() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    let runs = (0..40).map(|i| {
        let session = session.clone();
        async move {
            session
                .output(ExecRequest::command(format!("echo {i}")))
                .await
        }
    });
    let outs = within("40 execs", futures_join_all(runs)).await;
    for (i, out) in outs.into_iter().enumerate() {
        let out = out.unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{i}\n"));
    }
}

async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut outs = Vec::new();
    for handle in handles {
        outs.push(handle.await.unwrap());
    }
    outs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_an_error_not_exit_zero() {
    let server = sshd();
    let session = within("connect", server.connect()).await.unwrap();
    // The command's parent is the sshd process serving this connection. The pause lets the
    // exec's confirmation arrive first; on a loaded host the kill can still win that race,
    // and then the exec itself must report the lost connection.
    let started = session
        .exec(ExecRequest::command(
            "echo up; sleep 1; kill -9 $PPID; sleep 60",
        ))
        .await;
    match started {
        Ok(mut exec) => {
            let mut out = Vec::new();
            within("output", exec.stdout.read_to_end(&mut out))
                .await
                .unwrap();
            let ended = within("exit", exec.exit).await;
            assert!(
                matches!(ended, Err(SshError::ConnectionLost { .. })),
                "{ended:?}"
            );
        }
        Err(SshError::ConnectionLost { .. }) => {}
        Err(other) => panic!("exec: {other:?}"),
    }
    within("closed", session.closed()).await;
    assert!(session.is_closed());

    let again = session.exec(ExecRequest::command("true")).await;
    assert!(
        matches!(again, Err(SshError::ConnectionLost { .. })),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_refused() {
    let server = sshd();
    let other = generate_host_key().unwrap().public_key().unwrap();
    let attempt = Session::connect(
        server.addr(),
        server.user(),
        server.user_key(),
        &other,
        common::LIMIT,
    );
    let err = within("connect", attempt).await.unwrap_err();
    let SshError::HostKeyMismatch {
        expected, offered, ..
    } = &err
    else {
        panic!("expected a host key mismatch, got {err:?}");
    };
    assert_eq!(expected, &other.fingerprint());
    assert_eq!(offered, &server.host_key().fingerprint());
    let text = err.to_string();
    assert!(text.contains(&other.fingerprint()) && text.contains(&server.host_key().fingerprint()));
    assert!(text.contains(&server.addr().to_string()), "{text}");
    assert_eq!(err.stage(), Some(vmoat_ssh::Stage::Handshake));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_server_does_not_know_is_rejected_with_its_path() {
    let server = sshd();
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = vmoat_ssh::ensure_user_key(stranger_dir.path()).unwrap();
    let attempt = Session::connect(
        server.addr(),
        server.user(),
        &stranger,
        server.host_key(),
        common::LIMIT,
    );
    let err = within("connect", attempt).await.unwrap_err();
    assert!(matches!(err, SshError::AuthRejected { .. }), "{err:?}");
    assert_eq!(err.stage(), Some(vmoat_ssh::Stage::Auth));
    assert!(err.to_string().contains(server.user()), "{err}");
    assert!(
        err.to_string()
            .contains(&stranger.path().display().to_string()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_a_connect_error_naming_the_address() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let dir = tempfile::tempdir().unwrap();
    let key = vmoat_ssh::ensure_user_key(dir.path()).unwrap();
    let pinned = generate_host_key().unwrap().public_key().unwrap();
    let err = Session::connect(addr, "me", &key, &pinned, common::LIMIT)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::Connect { .. }), "{err:?}");
    assert_eq!(err.stage(), Some(vmoat_ssh::Stage::Connect));
    assert!(err.to_string().contains("as me"), "{err}");
    assert!(err.to_string().contains(&addr.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_key_is_one_openssh_reads() {
    let server = sshd();
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(server.user_key_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived = vmoat_ssh::PublicKey::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(&derived, server.user_key().public_key());

    // The modes Lima's ssh-keygen gives the pair, which OpenSSH insists on.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let key = server.user_key_path();
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&key.with_extension("pub")), 0o644);
    assert_eq!(mode(key.parent().unwrap()), 0o700);
}
