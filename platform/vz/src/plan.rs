//! Checks a [`VmSpec`] against what vz can do and turns it into a [`VmPlan`]: the exact VM the
//! macOS code builds, with every file checked and every value normalised. Doing this apart
//! from Objective-C keeps the checks testable anywhere and leaves the macOS code a plain
//! translation.

use std::fs;
use std::path::{Path, PathBuf};

use vmoat_driver::{Arch, Boot, DriverError, MountType, VmSpec};

use crate::disk::{ImageFormat, probe};
use crate::leases::parse_mac;
use crate::{MACHINE_IDENTIFIER_FILE, PLATFORM, UNCOMPRESSED_KERNEL_FILE};

/// The longest virtiofs tag vz accepts, in bytes.
pub const MAX_TAG_BYTES: usize = 36;

/// The console the Linux boot loader's command line must name for `serialv.log` to get the
/// kernel's output: vz's serial port is a virtio console.
pub const CONSOLE: &str = "console=hvc0";

/// How the VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootPlan {
    /// `VZLinuxBootLoader`.
    Linux {
        /// The kernel as given (the macOS code decompresses it for arm64 into `scratch`).
        kernel: PathBuf,
        /// Where an uncompressed copy goes when needed.
        scratch: PathBuf,
        /// The initrd.
        initrd: Option<PathBuf>,
        /// The command line, with the console added when missing.
        cmdline: String,
    },
    /// `VZEFIBootLoader` with a variable store.
    Efi {
        /// The variable store; created when absent.
        vars: PathBuf,
    },
}

/// One virtiofs share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharePlan {
    /// The tag the guest mounts.
    pub tag: String,
    /// The host directory.
    pub host_path: PathBuf,
    /// Whether the guest may only read.
    pub read_only: bool,
}

/// The VM the macOS code builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan {
    /// For messages and the dispatch queue's label.
    pub instance: String,
    /// Guest architecture (the host's).
    pub arch: Arch,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// How it boots.
    pub boot: BootPlan,
    /// The machine identifier file (`vz-identifier`), created when absent.
    pub identifier: PathBuf,
    /// The raw root disk.
    pub disk: PathBuf,
    /// The NoCloud seed, attached read-only.
    pub cidata: PathBuf,
    /// virtiofs shares.
    pub shares: Vec<SharePlan>,
    /// The NAT NIC's MAC, as vz spells it; `None` for restricted networking (no NIC at all,
    /// so the guest reaches nothing and is reached only over vsock).
    pub mac: Option<String>,
    /// The host port the SSH proxy listens on (127.0.0.1).
    pub ssh_host_port: u16,
    /// The serial console log, truncated at each start.
    pub serial_log: PathBuf,
}

/// Validates `spec` for vz.
pub fn plan(spec: &VmSpec) -> Result<VmPlan, DriverError> {
    let refuse = |detail: String| DriverError::StartFailed {
        platform: PLATFORM,
        detail,
    };

    if spec.arch != Arch::host() {
        return Err(refuse(format!(
            "vz runs only {} guests on this Mac, but {} asks for {}; \
             use the {} image",
            Arch::host(),
            spec.instance,
            spec.arch,
            Arch::host().debian_name()
        )));
    }

    if spec.cpus == 0 {
        return Err(refuse("VM_CPU must be at least 1".into()));
    }
    let memory_bytes = spec
        .memory_mib
        .checked_mul(1 << 20)
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| {
            refuse(format!(
                "VM_MEMORY of {} MiB is not usable",
                spec.memory_mib
            ))
        })?;

    let boot = boot_plan(spec)?;

    require_file(&spec.disk, "opening disk")?;
    if let (ImageFormat::Qcow2, _) = probe(&spec.disk)? {
        return Err(refuse(format!(
            "disk {} is qcow2, which vz cannot read; it was made for qemu: \
             run `vmoat destroy` and `vmoat up` to make a raw one",
            spec.disk.display()
        )));
    }
    require_file(&spec.cidata, "opening cidata volume")?;

    let shares = share_plans(spec)?;

    let mac = if spec.network.restricted {
        None
    } else {
        let bytes = parse_mac(&spec.network.mac)
            .filter(|mac| mac[0] & 1 == 0)
            .ok_or_else(|| {
                refuse(format!(
                    "MAC address {:?} is not a unicast address like 52:55:55:12:34:56",
                    spec.network.mac
                ))
            })?;
        Some(format_mac(&bytes))
    };

    if spec.network.ssh_host_port == 0 {
        return Err(refuse(
            "the SSH host port must be chosen before start (got 0)".into(),
        ));
    }

    Ok(VmPlan {
        instance: spec.instance.clone(),
        arch: spec.arch,
        cpus: spec.cpus,
        memory_bytes,
        boot,
        identifier: spec.instance_dir.join(MACHINE_IDENTIFIER_FILE),
        disk: spec.disk.clone(),
        cidata: spec.cidata.clone(),
        shares,
        mac,
        ssh_host_port: spec.network.ssh_host_port,
        serial_log: spec.serial_log.clone(),
    })
}

