//! A firmware-bootable (UEFI) copy of vmoat's Debian image, for the direct-vs-firmware figure.
//!
//! vmoat's image is a whole-disk ext4 with no bootloader, booted by handing qemu its kernel.
//! This makes the disk a UEFI firmware (OVMF) can boot with the same kernel, initrd and command
//! line (measurements.md §8): a GPT disk whose first partition is a FAT EFI system partition
//! holding a unified kernel image (systemd's EFI stub with the kernel, initrd and command line
//! as PE sections) at the removable-media path `EFI/BOOT/BOOTX64.EFI`, and whose second
//! partition is the image's ext4 root, copied unchanged (`root=LABEL=vmoat-root` still finds
//! it). The disk sits alone in its directory, so `VM_IMAGE=<it>` finds no kernel beside it
//! and vmoat boots it through firmware.
//!
//! Host tools: objcopy and objdump (binutils), mkfs.vfat (dosfstools), mmd and mcopy (mtools),
//! sfdisk (fdisk), qemu-img, and the stub from systemd-boot-efi.

use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vmoat_benches::output_of;

/// systemd's UEFI stub for x86_64 (Debian's systemd-boot-efi).
const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// GPT type of an EFI system partition.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

/// GPT type of a Linux file system.
const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

const MIB: u64 = 1 << 20;

/// The tools the build runs.
const TOOLS: [(&str, &str); 7] = [
    ("objcopy", "binutils"),
    ("objdump", "binutils"),
    ("mkfs.vfat", "dosfstools"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
    ("sfdisk", "fdisk"),
    ("qemu-img", "qemu-utils"),
];

/// Why the firmware variant cannot be built on this host, if it cannot.
pub fn unavailable() -> Option<String> {
    if !cfg!(target_arch = "x86_64") {
        return Some("the firmware variant is built for x86_64 hosts only".into());
    }
    let mut packages: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| find_on_path(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    if !Path::new(STUB).is_file() {
        packages.push("systemd-boot-efi");
    }
    packages.dedup();
    (!packages.is_empty()).then(|| {
        format!(
            "missing host tools; apt-get install --no-install-recommends {}",
            packages.join(" ")
        )
    })
}

/// What the firmware disk is made from: the files of a VM vmoat made for direct boot.
pub struct Parts {
    /// The base disk (the image's whole-disk ext4, any format qemu-img reads).
    pub base: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
}

/// Builds `<dir>/fw.raw` from `parts` and returns its path; the work files are removed.
pub fn build(dir: &Path, parts: &Parts) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let work = dir.join("work");
    fs::create_dir_all(&work)?;

    let uki = work.join("uki.efi");
    unified_kernel_image(&work, parts, &uki)?;

    let uki_size = fs::metadata(&uki)?.len();
    let esp_size = round_up(uki_size + 8 * MIB, 16 * MIB).max(64 * MIB);
    let esp = work.join("esp.img");
    esp_image(&esp, esp_size, &uki)?;

    let root_size = virtual_size(&parts.base)?;
    let disk = dir.join("fw.raw");
    let esp_start = MIB;
    let root_start = esp_start + esp_size;
    let total = root_start + root_size + MIB;
    fs::File::create(&disk)?.set_len(total)?;
    partition(&disk, esp_start, esp_size, root_start, root_size)?;
    copy_into(&esp, &disk, esp_start)?;

    // The ext4 is written straight into its partition: qemu's raw driver takes an offset.
    let target = format!(
        "driver=raw,offset={root_start},size={root_size},file.filename={}",
        disk.to_string_lossy().replace(',', ",,")
    );
    output_of(
        Command::new(tool("qemu-img"))
            .args(["convert", "-n"])
            .arg(&parts.base)
            .args(["--target-image-opts", &target]),
    )?;

    fs::remove_dir_all(&work)?;
    Ok(disk)
}

/// systemd's stub with `.osrel`, `.cmdline`, `.initrd` and `.linux` added after its last
/// section, page-aligned, the kernel last (it may use the memory after its own image).
fn unified_kernel_image(work: &Path, parts: &Parts, out: &Path) -> io::Result<()> {
    let osrel = work.join("os-release");
    fs::write(&osrel, "NAME=\"vmoat bench\"\nID=vmoat-bench\n")?;
    let cmdline = work.join("cmdline");
    fs::write(&cmdline, parts.cmdline.trim())?;

    let listing = output_of(Command::new(tool("objdump")).args(["-h", STUB]))?;
    let mut next = round_up(sections_end(&listing)?, 4096);
    let mut command = Command::new(tool("objcopy"));
    for (name, file) in [
        (".osrel", &osrel),
        (".cmdline", &cmdline),
        (".initrd", &parts.initrd),
        (".linux", &parts.kernel),
    ] {
        command
            .arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}=0x{next:x}"));
        next = round_up(next + fs::metadata(file)?.len(), 4096);
    }
    output_of(command.arg(STUB).arg(out)).map(drop)
}

