//! qemu platform driver: argv, accel choice (kvm/hvf/tcg), QMP, virtiofsd, disks.
//!
//! [`QemuDriver`] implements [`vmoat_driver::Driver`]: it checks the host ([`accel`] explains
//! the accelerator choice, [`host`] finds the tools), makes each VM's qcow2 overlay on the
//! shared base image, starts qemu from a [`VmSpec`] with the command line [`argv`] builds,
//! waits until QMP answers, and hands back a [`QemuVm`] the agent watches and stops. qemu is
//! started in its own process group and survives the agent; a new agent finds it again with
//! [`Driver::adopt`].
//!
//! Failures the caller acts on have their own [`DriverError`] variants: a host forwarding
//! port taken in the meantime is [`DriverError::PortInUse`] (pick another port and start
//! again), a disk another qemu holds is [`DriverError::DiskInUse`], and a host that cannot
//! run qemu at all is [`DriverError::HostUnsupported`].

pub mod accel;
mod argv;
mod disk;
mod files;
pub mod host;
mod process;
pub mod qmp;
mod virtiofsd;
mod vm;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmoat_driver::{
    Arch, Boot, DiskRequest, Driver, DriverError, Finding, HostCheck, MountType, Severity, VmSpec,
};

pub use accel::{AccelChoice, AccelProbe, HostOs};
pub use argv::{DiskFormat, QemuHost, argv, serial_console};
pub use files::InstanceFiles;
pub use host::{Firmware, ToolSearch};
pub use process::tail as log_tail;
pub use qmp::{Qmp, QmpError, QmpEvent, VmStatus};
pub use vm::QemuVm;

use crate::process::{alive, read_pid_file, runs_with};
use crate::vm::{QMP_TIMEOUT, control, remove};

/// The platform name in messages.
const PLATFORM: &str = "qemu";

/// How long `start` waits for QMP to answer by default.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The qemu driver, with the tools and accelerator it resolved from the environment.
#[derive(Clone, Debug)]
pub struct QemuDriver {
    search: ToolSearch,
    probe: AccelProbe,
    start_timeout: Duration,
}

impl QemuDriver {
    /// The driver for this host and environment: qemu from `QEMU_SYSTEM_<ARCH>` or `PATH`,
    /// the accelerator from `/dev/kvm` (or HVF), `VMOAT_ACCEL` and `VMOAT_NO_TCG`.
    pub fn from_env() -> QemuDriver {
        QemuDriver::new(ToolSearch::from_env(), AccelProbe::from_env())
    }

    /// A driver with explicit tool search and accelerator probe (tests, other hosts).
    pub fn new(search: ToolSearch, probe: AccelProbe) -> QemuDriver {
        QemuDriver {
            search,
            probe,
            start_timeout: DEFAULT_START_TIMEOUT,
        }
    }

    /// Changes how long [`Driver::start`] waits for qemu's QMP socket to answer.
    pub fn with_start_timeout(mut self, timeout: Duration) -> QemuDriver {
        self.start_timeout = timeout;
        self
    }

    /// The accelerator a guest of `arch` would get, and why.
    pub fn accel(&self, arch: Arch) -> AccelChoice {
        self.probe.choose(arch)
    }

    /// The virtiofsd binary, if this host has one.
    pub fn virtiofsd(&self) -> Option<PathBuf> {
        let qemu = self.search.qemu(self.probe.host_arch);
        self.search.virtiofsd(qemu.as_deref())
    }