/// Kernel or EFI boot.
fn boot_plan(spec: &VmSpec) -> Result<BootPlan, DriverError> {
    match &spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            require_file(kernel, "opening kernel")?;
            if let Some(initrd) = initrd {
                require_file(initrd, "opening initrd")?;
            }

            Ok(BootPlan::Linux {
                kernel: kernel.clone(),
                scratch: spec.instance_dir.join(UNCOMPRESSED_KERNEL_FILE),
                initrd: initrd.clone(),
                cmdline: with_console(cmdline),
            })
        }
        Boot::Firmware { code, vars } => {
            if let Some(code) = code {
                // vz carries its own UEFI firmware; a pinned qemu firmware file means nothing.
                tracing::warn!(
                    firmware = %code.display(),
                    "vz uses its built-in UEFI firmware; the pinned firmware file is ignored"
                );
            }
            Ok(BootPlan::Efi { vars: vars.clone() })
        }
    }
}

/// The virtiofs shares, or why vz cannot share the mounts as asked.
fn share_plans(spec: &VmSpec) -> Result<Vec<SharePlan>, DriverError> {
    let refuse = |detail: String| DriverError::StartFailed {
        platform: PLATFORM,
        detail,
    };

    if !spec.mounts.is_empty() && spec.mount_type != MountType::Virtiofs {
        return Err(refuse(format!(
            "vz shares directories only with virtiofs, not {}; set MOUNT_TYPE=virtiofs",
            spec.mount_type
        )));
    }

    let mut shares: Vec<SharePlan> = Vec::with_capacity(spec.mounts.len());
    for mount in &spec.mounts {
        if mount.tag.is_empty() || mount.tag.len() > MAX_TAG_BYTES {
            return Err(refuse(format!(
                "mount tag {:?} for {} must be 1 to {MAX_TAG_BYTES} bytes",
                mount.tag,
                mount.host_path.display()
            )));
        }
        if shares.iter().any(|s| s.tag == mount.tag) {
            return Err(refuse(format!("mount tag {:?} is used twice", mount.tag)));
        }

        let is_dir = fs::metadata(&mount.host_path).map(|m| m.is_dir());
        if !matches!(is_dir, Ok(true)) {
            return Err(refuse(format!(
                "shared directory {} does not exist or is not a directory; check VM_MOUNT",
                mount.host_path.display()
            )));
        }

        shares.push(SharePlan {
            tag: mount.tag.clone(),
            host_path: mount.host_path.clone(),
            read_only: !mount.writable,
        });
    }

    Ok(shares)
}

