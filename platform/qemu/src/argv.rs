//! qemu's command line, built by a pure function from the VM spec and the resolved host facts.
//!
//! The choices follow Lima's qemu driver (`colima-compat.md` §5) where vmoat has no reason to
//! differ, and the measurements where it has:
//! - `-nodefaults -no-user-config -display none`: no default VGA, NIC, floppy, cdrom or
//!   monitor, and no host config file changing the VM behind vmoat's back.
//! - TCG gets `tb-size=256`: the default 1 GiB code cache doubled qemu's RSS with no speed gain
//!   (`measurements.md`).
//! - The serial console is Lima's socket chardev with a log file: the log is readable while
//!   qemu runs and a console can still be attached to `serial.sock`.
//! - 9p uses `security_model=none`: qemu tries to give a new file the guest's owner and ignores
//!   a refusal. Running as the host user, files are the host user's (qemu's own uid); running as
//!   root, they get the guest uid, which vmoat makes equal to the host user's. `passthrough`
//!   would fail guest writes whenever qemu may not chown, and `mapped-*` stores owners in
//!   xattrs, leaving host files owned by qemu with mode 0600.
//! - virtiofs needs guest RAM in a shared memfd (`memory-backend-memfd,share=on`) so
//!   virtiofsd can map it, and one `vhost-user-fs-pci` per mount.

use std::path::{Path, PathBuf};

use vmoat_driver::{Accel, Arch, Boot, MountType, VmSpec};

use crate::files::InstanceFiles;

/// The slirp network Lima uses; the guest gets 192.168.5.15, the gateway is .2, DNS .3.
const USER_NET: &str = "net=192.168.5.0/24,dhcpstart=192.168.5.15";

/// The on-disk format of the VM disk, passed explicitly so qemu never probes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// A qcow2 image (vmoat's overlays).
    Qcow2,
    /// A raw image (Lima ≥ 2.1's `disk`, for instances made by Lima).
    Raw,
}

impl DiskFormat {
    /// qemu's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// What the driver resolved about this host for one VM: everything [`argv`] needs beyond the
/// spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuHost {
    /// The `qemu-system-<arch>` binary.
    pub qemu: PathBuf,
    /// The accelerator.
    pub accel: Accel,
    /// The UEFI code file, for [`Boot::Firmware`] (the spec's pinned file, else the one found
    /// on the host). The variable store is the spec's `vars`.
    pub firmware_code: Option<PathBuf>,
    /// The format of the spec's disk.
    pub disk_format: DiskFormat,
}

/// The full command line (the binary first) that starts the VM of `spec` on `host`.
///
/// Sockets, the pid file and virtiofsd sockets live in the spec's instance directory under
/// the names of [`InstanceFiles`]. Paths must be UTF-8 (the driver checks before calling);
/// commas in them are doubled, as qemu's option syntax requires.
pub fn argv(spec: &VmSpec, host: &QemuHost) -> Vec<String> {
    let files = InstanceFiles::new(&spec.instance_dir);
    let mut a = Args::default();

    a.push(path(&host.qemu));
    a.pair("-name", format!("lima-{}", opt(&spec.instance)));

    machine(&mut a, spec, host);
    memory_and_cpus(&mut a, spec);
    a.flag("-nodefaults");
    a.flag("-no-user-config");
    a.pair("-display", "none");
    a.pair("-msg", "timestamp=on");

    boot(&mut a, spec, host);
    disks(&mut a, spec, host);
    network(&mut a, spec);
    a.pair("-device", "virtio-rng-pci");
    consoles(&mut a, spec, &files);
    mounts(&mut a, spec, &files);

    a.pair("-chardev", chardev_server("char-qmp", &files.qmp_sock()));
    a.pair("-qmp", "chardev:char-qmp");
    a.pair("-pidfile", path(&files.qemu_pid()));

    a.0
}

/// The serial console device the guest kernel should write to (`console=<this>`).
pub fn serial_console(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn push(&mut self, arg: impl Into<String>) {
        self.0.push(arg.into());
    }

    fn flag(&mut self, flag: &str) {
        self.0.push(flag.to_owned());
    }

    fn pair(&mut self, flag: &str, value: impl Into<String>) {
        self.0.push(flag.to_owned());
        self.0.push(value.into());
    }
}

fn machine(a: &mut Args, spec: &VmSpec, host: &QemuHost) {
    match spec.arch {
        // vmport is a VMware backdoor port nothing in the guest uses.
        Arch::X86_64 => a.pair("-machine", "q35,vmport=off"),
        // GICv3 where available: GICv2 caps the VM at 8 CPUs.
        Arch::Aarch64 => a.pair("-machine", "virt,gic-version=max"),
    }

    match host.accel {
        Accel::Tcg => a.pair("-accel", "tcg,thread=multi,tb-size=256"),
        Accel::Kvm => a.pair("-accel", "kvm"),
        Accel::Hvf => a.pair("-accel", "hvf"),
    }

    let cpu = match host.accel {
        Accel::Kvm | Accel::Hvf => "host",
        Accel::Tcg => "max",
    };
    a.pair("-cpu", cpu);

    if spec.arch == Arch::X86_64 {
        // No ACPI suspend: a suspended VM looks hung to the agent and wakes on nothing.
        a.pair("-global", "ICH9-LPC.disable_s3=1");
        a.pair("-global", "ICH9-LPC.disable_s4=1");
    }
}