    /// Everything [`argv`] needs for `spec` on this host, or why the VM cannot start.
    pub fn resolve(&self, spec: &VmSpec) -> Result<QemuHost, DriverError> {
        let qemu = self.qemu_binary(spec.arch)?;

        let choice = self.probe.choose(spec.arch);
        let Some(accel) = choice.accel else {
            return Err(unsupported(&choice.finding));
        };

        let firmware_code = match &spec.boot {
            Boot::Kernel { .. } => None,
            Boot::Firmware {
                code: Some(code), ..
            } => Some(code.clone()),
            Boot::Firmware { code: None, .. } => {
                let found = self
                    .search
                    .firmware(spec.arch, Some(&qemu))
                    .ok_or_else(|| unsupported(&firmware_missing(spec.arch, Severity::Error)))?;
                Some(found.code)
            }
        };

        Ok(QemuHost {
            qemu,
            accel,
            firmware_code,
            disk_format: disk::detect_format(&spec.disk)?,
        })
    }

    fn qemu_binary(&self, arch: Arch) -> Result<PathBuf, DriverError> {
        let finding = self.qemu_finding(arch);
        match (finding.severity, self.search.qemu(arch)) {
            (Severity::Ok, Some(path)) => Ok(path),
            _ => Err(unsupported(&finding)),
        }
    }

    fn qemu_finding(&self, arch: Arch) -> Finding {
        let var = ToolSearch::qemu_env_var(arch);
        tool_finding(
            "qemu",
            self.search.qemu(arch),
            Severity::Error,
            format!("qemu-system-{arch} is not on PATH"),
            format!("{}, or set {var} to its path", install_qemu_hint(arch)),
        )
    }

    fn qemu_img_finding(&self, qemu: Option<&Path>) -> Finding {
        tool_finding(
            "qemu-img",
            self.search.qemu_img(qemu),
            Severity::Error,
            "qemu-img is not on PATH; it makes each VM's disk".into(),
            install_hint("qemu-utils", "qemu"),
        )
    }

    /// The virtiofsd finding and whether virtiofs can be the default mount type.
    fn virtiofsd_finding(&self, qemu: Option<&Path>) -> (Finding, bool) {
        if self.probe.os != HostOs::Linux {
            let finding = Finding {
                severity: Severity::Ok,
                check: "virtiofsd".into(),
                message: "qemu on this OS has no virtiofs; mounts use 9p".into(),
                fix: None,
            };
            return (finding, false);
        }

        let mut finding = tool_finding(
            "virtiofsd",
            self.search.virtiofsd(qemu),
            Severity::Warn,
            "virtiofsd not found: mounts use 9p, which was 5-7x slower than virtiofs for git \
             status here"
                .into(),
            "apt-get install virtiofsd (Debian 12+, Ubuntu 24.04+), or apt-get install \
             libseccomp-dev libcap-ng-dev && cargo install --locked virtiofsd"
                .into(),
        );
        let usable = finding.severity == Severity::Ok;
        if usable {
            finding.message.push_str("; mounts use virtiofs");
        } else if !finding.message.contains("9p") {
            finding.message.push_str("; mounts use 9p");
        }
        (finding, usable)
    }

    fn firmware_finding(&self, arch: Arch, qemu: Option<&Path>) -> Finding {
        match self.search.firmware(arch, qemu) {
            Some(fw) => Finding {
                severity: Severity::Ok,
                check: "firmware".into(),
                message: format!(
                    "UEFI firmware {} (variables from {})",
                    fw.code.display(),
                    fw.vars_template.display()
                ),
                fix: None,
            },
            None => firmware_missing(arch, Severity::Warn),
        }
    }

