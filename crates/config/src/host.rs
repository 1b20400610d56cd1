//! Facts about the host a config is checked against: the home directory and user bash sees,
//! and the RAM and CPUs a VM's size must fit in.

use std::path::PathBuf;

/// The host, as config evaluation and validation see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// `$HOME` (the default `VM_MOUNT`, and `HOME` for bash).
    pub home: PathBuf,
    /// The user name (`USER` for bash).
    pub user: String,
    /// The user id.
    pub uid: u32,
    /// Physical RAM in bytes; 0 when it could not be read (size checks are then skipped).
    pub total_memory_bytes: u64,
    /// CPUs this process may use (at least 1).
    pub cpus: u32,
}

impl HostFacts {
    /// Reads the facts from the environment and the OS: `HOME` (else the password database),
    /// `USER` (else `LOGNAME`, else the password database), the real uid, RAM from
    /// `/proc/meminfo` on Linux and `hw.memsize` on macOS, and the CPUs available to this
    /// process.
    pub fn detect() -> HostFacts {
        let uid = nix::unistd::getuid();
        let account = || nix::unistd::User::from_uid(uid).ok().flatten();

        let home = non_empty_var("HOME")
            .map(PathBuf::from)
            .or_else(|| account().map(|u| u.dir))
            .unwrap_or_else(|| PathBuf::from("/"));
        let user = non_empty_var("USER")
            .or_else(|| non_empty_var("LOGNAME"))
            .or_else(|| account().map(|u| u.name))
            .unwrap_or_else(|| uid.to_string());
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);

        HostFacts {
            home,
            user,
            uid: uid.as_raw(),
            total_memory_bytes: os::total_memory_bytes().unwrap_or(0),
            cpus,
        }
    }
}

fn non_empty_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[cfg(target_os = "linux")]
mod os {
    /// `MemTotal` from `/proc/meminfo` (given in KiB).
    pub fn total_memory_bytes() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        parse_meminfo(&text)
    }

    pub(super) fn parse_meminfo(text: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line
            .trim_start_matches("MemTotal:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    }
}

#[cfg(target_os = "macos")]
mod os {
    /// `sysctl hw.memsize`.
    pub fn total_memory_bytes() -> Option<u64> {
        let mut bytes: u64 = 0;
        let mut len = size_of::<u64>();
        // SAFETY: the name is a NUL-terminated C string, `bytes` is a valid u64 and `len` holds
        // its size, as sysctlbyname requires; no new value is set (null, 0).
        let rc = unsafe {
            libc::sysctlbyname(
                c"hw.memsize".as_ptr(),
                (&raw mut bytes).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0 && len == size_of::<u64>()).then_some(bytes)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod os {
    /// Unknown on this OS: size checks are skipped.
    pub fn total_memory_bytes() -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_host() {
        let host = HostFacts::detect();
        assert!(host.cpus >= 1);
        assert!(!host.user.is_empty());
        assert!(host.home.is_absolute());
        #[cfg(any(target_os = "linux", target_os = "macos"))]
        assert!(host.total_memory_bytes > 256 << 20, "{host:?}");
        assert_eq!(host.uid, nix::unistd::getuid().as_raw());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn meminfo() {
        let text = "MemTotal:       24572336 kB\nMemFree:  1 kB\n";
        assert_eq!(os::parse_meminfo(text), Some(24572336 * 1024));
        assert_eq!(os::parse_meminfo("MemFree: 1 kB\n"), None);
    }
}
