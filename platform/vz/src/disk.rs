//! A vz VM's own disk: a raw image made from the shared base, never a qcow2 overlay, because
//! Virtualization.framework reads only raw (and ASIF) images.
//!
//! On APFS the disk is a `clonefile(2)` of the base: instant, and it shares every block with
//! the base until the guest writes. Where cloning fails (another file system, another volume)
//! the base is copied sparsely, skipping holes and zero blocks, so a 2 GiB image with a 20 GiB
//! virtual size costs 2 GiB. A qcow2 base is converted with `qemu-img convert`. The result is
//! then grown (`ftruncate`) to the size the VM asked for; the guest's `growpart` does the rest.
//!
//! The disk appears under its final name only when complete: it is built as `<disk>.tmp`
//! (Lima's temp suffix) and renamed, and a failure removes the temp file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{debug, info};
use vmoat_driver::{DiskRequest, DriverError};

/// The first four bytes of a qcow2 image.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Copy granularity, and the unit zero runs are skipped in.
const CHUNK: usize = 1 << 20;

/// A base image's format, as far as vz cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// A raw disk image: usable as is.
    Raw,
    /// qcow2: must be converted.
    Qcow2,
}

/// How a disk was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOrigin {
    /// An APFS clone of the base.
    Cloned,
    /// A sparse copy of the base (cloning was not possible).
    Copied,
    /// A raw conversion of a qcow2 base.
    Converted,
}

/// Reads an image's format and the disk size its guest sees (the file size for raw, the
/// header's size for qcow2).
pub fn probe(path: &Path) -> Result<(ImageFormat, u64), DriverError> {
    let io_err = |source| DriverError::Io {
        action: "reading base image",
        path: path.to_path_buf(),
        source,
    };

    let mut file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();

    let mut header = [0u8; 32];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]).map_err(io_err)? {
            0 => break,
            n => filled += n,
        }
    }

    if filled >= 32 && header[..4] == QCOW2_MAGIC {
        // The virtual size is the big-endian u64 at offset 24 of every qcow2 version.
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[24..32]);
        return Ok((ImageFormat::Qcow2, u64::from_be_bytes(size)));
    }

    Ok((ImageFormat::Raw, len))
}

/// Creates `request.disk` as a raw image of `request.size_bytes` from `request.base`.
pub fn create_raw_disk(request: &DiskRequest) -> Result<DiskOrigin, DriverError> {
    create_raw_disk_using(request, find_tool("qemu-img").as_deref())
}

/// [`create_raw_disk`] with an explicit `qemu-img` (or none), for tests.
fn create_raw_disk_using(
    request: &DiskRequest,
    qemu_img: Option<&Path>,
) -> Result<DiskOrigin, DriverError> {
    let disk = &request.disk;

    // Never replace a disk: it holds a VM's state.
    if fs::symlink_metadata(disk).is_ok() {
        return Err(DriverError::Io {
            action: "refusing to overwrite the existing disk",
            path: disk.clone(),
            source: io::ErrorKind::AlreadyExists.into(),
        });
    }

    // `basedisk` is a link into the image cache; clone what it points at.
    let base = fs::canonicalize(&request.base).map_err(|source| DriverError::Io {
        action: "reading base image",
        path: request.base.clone(),
        source,
    })?;
    let (format, base_size) = probe(&base)?;

    if request.size_bytes < base_size {
        return Err(DriverError::DiskTooSmall {
            disk: disk.clone(),
            base,
            base_bytes: base_size,
            requested_bytes: request.size_bytes,
        });
    }

    let tmp = temp_path(disk);
    remove_if_present(&tmp)?;
    let guard = RemoveOnDrop(Some(tmp.clone()));

    let origin = match format {
        ImageFormat::Raw => clone_or_copy(&base, &tmp)?,
        ImageFormat::Qcow2 => {
            convert(qemu_img, &base, &tmp)?;
            DiskOrigin::Converted
        }
    };

    grow(&tmp, request.size_bytes)?;

    fs::rename(&tmp, disk).map_err(|source| DriverError::Io {
        action: "renaming new disk into place",
        path: disk.clone(),
        source,
    })?;
    guard.disarm();

    info!(disk = %disk.display(), base = %base.display(), ?origin, "created raw disk");
    Ok(origin)
}

