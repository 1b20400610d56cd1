//! Kernels for vz's Linux boot loader. On Apple Silicon `VZLinuxBootLoader` boots only an
//! uncompressed arm64 `Image`, while distributions ship `vmlinuz` compressed: Debian gzips the
//! `Image`, and kernels built with `CONFIG_EFI_ZBOOT` wrap a compressed `Image` in a small EFI
//! program. Such kernels are decompressed once into the instance directory. On Intel Macs the
//! loader takes a `bzImage` as shipped.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use tracing::info;
use vmoat_driver::{Arch, DriverError};

/// The arm64 `Image` header's magic, `ARM\x64`, at byte 0x38.
const ARM64_MAGIC: &[u8; 4] = b"ARM\x64";
const ARM64_MAGIC_OFFSET: usize = 0x38;

/// The gzip magic.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// What a kernel file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed arm64 `Image`: vz boots it as is.
    Arm64Image,
    /// A gzip stream (Debian's arm64 `vmlinuz`).
    Gzip,
    /// An EFI zboot wrapper: the compressed payload at `offset`, `size` bytes long, compressed
    /// with `compression` (`gzip`, `zstd`, …).
    Zboot {
        /// Where the payload starts.
        offset: u64,
        /// Its length.
        size: u64,
        /// The compression named in the header.
        compression: String,
    },
    /// Anything else (an x86 `bzImage`, or something vz cannot boot on arm64).
    Other,
}

/// Classifies a kernel from its first 64 bytes (or fewer, for a tiny file).
pub fn kernel_format(header: &[u8]) -> KernelFormat {
    if header.starts_with(&GZIP_MAGIC) {
        return KernelFormat::Gzip;
    }

    if header.len() >= ARM64_MAGIC_OFFSET + 4
        && &header[ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC
    {
        return KernelFormat::Arm64Image;
    }

    // EFI zboot: "MZ", then "zimg", the payload's offset and size (little-endian u32 at 8 and
    // 12), and the compression's name, NUL-padded, at 24.
    if header.len() >= 32 && header.starts_with(b"MZ") && &header[4..8] == b"zimg" {
        let word = |at: usize| {
            u64::from(u32::from_le_bytes([
                header[at],
                header[at + 1],
                header[at + 2],
                header[at + 3],
            ]))
        };
        let name = &header[24..32];
        let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        return KernelFormat::Zboot {
            offset: word(8),
            size: word(12),
            compression: String::from_utf8_lossy(&name[..name_len]).into_owned(),
        };
    }

    KernelFormat::Other
}

/// The kernel vz should boot for `arch`: `kernel` itself when vz can read it, else an
/// uncompressed copy at `scratch` (reused while it is newer than `kernel`).
pub fn bootable_kernel(kernel: &Path, arch: Arch, scratch: &Path) -> Result<PathBuf, DriverError> {
    if arch != Arch::Aarch64 {
        return Ok(kernel.to_path_buf());
    }

    let read_err = |source| DriverError::Io {
        action: "reading kernel",
        path: kernel.to_path_buf(),
        source,
    };

    let mut header = Vec::with_capacity(64);
    File::open(kernel)
        .map_err(read_err)?
        .take(64)
        .read_to_end(&mut header)
        .map_err(read_err)?;

    let format = kernel_format(&header);
    if format == KernelFormat::Arm64Image {
        return Ok(kernel.to_path_buf());
    }

    if is_fresh(scratch, kernel) {
        return Ok(scratch.to_path_buf());
    }

    match format {
        KernelFormat::Gzip => {
            let input = File::open(kernel).map_err(read_err)?;
            decompress(MultiGzDecoder::new(input), kernel, scratch)?;
        }
        KernelFormat::Zboot {
            offset,
            size,
            compression,
        } if compression == "gzip" => {
            let bytes = fs::read(kernel).map_err(read_err)?;
            let payload = usize::try_from(offset)
                .ok()
                .zip(usize::try_from(offset + size).ok())
                .and_then(|(start, end)| bytes.get(start..end))
                .ok_or_else(|| {
                    not_bootable(kernel, "its EFI zboot payload lies outside the file")
                })?;
            decompress(MultiGzDecoder::new(payload), kernel, scratch)?;
        }
        KernelFormat::Zboot { compression, .. } => {
            return Err(not_bootable(
                kernel,
                &format!("it is an EFI zboot kernel compressed with {compression:?}, not gzip"),
            ));
        }
        KernelFormat::Other | KernelFormat::Arm64Image => {
            return Err(not_bootable(
                kernel,
                "it is neither an arm64 Image nor gzip-compressed",
            ));
        }
    }

    Ok(scratch.to_path_buf())
}

/// Whether `copy` exists, is not empty, and is at least as new as `original`.
fn is_fresh(copy: &Path, original: &Path) -> bool {
    let modified = |path: &Path| fs::metadata(path).and_then(|m| m.modified()).ok();
    let non_empty = fs::metadata(copy).is_ok_and(|m| m.len() > 0);
    non_empty && matches!((modified(copy), modified(original)), (Some(c), Some(o)) if c >= o)
}

/// Writes the decompressed kernel to `scratch` (through a temp file) and checks that it is an
/// arm64 `Image`.
fn decompress(mut reader: impl Read, kernel: &Path, scratch: &Path) -> Result<(), DriverError> {
    let mut image = Vec::new();
    reader
        .read_to_end(&mut image)
        .map_err(|source| DriverError::Io {
            action: "decompressing kernel",
            path: kernel.to_path_buf(),
            source,
        })?;

    if kernel_format(&image[..image.len().min(64)]) != KernelFormat::Arm64Image {
        return Err(not_bootable(
            kernel,
            "it decompresses to something other than an arm64 Image",
        ));
    }

    let write_err = |source| DriverError::Io {
        action: "writing uncompressed kernel",
        path: scratch.to_path_buf(),
        source,
    };
    let mut tmp_name = scratch.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);

    let mut file = File::create(&tmp).map_err(write_err)?;
    file.write_all(&image).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    fs::rename(&tmp, scratch).map_err(write_err)?;

    info!(kernel = %kernel.display(), image = %scratch.display(), "decompressed kernel for vz");
    Ok(())
}

