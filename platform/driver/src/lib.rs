//! The contract between vmoat and a virtualisation platform.
//!
//! A platform (qemu on Linux, Virtualization.framework on macOS) checks whether this host can
//! run it, creates a VM's disk from the shared base image, starts a VM from a [`VmSpec`], and
//! stops it gracefully or by force. The host agent drives a platform only through this crate,
//! so the agent, the CLI and the tests stay the same on every host.
//!
//! The trait is synchronous on purpose: qemu is a child process and a QMP socket, vz runs on
//! its own dispatch queue, and neither needs an async runtime. The agent calls it from a
//! blocking task.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A guest CPU architecture, spelled as Lima and Colima spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// 64-bit x86.
    #[serde(rename = "x86_64")]
    X86_64,
    /// 64-bit Arm.
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl Arch {
    /// The architecture this binary was built for, which is the only one vmoat runs natively.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    /// Lima's spelling (`x86_64`, `aarch64`).
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Go's and Debian's spelling (`amd64`, `arm64`), used in image names.
    pub fn debian_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// Parses either spelling.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "x86_64" | "amd64" => Some(Arch::X86_64),
            "aarch64" | "arm64" => Some(Arch::Aarch64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which platform runs the VM (Colima's `vmType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmType {
    /// qemu, with KVM, HVF or TCG.
    Qemu,
    /// Apple's Virtualization.framework.
    Vz,
}

impl VmType {
    /// The config and colima.yaml spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            VmType::Qemu => "qemu",
            VmType::Vz => "vz",
        }
    }

    /// The platform vmoat picks on this host when the config does not say.
    pub fn default_for_host() -> VmType {
        if cfg!(target_os = "macos") {
            VmType::Vz
        } else {
            VmType::Qemu
        }
    }
}

impl fmt::Display for VmType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How host directories are shared with the guest (Colima's `mountType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MountType {
    /// virtio-9p, built into qemu.
    #[serde(rename = "9p")]
    NineP,
    /// virtio-fs: virtiofsd on Linux, built into vz on macOS.
    #[serde(rename = "virtiofs")]
    Virtiofs,
}

impl MountType {
    /// The config and colima.yaml spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::NineP => "9p",
            MountType::Virtiofs => "virtiofs",
        }
    }
}

impl fmt::Display for MountType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The CPU virtualisation a qemu VM runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Linux KVM.
    Kvm,
    /// macOS Hypervisor.framework (qemu) or Virtualization.framework (vz).
    Hvf,
    /// qemu's software emulation: slow, but runs anywhere.
    Tcg,
}

impl Accel {
    /// qemu's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host directory shared into the guest at the same path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The directory on the host (already canonical).
    pub host_path: PathBuf,
    /// Where the guest mounts it; vmoat always uses the host path.
    pub guest_path: PathBuf,
    /// The virtio tag, `lima-` + 16 hex digits as Lima derives it ([`lima_mount_tag`]).
    pub tag: String,
    /// Whether the guest may write.
    pub writable: bool,
}

/// Lima's virtio tag for a mount: `lima-` + the first 8 bytes of
/// SHA-256(`location:mountPoint`) in hex (Lima's `limayaml.MountTag`).
///
/// Hashing both paths keeps the tag stable across boots and distinct when one location is
/// mounted at two places. The result is 21 bytes, well under virtio-9p's 31-byte tag limit.
pub fn lima_mount_tag(location: &Path, mount_point: &Path) -> String {
    let mut hasher = Sha256::new();
    hasher.update(location.as_os_str().as_encoded_bytes());
    hasher.update(b":");
    hasher.update(mount_point.as_os_str().as_encoded_bytes());
    let digest = hasher.finalize();
    format!("lima-{}", hex(&digest[..8]))
}