/// `<disk>.tmp`.
fn temp_path(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Removes a leftover file from an earlier, interrupted attempt.
fn remove_if_present(path: &Path) -> Result<(), DriverError> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(DriverError::Io {
            action: "removing leftover",
            path: path.to_path_buf(),
            source: err,
        }),
        _ => Ok(()),
    }
}

/// Removes a half-made file unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// Clones `base` to `dst` where the file system can, else copies it sparsely.
fn clone_or_copy(base: &Path, dst: &Path) -> Result<DiskOrigin, DriverError> {
    #[cfg(target_os = "macos")]
    match clonefile(base, dst) {
        Ok(()) => {
            // The clone keeps the base's mode, and cached images are often read-only.
            fs::set_permissions(dst, fs::Permissions::from_mode(0o644)).map_err(|source| {
                DriverError::Io {
                    action: "making the cloned disk writable",
                    path: dst.to_path_buf(),
                    source,
                }
            })?;
            return Ok(DiskOrigin::Cloned);
        }
        Err(err) => {
            info!(
                base = %base.display(),
                "clonefile failed ({err}), so the disk is a sparse copy instead (not APFS?)"
            );
        }
    }

    sparse_copy(base, dst)?;
    Ok(DiskOrigin::Copied)
}

/// APFS `clonefile(2)`.
#[cfg(target_os = "macos")]
fn clonefile(src: &Path, dst: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    let src = CString::new(src.as_os_str().as_bytes())?;
    let dst = CString::new(dst.as_os_str().as_bytes())?;

    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call, and
    // flags 0 asks for nothing beyond the documented default behaviour.
    let rc = unsafe { libc::clonefile(src.as_ptr(), dst.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies `src` to a new `dst` of the same length, writing only the non-zero parts so the copy
/// is as sparse as the file system allows.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<(), DriverError> {
    let read_err = |source| DriverError::Io {
        action: "copying base image",
        path: src.to_path_buf(),
        source,
    };
    let write_err = |source| DriverError::Io {
        action: "writing disk",
        path: dst.to_path_buf(),
        source,
    };

    let input = File::open(src).map_err(read_err)?;
    let len = input.metadata().map_err(read_err)?.len();

    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dst)
        .map_err(write_err)?;
    output.set_len(len).map_err(write_err)?;

    let mut buf = vec![0u8; CHUNK];
    for (start, end) in data_ranges(&input, len).map_err(read_err)? {
        let mut offset = start;
        while offset < end {
            let want = usize::try_from(end - offset).map_or(CHUNK, |left| left.min(CHUNK));
            let chunk = &mut buf[..want];
            input.read_exact_at(chunk, offset).map_err(read_err)?;

            // Zero runs inside data extents stay holes too.
            if chunk.iter().any(|&b| b != 0) {
                output.write_all_at(chunk, offset).map_err(write_err)?;
            }
            offset += want as u64;
        }
    }

    output.sync_all().map_err(write_err)
}

/// The byte ranges of `file` that may hold data, from `SEEK_DATA`/`SEEK_HOLE`; the whole file
/// when the file system cannot say.
fn data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| -> io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;

        // SAFETY: lseek on a descriptor `file` keeps open; it only moves the file position,
        // which nothing else here uses (reads are positional).
        let found = unsafe { libc::lseek(fd, offset, whence) };
        if found >= 0 {
            return Ok(Some(found as u64));
        }

        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // No data at or after `offset`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    };

    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match seek(pos, libc::SEEK_DATA) {
            Ok(Some(start)) => start,
            Ok(None) => break,
            // SEEK_DATA unsupported: treat everything as data.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) && ranges.is_empty() => {
                debug!("SEEK_DATA unsupported ({err}); scanning the whole image");
                return Ok(vec![(0, len)]);
            }
            Err(err) => return Err(err),
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        ranges.push((start, end));
        pos = end;
    }

    Ok(ranges)
}

