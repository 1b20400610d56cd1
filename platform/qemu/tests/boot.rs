//! Real boots of vmoat's Debian guest with this driver and a cidata seed, under whatever
//! accelerator the host gives (TCG here), with restricted networking.
//!
//! These take one to three minutes each, so they are `#[ignore]`d; run them with
//!
//! ```text
//! cargo test -p vmoat-qemu --test boot -- --ignored --nocapture
//! ```
//!
//! The image is the newest `debian-*-<arch>` under vmoat's image cache
//! (`$VMOAT_CACHE_DIR`, `$XDG_CACHE_HOME/vmoat` or `~/.cache/vmoat`, built by
//! `vmoat image build debian`), or the directory in `VMOAT_TEST_IMAGE_DIR` (holding
//! `manifest.json`, or `disk.qcow2`, `vmlinuz` and `initrd.img`). The boots run one at a time
//! even when the harness runs tests in parallel. Every qemu and virtiofsd is killed by pid when a
//! test ends, pass or fail.

#![allow(clippy::print_stderr)]

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{free_port, kill_if_ours, run_ok};
use vmoat_cidata::{GuestUser, HostKey, Seed, SeedMount, User, write_iso};
use vmoat_driver::{
    Arch, Boot, DiskRequest, Driver, Mount, MountType, Network, RunningVm, VmSpec, VmState,
    host_machine_id, lima_mac, lima_mount_tag,
};
use vmoat_qemu::{QemuDriver, QemuVm, log_tail};

/// One VM at a time: the host has two cores.
static ONE_BOOT: Mutex<()> = Mutex::new(());

/// How long a boot may take to reach sshd under TCG on a busy two-core host.
const SSH_TIMEOUT: Duration = Duration::from_secs(420);

/// The uid and gid of the guest user in user mode when the tests run as root: not root's, so
/// the owner seen on the host really comes from the guest. As another user, the guest user
/// gets that user's uid, as vmoat does.
const ROOT_TEST_UID: u32 = 4321;

/// The guest user's uid and gid for this run.
fn guest_ids() -> (u32, u32) {
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if uid == 0 {
        (ROOT_TEST_UID, ROOT_TEST_UID)
    } else {
        (uid, gid)
    }
}

/// The image to boot.
struct Image {
    disk: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
}

fn image() -> Image {
    let dir = match std::env::var_os("VMOAT_TEST_IMAGE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => newest_cached_image().expect(
            "no debian image in vmoat's cache: run `vmoat image build debian` or set \
             VMOAT_TEST_IMAGE_DIR",
        ),
    };

    let manifest = dir.join("manifest.json");
    let (disk, kernel, initrd, cmdline) = match std::fs::read_to_string(&manifest) {
        Ok(text) => {
            let m: serde_json::Value = serde_json::from_str(&text).unwrap();
            let field = |k: &str| {
                m[k].as_str()
                    .unwrap_or_else(|| panic!("{k} in {manifest:?}"))
            };
            (
                field("disk").to_owned(),
                field("kernel").to_owned(),
                field("initrd").to_owned(),
                field("cmdline").to_owned(),
            )
        }
        Err(_) => (
            "disk.qcow2".into(),
            "vmlinuz".into(),
            "initrd.img".into(),
            "root=LABEL=vmoat-root rw console=ttyS0".into(),
        ),
    };
    Image {
        disk: dir.join(disk),
        kernel: dir.join(kernel),
        initrd: dir.join(initrd),
        cmdline,
    }
}

