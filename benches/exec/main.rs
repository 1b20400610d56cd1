//! `bench-exec`: running a command in a real VM and moving bytes out of it, vmoat's way against
//! OpenSSH's, in one run on one VM (scratch HOME and COLIMA_HOME). Figures for issue 5.
//!
//! - Exec round trip of `true` in the worktree dir, each path paired (A B A B …) with the `ssh`
//!   binary making a fresh connection per call to the VM's forwarded SSH port (vmoat's key,
//!   the VM's pinned host key in a known_hosts file, the same remote command line):
//!   - `vmoat ssh true`, the whole process (what a script pays);
//!   - the agent's exec endpoint called in-process (`vmoat_agent::exec_client` on `ha.sock`),
//!     which is the agent path without the process start;
//!   - a fresh russh connection per call (`vmoat_ssh::Session::connect`, handshake included).
//!
//!   Goal from issue 5: the agent path ≥ 10× faster than a fresh `ssh`.
//! - Tunnel throughput: busybox httpd in the guest serves a file of random bytes; the host
//!   fetches it through `vmoat tunnel PORT` (held by the agent) and through `ssh -N -L` to the
//!   same guest port, alternately; MB/s at the receiving end. Goal: ≥ 1.0× `ssh -L`.
//!
//! Options: `--runs N` (exec pairs per path, default 20), `--warmup N` (default 2),
//! `--tunnel-runs N` (throughput pairs, default 5), `--size-mib N` (file size, default 64),
//! `--vmoat PATH`, `--json`. The load average is printed with the figures.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmoat_agent::client::AgentClient;
use vmoat_agent::exec_client;
use vmoat_benches::Report as _;
use vmoat_benches::args::Flags;
use vmoat_benches::vm::{self, BenchVm};
use vmoat_benches::{
    Paired, Sample, cleanup, fail, ms, must, note, paired, sample_json, say, time_once,
};
use vmoat_ssh::{PublicKey, Session, UserKey};

/// The guest port busybox httpd listens on (inside the VM only).
const GUEST_PORT: u16 = 18080;

/// What the `ssh` binary and russh need to reach the guest as vmoat does.
struct Guest {
    port: u16,
    user: String,
    key_path: PathBuf,
    key: UserKey,
    pinned: PublicKey,
    known_hosts: PathBuf,
    /// The remote command line vmoat sends for `true` in the worktree dir.
    remote_true: String,
    worktree: PathBuf,
}

fn main() {
    cleanup::on_signals();
    let flags = Flags::from_args(
        &[
            "--runs",
            "--warmup",
            "--tunnel-runs",
            "--size-mib",
            "--vmoat",
        ],
        &["--json"],
    );
    let runs = flags.number("--runs", 20).max(1);
    let warmup = flags.number("--warmup", 2);
    let tunnel_runs = flags.number("--tunnel-runs", 5).max(1);
    let size = flags.number("--size-mib", 64).max(1) << 20;
    let vmoat = flags.vmoat_binary(runs, warmup);

    let load_before = vm::load_average();
    let vm = BenchVm::prepared("exec", &vmoat);
    note("booting the VM (vmoat up)");
    must(vm.up_retrying(3).map(drop), "vmoat up");

    let guest = must(guest(&vm), "reading the VM's SSH settings");
    let client = vm.agent();
    check_paths(&vm, &client, &guest);

    let load_exec = vm::load_average();
    note("exec pairs");
    let rt = vm.runtime();
    let cli = || time_once(&mut vm.command(["ssh", "true"]));
    let agent = || {
        let started = Instant::now();
        let captured = rt
            .block_on(exec_client::capture(&client, agent_true(&guest)))
            .map_err(io::Error::other)?;
        if !captured.success() {
            return Err(io::Error::other(format!("true: {:?}", captured.exit)));
        }
        Ok(started.elapsed())
    };
    let russh = || {
        let started = Instant::now();
        rt.block_on(fresh_russh(&guest, "true"))?;
        Ok(started.elapsed())
    };
    let ssh = || time_once(ssh_command(&guest).arg(&guest.remote_true));
    let cli_vs_ssh = must(paired(runs, warmup, cli, ssh), "vmoat ssh vs ssh");
    let agent_vs_ssh = must(paired(runs, warmup, agent, ssh), "agent vs ssh");
    let russh_vs_ssh = must(paired(runs, warmup, russh, ssh), "fresh russh vs ssh");

    note(&format!(
        "tunnel: {} MiB of random bytes in the guest",
        size >> 20
    ));
    let digest = must(serve_file(&vm, &client, size), "starting busybox httpd");
    let tunnel_port = must(open_tunnel(&vm), "vmoat tunnel");
    let forward = must(SshForward::start(&guest), "ssh -L");
    for (name, port) in [("vmoat tunnel", tunnel_port), ("ssh -L", forward.port)] {
        let got = must(fetch(port, size, true), name);
        if got.digest.as_deref() != Some(digest.as_str()) {
            fail(&format!(
                "{name} delivered other bytes than the guest's file"
            ));
        }
    }
    let load_tunnel = vm::load_average();
    let tunnel = must(
        paired(
            tunnel_runs,
            1,
            || fetch(tunnel_port, size, false).map(|f| f.time),
            || fetch(forward.port, size, false).map(|f| f.time),
        ),
        "tunnel throughput",
    );
    drop(forward);
    let _ = vm.run(&["untunnel"]);
    drop(vm);

    let report = Report {
        loads: [load_before, load_exec, load_tunnel, vm::load_average()],
        cli_vs_ssh,
        agent_vs_ssh,
        russh_vs_ssh,
        tunnel,
        size,
    };
    report.print(flags.switch("--json"));
}

