//! The driver against a real qemu and qemu-img: QMP, start, adopt, stop, a busy forwarding
//! port, a disk in use, and disk creation. The VMs boot UEFI firmware with nothing to boot
//! (256 MiB, one CPU): qemu runs and answers QMP within a second. Every qemu is killed by pid
//! when a test ends, pass or fail.

mod common;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Reaper, firmware_fixture, image_info, start};
use vmoat_driver::{DiskRequest, Driver, DriverError, RunningVm, VmState};
use vmoat_qemu::{AccelProbe, HostOs, QemuDriver, Qmp, ToolSearch};

#[test]
fn qmp_talks_to_a_real_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut reaper = Reaper::default();

    let child = Command::new(format!("qemu-system-{}", std::env::consts::ARCH))
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("qemu-system runs");
    reaper.watch(child.id(), &sock);
    let mut child = child;

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut qmp = loop {
        match Qmp::connect(&sock, Duration::from_secs(5)) {
            Ok(q) => break q,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(
        qmp.version().starts_with(char::is_numeric),
        "{}",
        qmp.version()
    );

    let status = qmp.query_status().unwrap();
    assert!(status.running, "{status:?}");

    let err = qmp
        .execute("no-such-command", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CommandNotFound"), "{err}");

    qmp.quit().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn start_stop_and_the_files_qemu_leaves() {
    let driver = QemuDriver::from_env();
    let fx = firmware_fixture(&driver);
    let mut reaper = Reaper::default();

    let mut vm = start(&driver, &fx.spec, &mut reaper).unwrap();
    let pid = vm.pid().unwrap();
    assert!(vm.is_child());
    assert_eq!(vm.state(), VmState::Running);

    let pid_file = fx.spec.instance_dir.join("qemu.pid");
    let written: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(written, pid, "qemu writes its own pid file");
    assert!(
        fx.spec.instance_dir.join("qemu-efi-vars.fd").is_file(),
        "vars copied"
    );
    assert!(
        fx.spec.serial_log.exists(),
        "serial log is created while qemu runs"
    );

    let status = vm.qmp().unwrap().query_status().unwrap();
    assert_eq!(status.status, "running");

    // The firmware has no ACPI OS to act on the power button, so the graceful stop runs into
    // its grace period and the forced stop ends qemu.
    let started = Instant::now();
    let info = vm.stop(Duration::from_secs(2)).unwrap();
    assert!(info.requested);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(vm.state(), VmState::Exited(_)));
    assert!(!pid_file.exists(), "qemu.pid is gone after the stop");
    assert!(!fx.spec.instance_dir.join("qmp.sock").exists());
}

#[test]
fn a_new_agent_adopts_the_running_vm() {
    let driver = QemuDriver::from_env();
    let fx = firmware_fixture(&driver);
    let mut reaper = Reaper::default();

    let first = start(&driver, &fx.spec, &mut reaper).unwrap();
    let pid = first.pid().unwrap();
    // The agent that started it "crashes": its handle goes away, qemu keeps running.
    drop(first);

    let mut adopted = driver
        .adopt(&fx.spec)
        .unwrap()
        .expect("qemu is still running");
    assert_eq!(adopted.pid(), Some(pid));
    assert!(!adopted.is_child());
    assert_eq!(adopted.state(), VmState::Running);
    assert_eq!(
        adopted.qmp().unwrap().query_status().unwrap().status,
        "running"
    );

    // Starting again on the same instance must not make a second qemu.
    match driver.start(&fx.spec) {
        Err(DriverError::DiskInUse { .. }) => {}
        other => panic!("expected DiskInUse, got {other:?}"),
    }

    let info = adopted.force_stop().unwrap();
    assert!(info.requested);
    assert_eq!(adopted.state(), VmState::Exited(info));
    assert!(driver.adopt(&fx.spec).unwrap().is_none());
}

#[test]
fn a_stale_pid_file_is_not_adopted() {
    let driver = QemuDriver::from_env();
    let fx = firmware_fixture(&driver);
    let pid_file = fx.spec.instance_dir.join("qemu.pid");

    // A live process that is not this instance's qemu: this test itself.
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
    assert!(driver.adopt(&fx.spec).unwrap().is_none());
    assert!(!pid_file.exists(), "the stale pid file is cleaned");

    std::fs::write(&pid_file, "999999999\n").unwrap();
    assert!(driver.adopt(&fx.spec).unwrap().is_none());
}

#[test]
fn a_busy_forwarding_port_is_port_in_use() {
    let driver = QemuDriver::from_env();
    let mut fx = firmware_fixture(&driver);
    let mut reaper = Reaper::default();

    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    fx.spec.network.ssh_host_port = port;

    match start(&driver, &fx.spec, &mut reaper) {
        Err(DriverError::PortInUse { port: p }) => assert_eq!(p, port),
        other => panic!("expected PortInUse, got {other:?}"),
    }
    assert!(!fx.spec.instance_dir.join("qemu.pid").exists());

    // With the port free, the same spec starts.
    drop(holder);
    let mut vm = start(&driver, &fx.spec, &mut reaper).unwrap();
    vm.force_stop().unwrap();
}

#[test]
fn a_disk_held_by_another_qemu_is_disk_in_use() {
    let driver = QemuDriver::from_env();
    let fx = firmware_fixture(&driver);
    let mut reaper = Reaper::default();
    let mut vm = start(&driver, &fx.spec, &mut reaper).unwrap();

    // Another instance directory pointing at the same disk: qemu's image lock refuses it.
    let other_dir = fx.dir.path().join("colima-other");
    std::fs::create_dir(&other_dir).unwrap();
    let mut other = fx.spec.clone();
    other.instance = "colima-other".into();
    other.instance_dir = other_dir.clone();
    other.serial_log = other_dir.join("serial.log");
    other.network.ssh_host_port = common::free_port();
    if let vmoat_driver::Boot::Firmware { vars, .. } = &mut other.boot {
        *vars = other_dir.join("qemu-efi-vars.fd");
    }

    match start(&driver, &other, &mut reaper) {
        Err(DriverError::DiskInUse { disk }) => assert_eq!(disk, fx.spec.disk),
        other => panic!("expected DiskInUse, got {other:?}"),
    }
    vm.force_stop().unwrap();
}

#[test]
fn no_usable_accel_with_tcg_disabled_is_host_unsupported() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("sys/module/kvm_pvm")).unwrap();
    std::fs::create_dir_all(root.path().join("dev")).unwrap();
    std::fs::write(root.path().join("dev/kvm"), b"").unwrap();
    let probe = AccelProbe {
        root: root.path().to_owned(),
        os: HostOs::Linux,
        host_arch: vmoat_driver::Arch::host(),
        requested: None,
        no_tcg: true,
    };
    let driver = QemuDriver::new(ToolSearch::from_env(), probe);
    let fx = firmware_fixture(&driver);

    let check = driver.check_host();
    assert!(!check.usable());
    let accel = check.findings.iter().find(|f| f.check == "accel").unwrap();
    assert!(accel.message.contains("kvm_pvm"), "{}", accel.message);

    match driver.start(&fx.spec) {
        Err(e @ DriverError::HostUnsupported { .. }) => {
            let text = e.to_string();
            assert!(text.contains("VMOAT_NO_TCG"), "{text}");
        }
        other => panic!("expected HostUnsupported, got {other:?}"),
    }
}

