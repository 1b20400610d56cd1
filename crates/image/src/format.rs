//! Telling disk formats apart by their first bytes.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ImageError;

/// The on-disk format of a base image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain disk image.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl DiskFormat {
    /// qemu's spelling (`raw`, `qcow2`), as `-F` and `format=` take it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// Bytes read to recognise a format: enough for the ext2/3/4 superblock magic at 1080.
const HEAD: usize = 2048;

/// The format of the disk at `path`, by magic. A raw disk has no magic of its own, so raw
/// is accepted when the image starts with a partition table (MBR/GPT boot signature) or an
/// ext2/3/4 file system (a whole-disk file system, as vmoat's Debian image has).
pub fn detect(path: &Path) -> Result<DiskFormat, ImageError> {
    let mut head = Vec::with_capacity(HEAD);
    File::open(path)
        .and_then(|f| f.take(HEAD as u64).read_to_end(&mut head))
        .map_err(|e| ImageError::io("read", path, e))?;
    classify(&head).map_err(|reason| ImageError::UnknownFormat {
        path: path.to_owned(),
        reason,
    })
}

fn classify(head: &[u8]) -> Result<DiskFormat, String> {
    if head.starts_with(QCOW2_MAGIC) {
        return Ok(DiskFormat::Qcow2);
    }
    for (magic, name) in [(GZIP_MAGIC, "gzip"), (XZ_MAGIC, "xz"), (ZSTD_MAGIC, "zstd")] {
        if head.starts_with(magic) {
            return Err(format!("it is {name}-compressed; decompress it first"));
        }
    }
    if head.len() < HEAD {
        return Err(format!("it is only {} bytes long", head.len()));
    }
    let boot_signature = head[510] == 0x55 && head[511] == 0xaa;
    let ext_magic = head[1080] == 0x53 && head[1081] == 0xef;
    if boot_signature || ext_magic {
        return Ok(DiskFormat::Raw);
    }
    Err("no qcow2 header, partition table or ext4 file system at its start".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart() {
        let mut qcow = vec![0u8; HEAD];
        qcow[..4].copy_from_slice(QCOW2_MAGIC);
        assert_eq!(classify(&qcow), Ok(DiskFormat::Qcow2));

        let mut mbr = vec![0u8; HEAD];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(classify(&mbr), Ok(DiskFormat::Raw));

        let mut ext4 = vec![0u8; HEAD];
        ext4[1080] = 0x53;
        ext4[1081] = 0xef;
        assert_eq!(classify(&ext4), Ok(DiskFormat::Raw));

        assert!(classify(&[0x1f, 0x8b, 8, 0]).unwrap_err().contains("gzip"));
        assert!(
            classify(&vec![0u8; HEAD])
                .unwrap_err()
                .contains("no qcow2 header")
        );
        assert!(classify(b"short").unwrap_err().contains("5 bytes"));
    }
}
