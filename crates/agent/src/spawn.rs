//! Starting an agent detached from the CLI: its own session (so a closing terminal or Ctrl-C
//! in the shell that ran `vmoat up` never reaches it), stdio to the instance's log files, and a
//! bounded wait until it answers on `ha.sock`.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::serial;

/// Why an agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The process could not be created, or its log files opened.
    #[error("cannot start the host agent `{}`", .exe.display())]
    Start {
        /// The executable.
        exe: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It exited before answering.
    #[error("the host agent exited at start ({status}); its log {} ends with:\n{tail}",
        .log.display())]
    Exited {
        /// Its exit status.
        status: String,
        /// Its log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// It did not answer in time.
    #[error("the host agent did not answer on {} within {} s; see {}",
        .socket.display(), .after.as_secs(), .log.display())]
    Timeout {
        /// The socket.
        socket: PathBuf,
        /// The limit.
        after: Duration,
        /// Its log.
        log: PathBuf,
    },
}

/// Where an agent's files go.
#[derive(Clone, Debug)]
pub struct AgentFiles {
    /// `ha.sock`.
    pub socket: PathBuf,
    /// `ha.stdout.log`.
    pub stdout_log: PathBuf,
    /// `ha.stderr.log`.
    pub stderr_log: PathBuf,
}

/// Starts `exe agent <profile>` detached and waits until it answers on its socket.
/// Returns its pid.
pub fn spawn(
    exe: &Path,
    profile: &str,
    files: &AgentFiles,
    wait: Duration,
) -> Result<u32, SpawnError> {
    let start_err = |source| SpawnError::Start {
        exe: exe.to_owned(),
        source,
    };
    let open_log = |path: &Path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(start_err)
    };

    let mut command = Command::new(exe);
    command
        .arg("agent")
        .arg(profile)
        .stdin(Stdio::null())
        .stdout(open_log(&files.stdout_log)?)
        .stderr(open_log(&files.stderr_log)?);
    let mut child = start_detached(command).map_err(start_err)?;
    let pid = child.id();

    if let Err(err) = wait_until_answering(&mut child, files, wait) {
        // The agent binds its socket before it starts a VM, so one that never answered has
        // started nothing: end it rather than leave it behind.
        let _ = child.kill();
        let _ = child.wait();
        return Err(err);
    }
    Ok(pid)
}

fn start_detached(mut command: Command) -> std::io::Result<Child> {
    // SAFETY: `setsid` is async-signal-safe and touches no memory of the parent; it is the
    // only thing done between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    command.spawn()
}

fn wait_until_answering(
    child: &mut Child,
    files: &AgentFiles,
    wait: Duration,
) -> Result<(), SpawnError> {
    let deadline = Instant::now() + wait;
    loop {
        if std::os::unix::net::UnixStream::connect(&files.socket).is_ok() {
            return Ok(());
        }

        if let Ok(Some(status)) = child.try_wait() {
            return Err(SpawnError::Exited {
                status: status.to_string(),
                log: files.stderr_log.clone(),
                tail: serial::tail(&files.stderr_log, 15).join("\n"),
            });
        }

        if Instant::now() >= deadline {
            return Err(SpawnError::Timeout {
                socket: files.socket.clone(),
                after: wait,
                log: files.stderr_log.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> AgentFiles {
        AgentFiles {
            socket: dir.join("ha.sock"),
            stdout_log: dir.join("ha.stdout.log"),
            stderr_log: dir.join("ha.stderr.log"),
        }
    }

    #[test]
    fn an_agent_that_dies_at_start_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-vmoat");
        std::fs::write(&script, "#!/bin/sh\necho \"cannot boot $2\" >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();

        let err = spawn(&script, "wt-x", &files(dir.path()), Duration::from_secs(10)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("cannot boot wt-x"), "{text}");
    }

    #[test]
    fn an_agent_that_never_answers_is_ended() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-vmoat");
        std::fs::write(
            &script,
            "#!/bin/sh\necho $$ > \"$(dirname \"$0\")/pid\"\nexec sleep 30\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();

        let err = spawn(
            &script,
            "wt-x",
            &files(dir.path()),
            Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(matches!(err, SpawnError::Timeout { .. }), "{err}");
        let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap();
        assert!(!Path::new(&format!("/proc/{}", pid.trim())).exists());
    }

    #[test]
    fn the_agent_leads_its_own_session() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let mut child = start_detached(command).unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let session: u32 = after_name.split(' ').nth(3).unwrap().parse().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(session, child.id());
    }
}
