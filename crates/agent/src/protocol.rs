//! The agent's control protocol: HTTP/1.1 over the instance's `ha.sock`.
//!
//! `GET /v1/info` is Lima's endpoint (`{"sshLocalPort":N}`): it is what makes `limactl list` and
//! `colima list` report the VM as running. Everything else is vmoat's, under `/vmoat/v1/`:
//!
//! | method and path                 | body → answer                                        |
//! |---------------------------------|------------------------------------------------------|
//! | `GET /vmoat/v1/status`          | → [`AgentStatus`]                                    |
//! | `GET /vmoat/v1/events?from=N`   | → newline-delimited [`Event`]s, streamed             |
//! | `POST /vmoat/v1/exec` (upgrade) | then [`frame`](crate::frame)s both ways              |
//! | `GET /vmoat/v1/tunnels`         | → `[`[`Tunnel`]`]`                                   |
//! | `POST /vmoat/v1/tunnels`        | [`TunnelRequest`] → [`Tunnel`]                       |
//! | `DELETE /vmoat/v1/tunnels/N`    | → `[`[`Tunnel`]`]` closed (N omitted: all)           |
//! | `POST /vmoat/v1/probe`          | [`ProbeRequest`] → [`ProbeResult`]                   |
//! | `POST /vmoat/v1/stop`           | [`StopRequest`] → [`StopResult`], then the agent ends |
//!
//! Errors come back as a non-2xx status with an [`ApiError`] body. The protocol knows nothing
//! of unix sockets beyond the transport, so a remote agent can speak it over SSH later.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Lima's `/v1/info` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimaInfo {
    /// The 127.0.0.1 port forwarded to the guest's sshd.
    #[serde(rename = "sshLocalPort")]
    pub ssh_local_port: u16,
}

/// A boot stage, in the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The hypervisor process starts and its control socket answers.
    Hypervisor,
    /// The guest kernel prints on the serial console.
    Kernel,
    /// sshd answers and accepts vmoat's key with the pinned host key.
    Ssh,
    /// cloud-init has applied the seed.
    CloudInit,
    /// The guest's Docker daemon answers through the forwarded socket.
    Docker,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 5] = [
        Stage::Hypervisor,
        Stage::Kernel,
        Stage::Ssh,
        Stage::CloudInit,
        Stage::Docker,
    ];

    /// The name shown in progress lines (`spec.md` "Long work").
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Hypervisor => "boot",
            Stage::Kernel => "kernel",
            Stage::Ssh => "ssh",
            Stage::CloudInit => "cloud-init",
            Stage::Docker => "docker",
        }
    }

    /// What the stage waits on, for progress lines.
    pub fn waiting_on(self) -> &'static str {
        match self {
            Stage::Hypervisor => "the hypervisor to start",
            Stage::Kernel => "the guest kernel to print on the serial console",
            Stage::Ssh => "the guest's sshd to accept vmoat's key",
            Stage::CloudInit => "cloud-init to apply the seed",
            Stage::Docker => "the guest's Docker daemon to answer",
        }
    }
}

/// Where the agent is in a VM's life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Booting; the stage it waits on.
    Booting {
        /// The current stage.
        stage: Stage,
    },
    /// The guest is up: SSH, cloud-init and Docker all answer.
    Ready,
    /// A stop was requested and is under way.
    Stopping,
    /// The boot failed or the hypervisor ended; the agent is about to exit.
    Failed {
        /// What went wrong, with the serial tail when a stage timed out.
        reason: String,
        /// The stage that failed, if it was a boot stage.
        stage: Option<Stage>,
        /// Whether it was a timeout (exit 4) rather than an error.
        timeout: bool,
    },
}

/// One event of the agent's life, streamed to CLI commands that wait on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A stage began.
    StageStarted {
        /// The stage.
        stage: Stage,
        /// Its time limit in seconds.
        timeout_secs: u64,
    },
    /// A stage finished.
    StageDone {
        /// The stage.
        stage: Stage,
        /// How long it took, in milliseconds.
        elapsed_ms: u64,
    },
    /// A line worth showing while a stage runs (e.g. a retry).
    Note {
        /// The text.
        message: String,
    },
    /// Every stage is done.
    Ready,
    /// The boot failed; the agent ends after this.
    Failed {
        /// The stage that failed, if any.
        stage: Option<Stage>,
        /// What went wrong, including the serial tail on a timeout.
        reason: String,
        /// Whether it was a timeout (exit 4).
        timeout: bool,
    },
    /// The VM stopped (on request or by itself); the agent ends after this.
    Stopped {
        /// Why it stopped.
        reason: String,
    },
}

/// One stage's timing, for `status` and the boot-timeline bench.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTiming {
    /// The stage.
    pub stage: Stage,
    /// Milliseconds from the agent's start when the stage finished.
    pub done_at_ms: u64,
    /// How long the stage took.
    pub elapsed_ms: u64,
}

/// `GET /vmoat/v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The profile name.
    pub profile: String,
    /// The agent's pid.
    pub agent_pid: u32,
    /// The hypervisor's pid, when it is a separate process.
    pub hypervisor_pid: Option<u32>,
    /// Where the VM is.
    #[serde(flatten)]
    pub phase: Phase,
    /// The SSH port on 127.0.0.1.
    pub ssh_port: u16,
    /// qemu's accelerator (`kvm`, `tcg`, `hvf`) or `vz`.
    pub accel: String,
    /// Unix seconds when the VM started (or was adopted).
    pub started_at: u64,
    /// Whether this agent adopted a VM an earlier agent started.
    pub adopted: bool,
    /// Stage timings of this boot.
    pub stages: Vec<StageTiming>,
    /// The forwarded docker socket on the host, once Docker answers.
    pub docker_socket: Option<PathBuf>,
    /// Open tunnels.
    pub tunnels: Vec<Tunnel>,
}