fn guest(vm: &BenchVm) -> io::Result<Guest> {
    let settings = vm.settings()?;
    let status = vm
        .status()
        .ok_or_else(|| io::Error::other("the agent does not answer"))?;
    let key = UserKey::load(&settings.ssh_key).map_err(io::Error::other)?;
    let pinned = PublicKey::parse(&settings.host_key).map_err(io::Error::other)?;
    let known_hosts = vm.scratch().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {}\n", status.ssh_port, settings.host_key),
    )?;
    // `vmoat ssh` runs in the worktree root as git names it.
    let worktree = std::fs::canonicalize(vm.repo())?;
    let remote_true = vmoat_ssh::ExecRequest::command("true")
        .cwd(&worktree)
        .remote_command()
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::other("no remote command for `true`"))?;
    Ok(Guest {
        port: status.ssh_port,
        user: settings.ssh_user,
        key_path: settings.ssh_key,
        key,
        pinned,
        known_hosts,
        remote_true,
        worktree,
    })
}

/// The agent's exec request for `command` in the worktree dir, as `vmoat ssh` sends it.
fn agent_request(guest: &Guest, command: &str) -> vmoat_agent::protocol::ExecRequest {
    vmoat_agent::protocol::ExecRequest {
        command: command.into(),
        cwd: Some(guest.worktree.clone()),
        ..Default::default()
    }
}

fn agent_true(guest: &Guest) -> vmoat_agent::protocol::ExecRequest {
    agent_request(guest, "true")
}

/// One command on a fresh russh connection (connect, authenticate, exec, disconnect);
/// returns its stdout.
async fn fresh_russh(guest: &Guest, command: &str) -> io::Result<Vec<u8>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, guest.port));
    let session = Session::connect(
        addr,
        &guest.user,
        &guest.key,
        &guest.pinned,
        Duration::from_secs(30),
    )
    .await
    .map_err(io::Error::other)?;
    let out = session
        .output(vmoat_ssh::ExecRequest::command(command).cwd(&guest.worktree))
        .await
        .map_err(io::Error::other)?;
    session.disconnect().await;
    if !out.status.success() {
        return Err(io::Error::other(format!("{command}: {:?}", out.status)));
    }
    Ok(out.stdout)
}

/// `ssh` to the guest's forwarded port with vmoat's key and the pinned host key; no config
/// files, no agent keys.
fn ssh_command(guest: &Guest) -> Command {
    let mut command = Command::new("ssh");
    command
        .env_remove("SSH_AUTH_SOCK")
        .args(["-F", "/dev/null", "-T", "-o", "BatchMode=yes"])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            guest.known_hosts.display()
        ))
        .arg("-i")
        .arg(&guest.key_path)
        .arg("-p")
        .arg(guest.port.to_string())
        .arg(format!("{}@127.0.0.1", guest.user))
        .stdin(Stdio::null());
    command
}