/// Lima's MAC address for an instance's NIC: `52:55:55:` + the first 3 bytes of
/// SHA-256(machine id + instance dir) (Lima's `limayaml.MACAddress`).
///
/// The `52` prefix is a locally administered unicast address; the hash keeps the MAC stable
/// for one instance on one host, so the guest's DHCP lease and interface name do not change.
pub fn lima_mac(machine_id: &str, instance_dir: &Path) -> String {
    let mut hasher = Sha256::new();
    hasher.update(machine_id.as_bytes());
    hasher.update(instance_dir.as_os_str().as_encoded_bytes());
    let digest = hasher.finalize();
    format!(
        "52:55:55:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

/// The host's machine id as Lima reads it on Linux: `/etc/machine-id`, else
/// `/var/lib/dbus/machine-id`, else the hostname. (On macOS Lima uses the
/// `IOPlatformUUID`; that lookup belongs to the vz platform.)
pub fn host_machine_id() -> String {
    for file in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(id) = std::fs::read_to_string(file)
            && !id.trim().is_empty()
        {
            return id.trim().to_owned();
        }
    }

    // Linux exposes the hostname here; elsewhere fall back to the environment.
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How the guest kernel is started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// Direct kernel boot: the kernel (and initrd) extracted beside the image.
    Kernel {
        /// The kernel image.
        kernel: PathBuf,
        /// The initial ramdisk, if the image has one.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// UEFI firmware boots the disk.
    Firmware {
        /// A firmware code file the user pinned; `None` lets the driver search the usual paths.
        code: Option<PathBuf>,
        /// The per-VM writable UEFI variable store (created by the driver when absent).
        vars: PathBuf,
    },
}

/// The guest's network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// No outbound traffic from the guest; only vmoat's own forwards reach it.
    pub restricted: bool,
    /// The 127.0.0.1 host port forwarded to the guest's sshd.
    pub ssh_host_port: u16,
    /// The NIC's MAC address.
    pub mac: String,
}

/// Everything a platform needs to start one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The Lima instance name, `colima-<profile>`.
    pub instance: String,
    /// The Lima instance directory, where sockets, pid files and logs live.
    pub instance_dir: PathBuf,
    /// Guest architecture.
    pub arch: Arch,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// The VM's own writable disk (a qcow2 overlay for qemu, a raw clone for vz).
    pub disk: PathBuf,
    /// The NoCloud seed volume.
    pub cidata: PathBuf,
    /// Kernel or firmware boot.
    pub boot: Boot,
    /// Shared host directories.
    pub mounts: Vec<Mount>,
    /// How mounts are shared.
    pub mount_type: MountType,
    /// Networking.
    pub network: Network,
    /// Where the serial console is written.
    pub serial_log: PathBuf,
}

/// How important a host finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Fine; said for completeness.
    Ok,
    /// Works, but slower or riskier than it could be.
    Warn,
    /// Blocks running VMs.
    Error,
}

/// One thing a platform found about the host, with what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// How much it matters.
    pub severity: Severity,
    /// Short name of what was checked (`qemu`, `accel`, `virtiofsd`, …).
    pub check: String,
    /// What was found.
    pub message: String,
    /// What to do, when something should be done.
    pub fix: Option<String>,
}

/// The outcome of [`Driver::check_host`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCheck {
    /// The accelerator VMs would use, or `None` if no VM can run.
    pub accel: Option<Accel>,
    /// Mount type to use when the config leaves it open.
    pub default_mount_type: MountType,
    /// Every check, good or bad.
    pub findings: Vec<Finding>,
}

impl HostCheck {
    /// Whether a VM can start on this host at all.
    pub fn usable(&self) -> bool {
        self.accel.is_some() && !self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// The blocking findings, for an error message.
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
    }
}

/// Create a VM's disk from the shared base image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRequest {
    /// The base image, never written to.
    pub base: PathBuf,
    /// The VM's disk to create.
    pub disk: PathBuf,
    /// Size the guest sees, in bytes; never smaller than the base.
    pub size_bytes: u64,
}