/// The start of an exec session: the first frame a client sends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The shell command line (run by the guest user's shell); empty for a login shell.
    pub command: String,
    /// Working directory in the guest.
    pub cwd: Option<PathBuf>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// A pseudo-terminal of this size, for interactive use.
    pub pty: Option<PtySize>,
    /// Whether the client will send stdin; when false the agent closes it at once.
    pub stdin: bool,
}

/// A terminal size, and the terminal type for a new PTY.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
    /// `TERM`, for a new PTY.
    pub term: String,
}

/// How a command in the guest ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Its exit status, when it exited.
    pub code: Option<u32>,
    /// The signal that ended it (`TERM`, `KILL`, …), when one did.
    pub signal: Option<String>,
}

impl ExecExit {
    /// The status a local process would report: the code, or 128 + the signal's number.
    pub fn status(&self) -> u8 {
        match (&self.code, &self.signal) {
            (Some(code), _) => u8::try_from(*code).unwrap_or(255),
            (None, Some(signal)) => 128u8.saturating_add(signal_number(signal)),
            (None, None) => 255,
        }
    }
}

fn signal_number(name: &str) -> u8 {
    match name.trim_start_matches("SIG") {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "SEGV" => 11,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "USR1" => 10,
        "USR2" => 12,
        _ => 127,
    }
}

/// `POST /vmoat/v1/tunnels`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRequest {
    /// The guest port to reach.
    pub guest_port: u16,
}

/// An open tunnel: a 127.0.0.1 listener the agent holds, forwarding to a guest port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    /// The guest port.
    pub guest_port: u16,
    /// The host port on 127.0.0.1.
    pub host_port: u16,
    /// `http://127.0.0.1:<host_port>`.
    pub url: String,
}

/// `POST /vmoat/v1/probe`: an HTTP GET made from inside the guest's network, through SSH, so
/// the guest needs no curl.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// An `http://` URL as the guest sees it.
    pub url: String,
    /// Time limit for this one attempt, in milliseconds.
    pub timeout_ms: u64,
}

/// The outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The HTTP status, when a response came.
    pub status: Option<u16>,
    /// Why no response came.
    pub error: Option<String>,
    /// The first bytes of the body, for messages.
    pub body_head: String,
}

impl ProbeResult {
    /// A 2xx answer.
    pub fn healthy(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }
}

/// `POST /vmoat/v1/stop`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRequest {
    /// How long the guest may take to power off before it is forced, in seconds.
    pub grace_secs: u64,
}

/// The answer to a stop, sent once the hypervisor has ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopResult {
    /// Whether the guest had to be forced off.
    pub forced: bool,
    /// How the hypervisor ended.
    pub detail: String,
}

/// A failed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for the user.
    pub message: String,
    /// A machine-readable kind (`not-ready`, `port-unreachable`, `bad-request`, …).
    pub kind: String,
}

/// What the agent leaves behind when it ends, so `status` can say why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// Unix seconds.
    pub at: u64,
    /// Why it ended.
    pub reason: String,
    /// Whether a user asked for it (`down`, `destroy`).
    pub requested: bool,
    /// The last serial console lines, when the guest died or hung.
    pub serial_tail: Vec<String>,
    /// The last stage reached, when the boot failed.
    pub stage: Option<Stage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lima_info_uses_limas_field_name() {
        let text = serde_json::to_string(&LimaInfo {
            ssh_local_port: 60022,
        })
        .unwrap();
        assert_eq!(text, r#"{"sshLocalPort":60022}"#);
    }

    #[test]
    fn events_are_tagged() {
        let text = serde_json::to_string(&Event::StageStarted {
            stage: Stage::CloudInit,
            timeout_secs: 600,
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"event":"stage-started","stage":"cloud-init","timeout_secs":600}"#
        );
    }

    #[test]
    fn exit_status_follows_the_shell() {
        let exit = |code, signal: Option<&str>| ExecExit {
            code,
            signal: signal.map(str::to_owned),
        };
        assert_eq!(exit(Some(0), None).status(), 0);
        assert_eq!(exit(Some(7), None).status(), 7);
        assert_eq!(exit(Some(300), None).status(), 255);
        assert_eq!(exit(None, Some("KILL")).status(), 137);
        assert_eq!(exit(None, Some("TERM")).status(), 143);
        assert_eq!(exit(None, None).status(), 255);
    }

    #[test]
    fn status_flattens_the_phase() {
        let status = AgentStatus {
            profile: "wt-a".into(),
            agent_pid: 1,
            hypervisor_pid: Some(2),
            phase: Phase::Booting { stage: Stage::Ssh },
            ssh_port: 60022,
            accel: "tcg".into(),
            started_at: 0,
            adopted: false,
            stages: vec![],
            docker_socket: None,
            tunnels: vec![],
        };
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(value["phase"], "booting");
        assert_eq!(value["stage"], "ssh");
        let back: AgentStatus = serde_json::from_value(value).unwrap();
        assert_eq!(back, status);
    }
}