/// The end (address + size) of the last section in an `objdump -h` listing.
fn sections_end(listing: &str) -> io::Result<u64> {
    let mut end = None;
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "Idx Name Size VMA LMA File-off Algn", Idx a number.
        if fields.len() < 4 || fields[0].parse::<u32>().is_err() {
            continue;
        }
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        if let (Some(size), Some(vma)) = (hex(fields[2]), hex(fields[3])) {
            end = end.max(Some(vma + size));
        }
    }
    end.ok_or_else(|| io::Error::other(format!("no sections in objdump -h {STUB}")))
}

/// A FAT image of `size` bytes with `uki` at `EFI/BOOT/BOOTX64.EFI`.
fn esp_image(esp: &Path, size: u64, uki: &Path) -> io::Result<()> {
    output_of(
        Command::new(tool("mkfs.vfat"))
            .args(["-C", "-n", "VMOATESP"])
            .arg(esp)
            .arg((size / 1024).to_string()),
    )?;
    let image = esp.as_os_str();
    output_of(
        Command::new(tool("mmd"))
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(image)
            .args(["::EFI", "::EFI/BOOT"]),
    )?;
    output_of(
        Command::new(tool("mcopy"))
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(image)
            .arg(uki)
            .arg("::EFI/BOOT/BOOTX64.EFI"),
    )
    .map(drop)
}

/// A GPT with the ESP and the root partition, by sfdisk.
fn partition(
    disk: &Path,
    esp_start: u64,
    esp_size: u64,
    root_start: u64,
    root_size: u64,
) -> io::Result<()> {
    let sector = |bytes: u64| bytes / 512;
    let script = format!(
        "label: gpt\nstart={}, size={}, type={ESP_TYPE}, name=esp\n\
         start={}, size={}, type={LINUX_TYPE}, name=root\n",
        sector(esp_start),
        sector(esp_size),
        sector(root_start),
        sector(root_size)
    );
    let mut child = Command::new(tool("sfdisk"))
        .arg("-q")
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("sfdisk has no stdin"))?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "sfdisk {}: {}: {}",
            disk.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Copies all of `from` into `to` at byte `offset`.
fn copy_into(from: &Path, to: &Path, offset: u64) -> io::Result<()> {
    let mut source = fs::File::open(from)?;
    let mut target = fs::OpenOptions::new().write(true).open(to)?;
    target.seek(SeekFrom::Start(offset))?;
    io::copy(&mut source, &mut target)?;
    target.sync_all()
}

/// A disk's size as the guest sees it.
fn virtual_size(disk: &Path) -> io::Result<u64> {
    let info = output_of(
        Command::new(tool("qemu-img"))
            .args(["info", "--output=json"])
            .arg(disk),
    )?;
    serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| v.get("virtual-size")?.as_u64())
        .ok_or_else(|| io::Error::other(format!("no virtual-size for {}", disk.display())))
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

/// A tool's path (sbin directories included, which a user's PATH may lack), else its name.
fn tool(name: &str) -> PathBuf {
    find_on_path(name).unwrap_or_else(|| PathBuf::from(name))
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_of_the_last_section() {
        let listing = "\nfile.stub:     file format pei-x86-64\n\nSections:\n\
            Idx Name          Size      VMA               LMA               File off  Algn\n\
              0 .text         0000bff0  0000000000004000  0000000000004000  00000400  2**4\n\
                              CONTENTS, ALLOC, LOAD, READONLY, CODE\n\
              7 .sdmagic      00000034  0000000000019100  0000000000019100  00011200  2**2\n";
        assert_eq!(sections_end(listing).unwrap(), 0x19134);
        assert!(sections_end("no table").is_err());
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(0x19134, 4096), 0x1a000);
        assert_eq!(round_up(4096, 4096), 4096);
    }
}