fn memory_and_cpus(a: &mut Args, spec: &VmSpec) {
    let cpus = spec.cpus;
    a.pair("-smp", format!("{cpus},sockets=1,cores={cpus},threads=1"));
    a.pair("-m", spec.memory_mib.to_string());

    if spec.mount_type == MountType::Virtiofs && !spec.mounts.is_empty() {
        let size = spec.memory_mib;
        a.pair(
            "-object",
            format!("memory-backend-memfd,id=mem0,size={size}M,share=on"),
        );
        a.pair("-numa", "node,memdev=mem0");
    }
}

fn boot(a: &mut Args, spec: &VmSpec, host: &QemuHost) {
    match &spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            a.pair("-kernel", path(kernel));
            if let Some(initrd) = initrd {
                a.pair("-initrd", path(initrd));
            }
            a.pair("-append", cmdline);
        }
        Boot::Firmware { code, vars } => {
            // The driver resolves the code file before building argv; the spec's pin wins.
            let code = code.as_ref().or(host.firmware_code.as_ref());
            if let Some(code) = code {
                a.pair(
                    "-drive",
                    format!(
                        "if=pflash,unit=0,format=raw,readonly=on,file={}",
                        opt_path(code)
                    ),
                );
            }
            a.pair(
                "-drive",
                format!("if=pflash,unit=1,format=raw,file={}", opt_path(vars)),
            );
        }
    }
}

fn disks(a: &mut Args, spec: &VmSpec, host: &QemuHost) {
    let format = host.disk_format.as_str();
    a.pair(
        "-drive",
        format!(
            "file={},if=none,id=disk0,format={format},discard=unmap",
            opt_path(&spec.disk)
        ),
    );
    a.pair("-device", "virtio-blk-pci,drive=disk0,bootindex=1");

    // The seed as a cdrom on virtio-scsi, the usual NoCloud layout and Lima's.
    a.pair(
        "-drive",
        format!(
            "file={},if=none,id=cidata0,format=raw,readonly=on,media=cdrom",
            opt_path(&spec.cidata)
        ),
    );
    a.pair("-device", "virtio-scsi-pci,id=scsi0");
    a.pair("-device", "scsi-cd,bus=scsi0.0,drive=cidata0");
}

fn network(a: &mut Args, spec: &VmSpec) {
    let port = spec.network.ssh_host_port;
    let mut netdev = format!("user,id=net0,{USER_NET},hostfwd=tcp:127.0.0.1:{port}-:22");
    if spec.network.restricted {
        // The guest reaches nothing outside; DHCP and vmoat's forwards still work.
        netdev.push_str(",restrict=on");
    }
    a.pair("-netdev", netdev);
    a.pair(
        "-device",
        format!("virtio-net-pci,netdev=net0,mac={}", opt(&spec.network.mac)),
    );
}

fn consoles(a: &mut Args, spec: &VmSpec, files: &InstanceFiles) {
    let serial = format!(
        "{},logfile={}",
        chardev_server("char-serial", &files.serial_sock()),
        opt_path(&spec.serial_log)
    );
    a.pair("-chardev", serial);
    a.pair("-serial", "chardev:char-serial");

    // The qemu guest agent's port: cheap, and answers `guest-ping` once the guest is up.
    a.pair("-device", "virtio-serial-pci,id=vserial0");
    a.pair("-chardev", chardev_server("char-ga", &files.ga_sock()));
    a.pair(
        "-device",
        "virtserialport,bus=vserial0.0,chardev=char-ga,name=org.qemu.guest_agent.0",
    );
}

fn mounts(a: &mut Args, spec: &VmSpec, files: &InstanceFiles) {
    for (i, mount) in spec.mounts.iter().enumerate() {
        match spec.mount_type {
            MountType::NineP => {
                let mut virtfs = format!(
                    "local,id=fs{i},mount_tag={},path={},security_model=none",
                    opt(&mount.tag),
                    opt_path(&mount.host_path)
                );
                if !mount.writable {
                    virtfs.push_str(",readonly=on");
                }
                a.pair("-virtfs", virtfs);
            }
            MountType::Virtiofs => {
                let id = format!("char-virtiofs-{i}");
                a.pair(
                    "-chardev",
                    format!("socket,id={id},path={}", opt_path(&files.virtiofsd_sock(i))),
                );
                a.pair(
                    "-device",
                    format!(
                        "vhost-user-fs-pci,queue-size=1024,chardev={id},tag={}",
                        opt(&mount.tag)
                    ),
                );
            }
        }
    }
}

fn chardev_server(id: &str, socket: &Path) -> String {
    format!(
        "socket,id={id},path={},server=on,wait=off",
        opt_path(socket)
    )
}

/// A path as a plain argument (`-kernel`, the binary).
fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A path inside a `key=value,…` option: commas doubled.
pub(crate) fn opt_path(p: &Path) -> String {
    opt(&p.to_string_lossy())
}

/// A value inside a `key=value,…` option: commas doubled.
fn opt(value: &str) -> String {
    value.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_are_doubled_in_options() {
        assert_eq!(opt_path(Path::new("/a,b/c")), "/a,,b/c");
    }

    #[test]
    fn consoles_per_arch() {
        assert_eq!(serial_console(Arch::X86_64), "ttyS0");
        assert_eq!(serial_console(Arch::Aarch64), "ttyAMA0");
    }
}