fn newest_cached_image() -> Option<PathBuf> {
    let cache = std::env::var_os("VMOAT_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("vmoat")))
        .or_else(|| std::env::home_dir().map(|h| h.join(".cache/vmoat")))?;
    let suffix = format!("-{}", Arch::host().as_str());
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(cache.join("images"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("debian-") && name.ends_with(&suffix)
        })
        .filter(|p| p.join("manifest.json").is_file())
        .filter_map(|p| Some((p.join("manifest.json").metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// Kills, on drop, the VM's qemu and any virtiofsd it left (by their pids, checked against the
/// instance directory in their command lines), so a failing test leaves nothing running.
struct VmGuard {
    instance_dir: PathBuf,
    pids: Vec<u32>,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        let mut pids = self.pids.clone();
        for entry in std::fs::read_dir(&self.instance_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("virtiofsd-") && name.ends_with(".pid") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                pids.extend(text.trim().parse::<u32>());
            }
        }
        let marker = self.instance_dir.display().to_string();
        for pid in pids {
            kill_if_ours(pid, &marker);
        }
    }
}

/// A booting VM with everything a test needs to reach it.
struct Booted {
    _dir: tempfile::TempDir,
    spec: VmSpec,
    vm: QemuVm,
    _guard: VmGuard,
    key: PathBuf,
    known_hosts: PathBuf,
    login: String,
    share: PathBuf,
    started: Instant,
}

fn keygen(path: &Path, comment: &str) -> (String, String) {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
    );
    let private = std::fs::read_to_string(path).unwrap();
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (private, public.trim().to_owned())
}

/// Makes the disk, the seed and the spec, and starts the VM.
/// Boots the image. `root_home` also shares a host directory at the guest's `/root` (what
/// root mode with the default `VM_MOUNT=$HOME` does when vmoat runs as root).
fn boot(
    mount_type: MountType,
    user: GuestUser,
    cmdline: Option<&str>,
    root_home: Option<&Path>,
) -> Booted {
    let image = image();
    let dir = tempfile::Builder::new()
        .prefix("vmoat-boot-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let instance_dir = dir.path().join("colima-boottest");
    let share = dir.path().join("share");
    std::fs::create_dir_all(&instance_dir).unwrap();
    std::fs::create_dir_all(&share).unwrap();
    if let GuestUser::User(u) = &user {
        // The share belongs to the user the guest user mirrors, as a worktree would.
        std::os::unix::fs::chown(&share, Some(u.uid), Some(u.gid)).unwrap();
    }
    let driver = QemuDriver::from_env();

    let disk = instance_dir.join("diffdisk");
    driver
        .create_disk(&DiskRequest {
            base: image.disk.clone(),
            disk: disk.clone(),
            size_bytes: 8 << 30,
        })
        .unwrap();

    let key = dir.path().join("user");
    let (_, user_pub) = keygen(&key, "lima");
    let (host_private, host_public) = keygen(&dir.path().join("host_key"), "vmoat-host");
    let known_hosts = dir.path().join("known_hosts");

    let mut mounts = vec![Mount {
        host_path: share.clone(),
        guest_path: share.clone(),
        tag: lima_mount_tag(&share, &share),
        writable: true,
    }];
    if let Some(host) = root_home {
        let guest = Path::new("/root");
        mounts.push(Mount {
            host_path: host.to_owned(),
            guest_path: guest.to_owned(),
            tag: lima_mount_tag(host, guest),
            writable: true,
        });
    }
    let login = match &user {
        GuestUser::Root => "root".to_owned(),
        GuestUser::User(u) => u.name.clone(),
    };
    let seed = Seed {
        instance: "colima-boottest".into(),
        instance_id: None,
        user,
        authorized_keys: vec![user_pub],
        host_key: HostKey {
            private_openssh: host_private,
            public_openssh: host_public,
        },
        mounts: mounts
            .iter()
            .map(|m| SeedMount::from_driver(m, mount_type))
            .collect(),
        grow_root: true,
    };
    let cidata = instance_dir.join("cidata.iso");
    write_iso(&seed, &cidata).unwrap();

    let spec = VmSpec {
        instance: "colima-boottest".into(),
        instance_dir: instance_dir.clone(),
        arch: Arch::host(),
        cpus: 2,
        memory_mib: 2048,
        disk,
        cidata,
        boot: Boot::Kernel {
            kernel: image.kernel.clone(),
            initrd: Some(image.initrd.clone()),
            cmdline: cmdline.unwrap_or(&image.cmdline).to_owned(),
        },
        mounts,
        mount_type,
        network: Network {
            restricted: true,
            ssh_host_port: free_port(),
            mac: lima_mac(&host_machine_id(), &instance_dir),
        },
        serial_log: instance_dir.join("serial.log"),
    };

    let port = spec.network.ssh_host_port;
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{port} {}\n", seed.host_key.public_openssh),
    )
    .unwrap();

    let started = Instant::now();
    let mut guard = VmGuard {
        instance_dir: instance_dir.clone(),
        pids: Vec::new(),
    };
    let vm = driver.start(&spec).unwrap();
    guard.pids.push(vm.pid().unwrap());
    eprintln!(
        "[boot] qemu up, QMP answering: {:.1} s ({mount_type}, pid {})",
        started.elapsed().as_secs_f64(),
        vm.pid().unwrap()
    );

    Booted {
        _dir: dir,
        spec,
        vm,
        _guard: guard,
        key,
        known_hosts,
        login,
        share,
        started,
    }
}

impl Booted {
    /// Waits until the forwarded port answers with an SSH banner. On timeout, or when qemu
    /// exits first, returns why with the last 20 lines of the serial console.
    fn wait_for_sshd(&mut self, timeout: Duration) -> Result<Duration, String> {
        let port = self.spec.network.ssh_host_port;
        let deadline = Instant::now() + timeout;
        loop {
            if let VmState::Exited(info) = self.vm.state() {
                return Err(format!("qemu exited: {info}\n{}", self.serial_tail()));
            }
            if banner(port) {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no SSH banner on 127.0.0.1:{port} within {timeout:?}; serial tail:\n{}",
                    self.serial_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn serial_tail(&self) -> String {
        log_tail(&self.spec.serial_log, 20)
    }

    /// Runs a command in the guest with the `ssh` binary, pinning the seeded host key.
    fn ssh(&self, command: &str) -> Output {
        common::SshTarget {
            port: self.spec.network.ssh_host_port,
            login: &self.login,
            key: &self.key,
            known_hosts: &self.known_hosts,
        }
        .run(command)
    }

    /// Runs a command that must succeed and returns its trimmed stdout.
    fn ok(&self, command: &str) -> String {
        let out = self.ssh(command);
        assert!(
            out.status.success(),
            "`{command}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Retries the first login: sshd may accept TCP a moment before it accepts keys.
    fn first_login(&self) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.ssh("true");
            if out.status.success() {
                return self.started.elapsed();
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                !err.contains("HOST IDENTIFICATION HAS CHANGED") && !err.contains("verification"),
                "the guest's host key is not the seeded one: {err}"
            );
            assert!(
                Instant::now() < deadline,
                "no login: {err}\n{}",
                self.serial_tail()
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Powers the guest off through QMP and waits for qemu to exit on its own.
    fn power_off(&mut self) -> Duration {
        let asked = Instant::now();
        self.vm.request_stop().unwrap();
        let info = self
            .vm
            .wait_exit(Duration::from_secs(120))
            .unwrap()
            .unwrap_or_else(|| panic!("no exit after powerdown:\n{}", self.serial_tail()));
        assert_eq!(info.code, Some(0), "{info}");
        assert!(info.requested);
        assert!(!self.spec.instance_dir.join("qemu.pid").exists());
        asked.elapsed()
    }
}

fn banner(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 8];
    // slirp accepts the connection even before the guest listens, then closes it.
    stream.read_exact(&mut buf).is_ok() && buf.starts_with(b"SSH-")
}

fn test_user() -> GuestUser {
    let (uid, gid) = guest_ids();
    GuestUser::User(User {
        name: "vmoat-test".into(),
        uid,
        gid,
        home: "/home/vmoat-test.guest".into(),
        shell: "/bin/bash".into(),
        groups: vec!["docker".into()],
    })
}

/// Checks shared by the boots: cloud-init finished cleanly, the mount is at the same path, a
/// file written in the guest appears on the host with the guest user's owner.
fn check_guest(b: &Booted, fstype: &str, uid: u32) {
    let status = b.ok("cloud-init status --wait --long");
    assert!(status.contains("status: done"), "{status}");
    eprintln!(
        "[boot] cloud-init done: {:.1} s",
        b.started.elapsed().as_secs_f64()
    );
    assert!(
        !b.ok("sudo -n cat /var/log/cloud-init.log")
            .contains("WARNING")
    );

    assert_eq!(b.ok("hostname"), "lima-colima-boottest");
    assert_eq!(b.ok("id -u"), uid.to_string());

    let share = b.share.display().to_string();
    let mounted = b.ok(&format!("findmnt -n -o FSTYPE --target {share}"));
    assert_eq!(mounted, fstype, "the share is mounted at the same path");
    b.ok(&format!("echo from-guest > {share}/guest-file"));
    let meta = std::fs::metadata(b.share.join("guest-file")).unwrap();
    assert_eq!(
        meta.uid(),
        uid,
        "owner of a file the guest wrote, seen on the host"
    );
    assert_eq!(
        std::fs::read_to_string(b.share.join("guest-file")).unwrap(),
        "from-guest\n"
    );

    std::fs::write(b.share.join("host-file"), "from-host\n").unwrap();
    assert_eq!(b.ok(&format!("cat {share}/host-file")), "from-host");

    // The root file system grew to the 8 GiB disk (the image is 4 GiB).
    let root_kib: u64 = b.ok("df --output=size -k / | tail -1").parse().unwrap();
    assert!(root_kib > 7 << 20, "root is {root_kib} KiB");
}

#[test]
#[ignore = "boots a VM (1-3 minutes under TCG); cargo test -p vmoat-qemu --test boot -- --ignored"]
fn debian_boots_with_the_seed_over_9p() {
    let _one = ONE_BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = boot(MountType::NineP, test_user(), None, None);

    let sshd = b
        .wait_for_sshd(SSH_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("[boot] sshd banner: {:.1} s", sshd.as_secs_f64());
    let login = b.first_login();
    eprintln!(
        "[boot] first login with the pinned host key: {:.1} s",
        login.as_secs_f64()
    );

    let (uid, gid) = guest_ids();
    check_guest(&b, "9p", uid);
    let groups = b.ok("id -Gn");
    assert!(groups.split_whitespace().any(|g| g == "docker"), "{groups}");
    assert_eq!(b.ok("id -g"), gid.to_string());
    let sudo = Instant::now();
    assert_eq!(b.ok("sudo -n id -u"), "0");
    assert!(
        sudo.elapsed() < Duration::from_secs(5),
        "sudo waited on DNS"
    );

    let off = b.power_off();
    eprintln!(
        "[boot] system_powerdown -> qemu exit: {:.1} s",
        off.as_secs_f64()
    );
}

#[test]
#[ignore = "boots a VM with virtiofsd (1-3 minutes under TCG); needs virtiofsd installed"]
fn debian_boots_as_root_over_virtiofs() {
    let _one = ONE_BOOT.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        QemuDriver::from_env().virtiofsd().is_some(),
        "virtiofsd is not installed (cargo install --locked virtiofsd)"
    );
    // The host's root home, shared at /root, with a key of its own: the guest's login key must
    // not end up in it (it would let the Lima key log in to the host).
    let root_home = tempfile::Builder::new()
        .prefix("vmoat-roothome-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let host_keys = root_home.path().join(".ssh/authorized_keys");
    std::fs::create_dir_all(host_keys.parent().unwrap()).unwrap();
    let own_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIhostsownkey host-root\n";
    std::fs::write(&host_keys, own_key).unwrap();

    let mut b = boot(
        MountType::Virtiofs,
        GuestUser::Root,
        None,
        Some(root_home.path()),
    );

    let sshd = b
        .wait_for_sshd(SSH_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("[boot] sshd banner: {:.1} s", sshd.as_secs_f64());
    let login = b.first_login();
    eprintln!("[boot] first login as root: {:.1} s", login.as_secs_f64());

    check_guest(&b, "virtiofs", 0);
    // Root mode makes no user: not the image's default one either.
    assert_eq!(b.ok("getent passwd 1000 || echo none"), "none");

    // Root logged in although /root is the host's directory, and the host's keys are as
    // they were.
    assert_eq!(b.ok("findmnt -n -o FSTYPE --target /root"), "virtiofs");
    assert_eq!(
        std::fs::read_to_string(&host_keys).unwrap().trim(),
        own_key.trim()
    );

    let virtiofsd_pid = b.spec.instance_dir.join("virtiofsd-0.pid");
    assert!(virtiofsd_pid.exists());
    let off = b.power_off();
    eprintln!(
        "[boot] system_powerdown -> qemu exit: {:.1} s",
        off.as_secs_f64()
    );
    assert!(!virtiofsd_pid.exists(), "virtiofsd is stopped with the VM");
}

#[test]
#[ignore = "boots a kernel that cannot find its root (about 1 minute under TCG)"]
fn a_boot_that_cannot_finish_times_out_with_the_serial_tail() {
    let _one = ONE_BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let cmdline = "root=LABEL=no-such-root rw console=ttyS0 rootdelay=5";
    let mut b = boot(MountType::NineP, test_user(), Some(cmdline), None);

    let err = b
        .wait_for_sshd(Duration::from_secs(60))
        .expect_err("a guest without its root file system never runs sshd");
    eprintln!("[boot] as expected:\n{err}");
    assert!(err.contains("no SSH banner"), "{err}");
    assert!(
        err.contains("no-such-root") || err.contains("root file system") || err.contains("ALERT"),
        "the serial tail shows why: {err}"
    );

    // Nothing is left running: the forced stop ends qemu and removes its pid file.
    let info = b.vm.force_stop().unwrap();
    assert!(info.requested);
    assert!(matches!(b.vm.state(), VmState::Exited(_)));
    assert!(!b.spec.instance_dir.join("qemu.pid").exists());
}
