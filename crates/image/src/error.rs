//! Everything that can go wrong while finding, fetching, building or managing an image.
//!
//! Each message names the thing (URL, file, image, stage) and, where there is one, the next
//! step. Causes travel in `#[source]` and are not repeated in the message.

use std::io;
use std::path::PathBuf;

/// An image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The server could not be reached at all (no network, DNS, refused, timed out).
    #[error(
        "cannot reach {url} (no network or no route to it?); set VM_IMAGE=debian to build \
         vmoat's own image from Debian packages instead"
    )]
    Unreachable {
        /// The URL that was requested.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },

    /// The server answered with an error status.
    #[error("download of {url} failed: the server answered HTTP {status}")]
    HttpStatus {
        /// The URL that was requested (after redirects).
        url: String,
        /// The status code.
        status: u16,
    },

    /// The transfer broke off before the end.
    #[error("download of {url} broke off after {received} bytes; run the command again to resume")]
    Interrupted {
        /// The URL.
        url: String,
        /// Bytes of the file on disk so far (kept for resuming, never trusted as is).
        received: u64,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },

    /// The downloaded bytes do not have the expected checksum.
    #[error(
        "checksum mismatch for {url}: expected sha512 {expected}, got {actual}; the download \
         was discarded"
    )]
    DigestMismatch {
        /// The URL.
        url: String,
        /// The sha512 (hex) the catalog or checksum file gave.
        expected: String,
        /// The sha512 (hex) of what arrived.
        actual: String,
    },

    /// A `<url>.sha512sum` file could not be used.
    #[error("checksum file {url} holds no sha512 digest: {reason}")]
    ChecksumFile {
        /// The checksum file's URL.
        url: String,
        /// What was wrong with it.
        reason: String,
    },

    /// The compressed image could not be unpacked.
    #[error("cannot unpack {url} (gzip) into {path}")]
    Unpack {
        /// The image URL.
        url: String,
        /// The file being written.
        path: PathBuf,
        /// The decoder's or the file system's error.
        #[source]
        source: io::Error,
    },

    /// The catalog has a line it cannot read.
    #[error("image catalog {origin}, line {line}: {reason}")]
    Catalog {
        /// Where the catalog came from (`embedded` or a file).
        origin: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },

    /// The catalog has no image for this arch.
    #[error("image catalog {origin} has no Colima docker image for {arch}")]
    NotInCatalog {
        /// Where the catalog came from.
        origin: String,
        /// The arch asked for.
        arch: String,
    },

    /// `VM_IMAGE` names no image vmoat knows.
    #[error(
        "unknown image `{name}`: VM_IMAGE takes `colima`, `debian`, a name from `vmoat image \
         list`, or a path to a raw or qcow2 disk"
    )]
    UnknownName {
        /// The name given.
        name: String,
    },

    /// A path given as the image does not exist or is not a regular file.
    #[error("image {path} does not exist or is not a file; set VM_IMAGE to a raw or qcow2 disk")]
    MissingPath {
        /// The path.
        path: PathBuf,
    },

    /// A path given as the image is not a disk vmoat can boot.
    #[error("image {path} is not a raw or qcow2 disk: {reason}")]
    UnknownFormat {
        /// The path.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// This host cannot build the Debian image.
    #[error("cannot build the debian image on this host: {reason}")]
    BuildUnavailable {
        /// Why, and what to do.
        reason: String,
    },

    /// The Debian image build failed.
    #[error(
        "building the debian image failed in stage `{stage}` ({status}); last lines of its \
         output:\n{tail}"
    )]
    BuildFailed {
        /// The build stage that was running.
        stage: String,
        /// How the build process ended.
        status: String,
        /// Its last output lines.
        tail: String,
    },

    /// The Debian image build took too long and was stopped.
    #[error("building the debian image timed out after {seconds} s in stage `{stage}`")]
    BuildTimeout {
        /// The build stage that was running.
        stage: String,
        /// The time limit.
        seconds: u64,
    },

    /// A cached image is used by VMs and cannot be removed.
    #[error("image `{name}` is the base of VM(s) {vms}; destroy them first")]
    InUse {
        /// The image.
        name: String,
        /// The VMs (Lima instance names), comma-separated.
        vms: String,
    },

    /// No cached image has this name.
    #[error("no cached image named `{name}`; `vmoat image list` shows them")]
    NoSuchImage {
        /// The name given.
        name: String,
    },

    /// An image's manifest cannot be read or written.
    #[error("image manifest {path} is unreadable; `vmoat image rm` the image and fetch it again")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },

    /// A file system operation failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What vmoat was doing (`create`, `read`, `rename`, `lock`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client for image downloads")]
    Client(#[source] reqwest::Error),
}

impl ImageError {
    /// Whether this is a download or verification failure, which the CLI reports with exit 6.
    pub fn is_download_failure(&self) -> bool {
        matches!(
            self,
            ImageError::Unreachable { .. }
                | ImageError::HttpStatus { .. }
                | ImageError::Interrupted { .. }
                | ImageError::DigestMismatch { .. }
                | ImageError::ChecksumFile { .. }
                | ImageError::Unpack { .. }
                | ImageError::NotInCatalog { .. }
        )
    }

    /// Wraps an I/O error with what was being done to which path.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_is_a_download_failure_and_io_is_not() {
        let mismatch = ImageError::DigestMismatch {
            url: "http://x/y".into(),
            expected: "aa".into(),
            actual: "bb".into(),
        };
        assert!(mismatch.is_download_failure());

        let io = ImageError::io("read", "/x", io::Error::other("boom"));
        assert!(!io.is_download_failure());
        assert_eq!(io.to_string(), "cannot read /x");
    }
}
