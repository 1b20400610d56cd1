//! Shared fixtures for the tests that run a real qemu: a temporary instance directory with a
//! disk and a seed, a spec, and a guard that kills every qemu a test started, by pid, even
//! when the test fails.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmoat_driver::{Arch, Boot, DiskRequest, Driver, MountType, Network, RunningVm, VmSpec};
use vmoat_qemu::QemuDriver;

/// Kills the processes it holds on drop: SIGKILL by pid, and only while the pid's command
/// line still holds the test's own marker (a temporary path), so a pid the kernel has given
/// to another process since is left alone.
#[derive(Default)]
pub struct Reaper {
    pids: Vec<(u32, String)>,
}

impl Reaper {
    /// Kills `pid` on drop if its command line still contains `marker`.
    pub fn watch(&mut self, pid: u32, marker: &Path) {
        self.pids.push((pid, marker.display().to_string()));
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, marker) in &self.pids {
            kill_if_ours(*pid, marker);
        }
    }
}

/// SIGKILL to `pid` if its command line contains `marker`.
pub fn kill_if_ours(pid: u32, marker: &str) {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    if String::from_utf8_lossy(&cmdline).contains(marker) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

/// A VM under test: its directory, spec and the VM handle once started.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub spec: VmSpec,
}

/// A free 127.0.0.1 port (bound, then released: good enough for a test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An instance directory with a 64 MiB raw base, a qcow2 overlay made by the driver, a dummy
/// seed, and a spec that boots UEFI firmware with nothing to boot: qemu runs and answers QMP,
/// which is all these tests need.
pub fn firmware_fixture(driver: &QemuDriver) -> Fixture {
    firmware_fixture_for(driver, Arch::host())
}

/// [`firmware_fixture`] for a guest of `arch`.
pub fn firmware_fixture_for(driver: &QemuDriver, arch: Arch) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 64 << 20]).unwrap();
    let instance_dir = dir.path().join("colima-test");
    std::fs::create_dir(&instance_dir).unwrap();

    let disk = instance_dir.join("diffdisk");
    driver
        .create_disk(&DiskRequest {
            base: base.clone(),
            disk: disk.clone(),
            size_bytes: 128 << 20,
        })
        .unwrap();
    let cidata = instance_dir.join("cidata.iso");
    std::fs::write(&cidata, vec![0u8; 2048]).unwrap();

    let spec = VmSpec {
        instance: "colima-test".into(),
        instance_dir: instance_dir.clone(),
        arch,
        cpus: 1,
        memory_mib: 256,
        disk,
        cidata,
        boot: Boot::Firmware {
            code: None,
            vars: instance_dir.join("qemu-efi-vars.fd"),
        },
        mounts: Vec::new(),
        mount_type: MountType::NineP,
        network: Network {
            restricted: true,
            ssh_host_port: free_port(),
            mac: "52:55:55:00:00:01".into(),
        },
        serial_log: instance_dir.join("serial.log"),
    };
    Fixture { dir, spec }
}

/// Starts the VM and registers it with the reaper.
pub fn start(
    driver: &QemuDriver,
    spec: &VmSpec,
    reaper: &mut Reaper,
) -> Result<vmoat_qemu::QemuVm, vmoat_driver::DriverError> {
    let vm = driver.start(spec)?;
    reaper.watch(vm.pid().unwrap(), &spec.instance_dir);
    Ok(vm)
}

/// `qemu-img info` as JSON, for checks independent of the driver's own reading.
pub fn image_info(path: &Path) -> serde_json::Value {
    let out = run_ok(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(path),
    );
    serde_json::from_slice(&out).unwrap()
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> Vec<u8> {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The directory of this file's golden data and fixtures.
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where and as whom the `ssh` binary reaches a test guest, trusting only its seeded host key.
pub struct SshTarget<'a> {
    /// The host port forwarded to the guest's sshd.
    pub port: u16,
    /// The guest user.
    pub login: &'a str,
    /// The private key's file.
    pub key: &'a Path,
    /// A known_hosts file holding only the seeded host key.
    pub known_hosts: &'a Path,
}

impl SshTarget<'_> {
    /// Runs `command` in the guest; its output and status, whatever they are.
    pub fn run(&self, command: &str) -> std::process::Output {
        let known_hosts = format!("UserKnownHostsFile={}", self.known_hosts.display());
        Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=30"])
            .args(["-o", &known_hosts, "-p", &self.port.to_string(), "-i"])
            .arg(self.key)
            .arg(format!("{}@127.0.0.1", self.login))
            .arg(command)
            .output()
            .expect("run ssh")
    }
}