    /// Makes the per-VM UEFI variable store from its template when it does not exist yet.
    fn ensure_vars(&self, spec: &VmSpec, qemu: &Path) -> Result<(), DriverError> {
        let Boot::Firmware { code, vars } = &spec.boot else {
            return Ok(());
        };
        if vars.exists() {
            return Ok(());
        }

        let template = match code {
            Some(code) => host::vars_template_for(code).ok_or_else(|| DriverError::Io {
                action: "finding the UEFI variable template for",
                path: code.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no *VARS* file beside it; create {} yourself",
                        vars.display()
                    ),
                ),
            })?,
            None => {
                let fw = self
                    .search
                    .firmware(spec.arch, Some(qemu))
                    .ok_or_else(|| unsupported(&firmware_missing(spec.arch, Severity::Error)))?;
                fw.vars_template
            }
        };
        fs::copy(&template, vars).map_err(|source| DriverError::Io {
            action: "copying the UEFI variable template to",
            path: vars.clone(),
            source,
        })?;
        Ok(())
    }

    /// The qemu of this instance that still runs, if any: pid file, liveness and identity.
    fn running_qemu(&self, spec: &VmSpec, files: &InstanceFiles) -> Option<u32> {
        let pid = read_pid_file(&files.qemu_pid())?;
        (alive(pid) && runs_with(pid, &vm::identity(files, &spec.disk))).then_some(pid)
    }

    /// Removes what a dead qemu left: its pid file, sockets and virtiofsd daemons.
    fn clean_stale(&self, spec: &VmSpec, files: &InstanceFiles) {
        remove(&files.qemu_pid());
        for socket in files.qemu_sockets() {
            remove(&socket);
        }
        let mut stale = virtiofsd::adopt_all(files, spec.mounts.len());
        virtiofsd::stop_all(&mut stale);
    }

    /// Waits until qemu answers QMP, or reports why it exited or hung.
    fn await_qmp(
        &self,
        spec: &VmSpec,
        files: &InstanceFiles,
        child: &mut std::process::Child,
    ) -> Result<Qmp, DriverError> {
        let deadline = Instant::now() + self.start_timeout;
        let mut last_error = None;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(classify_exit(spec, files, status));
            }
            if files.qmp_sock().exists() {
                match Qmp::connect(&files.qmp_sock(), QMP_TIMEOUT) {
                    Ok(mut qmp) => match qmp.query_status() {
                        Ok(_) => return Ok(qmp),
                        Err(e) => last_error = Some(e),
                    },
                    Err(e) => last_error = Some(e),
                }
            }
            if Instant::now() >= deadline {
                let why =
                    last_error.map_or("its socket never appeared".to_owned(), |e| e.to_string());
                return Err(DriverError::StartFailed {
                    platform: PLATFORM,
                    detail: format!(
                        "QMP did not answer within {:?} ({why}); qemu said: {}",
                        self.start_timeout,
                        process::tail(&files.qemu_stderr_log(), 5)
                    ),
                });
            }
            std::thread::sleep(process::POLL);
        }
    }
}

impl Driver for QemuDriver {
    type Vm = QemuVm;

