//! Golden tests of qemu's command line: one argument per line in `tests/golden/*.args`.
//!
//! A change to `argv` shows up here as a diff to review. After checking it, regenerate the
//! files with `VMOAT_BLESS=1 cargo test -p vmoat-qemu --test argv_golden`.

use std::path::{Path, PathBuf};

use vmoat_driver::{Accel, Arch, Boot, Mount, MountType, Network, VmSpec};
use vmoat_qemu::{DiskFormat, QemuHost, argv};

const DIR: &str = "/home/alice/.colima/_lima/colima-wt-demo";

fn spec(arch: Arch, boot: Boot, mount_type: MountType, restricted: bool) -> VmSpec {
    let dir = PathBuf::from(DIR);
    VmSpec {
        instance: "colima-wt-demo".into(),
        instance_dir: dir.clone(),
        arch,
        cpus: 4,
        memory_mib: 8192,
        disk: dir.join("diffdisk"),
        cidata: dir.join("cidata.iso"),
        boot,
        mounts: vec![
            Mount {
                host_path: "/home/alice".into(),
                guest_path: "/home/alice".into(),
                tag: "lima-4f6a0f2c1d1e0a9b".into(),
                writable: true,
            },
            Mount {
                // A comma in a path must be doubled inside qemu's option syntax.
                host_path: "/srv/ref,data".into(),
                guest_path: "/srv/ref,data".into(),
                tag: "lima-0011223344556677".into(),
                writable: false,
            },
        ],
        mount_type,
        network: Network {
            restricted,
            ssh_host_port: 60022,
            mac: "52:55:55:12:34:56".into(),
        },
        serial_log: dir.join("serial.log"),
    }
}

fn kernel_boot(console: &str) -> Boot {
    Boot::Kernel {
        kernel: format!("{DIR}/kernel").into(),
        initrd: Some(format!("{DIR}/initrd").into()),
        cmdline: format!("root=LABEL=vmoat-root rw console={console}"),
    }
}

fn firmware_boot() -> Boot {
    Boot::Firmware {
        code: None,
        vars: format!("{DIR}/qemu-efi-vars.fd").into(),
    }
}

fn check(name: &str, args: Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.args"));
    let actual = args.join("\n") + "\n";

    if std::env::var_os("VMOAT_BLESS").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (VMOAT_BLESS=1 writes it)", path.display()));
    if expected != actual {
        let diff: Vec<String> = diff_lines(&expected, &actual);
        panic!(
            "{name}: argv changed (VMOAT_BLESS=1 accepts it):\n{}",
            diff.join("\n")
        );
    }
}

/// A plain line diff: enough to see which argument moved or changed.
fn diff_lines(expected: &str, actual: &str) -> Vec<String> {
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    let mut out = Vec::new();
    for i in 0..e.len().max(a.len()) {
        match (e.get(i), a.get(i)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => out.push(format!(
                "{i}: - {}\n{i}: + {}",
                x.unwrap_or(&""),
                y.unwrap_or(&"")
            )),
        }
    }
    out
}

#[test]
fn x86_64_tcg_9p_kernel_boot_restricted() {
    let host = QemuHost {
        qemu: "/usr/bin/qemu-system-x86_64".into(),
        accel: Accel::Tcg,
        firmware_code: None,
        disk_format: DiskFormat::Qcow2,
    };
    let spec = spec(Arch::X86_64, kernel_boot("ttyS0"), MountType::NineP, true);
    check("x86_64-tcg-9p", argv(&spec, &host));
}

#[test]
fn x86_64_kvm_virtiofs_firmware_boot() {
    let host = QemuHost {
        qemu: "/usr/bin/qemu-system-x86_64".into(),
        accel: Accel::Kvm,
        firmware_code: Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into()),
        disk_format: DiskFormat::Qcow2,
    };
    let spec = spec(Arch::X86_64, firmware_boot(), MountType::Virtiofs, false);
    check("x86_64-kvm-virtiofs", argv(&spec, &host));
}

#[test]
fn aarch64_tcg_firmware_boot() {
    let host = QemuHost {
        qemu: "/usr/bin/qemu-system-aarch64".into(),
        accel: Accel::Tcg,
        firmware_code: Some("/usr/share/AAVMF/AAVMF_CODE.fd".into()),
        disk_format: DiskFormat::Raw,
    };
    let spec = spec(Arch::Aarch64, firmware_boot(), MountType::NineP, true);
    check("aarch64-tcg-firmware", argv(&spec, &host));
}

#[test]
fn aarch64_hvf_kernel_boot() {
    let host = QemuHost {
        qemu: "/opt/homebrew/bin/qemu-system-aarch64".into(),
        accel: Accel::Hvf,
        firmware_code: None,
        disk_format: DiskFormat::Qcow2,
    };
    let spec = spec(
        Arch::Aarch64,
        kernel_boot("ttyAMA0"),
        MountType::NineP,
        false,
    );
    check("aarch64-hvf-kernel", argv(&spec, &host));
}

#[test]
fn a_pinned_firmware_wins_over_the_found_one() {
    let host = QemuHost {
        qemu: "/usr/bin/qemu-system-x86_64".into(),
        accel: Accel::Tcg,
        firmware_code: Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into()),
        disk_format: DiskFormat::Qcow2,
    };
    let boot = Boot::Firmware {
        code: Some("/opt/fw/CODE.fd".into()),
        vars: format!("{DIR}/qemu-efi-vars.fd").into(),
    };
    let args = argv(&spec(Arch::X86_64, boot, MountType::NineP, false), &host);
    assert!(args.contains(&"if=pflash,unit=0,format=raw,readonly=on,file=/opt/fw/CODE.fd".into()));
    assert!(!args.iter().any(|a| a.contains("OVMF")));
}
