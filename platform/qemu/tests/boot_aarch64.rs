//! The arm64 smoke boot: vmoat's Debian image for arm64, started by this driver with a cidata
//! seed under `qemu-system-aarch64` (`virt` machine; on an x86_64 host TCG with `-cpu max`),
//! direct kernel boot with `console=ttyAMA0`, restricted networking and one 9p share, until
//! sshd answers with the seeded host key, cloud-init is done and Docker runs; then a powerdown.
//!
//! It takes several minutes under TCG, so it is `#[ignore]`d. `scripts/arm64-smoke` builds the
//! image and runs it; by hand:
//!
//! ```text
//! VMOAT_TEST_IMAGE_DIR=<dir of an arm64 image> \
//!     cargo test -p vmoat-qemu --test boot_aarch64 -- --ignored --nocapture
//! ```
//!
//! Without `VMOAT_TEST_IMAGE_DIR` the newest `debian-*-aarch64` in vmoat's image cache is used.
//! Each stage's time since qemu's launch goes to stderr as `[arm64] <stage>: <s> s`.

#![allow(clippy::print_stderr)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Reaper, free_port, run_ok};
use vmoat_cidata::{GuestUser, HostKey, Seed, SeedMount, User, write_iso};
use vmoat_driver::{
    Accel, Arch, Boot, DiskRequest, Driver, Mount, MountType, Network, RunningVm, VmSpec, VmState,
    lima_mount_tag,
};
use vmoat_qemu::{QemuDriver, QemuVm, log_tail};

/// How long the guest may take to reach sshd: TCG emulating arm64 on a busy two-core x86_64
/// host boots several times slower than an x86_64 guest (`docs/macos.md` has the figures).
const SSH_TIMEOUT: Duration = Duration::from_secs(1200);

/// How long cloud-init and Docker may take once sshd answers.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The guest user's uid and gid (not the host's: nothing here depends on the owner).
const GUEST_ID: u32 = 4321;

/// The arm64 image: the directory and what its manifest says.
struct Image {
    dir: PathBuf,
    manifest: serde_json::Value,
}