/// Why a hypervisor process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// Whether vmoat asked for the stop (`down`), as opposed to a crash or a guest poweroff.
    pub requested: bool,
    /// The hypervisor's own last words (stderr tail), if any.
    pub detail: String,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (_, Some(sig)) => write!(f, "killed by signal {sig}")?,
            (Some(code), None) => write!(f, "exited with status {code}")?,
            (None, None) => f.write_str("stopped")?,
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail.trim())?;
        }
        Ok(())
    }
}

/// Errors a platform reports.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The host can't run this platform; the message says what to install or enable.
    #[error("this host cannot run VMs with {platform}: {reason}")]
    HostUnsupported {
        /// The platform name.
        platform: &'static str,
        /// Why, and what to do.
        reason: String,
    },
    /// The SSH host port was taken between choosing it and the hypervisor binding it.
    #[error("host port 127.0.0.1:{port} was taken before the VM could bind it")]
    PortInUse {
        /// The port.
        port: u16,
    },
    /// The disk is already in use by another hypervisor process.
    #[error("disk {} is already in use by another VM process", .disk.display())]
    DiskInUse {
        /// The disk.
        disk: PathBuf,
    },
    /// The hypervisor failed to start or exited right away.
    #[error("{platform} failed to start: {detail}")]
    StartFailed {
        /// The platform name.
        platform: &'static str,
        /// What it said.
        detail: String,
    },
    /// A file operation on a named path failed.
    #[error("{action} {}", .path.display())]
    Io {
        /// What was being done (`creating disk`, `reading pid file`, …).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A control channel (QMP, the vz API) refused or failed a request.
    #[error("{platform} control request `{request}` failed: {detail}")]
    Control {
        /// The platform name.
        platform: &'static str,
        /// The request.
        request: String,
        /// What went wrong.
        detail: String,
    },
    /// The requested disk is smaller than the image it is made from.
    #[error(
        "disk size {requested_bytes} bytes for {} is smaller than its base image {} \
         ({base_bytes} bytes); raise VM_DISK",
        .disk.display(),
        .base.display()
    )]
    DiskTooSmall {
        /// The disk that was to be created.
        disk: PathBuf,
        /// The base image.
        base: PathBuf,
        /// The base image's virtual size.
        base_bytes: u64,
        /// The size asked for.
        requested_bytes: u64,
    },
    /// A helper tool (qemu-img, virtiofsd) failed.
    #[error("`{tool}` failed: {detail}")]
    Tool {
        /// The command line or tool name.
        tool: String,
        /// Its stderr, or why it could not run.
        detail: String,
    },
}

/// The state of a running VM, as far as the platform can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// The hypervisor is alive.
    Running,
    /// The hypervisor ended.
    Exited(ExitInfo),
}

/// A platform: checks the host, makes disks, starts VMs.
pub trait Driver {
    /// The handle of a VM this platform started or adopted.
    type Vm: RunningVm;

    /// A short name for messages (`qemu`, `vz`).
    fn name(&self) -> &'static str;

    /// Whether this host can run VMs with this platform, and every reason why not.
    fn check_host(&self) -> HostCheck;

    /// Creates the VM's disk from the base image (copy-on-write where the platform can).
    fn create_disk(&self, request: &DiskRequest) -> Result<(), DriverError>;

    /// Starts a VM. Returns once the hypervisor is up, not once the guest has booted.
    fn start(&self, spec: &VmSpec) -> Result<Self::Vm, DriverError>;

    /// Takes over a VM that is still running from an earlier agent (one that crashed), if
    /// there is one for this instance; `Ok(None)` when nothing is running.
    fn adopt(&self, spec: &VmSpec) -> Result<Option<Self::Vm>, DriverError>;
}

/// A VM the platform started.
pub trait RunningVm: Send {
    /// The hypervisor's pid, when it runs as its own process.
    fn pid(&self) -> Option<u32>;

