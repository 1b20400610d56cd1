//! A running qemu: started by this driver, or adopted from an agent that died.
//!
//! qemu runs in its own process group so it outlives the agent that started it (the next agent
//! adopts it through `qemu.pid`). A started VM is this process's child and is reaped for its
//! exit status; an adopted one is watched by pid plus identity (its command line names this
//! instance's QMP socket and disk), so a recycled pid is never mistaken for the VM.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use nix::sys::signal::Signal;
use vmoat_driver::{DriverError, ExitInfo, RunningVm, VmState};

use crate::argv::opt_path;
use crate::files::InstanceFiles;
use crate::process::{alive, runs_with, signal, tail, wait_until};
use crate::qmp::{Qmp, QmpError};
use crate::virtiofsd::{self, Virtiofsd};

/// How long one QMP request may take.
pub(crate) const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long qemu gets to exit on SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// How long a SIGKILLed qemu may take to disappear.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// Lines of qemu's stderr kept in [`ExitInfo::detail`].
const DETAIL_LINES: usize = 10;

/// A qemu VM this driver started or adopted.
#[derive(Debug)]
pub struct QemuVm {
    pid: u32,
    /// Present when this process started qemu (and so must reap it).
    child: Option<Child>,
    files: InstanceFiles,
    /// Arguments that identify this VM's qemu among all processes.
    identity: Vec<String>,
    virtiofsd: Vec<Virtiofsd>,
    qmp: Option<Qmp>,
    requested: bool,
    exit: Option<ExitInfo>,
}

/// The arguments that only this instance's qemu has: its QMP socket and its disk, spelled as
/// they appear in the command line.
pub(crate) fn identity(files: &InstanceFiles, disk: &Path) -> Vec<String> {
    vec![
        format!("path={},", opt_path(&files.qmp_sock())),
        format!("file={},", opt_path(disk)),
    ]
}

impl QemuVm {
    /// A VM handle: `child` when this process started qemu, `None` when it adopted `pid`.
    pub(crate) fn new(
        pid: u32,
        child: Option<Child>,
        files: InstanceFiles,
        disk: &Path,
        virtiofsd: Vec<Virtiofsd>,
        qmp: Qmp,
    ) -> QemuVm {
        QemuVm {
            pid,
            child,
            identity: identity(&files, disk),
            files,
            virtiofsd,
            qmp: Some(qmp),
            requested: false,
            exit: None,
        }
    }

    /// The instance's files (sockets, logs).
    pub fn files(&self) -> &InstanceFiles {
        &self.files
    }

    /// Whether this process started the VM (as opposed to adopting it).
    pub fn is_child(&self) -> bool {
        self.child.is_some()
    }

    /// The QMP connection, reconnected if an earlier one broke. Keep uses short: qemu serves
    /// one QMP client at a time, and this handle is it.
    pub fn qmp(&mut self) -> Result<&mut Qmp, DriverError> {
        if self.qmp.is_none() {
            let qmp = Qmp::connect(&self.files.qmp_sock(), QMP_TIMEOUT)
                .map_err(|e| control("qmp_capabilities", &e))?;
            self.qmp = Some(qmp);
        }
        Ok(self.qmp.as_mut().expect("connected above"))
    }

    /// Runs a QMP command, reconnecting once if the connection had broken.
    fn qmp_command(
        &mut self,
        run: impl Fn(&mut Qmp) -> Result<(), QmpError>,
    ) -> Result<(), QmpError> {
        for attempt in 0..2 {
            if self.qmp.is_none() {
                self.qmp = Some(Qmp::connect(&self.files.qmp_sock(), QMP_TIMEOUT)?);
            }
            let qmp = self.qmp.as_mut().expect("connected above");
            match run(qmp) {
                Ok(()) => return Ok(()),
                Err(e @ (QmpError::Closed { .. } | QmpError::Io { .. })) if attempt == 0 => {
                    tracing::debug!(error = %e, "QMP connection broke; reconnecting");
                    self.qmp = None;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Whether qemu still runs, reaping it if it is our child.
    fn running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    self.finish(Some(status));
                    false
                }
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "cannot wait for qemu");
                    true
                }
            },
            None => {
                if alive(self.pid) && runs_with(self.pid, &self.identity) {
                    true
                } else {
                    self.finish(None);
                    false
                }
            }
        }
    }

    /// Records how qemu ended and cleans what it leaves behind.
    fn finish(&mut self, status: Option<ExitStatus>) {
        use std::os::unix::process::ExitStatusExt;

        self.qmp = None;
        virtiofsd::stop_all(&mut self.virtiofsd);
        self.virtiofsd.clear();

        // qemu removes its pid file on a clean exit, not when killed.
        if crate::process::read_pid_file(&self.files.qemu_pid()) == Some(self.pid) {
            remove(&self.files.qemu_pid());
        }
        for socket in self.files.qemu_sockets() {
            remove(&socket);
        }

        self.exit = Some(ExitInfo {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            requested: self.requested,
            detail: tail(&self.files.qemu_stderr_log(), DETAIL_LINES),
        });
    }

    /// Sends a signal to qemu, if it is still the process we mean.
    fn send(&mut self, sig: Signal) -> Result<(), DriverError> {
        if !self.running() {
            return Ok(());
        }
        signal(self.pid, sig).map_err(|e| DriverError::Control {
            platform: "qemu",
            request: format!("kill -{} {}", sig.as_str(), self.pid),
            detail: e.desc().to_owned(),
        })
    }
}

impl RunningVm for QemuVm {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn state(&mut self) -> VmState {
        if self.running() {
            VmState::Running
        } else {
            VmState::Exited(self.exit.clone().expect("set when not running"))
        }
    }

    fn request_stop(&mut self) -> Result<(), DriverError> {
        if !self.running() {
            return Ok(());
        }
        self.requested = true;
        self.qmp_command(|qmp| qmp.system_powerdown())
            .map_err(|e| control("system_powerdown", &e))
    }

    fn force_stop(&mut self) -> Result<ExitInfo, DriverError> {
        self.requested = true;

        self.send(Signal::SIGTERM)?;
        if !wait_until(TERM_GRACE, || !self.running()) {
            tracing::warn!(
                pid = self.pid,
                "qemu ignored SIGTERM for {TERM_GRACE:?}; killing it"
            );
            self.send(Signal::SIGKILL)?;
            if !wait_until(KILL_GRACE, || !self.running()) {
                return Err(DriverError::Control {
                    platform: "qemu",
                    request: format!("kill -KILL {}", self.pid),
                    detail: format!("qemu is still there after {KILL_GRACE:?}"),
                });
            }
        }

        let mut info = self.exit.clone().expect("set once exited");
        info.requested = true;
        Ok(info)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitInfo>, DriverError> {
        if wait_until(timeout, || !self.running()) {
            Ok(self.exit.clone())
        } else {
            Ok(None)
        }
    }
}

/// A QMP failure as a driver error; `detail` is a string, so the cause chain goes into it.
pub(crate) fn control(request: &str, error: &QmpError) -> DriverError {
    let mut detail = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    DriverError::Control {
        platform: "qemu",
        request: request.to_owned(),
        detail,
    }
}

pub(crate) fn remove(path: &PathBuf) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove stale file");
    }
}
