//! Where images live: vmoat's own cache and Lima's download cache.
//!
//! vmoat's cache holds images ready to boot (unpacked or built); Lima's download cache holds
//! what was downloaded, in Lima's layout, so one download serves Lima, Colima and vmoat.
//! Lima takes its cache from Go's `os.UserCacheDir()` and has no override of its own
//! (`colima-compat.md` §8), so [`lima_download_cache`] follows Go's rules exactly.

use std::path::{Path, PathBuf};

/// vmoat's cache: `$VMOAT_CACHE_DIR`, else `$XDG_CACHE_HOME/vmoat`, else `~/.cache/vmoat`
/// (macOS: `~/Library/Caches/vmoat`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env_path("VMOAT_CACHE_DIR") {
        return dir;
    }
    if let Some(dir) = env_path("XDG_CACHE_HOME") {
        return dir.join("vmoat");
    }
    home().join(platform_cache_suffix()).join("vmoat")
}

/// Lima's download cache: `<UserCacheDir>/lima/download`, where UserCacheDir is
/// `$XDG_CACHE_HOME` (absolute) or `~/.cache` on Linux and `~/Library/Caches` on macOS.
pub fn lima_download_cache() -> PathBuf {
    go_user_cache_dir().join("lima").join("download")
}

/// Go's `os.UserCacheDir()`, which Lima uses.
fn go_user_cache_dir() -> PathBuf {
    if cfg!(target_os = "macos") {
        return home().join("Library/Caches");
    }
    match env_path("XDG_CACHE_HOME") {
        Some(dir) => dir,
        None => home().join(".cache"),
    }
}

fn platform_cache_suffix() -> &'static str {
    if cfg!(target_os = "macos") {
        "Library/Caches"
    } else {
        ".cache"
    }
}

/// An absolute path from the environment; empty or relative values count as unset, as Go
/// treats a relative `$XDG_CACHE_HOME`.
fn env_path(name: &str) -> Option<PathBuf> {
    let value = PathBuf::from(std::env::var_os(name)?);
    value.is_absolute().then_some(value)
}

fn home() -> PathBuf {
    // Without a home directory (a bare service account) the temp dir still works.
    std::env::home_dir()
        .filter(|h| h.is_absolute())
        .unwrap_or_else(std::env::temp_dir)
}

/// The directory of one URL in Lima's download cache:
/// `<download cache>/by-url-sha256/<sha256 hex of the URL>`.
pub fn lima_entry_dir(download_cache: &Path, url: &str) -> PathBuf {
    download_cache
        .join("by-url-sha256")
        .join(crate::digest::sha256_hex(url.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lima_entry_is_keyed_by_the_sha256_of_the_url() {
        let dir = lima_entry_dir(
            Path::new("/c/lima/download"),
            "https://example.com/a.raw.gz",
        );
        let key = dir.file_name().unwrap().to_str().unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(
            dir.parent().unwrap(),
            Path::new("/c/lima/download/by-url-sha256")
        );
        // sha256("abc"), a published test vector, checks the key function itself.
        let abc = lima_entry_dir(Path::new("/d"), "abc");
        assert!(abc.ends_with("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    }

    #[test]
    fn cache_dirs_are_absolute() {
        assert!(cache_dir().is_absolute());
        assert!(lima_download_cache().ends_with("lima/download"));
    }
}
