//! Free disk space where profiles and images live, for `doctor` and for checks before a VM
//! disk is created.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Bytes available to this user on the file system holding `path`. A path that does not exist
/// yet (a Colima home before the first VM) is measured at its nearest existing ancestor, where
/// it will be created.
pub fn free_space(path: &Path) -> io::Result<u64> {
    let existing = path
        .ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .unwrap_or(Path::new("."));
    let c_path = CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;

    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a NUL-terminated string and stat a valid out-pointer.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The field widths differ between platforms, hence the casts.
    #[allow(clippy::unnecessary_cast)]
    let bytes = stat.f_bavail as u64 * stat.f_frsize as u64;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_measured_at_the_nearest_existing_ancestor() {
        let tmp = std::env::temp_dir();
        let here = free_space(&tmp).unwrap();
        assert!(here > 0);
        let missing = tmp.join("vmoat-no-such-dir").join("deeper");
        let there = free_space(&missing).unwrap();
        // Same file system; other writers may change it a little in between.
        assert!(here.abs_diff(there) < 1 << 30, "{here} vs {there}");
    }
}