    /// Whether the hypervisor still runs; reaps it when it has ended.
    fn state(&mut self) -> VmState;

    /// Asks the guest to shut down (ACPI power button). Returns at once.
    fn request_stop(&mut self) -> Result<(), DriverError>;

    /// Ends the VM now (SIGTERM then SIGKILL for qemu, `stop` for vz).
    fn force_stop(&mut self) -> Result<ExitInfo, DriverError>;

    /// Waits up to `timeout` for the VM to end; `Ok(None)` when it still runs.
    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitInfo>, DriverError>;

    /// Graceful stop: ask, wait up to `grace`, then force.
    fn stop(&mut self, grace: Duration) -> Result<ExitInfo, DriverError> {
        if let VmState::Exited(info) = self.state() {
            return Ok(info);
        }

        let asked = self.request_stop();

        if asked.is_ok()
            && let Some(mut info) = self.wait_exit(grace)?
        {
            info.requested = true;
            return Ok(info);
        }

        let mut info = self.force_stop()?;
        info.requested = true;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_parses_both_spellings() {
        assert_eq!(Arch::parse("amd64"), Some(Arch::X86_64));
        assert_eq!(Arch::parse("x86_64"), Some(Arch::X86_64));
        assert_eq!(Arch::parse("arm64"), Some(Arch::Aarch64));
        assert_eq!(Arch::parse("aarch64"), Some(Arch::Aarch64));
        assert_eq!(Arch::parse("riscv64"), None);
    }

    #[test]
    fn exit_info_reads_well() {
        let info = ExitInfo {
            code: None,
            signal: Some(9),
            requested: false,
            detail: String::new(),
        };
        assert_eq!(info.to_string(), "killed by signal 9");

        let info = ExitInfo {
            code: Some(1),
            signal: None,
            requested: false,
            detail: "could not set up host forwarding rule\n".into(),
        };
        assert_eq!(
            info.to_string(),
            "exited with status 1: could not set up host forwarding rule"
        );
    }

    #[test]
    fn mount_tag_matches_lima() {
        // Lima: fmt.Sprintf("lima-%x", sha256.Sum256([]byte("/Users/u:/Users/u"))[0:8]);
        // computed independently with `printf %s /Users/u:/Users/u | sha256sum`.
        let tag = lima_mount_tag(Path::new("/Users/u"), Path::new("/Users/u"));
        assert_eq!(tag.len(), "lima-".len() + 16);
        assert_eq!(
            tag,
            format!("lima-{}", &sha256_hex(b"/Users/u:/Users/u")[..16])
        );
        assert_ne!(
            tag,
            lima_mount_tag(Path::new("/Users/u"), Path::new("/mnt/u"))
        );
    }

    #[test]
    fn mac_matches_lima() {
        let mac = lima_mac("abc", Path::new("/h/.colima/_lima/colima-x"));
        let digest = sha256_hex(b"abc/h/.colima/_lima/colima-x");
        let expect = format!(
            "52:55:55:{}:{}:{}",
            &digest[0..2],
            &digest[2..4],
            &digest[4..6]
        );
        assert_eq!(mac, expect);
    }

    /// An independent hex SHA-256, from coreutils, so the tests do not check the code
    /// against itself.
    fn sha256_hex(data: &[u8]) -> String {
        use std::io::Write;
        use std::process::{Command, Stdio};

        let mut child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sha256sum runs");
        child.stdin.take().unwrap().write_all(data).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    }

    #[test]
    fn host_check_is_unusable_with_an_error() {
        let check = HostCheck {
            accel: Some(Accel::Tcg),
            default_mount_type: MountType::NineP,
            findings: vec![Finding {
                severity: Severity::Error,
                check: "qemu".into(),
                message: "qemu-system-x86_64 not found".into(),
                fix: Some("apt-get install qemu-system-x86".into()),
            }],
        };
        assert!(!check.usable());
        assert_eq!(check.errors().count(), 1);
    }
}