/// Before timing: every path really runs a command in the worktree dir.
fn check_paths(vm: &BenchVm, client: &AgentClient, guest: &Guest) {
    let want = format!("{}\n", guest.worktree.display());
    let cli = vm.run(&["ssh", "pwd"]);
    let agent = vm
        .runtime()
        .block_on(exec_client::capture(client, agent_request(guest, "pwd")))
        .map(|c| String::from_utf8_lossy(&c.stdout).into_owned());
    let russh = vm
        .runtime()
        .block_on(fresh_russh(guest, "pwd"))
        .map(|o| String::from_utf8_lossy(&o).into_owned());
    let remote_pwd = vmoat_ssh::ExecRequest::command("pwd")
        .cwd(&guest.worktree)
        .remote_command()
        .ok()
        .flatten()
        .unwrap_or_default();
    let ssh = vmoat_benches::output_of(ssh_command(guest).arg(remote_pwd));
    let results = [
        ("vmoat ssh", cli.map_err(|e| e.to_string())),
        ("agent exec", agent.map_err(|e| e.to_string())),
        ("fresh russh", russh.map_err(|e| e.to_string())),
        ("ssh", ssh.map_err(|e| e.to_string())),
    ];
    for (name, got) in results {
        match got {
            Ok(out) if out == want => {}
            other => fail(&format!("{name} check: want {want:?}, got {other:?}")),
        }
    }
}