impl Image {
    /// The image named by `VMOAT_TEST_IMAGE_DIR`, else the newest arm64 image in the cache;
    /// panics with what to run when there is none or it is not an arm64 image.
    fn find() -> Image {
        let dir = std::env::var_os("VMOAT_TEST_IMAGE_DIR")
            .map(PathBuf::from)
            .or_else(newest_cached)
            .expect(
                "no arm64 debian image: run scripts/arm64-smoke, or set VMOAT_TEST_IMAGE_DIR \
                 to the directory of one",
            );
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (not a vmoat image directory)", path.display()));
        let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            manifest["arch"].as_str(),
            Some("aarch64"),
            "{} is not an arm64 image",
            path.display()
        );
        Image { dir, manifest }
    }

    /// A file of the image the manifest names under `key`.
    fn file(&self, key: &str) -> PathBuf {
        let name = self.manifest[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {}/manifest.json", self.dir.display()));
        self.dir.join(name)
    }

    fn cmdline(&self) -> String {
        self.manifest["cmdline"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// The newest `debian-*-aarch64` image in vmoat's cache.
fn newest_cached() -> Option<PathBuf> {
    let cache = std::env::var_os("VMOAT_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("vmoat")))
        .or_else(|| std::env::home_dir().map(|h| h.join(".cache/vmoat")))?;
    std::fs::read_dir(cache.join("images"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("debian-") && name.ends_with("-aarch64")
        })
        .filter_map(|p| Some((p.join("manifest.json").metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

/// The VM under test and how to log in to it.
struct Guest {
    vm: QemuVm,
    spec: VmSpec,
    key: PathBuf,
    known_hosts: PathBuf,
    share: PathBuf,
    launched: Instant,
}

impl Guest {
    /// Seconds since qemu was launched, printed with the stage it ends.
    fn mark(&self, stage: &str) -> f64 {
        let seconds = self.launched.elapsed().as_secs_f64();
        eprintln!("[arm64] {stage}: {seconds:.1} s");
        seconds
    }

    fn serial_tail(&self) -> String {
        log_tail(&self.spec.serial_log, 30)
    }

    /// Polls `done` every two seconds until it holds; panics with the serial tail when qemu
    /// exits first or `timeout` passes.
    fn wait(&mut self, what: &str, timeout: Duration, mut done: impl FnMut(&Guest) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if let VmState::Exited(info) = self.vm.state() {
                panic!(
                    "qemu exited waiting for {what}: {info}\n{}",
                    self.serial_tail()
                );
            }
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; serial tail:\n{}",
                self.serial_tail()
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Runs `command` in the guest with OpenSSH, trusting only the seeded host key.
    fn ssh(&self, command: &str) -> std::process::Output {
        common::SshTarget {
            port: self.spec.network.ssh_host_port,
            login: "vmoat-test",
            key: &self.key,
            known_hosts: &self.known_hosts,
        }
        .run(command)
    }

    /// Runs a command that must succeed; returns its trimmed stdout.
    fn ok(&self, command: &str) -> String {
        let out = self.ssh(command);
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success(),
            "`{command}` failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// An ed25519 key pair in `path` and `path.pub`; returns (private, public).
fn keygen(path: &Path) -> (String, String) {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmoat-arm64", "-f"])
            .arg(path),
    );
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (
        std::fs::read_to_string(path).unwrap(),
        public.trim().to_owned(),
    )
}

/// Makes the overlay disk, the seed and the spec in `dir`, and starts qemu.
fn launch(image: &Image, dir: &Path, reaper: &mut Reaper) -> Guest {
    let driver = QemuDriver::from_env();
    let instance_dir = dir.join("colima-arm64");
    let share = dir.join("share");
    std::fs::create_dir_all(&instance_dir).unwrap();
    std::fs::create_dir_all(&share).unwrap();
    std::os::unix::fs::chown(&share, Some(GUEST_ID), Some(GUEST_ID)).unwrap();

    let disk = instance_dir.join("diffdisk");
    let base = image.file("disk");
    let request = DiskRequest {
        base,
        disk: disk.clone(),
        size_bytes: 8 << 30,
    };
    driver.create_disk(&request).unwrap();

    let key = dir.join("user");
    let (_, user_public) = keygen(&key);
    let (host_private, host_public) = keygen(&dir.join("host"));
    let mount = Mount {
        host_path: share.clone(),
        guest_path: share.clone(),
        tag: lima_mount_tag(&share, &share),
        writable: true,
    };
    let seed = Seed {
        instance: "colima-arm64".into(),
        instance_id: None,
        user: GuestUser::User(User {
            name: "vmoat-test".into(),
            uid: GUEST_ID,
            gid: GUEST_ID,
            home: "/home/vmoat-test.guest".into(),
            shell: "/bin/bash".into(),
            groups: vec!["docker".into()],
        }),
        authorized_keys: vec![user_public],
        host_key: HostKey {
            private_openssh: host_private,
            public_openssh: host_public,
        },
        mounts: vec![SeedMount::from_driver(&mount, MountType::NineP)],
        grow_root: true,
    };
    let cidata = instance_dir.join("cidata.iso");
    write_iso(&seed, &cidata).unwrap();

    let port = free_port();
    let known_hosts = dir.join("known_hosts");
    let pinned = format!("[127.0.0.1]:{port} {}\n", seed.host_key.public_openssh);
    std::fs::write(&known_hosts, pinned).unwrap();

    let spec = VmSpec {
        instance: "colima-arm64".into(),
        instance_dir: instance_dir.clone(),
        arch: Arch::Aarch64,
        cpus: 2,
        memory_mib: 2048,
        disk,
        cidata,
        boot: Boot::Kernel {
            kernel: image.file("kernel"),
            initrd: Some(image.file("initrd")),
            cmdline: image.cmdline(),
        },
        mounts: vec![mount],
        mount_type: MountType::NineP,
        network: Network {
            restricted: true,
            ssh_host_port: port,
            mac: "52:55:55:a6:40:01".into(),
        },
        serial_log: instance_dir.join("serial.log"),
    };

    let launched = Instant::now();
    let vm = common::start(&driver, &spec, reaper).unwrap();
    Guest {
        vm,
        spec,
        key,
        known_hosts,
        share,
        launched,
    }
}

/// qemu's own command line, as the kernel has it: what really ran, not what argv meant.
fn running_argv(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The value after `flag` in `argv`.
fn flag<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    let at = argv.iter().position(|a| a == flag)?;
    argv.get(at + 1).map(String::as_str)
}

/// Whether sshd answers on the forwarded port with an SSH banner (slirp accepts the TCP
/// connection before the guest listens, then closes it).
fn sshd_answers(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut banner = [0u8; 4];
    stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-"
}

#[test]
#[ignore = "boots an arm64 VM under TCG (several minutes); scripts/arm64-smoke runs it"]
fn arm64_debian_boots_under_qemu_system_aarch64() {
    let image = Image::find();
    eprintln!("[arm64] image {}", image.dir.display());
    let choice = QemuDriver::from_env().accel(Arch::Aarch64);
    eprintln!("[arm64] accel: {}", choice.finding.message);
    if Arch::host() != Arch::Aarch64 {
        assert_eq!(
            choice.accel,
            Some(Accel::Tcg),
            "a foreign guest is emulated"
        );
    }

    let dir = tempfile::Builder::new()
        .prefix("vmoat-arm64-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut reaper = Reaper::default();
    let mut g = launch(&image, dir.path(), &mut reaper);
    g.mark("qemu up, QMP answering");

    // The machine the driver chose, read back from the running process.
    let argv = running_argv(g.vm.pid().unwrap());
    assert!(argv[0].ends_with("qemu-system-aarch64"), "{argv:?}");
    assert_eq!(flag(&argv, "-machine"), Some("virt,gic-version=max"));
    let append = flag(&argv, "-append").unwrap_or_default();
    assert!(append.contains("console=ttyAMA0"), "{append}");
    if choice.accel == Some(Accel::Tcg) {
        assert_eq!(flag(&argv, "-cpu"), Some("max"));
    }

    // The kernel writes to the PL011 serial port, which the driver logs.
    let serial = g.spec.serial_log.clone();
    g.wait(
        "kernel output on the serial log",
        Duration::from_secs(300),
        |_| std::fs::read_to_string(&serial).is_ok_and(|t| t.contains("Linux version")),
    );
    g.mark("kernel on ttyAMA0");

    let port = g.spec.network.ssh_host_port;
    g.wait("SSH banner", SSH_TIMEOUT, |_| sshd_answers(port));
    g.mark("sshd answers");

    // sshd may accept TCP a moment before the seeded user and key are in place; a host key
    // other than the seeded one fails at once.
    g.wait("login with the pinned host key", SETTLE_TIMEOUT, |g| {
        let out = g.ssh("true");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("HOST IDENTIFICATION HAS CHANGED") && !err.contains("verification"),
            "the guest's host key is not the seeded one: {err}"
        );
        out.status.success()
    });
    g.mark("logged in, host key pinned");

    let status = g.ok("cloud-init status --wait --long");
    assert!(status.contains("status: done"), "{status}");
    g.mark("cloud-init done");
    let log = g.ok("sudo -n cat /var/log/cloud-init.log");
    assert!(!log.contains("WARNING"), "cloud-init warned");

    assert_eq!(g.ok("uname -m"), "aarch64");
    assert_eq!(g.ok("dpkg --print-architecture"), "arm64");
    assert_eq!(g.ok("hostname"), "lima-colima-arm64");
    assert!(g.ok("cat /proc/cmdline").contains("console=ttyAMA0"));

    let share = g.share.display().to_string();
    assert_eq!(
        g.ok(&format!("findmnt -n -o FSTYPE --target {share}")),
        "9p"
    );
    g.ok(&format!("echo from-arm64 > {share}/guest-file"));
    let written = std::fs::read_to_string(g.share.join("guest-file")).unwrap();
    assert_eq!(written, "from-arm64\n");

    let root_kib: u64 = g.ok("df --output=size -k / | tail -1").parse().unwrap();
    assert!(
        root_kib > 7 << 20,
        "root did not grow to the 8 GiB disk: {root_kib} KiB"
    );

    g.wait("Docker's daemon", SETTLE_TIMEOUT, |g| {
        g.ssh("docker version --format '{{.Server.Arch}}'")
            .status
            .success()
    });
    assert_eq!(g.ok("docker version --format '{{.Server.Arch}}'"), "arm64");
    g.mark("docker answers");

    // A container from the image's static busybox: no registry needed.
    let run = "d=$(mktemp -d) && mkdir $d/bin && cp /usr/bin/busybox $d/bin/ && \
               tar -C $d -c . | docker import - vmoat-bb >/dev/null && \
               docker run --rm --network none vmoat-bb /bin/busybox uname -m";
    assert_eq!(g.ok(run), "aarch64");
    g.mark("container ran");

    let asked = Instant::now();
    g.vm.request_stop().unwrap();
    let exit = g.vm.wait_exit(Duration::from_secs(180)).unwrap();
    let exit = exit.unwrap_or_else(|| panic!("no exit after powerdown:\n{}", g.serial_tail()));
    assert_eq!(exit.code, Some(0), "{exit}");
    eprintln!(
        "[arm64] powerdown -> qemu exit: {:.1} s",
        asked.elapsed().as_secs_f64()
    );
    assert!(!g.spec.instance_dir.join("qemu.pid").exists());
}