    fn name(&self) -> &'static str {
        PLATFORM
    }

    fn check_host(&self) -> HostCheck {
        let arch = self.probe.host_arch;
        let qemu = self.search.qemu(arch);
        let qemu = qemu.as_deref();

        let choice = self.probe.choose(arch);
        let (virtiofsd, virtiofs_ok) = self.virtiofsd_finding(qemu);
        let findings = vec![
            self.qemu_finding(arch),
            self.qemu_img_finding(qemu),
            choice.finding,
            virtiofsd,
            self.firmware_finding(arch, qemu),
        ];

        HostCheck {
            accel: choice.accel,
            default_mount_type: if virtiofs_ok {
                MountType::Virtiofs
            } else {
                MountType::NineP
            },
            findings,
        }
    }

    fn create_disk(&self, request: &DiskRequest) -> Result<(), DriverError> {
        let qemu = self.search.qemu(self.probe.host_arch);
        let qemu_img = self
            .search
            .qemu_img(qemu.as_deref())
            .ok_or_else(|| unsupported(&self.qemu_img_finding(qemu.as_deref())))?;
        disk::create(&qemu_img, request)
    }

    fn start(&self, spec: &VmSpec) -> Result<QemuVm, DriverError> {
        check_paths(spec)?;
        let files = InstanceFiles::new(&spec.instance_dir);
        let host = self.resolve(spec)?;

        if let Some(pid) = self.running_qemu(spec, &files) {
            tracing::warn!(pid, instance = %spec.instance, "qemu already runs for this instance");
            return Err(DriverError::DiskInUse {
                disk: spec.disk.clone(),
            });
        }
        self.clean_stale(spec, &files);
        self.ensure_vars(spec, &host.qemu)?;

        let mut daemons = Vec::new();
        if spec.mount_type == MountType::Virtiofs && !spec.mounts.is_empty() {
            let binary =
                self.search
                    .virtiofsd(Some(&host.qemu))
                    .ok_or_else(|| DriverError::Tool {
                        tool: "virtiofsd".into(),
                        detail: "not found; install it (see `vmoat doctor`) or set MOUNT_TYPE=9p"
                            .into(),
                    })?;
            daemons = virtiofsd::start_all(&binary, &spec.mounts, &files)?;
        }

        let args = argv(spec, &host);
        tracing::info!(instance = %spec.instance, accel = %host.accel, "starting qemu");
        tracing::debug!(argv = ?args, "qemu command line");

        let spawned = spawn(&args, &files);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                virtiofsd::stop_all(&mut daemons);
                return Err(e);
            }
        };

        match self.await_qmp(spec, &files, &mut child) {
            Ok(qmp) => Ok(QemuVm::new(
                child.id(),
                Some(child),
                files,
                &spec.disk,
                daemons,
                qmp,
            )),
            Err(e) => {
                // Never leave a half-started qemu behind: it is our child, so its pid is ours
                // until reaped.
                let _ = child.kill();
                let _ = child.wait();
                virtiofsd::stop_all(&mut daemons);
                remove(&files.qemu_pid());
                Err(e)
            }
        }
    }

    fn adopt(&self, spec: &VmSpec) -> Result<Option<QemuVm>, DriverError> {
        let files = InstanceFiles::new(&spec.instance_dir);
        let Some(pid) = self.running_qemu(spec, &files) else {
            if files.qemu_pid().exists() {
                tracing::info!(instance = %spec.instance, "removing stale qemu.pid");
            }
            self.clean_stale(spec, &files);
            return Ok(None);
        };

        let qmp = Qmp::connect(&files.qmp_sock(), QMP_TIMEOUT)
            .and_then(|mut qmp| qmp.query_status().map(|_| qmp))
            .map_err(|e| control("query-status", &e))?;
        let daemons = if spec.mount_type == MountType::Virtiofs {
            virtiofsd::adopt_all(&files, spec.mounts.len())
        } else {
            Vec::new()
        };
        tracing::info!(pid, instance = %spec.instance, "adopted running qemu");
        Ok(Some(QemuVm::new(
            pid, None, files, &spec.disk, daemons, qmp,
        )))
    }
}

/// Starts qemu in its own process group with its output in the instance's stderr log.
fn spawn(args: &[String], files: &InstanceFiles) -> Result<std::process::Child, DriverError> {
    let log_path = files.qemu_stderr_log();
    let io = |action| {
        let path = log_path.clone();
        move |source| DriverError::Io {
            action,
            path,
            source,
        }
    };
    let log = fs::File::create(&log_path).map_err(io("creating qemu log"))?;
    let log_out = log.try_clone().map_err(io("opening qemu log"))?;

    Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(log_out)
        .stderr(log)
        // Its own group: a signal to the agent's group (Ctrl-C, a crash) must not reach it.
        .process_group(0)
        .spawn()
        .map_err(|e| DriverError::StartFailed {
            platform: PLATFORM,
            detail: format!("cannot run {}: {e}", args[0]),
        })
}

/// Turns qemu's early exit into the error the caller can act on.
fn classify_exit(
    spec: &VmSpec,
    files: &InstanceFiles,
    status: std::process::ExitStatus,
) -> DriverError {
    let log = fs::read_to_string(files.qemu_stderr_log()).unwrap_or_default();

    if log.contains("Could not set up host forwarding rule") {
        return DriverError::PortInUse {
            port: spec.network.ssh_host_port,
        };
    }
    if log.contains("Failed to get \"write\" lock")
        || log.contains("Is another process using the image")
        || log.contains("Cannot lock pid file")
    {
        return DriverError::DiskInUse {
            disk: spec.disk.clone(),
        };
    }
    DriverError::StartFailed {
        platform: PLATFORM,
        detail: format!(
            "qemu exited at once ({status}): {}",
            process::tail(&files.qemu_stderr_log(), 5)
        ),
    }
}

