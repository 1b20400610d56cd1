//! The VM disk: a qcow2 overlay on the shared, read-only base image, made with `qemu-img`.
//!
//! The overlay is created under a temporary name and renamed into place, so a failed or
//! interrupted create never leaves a half-made disk where the next start would take it for
//! the VM's. The base is only ever read.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use vmoat_driver::{DiskRequest, DriverError};

use crate::argv::DiskFormat;

/// The part of `qemu-img info --output=json` vmoat reads.
#[derive(Debug, Deserialize)]
pub(crate) struct ImageInfo {
    /// The image format (`qcow2`, `raw`, …).
    pub format: String,
    /// The size the guest sees, in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

/// Reads an image's format and virtual size. `--force-share` because the base is open in
/// running VMs, which hold qemu's shared read lock on it.
pub(crate) fn info(qemu_img: &Path, image: &Path) -> Result<ImageInfo, DriverError> {
    let out = run(Command::new(qemu_img)
        .args(["info", "--force-share", "--output=json"])
        .arg(image))?;
    serde_json::from_slice(&out).map_err(|e| DriverError::Tool {
        tool: format!("{} info {}", qemu_img.display(), image.display()),
        detail: format!("unreadable JSON: {e}"),
    })
}

/// Creates `request.disk` as a qcow2 overlay of `request.base` of `request.size_bytes`.
pub(crate) fn create(qemu_img: &Path, request: &DiskRequest) -> Result<(), DriverError> {
    let base = absolute(&request.base)?;
    if !base.is_file() {
        return Err(DriverError::Io {
            action: "reading base image",
            path: base,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    if request.disk.exists() {
        return Err(DriverError::Io {
            action: "refusing to overwrite the existing disk",
            path: request.disk.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it holds the VM's data; delete the VM first to start over",
            ),
        });
    }

    let base_info = info(qemu_img, &base)?;
    if request.size_bytes < base_info.virtual_size {
        return Err(DriverError::DiskTooSmall {
            disk: request.disk.clone(),
            base,
            base_bytes: base_info.virtual_size,
            requested_bytes: request.size_bytes,
        });
    }

    let temp = temp_name(&request.disk);
    let made = run(Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", &base_info.format, "-b"])
        .arg(&base)
        .arg(&temp)
        .arg(request.size_bytes.to_string()))
    .and_then(|_| {
        fs::rename(&temp, &request.disk).map_err(|source| DriverError::Io {
            action: "moving the new disk into place at",
            path: request.disk.clone(),
            source,
        })
    });

    if made.is_err() {
        // Best effort: the error being returned is the one that matters.
        let _ = fs::remove_file(&temp);
    }
    made
}

/// The format of a disk, from its first bytes: qcow2 has a magic number; anything else is
/// taken as raw.
pub(crate) fn detect_format(disk: &Path) -> Result<DiskFormat, DriverError> {
    let mut magic = [0u8; 4];
    let mut file = fs::File::open(disk).map_err(|source| DriverError::Io {
        action: "opening VM disk",
        path: disk.to_owned(),
        source,
    })?;
    let read = file.read(&mut magic).map_err(|source| DriverError::Io {
        action: "reading VM disk",
        path: disk.to_owned(),
        source,
    })?;
    Ok(if read == 4 && &magic == b"QFI\xfb" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

/// The backing file is recorded as given, so it must not depend on the working directory.
/// Symlinks are kept: a `basedisk` link into the image cache stays a link.
fn absolute(path: &Path) -> Result<PathBuf, DriverError> {
    std::path::absolute(path).map_err(|source| DriverError::Io {
        action: "resolving base image path",
        path: path.to_owned(),
        source,
    })
}

fn temp_name(disk: &Path) -> PathBuf {
    let mut name = disk.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    disk.with_file_name(name)
}

fn run(command: &mut Command) -> Result<Vec<u8>, DriverError> {
    let shown = format!("{command:?}").replace('"', "");
    let out = command.output().map_err(|e| DriverError::Tool {
        tool: shown.clone(),
        detail: format!("cannot run it: {e}"),
    })?;
    if !out.status.success() {
        return Err(DriverError::Tool {
            tool: shown,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_magic() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
        assert_eq!(detect_format(&q).unwrap(), DiskFormat::Qcow2);
        let r = dir.path().join("r");
        fs::write(&r, [0u8; 512]).unwrap();
        assert_eq!(detect_format(&r).unwrap(), DiskFormat::Raw);
        let err = detect_format(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
