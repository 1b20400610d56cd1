//! `bench-ssh`: what vmoat's in-process SSH costs against OpenSSH's `ssh`, all against one
//! throwaway sshd on 127.0.0.1 (`vmoat_ssh::testing`), in one run.
//!
//! - Exec round trip of `true`: on one held russh session (a channel per call, as the host
//!   agent does), on a fresh russh connection per call (handshake included), and with the
//!   `ssh` binary per call. Each pair of figures is measured alternately (A B A B …).
//!   Goal from issue 5: the held session ≥ 10× faster than a fresh `ssh`.
//! - Forward throughput: a local source sends 256 MiB through vmoat's `forward_tcp` and through
//!   `ssh -N -L` to the same sshd, alternately; the figure is MB/s at the receiving client.
//!   Goal: vmoat ≥ 1.0× `ssh -L`.
//!
//! Options: `--runs N` (exec pairs, default 40; throughput pairs are N/8, at least 3),
//! `--warmup N`, `--json`.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmoat_benches::{Options, Paired, Scratch, fail, ms, paired, sample_json, say};
use vmoat_ssh::testing::SshServer;
use vmoat_ssh::{ExecRequest, Session};

/// Bytes each throughput run moves.
const THROUGHPUT_BYTES: usize = 256 << 20;

fn main() {
    let options = Options::from_args(40);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio runtime: {e}")));
    let server = SshServer::start().unwrap_or_else(|e| fail(&format!("sshd: {e}")));
    let scratch = Scratch::new("ssh").unwrap_or_else(|e| fail(&format!("scratch dir: {e}")));
    let known_hosts = scratch.path().join("known_hosts");
    let line = format!(
        "[127.0.0.1]:{} {}\n",
        server.addr().port(),
        server.host_key()
    );
    std::fs::write(&known_hosts, line).unwrap_or_else(|e| fail(&format!("known_hosts: {e}")));

    let held = runtime
        .block_on(server.connect())
        .unwrap_or_else(|e| fail(&format!("connect: {e}")));
    check_exec(&runtime, &held, &server, &known_hosts);

    let held_exec = || time_async(&runtime, exec_true(&held));
    let fresh_exec = || {
        time_async(&runtime, async {
            let session = server.connect().await.map_err(io::Error::other)?;
            exec_true(&session).await?;
            session.disconnect().await;
            Ok(())
        })
    };
    let ssh_exec = || {
        let started = Instant::now();
        let status = ssh_command(&server, &known_hosts).arg("true").status()?;
        if !status.success() {
            return Err(io::Error::other(format!("ssh true: {status}")));
        }
        Ok(started.elapsed())
    };

    let (runs, warmup) = (options.runs, options.warmup);
    let held_vs_ssh = measure(paired(runs, warmup, held_exec, ssh_exec));
    let fresh_vs_ssh = measure(paired(runs, warmup, fresh_exec, ssh_exec));
    let held_vs_fresh = measure(paired(runs, warmup, held_exec, fresh_exec));

    // Throughput: the same source behind both forwards.
    let source = spawn_source().unwrap_or_else(|e| fail(&format!("source server: {e}")));
    let vmoat_port = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(vmoat_ssh::forward_tcp(
            listener,
            held.clone(),
            "127.0.0.1",
            source,
        ));
        Ok::<_, io::Error>(port)
    });
    let vmoat_port = vmoat_port.unwrap_or_else(|e| fail(&format!("vmoat forward: {e}")));
    let ssh_forward = SshForward::start(&server, &known_hosts, source)
        .unwrap_or_else(|e| fail(&format!("ssh -L: {e}")));
    let throughput_runs = (runs / 8).max(3);
    let forward = measure(paired(
        throughput_runs,
        1,
        || pull(vmoat_port),
        || pull(ssh_forward.port),
    ));
    drop(ssh_forward);

    report(
        &options,
        &held_vs_ssh,
        &fresh_vs_ssh,
        &held_vs_fresh,
        &forward,
    );
}

fn measure(result: io::Result<Paired>) -> Paired {
    result.unwrap_or_else(|e| fail(&format!("measurement failed: {e}")))
}

fn time_async(
    runtime: &tokio::runtime::Runtime,
    work: impl Future<Output = io::Result<()>>,
) -> io::Result<Duration> {
    let started = Instant::now();
    runtime.block_on(work)?;
    Ok(started.elapsed())
}

async fn exec_true(session: &Session) -> io::Result<()> {
    let out = session
        .output(ExecRequest::command("true"))
        .await
        .map_err(io::Error::other)?;
    if !out.status.success() {
        return Err(io::Error::other(format!("true: {}", out.status)));
    }
    Ok(())
}

/// Before timing: every path must really run the command.
fn check_exec(
    runtime: &tokio::runtime::Runtime,
    held: &Session,
    server: &SshServer,
    known_hosts: &Path,
) {
    let out = runtime.block_on(held.output(ExecRequest::command("echo held")));
    match out {
        Ok(out) if out.stdout == b"held\n" => {}
        other => fail(&format!("held session check: {other:?}")),
    }
    let out = ssh_command(server, known_hosts).arg("echo ssh").output();
    match out {
        Ok(out) if out.stdout == b"ssh\n" => {}
        other => fail(&format!("ssh check: {other:?}")),
    }
}