/// Writes `size` random bytes to a file in the guest and serves its directory with busybox
/// httpd on [`GUEST_PORT`] (guest loopback only); returns the file's sha256.
fn serve_file(vm: &BenchVm, client: &AgentClient, size: usize) -> io::Result<String> {
    let script = format!(
        "set -e; d=\"$HOME/vmoat-bench-www\"; mkdir -p \"$d\"; \
         head -c {size} /dev/urandom > \"$d/blob\"; sha256sum \"$d/blob\"; \
         busybox httpd -p 127.0.0.1:{GUEST_PORT} -h \"$d\""
    );
    let request = vmoat_agent::protocol::ExecRequest {
        command: script,
        ..Default::default()
    };
    let out = vm
        .runtime()
        .block_on(exec_client::capture(client, request))
        .map_err(io::Error::other)?;
    if !out.success() {
        return Err(io::Error::other(format!(
            "{:?}: {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    out.stdout_text()
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other("sha256sum printed nothing"))
}

/// `vmoat --json tunnel GUEST_PORT`; returns the host port.
fn open_tunnel(vm: &BenchVm) -> io::Result<u16> {
    let text = vm.run(&["--json", "tunnel", &GUEST_PORT.to_string()])?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get(0)?.get("host_port")?.as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| io::Error::other(format!("no host_port in {text:?}")))
}

/// One fetch of the file through a forward.
struct Fetched {
    time: Duration,
    digest: Option<String>,
}

/// `GET /blob` on 127.0.0.1:`port` (HTTP/1.0, so the server closes after the body); the time
/// from connect to the last byte. A short or failed answer is an error.
fn fetch(port: u16, size: usize, hash: bool) -> io::Result<Fetched> {
    let started = Instant::now();
    let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    conn.write_all(b"GET /blob HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;

    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let mut hasher = hash.then(Sha256::new);
    let mut body = 0usize;
    let mut in_body = false;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if !in_body {
            head.extend_from_slice(chunk);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            if !head.starts_with(b"HTTP/1.0 200") && !head.starts_with(b"HTTP/1.1 200") {
                let line = String::from_utf8_lossy(&head[..end.min(80)]).into_owned();
                return Err(io::Error::other(format!("answer {line:?}")));
            }
            in_body = true;
            let rest = head.split_off(end + 4);
            body += rest.len();
            if let Some(h) = hasher.as_mut() {
                h.update(&rest);
            }
            continue;
        }
        body += chunk.len();
        if let Some(h) = hasher.as_mut() {
            h.update(chunk);
        }
    }
    let time = started.elapsed();
    if body != size {
        return Err(io::Error::other(format!(
            "received {body} of {size} bytes through port {port}"
        )));
    }
    Ok(Fetched {
        time,
        digest: hasher.map(|h| hex::encode(h.finalize())),
    })
}

/// `ssh -N -L` to the guest port, stopped (by its pid) on drop.
struct SshForward {
    child: Child,
    port: u16,
}

impl SshForward {
    fn start(guest: &Guest) -> io::Result<SshForward> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let child = ssh_command(guest)
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
            .arg(format!("127.0.0.1:{port}:127.0.0.1:{GUEST_PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut forward = SshForward { child, port };

        // The port answers once ssh has authenticated and set up the forward.
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            if let Some(status) = forward.child.try_wait()? {
                return Err(io::Error::other(format!("ssh -L exited: {status}")));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("ssh -L did not open its port in 120 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
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

struct Report {
    /// Load averages: start, before the exec pairs, before the tunnel pairs, end.
    loads: [String; 4],
    cli_vs_ssh: Paired,
    agent_vs_ssh: Paired,
    russh_vs_ssh: Paired,
    tunnel: Paired,
    size: usize,
}

/// `paired` gives time(A)/time(B); a speed-up is its inverse.
fn speedup(p: &Paired) -> f64 {
    1.0 / p.ratio().max(1e-12)
}

impl Report {
    fn mb_s(&self, time: Duration) -> f64 {
        self.size as f64 / 1e6 / time.as_secs_f64()
    }
}

impl vmoat_benches::Report for Report {
    fn table(&self) {
        say(&format!(
            "bench-exec (load average: start {}, exec {}, tunnel {}, end {})",
            self.loads[0], self.loads[1], self.loads[2], self.loads[3]
        ));
        say("exec of `true` in the worktree dir (median ms, min-max)");
        let row = |label: &str, s: &Sample| {
            say(&format!(
                "  {label:<34} {:>8}  ({}-{})",
                ms(s.median()),
                ms(s.min()),
                ms(s.max())
            ));
        };
        row("vmoat ssh true (process)", &self.cli_vs_ssh.a);
        row("agent exec, in-process (ha.sock)", &self.agent_vs_ssh.a);
        row("fresh russh connection", &self.russh_vs_ssh.a);
        row("ssh binary (pooled over 3 sets)", &pooled_ssh(self));
        say(&format!(
            "  agent in-process vs ssh: {:.1}x faster (goal >= 10x)",
            speedup(&self.agent_vs_ssh)
        ));
        say(&format!(
            "  vmoat ssh (process) vs ssh: {:.1}x faster",
            speedup(&self.cli_vs_ssh)
        ));
        say(&format!(
            "  fresh russh vs ssh: {:.1}x faster",
            speedup(&self.russh_vs_ssh)
        ));
        say(&format!(
            "tunnel throughput, {} MiB per run (median MB/s over {} pairs)",
            self.size >> 20,
            self.tunnel.ratios.len()
        ));
        say(&format!(
            "  vmoat tunnel   {:>8.1} MB/s",
            self.mb_s(self.tunnel.a.median())
        ));
        say(&format!(
            "  ssh -L         {:>8.1} MB/s",
            self.mb_s(self.tunnel.b.median())
        ));
        say(&format!(
            "  vmoat tunnel vs ssh -L: {:.2}x (goal >= 1.0x)",
            speedup(&self.tunnel)
        ));
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "load_average": {
                "start": self.loads[0],
                "exec": self.loads[1],
                "tunnel": self.loads[2],
                "end": self.loads[3],
            },
            "exec_true": {
                "vmoat_ssh_process": sample_json(&self.cli_vs_ssh.a),
                "agent_in_process": sample_json(&self.agent_vs_ssh.a),
                "fresh_russh": sample_json(&self.russh_vs_ssh.a),
                "ssh_binary": sample_json(&pooled_ssh(self)),
                "agent_vs_ssh_speedup": speedup(&self.agent_vs_ssh),
                "vmoat_ssh_vs_ssh_speedup": speedup(&self.cli_vs_ssh),
                "fresh_russh_vs_ssh_speedup": speedup(&self.russh_vs_ssh),
                "goal_agent_vs_ssh": 10.0,
            },
            "tunnel_throughput": {
                "bytes": self.size,
                "vmoat_tunnel_mb_s": self.mb_s(self.tunnel.a.median()),
                "ssh_l_mb_s": self.mb_s(self.tunnel.b.median()),
                "vmoat_vs_ssh_l": speedup(&self.tunnel),
                "runs": self.tunnel.ratios.len(),
                "goal": 1.0,
            },
        })
    }
}

/// Every `ssh` run of the three exec sets, as one sample.
fn pooled_ssh(report: &Report) -> Sample {
    let mut all = Vec::new();
    for pair in [
        &report.cli_vs_ssh,
        &report.agent_vs_ssh,
        &report.russh_vs_ssh,
    ] {
        all.extend(pair.b.times().iter().copied());
    }
    Sample::new(all)
}