#[test]
fn a_host_without_qemu_is_host_unsupported() {
    let mut search = ToolSearch::from_env();
    search.path = vec![tempfile::tempdir().unwrap().path().to_owned()];
    let driver = QemuDriver::new(search, AccelProbe::from_env());

    let check = driver.check_host();
    assert!(!check.usable());
    let qemu = check.findings.iter().find(|f| f.check == "qemu").unwrap();
    assert!(qemu.message.contains("not on PATH"), "{}", qemu.message);
    assert!(
        qemu.fix.as_deref().unwrap().contains("apt-get install"),
        "{qemu:?}"
    );
}

#[test]
fn check_host_reports_every_tool() {
    let check = QemuDriver::from_env().check_host();
    let names: Vec<&str> = check.findings.iter().map(|f| f.check.as_str()).collect();
    assert_eq!(
        names,
        ["qemu", "qemu-img", "accel", "virtiofsd", "firmware"]
    );
    let qemu = &check.findings[0];
    assert!(
        qemu.message.starts_with("QEMU emulator version"),
        "{qemu:?}"
    );
    assert!(check.usable(), "{check:?}");
}

#[test]
fn create_disk_makes_an_overlay_and_never_touches_the_base() {
    let driver = QemuDriver::from_env();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("100M")
        .status()
        .unwrap();
    assert!(made.success());
    let base_before = std::fs::read(&base).unwrap();

    let disk = dir.path().join("diffdisk");
    let request = DiskRequest {
        base: base.clone(),
        disk: disk.clone(),
        size_bytes: 1 << 30,
    };
    driver.create_disk(&request).unwrap();

    let info = image_info(&disk);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 1u64 << 30);
    assert_eq!(info["backing-filename"], base.to_str().unwrap());
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "the base is unchanged"
    );

    // An existing disk is never overwritten.
    let err = driver.create_disk(&request).unwrap_err().to_string();
    assert!(err.contains("refusing to overwrite"), "{err}");

    // Smaller than the base: refused with both sizes and what to change.
    let small = DiskRequest {
        base: base.clone(),
        disk: dir.path().join("small"),
        size_bytes: 50 << 20,
    };
    let err = driver.create_disk(&small).unwrap_err();
    assert!(matches!(err, DriverError::DiskTooSmall { base_bytes, .. } if base_bytes == 100 << 20));
    assert!(err.to_string().contains("VM_DISK"), "{err}");
    assert!(!dir.path().join("small").exists());

    // A missing base names itself.
    let missing = DiskRequest {
        base: dir.path().join("nope.qcow2"),
        disk: dir.path().join("d2"),
        size_bytes: 1 << 30,
    };
    let err = driver.create_disk(&missing).unwrap_err().to_string();
    assert!(err.contains("nope.qcow2"), "{err}");

    // Nothing but the base and the disk is left in the directory.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["base.qcow2", "diffdisk"]);
}

#[test]
#[ignore = "needs qemu-system-aarch64 and AAVMF: apt-get install qemu-system-arm qemu-efi-aarch64"]
fn aarch64_virt_starts_its_firmware_under_tcg() {
    let driver = QemuDriver::from_env();
    let mut fx = common::firmware_fixture_for(&driver, vmoat_driver::Arch::Aarch64);
    let share = fx.dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    fx.spec.mounts = vec![vmoat_driver::Mount {
        host_path: share.clone(),
        guest_path: share.clone(),
        tag: vmoat_driver::lima_mount_tag(&share, &share),
        writable: true,
    }];
    let mut reaper = Reaper::default();

    let mut vm = start(&driver, &fx.spec, &mut reaper).unwrap();
    assert_eq!(vm.qmp().unwrap().query_status().unwrap().status, "running");

    // AAVMF writes to the PL011 console, which is the serial log.
    let wrote = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::metadata(&fx.spec.serial_log).is_ok_and(|m| m.len() > 0)
    });
    assert!(wrote, "no firmware output on the serial log");
    vm.force_stop().unwrap();
}