/// Converts a qcow2 base to raw with `qemu-img`, or says how to get a raw image without it.
fn convert(qemu_img: Option<&Path>, base: &Path, dst: &Path) -> Result<(), DriverError> {
    let Some(qemu_img) = qemu_img else {
        return Err(DriverError::Tool {
            tool: "qemu-img".into(),
            detail: format!(
                "base image {} is qcow2, which vz cannot read, and qemu-img is not on PATH to \
                 convert it to raw: install it (`brew install qemu`), or use a raw image \
                 (Colima's default image is raw)",
                base.display()
            ),
        });
    };

    let output = Command::new(qemu_img)
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(base)
        .arg(dst)
        .output()
        .map_err(|err| DriverError::Tool {
            tool: qemu_img.display().to_string(),
            detail: format!("could not run it: {err}"),
        })?;

    if !output.status.success() {
        return Err(DriverError::Tool {
            tool: format!(
                "{} convert -f qcow2 -O raw {} {}",
                qemu_img.display(),
                base.display(),
                dst.display()
            ),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Extends `path` to `size` bytes; the new tail is a hole.
fn grow(path: &Path, size: u64) -> Result<(), DriverError> {
    let io_err = |source| DriverError::Io {
        action: "growing disk",
        path: path.to_path_buf(),
        source,
    };

    let file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
    if file.metadata().map_err(io_err)?.len() < size {
        file.set_len(size).map_err(io_err)?;
    }
    file.sync_all().map_err(io_err)
}

/// Finds an executable on `PATH`, then where Homebrew installs (a launchd-started agent may
/// have a bare `PATH`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/opt/homebrew/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a file someone may execute.
fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A 4 MiB raw image with data in its first and third MiB and a hole elsewhere.
    fn raw_base(dir: &Path) -> PathBuf {
        let path = dir.join("base.raw");
        let file = File::create(&path).unwrap();
        file.set_len(4 * MIB).unwrap();
        file.write_all_at(b"boot sector", 0).unwrap();
        file.write_all_at(&[0xab; 4096], 2 * MIB + 512).unwrap();
        path
    }

    fn request(base: &Path, disk: &Path, size: u64) -> DiskRequest {
        DiskRequest {
            base: base.to_path_buf(),
            disk: disk.to_path_buf(),
            size_bytes: size,
        }
    }

    fn qemu_img() -> PathBuf {
        find_tool("qemu-img").expect("these tests need qemu-img (Debian: qemu-utils)")
    }

    #[test]
    fn raw_base_is_copied_sparsely_and_grown() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_base(dir.path());
        let disk = dir.path().join("diffdisk");

        let origin = create_raw_disk_using(&request(&base, &disk, 16 * MIB), None).unwrap();

        // Linux has no clonefile; macOS on APFS clones.
        if cfg!(target_os = "macos") {
            assert!(matches!(origin, DiskOrigin::Cloned | DiskOrigin::Copied));
        } else {
            assert_eq!(origin, DiskOrigin::Copied);
        }

        let meta = fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 16 * MIB);
        assert!(
            meta.blocks() * 512 < 2 * MIB,
            "copy is not sparse: {} blocks",
            meta.blocks()
        );

        let copy = fs::read(&disk).unwrap();
        let original = fs::read(&base).unwrap();
        assert_eq!(&copy[..original.len()], &original[..]);
        assert!(copy[original.len()..].iter().all(|&b| b == 0));

        assert!(!temp_path(&disk).exists());
        assert_eq!(fs::read(&base).unwrap(), original, "base was modified");
    }

    #[test]
    fn the_base_may_be_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_base(dir.path());
        let link = dir.path().join("basedisk");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        let disk = dir.path().join("disk");

        create_raw_disk_using(&request(&link, &disk, 4 * MIB), None).unwrap();

        assert!(
            !fs::symlink_metadata(&disk)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&disk).unwrap(), fs::read(&base).unwrap());
    }

    #[test]
    fn read_only_base_gives_a_writable_disk() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_base(dir.path());
        fs::set_permissions(&base, fs::Permissions::from_mode(0o444)).unwrap();
        let disk = dir.path().join("diffdisk");

        create_raw_disk_using(&request(&base, &disk, 8 * MIB), None).unwrap();

        let mode = fs::metadata(&disk).unwrap().permissions().mode();
        assert_eq!(mode & 0o200, 0o200, "mode {mode:o}");
    }

    #[test]
    fn smaller_than_base_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_base(dir.path());
        let disk = dir.path().join("diffdisk");

        let err = create_raw_disk_using(&request(&base, &disk, MIB), None).unwrap_err();

        assert!(
            matches!(
                err,
                DriverError::DiskTooSmall {
                    base_bytes,
                    requested_bytes,
                    ..
                } if base_bytes == 4 * MIB && requested_bytes == MIB
            ),
            "{err}"
        );
        assert!(err.to_string().contains("VM_DISK"), "{err}");
        assert!(!disk.exists());
    }

    #[test]
    fn an_existing_disk_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_base(dir.path());
        let disk = dir.path().join("diffdisk");
        fs::write(&disk, b"a VM's state").unwrap();

        let err = create_raw_disk_using(&request(&base, &disk, 8 * MIB), None).unwrap_err();

        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(&disk).unwrap(), b"a VM's state");
    }

    #[test]
    fn missing_base_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("nope.raw");
        let disk = dir.path().join("diffdisk");

        let err = create_raw_disk_using(&request(&base, &disk, 8 * MIB), None).unwrap_err();

        assert!(err.to_string().contains("nope.raw"), "{err}");
    }

    #[test]
    fn a_stale_temp_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_base(dir.path());
        let disk = dir.path().join("diffdisk");
        fs::write(temp_path(&disk), b"left from a crash").unwrap();

        create_raw_disk_using(&request(&base, &disk, 4 * MIB), None).unwrap();

        assert_eq!(fs::read(&disk).unwrap(), fs::read(&base).unwrap());
    }

    #[test]
    fn qcow2_base_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let raw = raw_base(dir.path());
        let base = dir.path().join("base.qcow2");
        let status = Command::new(qemu_img())
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&base)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(probe(&base).unwrap(), (ImageFormat::Qcow2, 4 * MIB));

        let disk = dir.path().join("diffdisk");
        let origin =
            create_raw_disk_using(&request(&base, &disk, 6 * MIB), Some(&qemu_img())).unwrap();

        assert_eq!(origin, DiskOrigin::Converted);
        assert_eq!(probe(&disk).unwrap(), (ImageFormat::Raw, 6 * MIB));
        let converted = fs::read(&disk).unwrap();
        assert_eq!(&converted[..4 * MIB as usize], &fs::read(&raw).unwrap()[..]);
    }

    #[test]
    fn qcow2_without_qemu_img_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let mut header = [0u8; 32];
        header[..4].copy_from_slice(&QCOW2_MAGIC);
        header[24..].copy_from_slice(&(4 * MIB).to_be_bytes());
        fs::write(&base, header).unwrap();
        let disk = dir.path().join("diffdisk");

        let err = create_raw_disk_using(&request(&base, &disk, 8 * MIB), None).unwrap_err();

        let text = err.to_string();
        assert!(text.contains("base.qcow2"), "{text}");
        assert!(text.contains("brew install qemu"), "{text}");
        assert!(!disk.exists());
        assert!(!temp_path(&disk).exists());
    }

    #[test]
    fn failed_conversion_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("broken.qcow2");
        let mut header = [0xffu8; 32];
        header[..4].copy_from_slice(&QCOW2_MAGIC);
        fs::write(&base, header).unwrap();
        let disk = dir.path().join("diffdisk");

        let err =
            create_raw_disk_using(&request(&base, &disk, u64::MAX), Some(&qemu_img())).unwrap_err();

        assert!(matches!(err, DriverError::Tool { .. }), "{err}");
        assert!(!disk.exists());
        assert!(!temp_path(&disk).exists());
    }

    #[test]
    fn probe_reads_short_files_as_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny");
        fs::write(&path, b"QFI").unwrap();
        assert_eq!(probe(&path).unwrap(), (ImageFormat::Raw, 3));
    }

    #[test]
    fn tools_are_found_on_path() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("vmoat-no-such-tool").is_none());
    }
}