/// The error for a kernel vz cannot boot.
fn not_bootable(kernel: &Path, why: &str) -> DriverError {
    DriverError::Io {
        action: "preparing kernel for vz's Linux boot loader",
        path: kernel.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{why}; vz on Apple Silicon boots an uncompressed arm64 Image \
                 (remove the kernel beside the image to boot through EFI instead)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    /// A fake but well-formed arm64 Image: header magic plus a body.
    fn arm64_image() -> Vec<u8> {
        let mut image = vec![0u8; 4096];
        image[ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + 4].copy_from_slice(ARM64_MAGIC);
        image[1000..1010].copy_from_slice(b"linux body");
        image
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn zboot(payload: &[u8], compression: &[u8]) -> Vec<u8> {
        let mut file = vec![0u8; 512];
        file[..2].copy_from_slice(b"MZ");
        file[4..8].copy_from_slice(b"zimg");
        file[8..12].copy_from_slice(&512u32.to_le_bytes());
        file[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        file[24..24 + compression.len()].copy_from_slice(compression);
        file.extend_from_slice(payload);
        file
    }

    #[test]
    fn formats_are_told_apart() {
        assert_eq!(
            kernel_format(&arm64_image()[..64]),
            KernelFormat::Arm64Image
        );
        assert_eq!(kernel_format(&gzip(b"x")), KernelFormat::Gzip);
        assert_eq!(kernel_format(b"MZ\0\0"), KernelFormat::Other);
        assert_eq!(kernel_format(b""), KernelFormat::Other);
        assert_eq!(
            kernel_format(&zboot(b"abc", b"zstd22")[..64]),
            KernelFormat::Zboot {
                offset: 512,
                size: 3,
                compression: "zstd22".into()
            }
        );
    }

    #[test]
    fn kernels_vz_reads_as_shipped_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("vmoat-vz-kernel");
        let cases = [
            ("bzImage", b"bzImage".to_vec(), Arch::X86_64),
            ("Image", arm64_image(), Arch::Aarch64),
        ];

        for (name, bytes, arch) in cases {
            let kernel = dir.path().join(name);
            fs::write(&kernel, bytes).unwrap();

            assert_eq!(bootable_kernel(&kernel, arch, &scratch).unwrap(), kernel);
            assert!(!scratch.exists(), "{name}");
        }
    }

    #[test]
    fn gzip_kernel_is_decompressed_once() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        fs::write(&kernel, gzip(&arm64_image())).unwrap();
        let scratch = dir.path().join("vmoat-vz-kernel");

        let path = bootable_kernel(&kernel, Arch::Aarch64, &scratch).unwrap();
        assert_eq!(path, scratch);
        assert_eq!(fs::read(&scratch).unwrap(), arm64_image());

        // A fresh copy is reused, not rewritten.
        fs::write(&scratch, b"marker").unwrap();
        assert_eq!(
            bootable_kernel(&kernel, Arch::Aarch64, &scratch).unwrap(),
            scratch
        );
        assert_eq!(fs::read(&scratch).unwrap(), b"marker");
    }

    #[test]
    fn gzip_zboot_kernel_is_unwrapped() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        fs::write(&kernel, zboot(&gzip(&arm64_image()), b"gzip")).unwrap();
        let scratch = dir.path().join("vmoat-vz-kernel");

        bootable_kernel(&kernel, Arch::Aarch64, &scratch).unwrap();

        assert_eq!(fs::read(&scratch).unwrap(), arm64_image());
    }

    #[test]
    fn unreadable_kernels_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("vmoat-vz-kernel");
        let cases: [(&str, Vec<u8>, &str); 3] = [
            ("zstd", zboot(b"whatever", b"zstd22"), "zstd22"),
            ("other", b"bzImage, not arm64".to_vec(), "neither"),
            (
                "not-image",
                gzip(b"not a kernel"),
                "other than an arm64 Image",
            ),
        ];

        for (name, bytes, expected) in cases {
            let kernel = dir.path().join(name);
            fs::write(&kernel, bytes).unwrap();

            let err = bootable_kernel(&kernel, Arch::Aarch64, &scratch).unwrap_err();

            let source = std::error::Error::source(&err).unwrap().to_string();
            assert!(err.to_string().contains(name), "{err}");
            assert!(source.contains(expected), "{name}: {source}");
            assert!(!scratch.exists(), "{name}");
        }
    }
}