/// `ssh` to the bench sshd with the same key, the host key pinned, no config files.
fn ssh_command(server: &SshServer, known_hosts: &Path) -> Command {
    let mut command = Command::new("ssh");
    command
        .args([
            "-F",
            "/dev/null",
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(server.user_key_path())
        .arg("-p")
        .arg(server.addr().port().to_string())
        .arg(format!("{}@127.0.0.1", server.user()))
        .stdin(Stdio::null());
    command
}

/// A TCP server on 127.0.0.1 that answers one request byte with [`THROUGHPUT_BYTES`] of noise.
fn spawn_source() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for byte in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let block = block.clone();
            std::thread::spawn(move || {
                let mut request = [0u8; 1];
                if conn.read_exact(&mut request).is_err() {
                    return;
                }
                for _ in 0..THROUGHPUT_BYTES / block.len() {
                    if conn.write_all(&block).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// Ask the source (through a forward on `port`) for its bytes; the time to receive them all.
fn pull(port: u16) -> io::Result<Duration> {
    let started = Instant::now();
    let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    conn.write_all(b"g")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    if total != THROUGHPUT_BYTES {
        return Err(io::Error::other(format!(
            "received {total} of {THROUGHPUT_BYTES} bytes"
        )));
    }
    Ok(started.elapsed())
}

/// `ssh -N -L` to the bench sshd, stopped (by its pid) on drop.
struct SshForward {
    child: Child,
    port: u16,
}

impl SshForward {
    fn start(server: &SshServer, known_hosts: &Path, target: u16) -> io::Result<SshForward> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let child = ssh_command(server, known_hosts)
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
            .arg(format!("127.0.0.1:{port}:127.0.0.1:{target}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut forward = SshForward { child, port };

        // The port answers once ssh has authenticated and set up the forward.
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            if let Some(status) = forward.child.try_wait()? {
                return Err(io::Error::other(format!("ssh -L exited: {status}")));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("ssh -L did not open its port in 60 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(forward)
    }
}

impl Drop for SshForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mb_per_s(time: Duration) -> f64 {
    THROUGHPUT_BYTES as f64 / 1e6 / time.as_secs_f64()
}

fn report(
    options: &Options,
    held_ssh: &Paired,
    fresh_ssh: &Paired,
    held_fresh: &Paired,
    fwd: &Paired,
) {
    // `paired` gives time(A)/time(B); speed-ups are the inverse.
    let speedup = |p: &Paired| 1.0 / p.ratio().max(1e-12);
    if options.json {
        let doc = serde_json::json!({
            "exec_true": {
                "held_session": sample_json(&held_ssh.a),
                "fresh_russh": sample_json(&fresh_ssh.a),
                "ssh_binary": sample_json(&held_ssh.b),
                "held_vs_ssh_speedup": speedup(held_ssh),
                "fresh_vs_ssh_speedup": speedup(fresh_ssh),
                "held_vs_fresh_speedup": speedup(held_fresh),
                "goal_held_vs_ssh": 10.0,
            },
            "forward_throughput": {
                "bytes": THROUGHPUT_BYTES,
                "vmoat_mb_s": mb_per_s(fwd.a.median()),
                "ssh_l_mb_s": mb_per_s(fwd.b.median()),
                "vmoat_vs_ssh_l": speedup(fwd),
                "goal": 1.0,
            },
        });
        say(&doc.to_string());
        return;
    }

    say("exec of `true` (median ms, min-max)");
    let row = |label: &str, s: &vmoat_benches::Sample| {
        say(&format!(
            "  {label:<28} {:>8}  ({}-{})",
            ms(s.median()),
            ms(s.min()),
            ms(s.max())
        ));
    };
    row("held russh session", &held_ssh.a);
    row("fresh russh connection", &fresh_ssh.a);
    row("ssh binary", &held_ssh.b);
    say(&format!(
        "  held session vs ssh:   {:.1}x faster (goal >= 10x)",
        speedup(held_ssh)
    ));
    say(&format!(
        "  fresh russh vs ssh:    {:.1}x faster",
        speedup(fresh_ssh)
    ));
    say(&format!(
        "  held vs fresh russh:   {:.1}x faster",
        speedup(held_fresh)
    ));
    say(&format!(
        "forward throughput, {} MiB per run (median)",
        THROUGHPUT_BYTES >> 20
    ));
    say(&format!(
        "  vmoat forward_tcp      {:>8.0} MB/s",
        mb_per_s(fwd.a.median())
    ));
    say(&format!(
        "  ssh -L                 {:>8.0} MB/s",
        mb_per_s(fwd.b.median())
    ));
    say(&format!(
        "  vmoat vs ssh -L:       {:.2}x (goal >= 1.0x)",
        speedup(fwd)
    ));
}
