//! Checksums: sha512 for images (what Colima publishes), sha256 for cache keys, and file
//! stamps that let a verified file be trusted again without reading it all.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256, Sha512};

use crate::error::ImageError;

/// The lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `s` is a sha512 digest in hex (128 hex digits).
pub fn is_sha512_hex(s: &str) -> bool {
    s.len() == 128 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Streams a file through sha512 and returns the lowercase hex digest.
pub fn sha512_file(path: &Path) -> Result<String, ImageError> {
    let mut file = File::open(path).map_err(|e| ImageError::io("open", path, e))?;
    let mut hasher = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| ImageError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What a file looked like when it was last verified: if size, modification time and inode
/// are unchanged, its content is taken as unchanged too. Checking a stamp costs one `stat`,
/// where re-hashing a 1 GiB image costs seconds; any ordinary write, copy or replacement
/// changes the stamp and forces a full check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Inode number.
    pub ino: u64,
}

impl Stamp {
    /// The stamp of the file at `path` now (symlinks followed).
    pub fn of(path: &Path) -> Result<Stamp, ImageError> {
        let meta = std::fs::metadata(path).map_err(|e| ImageError::io("stat", path, e))?;
        Ok(Stamp {
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ino: meta.ino(),
        })
    }

    /// Whether the file at `path` still has this stamp; false when it is gone.
    pub fn matches(&self, path: &Path) -> bool {
        Stamp::of(path).is_ok_and(|now| now == *self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sha512_of_a_file_matches_the_published_vector() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let digest = sha512_file(&path).unwrap();
        assert!(digest.starts_with("ddaf35a193617aba"));
        assert!(is_sha512_hex(&digest));
        assert!(!is_sha512_hex("xyz"));
    }

    #[test]
    fn a_write_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"one").unwrap();
        let stamp = Stamp::of(&path).unwrap();
        assert!(stamp.matches(&path));

        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"two").unwrap();
        drop(f);
        assert!(!stamp.matches(&path));
        assert!(!stamp.matches(&dir.path().join("gone")));
    }
}