/// `cmdline` with [`CONSOLE`] appended unless some `console=hvc…` is already there.
pub fn with_console(cmdline: &str) -> String {
    let has_virtio_console = cmdline
        .split_whitespace()
        .any(|arg| arg.starts_with("console=hvc"));

    if has_virtio_console {
        cmdline.trim().to_owned()
    } else if cmdline.trim().is_empty() {
        CONSOLE.to_owned()
    } else {
        format!("{} {CONSOLE}", cmdline.trim())
    }
}

/// A MAC as `52:55:55:0a:0b:0c`.
fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A file the VM needs must exist before vz is asked to open it; `action` names the failure
/// (`opening kernel`).
fn require_file(path: &Path, action: &'static str) -> Result<(), DriverError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(DriverError::StartFailed {
            platform: PLATFORM,
            detail: format!("{} is not a regular file", path.display()),
        }),
        Err(source) => Err(DriverError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use vmoat_driver::{Mount, Network};

    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        spec: VmSpec,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let instance_dir = root.join("colima-wt-x");
        let share = root.join("home");
        fs::create_dir_all(&instance_dir).unwrap();
        fs::create_dir_all(&share).unwrap();
        fs::write(instance_dir.join("diffdisk"), vec![0u8; 4096]).unwrap();
        fs::write(instance_dir.join("cidata.iso"), b"iso").unwrap();
        fs::write(root.join("kernel"), b"kernel").unwrap();
        fs::write(root.join("initrd"), b"initrd").unwrap();

        let spec = VmSpec {
            instance: "colima-wt-x".into(),
            instance_dir: instance_dir.clone(),
            arch: Arch::host(),
            cpus: 4,
            memory_mib: 8192,
            disk: instance_dir.join("diffdisk"),
            cidata: instance_dir.join("cidata.iso"),
            boot: Boot::Kernel {
                kernel: root.join("kernel"),
                initrd: Some(root.join("initrd")),
                cmdline: "root=LABEL=root ro console=ttyS0".into(),
            },
            mounts: vec![Mount {
                host_path: share.clone(),
                guest_path: share,
                tag: "lima-0123456789abcdef".into(),
                writable: true,
            }],
            mount_type: MountType::Virtiofs,
            network: Network {
                restricted: false,
                ssh_host_port: 60022,
                mac: "52:55:55:A:b:0c".into(),
            },
            serial_log: instance_dir.join("serialv.log"),
        };
        Fixture { dir, spec }
    }

    fn detail(err: DriverError) -> String {
        match err {
            DriverError::StartFailed { detail, .. } => detail,
            other => panic!("expected StartFailed, got {other}"),
        }
    }

    #[test]
    fn a_good_spec_becomes_a_plan() {
        let f = fixture();
        let plan = plan(&f.spec).unwrap();

        assert_eq!(plan.memory_bytes, 8 << 30);
        assert_eq!(plan.mac.as_deref(), Some("52:55:55:0a:0b:0c"));
        assert_eq!(plan.identifier, f.spec.instance_dir.join("vz-identifier"));
        assert_eq!(plan.shares.len(), 1);
        assert!(!plan.shares[0].read_only);
        match plan.boot {
            BootPlan::Linux {
                cmdline, scratch, ..
            } => {
                assert_eq!(cmdline, "root=LABEL=root ro console=ttyS0 console=hvc0");
                assert_eq!(scratch, f.spec.instance_dir.join("vmoat-vz-kernel"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn console_is_added_once() {
        assert_eq!(with_console(""), "console=hvc0");
        assert_eq!(with_console("quiet console=hvc0"), "quiet console=hvc0");
        assert_eq!(with_console("console=hvc1 quiet"), "console=hvc1 quiet");
        assert_eq!(with_console(" ro "), "ro console=hvc0");
    }

    #[test]
    fn firmware_boot_uses_the_given_store() {
        let mut f = fixture();
        let vars = f.spec.instance_dir.join("vz-efi");
        f.spec.boot = Boot::Firmware {
            code: Some(PathBuf::from("/usr/share/OVMF/OVMF_CODE.fd")),
            vars: vars.clone(),
        };

        assert_eq!(plan(&f.spec).unwrap().boot, BootPlan::Efi { vars });
    }

    #[test]
    fn restricted_network_has_no_nic() {
        let mut f = fixture();
        f.spec.network.restricted = true;
        f.spec.network.mac = "garbage".into();

        assert_eq!(plan(&f.spec).unwrap().mac, None);
    }

    #[test]
    fn foreign_arch_is_refused() {
        let mut f = fixture();
        f.spec.arch = match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };

        let text = detail(plan(&f.spec).unwrap_err());
        assert!(text.contains("vz runs only"), "{text}");
        // The way out is an image of the Mac's own arch, not qemu (refused on macOS).
        assert!(text.contains(Arch::host().debian_name()), "{text}");
        assert!(!text.contains("VM_TYPE=qemu"), "{text}");
    }

    #[test]
    fn nine_p_is_refused_with_the_fix() {
        let mut f = fixture();
        f.spec.mount_type = MountType::NineP;

        let text = detail(plan(&f.spec).unwrap_err());
        assert!(text.contains("MOUNT_TYPE=virtiofs"), "{text}");

        // Without mounts the mount type does not matter.
        f.spec.mounts.clear();
        assert!(plan(&f.spec).is_ok());
    }

    #[test]
    fn bad_tags_are_refused() {
        let mut f = fixture();
        f.spec.mounts[0].tag = "x".repeat(MAX_TAG_BYTES + 1);
        assert!(detail(plan(&f.spec).unwrap_err()).contains("1 to 36 bytes"));

        let mut f = fixture();
        let again = f.spec.mounts[0].clone();
        f.spec.mounts.push(again);
        assert!(detail(plan(&f.spec).unwrap_err()).contains("used twice"));
    }

    #[test]
    fn missing_share_is_named() {
        let mut f = fixture();
        f.spec.mounts[0].host_path = f.dir.path().join("gone");

        let text = detail(plan(&f.spec).unwrap_err());
        assert!(text.contains("gone") && text.contains("VM_MOUNT"), "{text}");
    }

    #[test]
    fn bad_mac_is_refused() {
        for mac in ["52:55:55:0a:0b", "53:55:55:00:00:01", "zz:55:55:00:00:01"] {
            let mut f = fixture();
            f.spec.network.mac = mac.into();
            assert!(detail(plan(&f.spec).unwrap_err()).contains(mac), "{mac}");
        }
    }

    #[test]
    fn missing_files_are_named() {
        let f = fixture();
        fs::remove_file(&f.spec.cidata).unwrap();
        let err = plan(&f.spec).unwrap_err();
        assert!(err.to_string().contains("cidata.iso"), "{err}");

        let f = fixture();
        if let Boot::Kernel { kernel, .. } = &f.spec.boot {
            fs::remove_file(kernel).unwrap();
        }
        let err = plan(&f.spec).unwrap_err();
        assert!(err.to_string().starts_with("opening kernel"), "{err}");
    }

    #[test]
    fn qcow2_disk_is_refused() {
        let f = fixture();
        let mut header = b"QFI\xfb".to_vec();
        header.resize(32, 0);
        fs::write(&f.spec.disk, header).unwrap();

        let text = detail(plan(&f.spec).unwrap_err());
        assert!(
            text.contains("qcow2") && text.contains("vmoat destroy"),
            "{text}"
        );
    }

    #[test]
    fn zero_sizes_are_refused() {
        let mut f = fixture();
        f.spec.cpus = 0;
        assert!(detail(plan(&f.spec).unwrap_err()).contains("VM_CPU"));

        let mut f = fixture();
        f.spec.memory_mib = 0;
        assert!(detail(plan(&f.spec).unwrap_err()).contains("VM_MEMORY"));

        let mut f = fixture();
        f.spec.network.ssh_host_port = 0;
        assert!(detail(plan(&f.spec).unwrap_err()).contains("SSH host port"));
    }
}