/// Every path qemu gets must be UTF-8 (argv is `String`s) and the files must exist.
fn check_paths(spec: &VmSpec) -> Result<(), DriverError> {
    let mut paths: Vec<(&'static str, &Path)> = vec![
        ("instance directory", &spec.instance_dir),
        ("VM disk", &spec.disk),
        ("cidata image", &spec.cidata),
        ("serial log", &spec.serial_log),
    ];
    match &spec.boot {
        Boot::Kernel { kernel, initrd, .. } => {
            paths.push(("kernel", kernel));
            if let Some(initrd) = initrd {
                paths.push(("initrd", initrd));
            }
        }
        Boot::Firmware { code, vars } => {
            if let Some(code) = code {
                paths.push(("UEFI code", code));
            }
            paths.push(("UEFI variables", vars));
        }
    }
    for mount in &spec.mounts {
        paths.push(("mount", &mount.host_path));
    }

    for (what, path) in paths {
        if path.to_str().is_none() {
            return Err(DriverError::StartFailed {
                platform: PLATFORM,
                detail: format!("the {what} path {} is not UTF-8; move it", path.display()),
            });
        }
        let must_exist = !matches!(what, "serial log" | "UEFI variables");
        if must_exist && !path.exists() {
            return Err(DriverError::Io {
                action: match what {
                    "instance directory" => "finding the instance directory",
                    "VM disk" => "finding the VM disk",
                    "cidata image" => "finding the cidata image",
                    "kernel" => "finding the kernel",
                    "initrd" => "finding the initrd",
                    "UEFI code" => "finding the UEFI code",
                    _ => "finding the mounted directory",
                },
                path: path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
    }
    Ok(())
}

/// A tool's finding: its version and path when it runs, else what is wrong, with `fix`.
fn tool_finding(
    check: &str,
    path: Option<PathBuf>,
    bad: Severity,
    missing: String,
    fix: String,
) -> Finding {
    let (severity, message, fix) = match path.map(|p| (host::version(&p), p)) {
        Some((Ok(version), p)) => (Severity::Ok, format!("{version} ({})", p.display()), None),
        Some((Err(why), _)) => (bad, why, Some(fix)),
        None => (bad, missing, Some(fix)),
    };
    Finding {
        severity,
        check: check.into(),
        message,
        fix,
    }
}

fn unsupported(finding: &Finding) -> DriverError {
    let reason = match &finding.fix {
        Some(fix) => format!("{}; {fix}", finding.message),
        None => finding.message.clone(),
    };
    DriverError::HostUnsupported {
        platform: PLATFORM,
        reason,
    }
}

fn firmware_missing(arch: Arch, severity: Severity) -> Finding {
    let package = match arch {
        Arch::X86_64 => "ovmf",
        Arch::Aarch64 => "qemu-efi-aarch64",
    };
    Finding {
        severity,
        check: "firmware".into(),
        message: format!(
            "no UEFI firmware for {arch}: only images with a kernel beside them can boot"
        ),
        fix: Some(install_hint(package, "qemu")),
    }
}

fn install_qemu_hint(arch: Arch) -> String {
    let package = match arch {
        Arch::X86_64 => "qemu-system-x86",
        Arch::Aarch64 => "qemu-system-arm",
    };
    install_hint(package, "qemu")
}

fn install_hint(debian: &str, brew: &str) -> String {
    if cfg!(target_os = "macos") {
        format!("brew install {brew}")
    } else {
        format!("install it (Debian/Ubuntu: apt-get install {debian})")
    }
}
