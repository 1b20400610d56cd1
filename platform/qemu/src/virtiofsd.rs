//! virtiofsd, one per virtiofs mount, started before qemu and stopped with it.
//!
//! Each daemon serves one host directory on a vhost-user socket in the instance directory. It
//! runs in its own process group (it forks into a sandbox, so the group is what gets the
//! signal), writes nothing but its log, and exits by itself once qemu closes the socket. Its
//! pid goes into `virtiofsd-<i>.pid`, so an agent that adopts a running VM can stop it too.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use vmoat_driver::{DriverError, Mount};

use crate::files::InstanceFiles;
use crate::process::{alive, read_pid_file, runs_with, signal_group, tail, wait_until};

/// How long a virtiofsd may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a virtiofsd gets to exit on SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A virtiofsd this driver started (with its child handle) or found running (pid only).
#[derive(Debug)]
pub(crate) struct Virtiofsd {
    pid: u32,
    child: Option<Child>,
    socket: PathBuf,
    pid_file: PathBuf,
}

/// The arguments of the virtiofsd serving `mount` on `socket`.
pub(crate) fn args(mount: &Mount, socket: &Path) -> Vec<String> {
    let mut args = vec![
        format!("--socket-path={}", socket.display()),
        format!("--shared-dir={}", mount.host_path.display()),
        // Measured: `auto` is what made git 5-7x faster than 9p (measurements-trixie.md).
        "--cache=auto".to_owned(),
        "--log-level=warn".to_owned(),
    ];
    if !mount.writable {
        args.push("--readonly".to_owned());
    }
    args
}

/// Starts one virtiofsd per mount and waits for their sockets. On failure, the ones already
/// started are stopped.
pub(crate) fn start_all(
    binary: &Path,
    mounts: &[Mount],
    files: &InstanceFiles,
) -> Result<Vec<Virtiofsd>, DriverError> {
    let mut started = Vec::new();
    for (i, mount) in mounts.iter().enumerate() {
        match start_one(binary, mount, i, files) {
            Ok(daemon) => started.push(daemon),
            Err(e) => {
                stop_all(&mut started);
                return Err(e);
            }
        }
    }
    Ok(started)
}

fn start_one(
    binary: &Path,
    mount: &Mount,
    index: usize,
    files: &InstanceFiles,
) -> Result<Virtiofsd, DriverError> {
    let socket = files.virtiofsd_sock(index);
    let pid_file = files.virtiofsd_pid(index);
    let log_path = files.virtiofsd_log(index);
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| DriverError::Io {
            action,
            path,
            source,
        }
    };

    // A socket left by a dead daemon would make qemu connect to nothing.
    remove_if_exists(&socket);
    let log = fs::File::create(&log_path).map_err(io("creating virtiofsd log", &log_path))?;
    let log_err = log
        .try_clone()
        .map_err(io("opening virtiofsd log", &log_path))?;

    let mut child = Command::new(binary)
        .args(args(mount, &socket))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own group: it outlives a crashed agent, and the group reaches its sandbox child.
        .process_group(0)
        .spawn()
        .map_err(|e| DriverError::Tool {
            tool: binary.display().to_string(),
            detail: format!("cannot start it: {e}"),
        })?;
    let pid = child.id();
    fs::write(&pid_file, format!("{pid}\n")).map_err(io("writing virtiofsd pid", &pid_file))?;

    let mut exited = None;
    let ready = wait_until(SOCKET_TIMEOUT, || {
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return true;
        }
        socket.exists()
    });

    let mut daemon = Virtiofsd {
        pid,
        child: Some(child),
        socket,
        pid_file,
    };
    if ready && exited.is_none() {
        return Ok(daemon);
    }

    daemon.stop();
    let detail = match exited {
        Some(status) => format!("it exited ({status}): {}", tail(&log_path, 10)),
        None => format!(
            "no socket within {SOCKET_TIMEOUT:?}; its log: {}",
            tail(&log_path, 10)
        ),
    };
    Err(DriverError::Tool {
        tool: format!("virtiofsd for {}", mount.host_path.display()),
        detail,
    })
}

/// The virtiofsd daemons of an instance found still running (after an agent crash), by their
/// pid files, checked by identity.
pub(crate) fn adopt_all(files: &InstanceFiles, mounts: usize) -> Vec<Virtiofsd> {
    let mut found = Vec::new();
    for i in 0..mounts {
        let socket = files.virtiofsd_sock(i);
        let pid_file = files.virtiofsd_pid(i);
        let Some(pid) = read_pid_file(&pid_file) else {
            continue;
        };
        let needle = format!("--socket-path={}", socket.display());
        if alive(pid) && runs_with(pid, &[needle]) {
            found.push(Virtiofsd {
                pid,
                child: None,
                socket,
                pid_file,
            });
        } else {
            remove_if_exists(&pid_file);
        }
    }
    found
}

/// Stops every daemon.
pub(crate) fn stop_all(daemons: &mut [Virtiofsd]) {
    for daemon in daemons {
        daemon.stop();
    }
}

impl Virtiofsd {
    /// Stops the daemon (SIGTERM to its group, then SIGKILL) unless it already exited, and
    /// removes its pid files and socket.
    ///
    /// The group is signalled only while its leader is known to be ours: a child not yet
    /// reaped keeps its pid (and so the group id) reserved; an adopted daemon is checked by
    /// its command line first.
    pub(crate) fn stop(&mut self) {
        let pid = self.pid;
        let needle = format!("--socket-path={}", self.socket.display());
        let running = |child: &mut Option<Child>| match child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => alive(pid) && runs_with(pid, std::slice::from_ref(&needle)),
        };

        for sig in [Signal::SIGTERM, Signal::SIGKILL] {
            if !running(&mut self.child) {
                break;
            }
            let _ = signal_group(pid, sig);
            wait_until(TERM_GRACE, || !running(&mut self.child));
        }

        remove_if_exists(&self.pid_file);
        remove_if_exists(&self.socket);
        // virtiofsd's own pid file beside its socket, which a killed daemon leaves behind.
        let mut own_pid_file = self.socket.clone().into_os_string();
        own_pid_file.push(".pid");
        remove_if_exists(Path::new(&own_pid_file));
    }
}

fn remove_if_exists(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove stale file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_follow_the_mount() {
        let mount = Mount {
            host_path: "/home/u/src".into(),
            guest_path: "/home/u/src".into(),
            tag: "lima-0".into(),
            writable: false,
        };
        let a = args(&mount, Path::new("/i/virtiofsd-0.sock"));
        assert_eq!(
            a,
            [
                "--socket-path=/i/virtiofsd-0.sock",
                "--shared-dir=/home/u/src",
                "--cache=auto",
                "--log-level=warn",
                "--readonly"
            ]
        );
    }
}
