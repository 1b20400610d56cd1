//! Process liveness that survives pid reuse.
//!
//! A pid file alone cannot tell the agent from an unrelated process that got the same pid
//! after a crash or a reboot. So the agent records its [`Identity`] (pid, the kernel's start
//! time of the process, its executable) in `vmoat-agent.json` beside Lima's plain `ha.pid`,
//! and [`is_alive`] checks all three against the live process table.
//!
//! Linux reads `/proc/<pid>/stat` (field 22, start time in clock ticks since boot) and
//! `/proc/<pid>/exe`; macOS asks `proc_pidinfo(PROC_PIDTBSDINFO)` and `proc_pidpath`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

/// Who a process is: its pid plus what stays fixed for its whole life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The process id.
    pub pid: u32,
    /// When the process started, in the platform's own unit (Linux: clock ticks since boot;
    /// macOS: microseconds since the epoch). Only ever compared for equality.
    pub start_time: u64,
    /// The executable the process runs.
    pub exe: PathBuf,
}

impl Identity {
    /// The identity of this process.
    pub fn current() -> io::Result<Identity> {
        Identity::of_pid(std::process::id())?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "own process missing from the table",
            )
        })
    }

    /// The identity of a live process; `Ok(None)` when there is no such process or it has
    /// already exited (a zombie counts as exited).
    pub fn of_pid(pid: u32) -> io::Result<Option<Identity>> {
        let Some(info) = platform::inspect(pid)? else {
            return Ok(None);
        };
        Ok(Some(Identity {
            pid,
            start_time: info.start_time,
            exe: info.exe.unwrap_or_default(),
        }))
    }
}

/// What the platform tells about one process.
struct ProcInfo {
    start_time: u64,
    /// `None` when the executable cannot be read (another user's process).
    exe: Option<PathBuf>,
}

/// Whether the process `identity` describes is still running: same pid, same start time and,
/// where the executable can be read, the same executable. An executable replaced on disk
/// since the start (an upgraded vmoat) still matches.
pub fn is_alive(identity: &Identity) -> bool {
    let Ok(Some(now)) = platform::inspect(identity.pid) else {
        return false;
    };
    if now.start_time != identity.start_time {
        return false;
    }
    match now.exe {
        Some(exe) => exe == identity.exe || identity.exe.as_os_str().is_empty(),
        None => true,
    }
}

/// Whether any process has this pid, as Lima decides it: `kill(pid, 0)` succeeds or is
/// refused for permissions. Says nothing about which process it is, and a zombie counts; use
/// [`is_alive`] when an identity is known.
pub fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The executable of a live process, when it can be read.
pub fn exe_of(pid: u32) -> Option<PathBuf> {
    platform::inspect(pid)
        .ok()
        .flatten()
        .and_then(|info| info.exe)
}

/// The command-line arguments of a live process, where the platform shows them (Linux:
/// `/proc/<pid>/cmdline`); `None` when it does not, or the process is gone.
pub fn args_of(pid: u32) -> Option<Vec<String>> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        // A zombie or a kernel thread: no arguments to go by.
        return None;
    }
    Some(
        raw.split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

/// Writes an identity record atomically (the agent calls this with its own identity).
pub fn write_identity(path: &Path, identity: &Identity) -> Result<(), FileError> {
    let mut text = serde_json::to_string_pretty(identity).expect("JSON of plain data");
    text.push('\n');
    files::write_atomic(path, text.as_bytes())
}

/// Reads an identity record; `Ok(None)` when there is none.
pub fn read_identity(path: &Path) -> Result<Option<Identity>, FileError> {
    let Some(text) = files::read_nonempty(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| FileError::Malformed {
            path: path.to_owned(),
            format: "JSON",
            source: Box::new(source),
        })
}

/// Reads a pid file (`ha.pid`, `qemu.pid`: a decimal number, optionally followed by a newline);
/// `Ok(None)` when there is none.
pub fn read_pid_file(path: &Path) -> Result<Option<u32>, FileError> {
    let Some(text) = files::read_nonempty(path)? else {
        return Ok(None);
    };
    match text.trim().parse::<u32>() {
        Ok(pid) if pid > 0 => Ok(Some(pid)),
        Ok(_) => Err(bad_pid(path, "pid 0".to_owned())),
        Err(_) => Err(bad_pid(path, format!("{:?} is not a pid", text.trim()))),
    }
}

fn bad_pid(path: &Path, detail: String) -> FileError {
    FileError::Malformed {
        path: path.to_owned(),
        format: "pid",
        source: detail.into(),
    }
}

/// Writes a pid file atomically, as Lima writes `ha.pid`.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<(), FileError> {
    files::write_atomic(path, format!("{pid}\n").as_bytes())
}

#[cfg(target_os = "linux")]
mod platform {
    use std::io;
    use std::path::PathBuf;

    use super::ProcInfo;

    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/exe`.
    pub(super) fn inspect(pid: u32) -> io::Result<Option<ProcInfo>> {
        let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat,
            // ESRCH: the process exited between the open and the read.
            Err(err)
                if err.kind() == io::ErrorKind::NotFound
                    || err.raw_os_error() == Some(libc::ESRCH) =>
            {
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        let (state, start_time) = parse_stat(&stat).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable /proc/{pid}/stat"),
            )
        })?;
        if state == 'Z' || state == 'X' {
            return Ok(None);
        }

        // The kernel appends " (deleted)" when the file was replaced since the start, which
        // happens on every upgrade; the process is still the same one.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|exe| {
                let text = exe.to_string_lossy();
                match text.strip_suffix(" (deleted)") {
                    Some(kept) => PathBuf::from(kept),
                    None => exe,
                }
            });
        Ok(Some(ProcInfo { start_time, exe }))
    }

    /// The state (field 3) and start time (field 22) of a stat line. The command name (field 2)
    /// is in parentheses and may itself hold spaces and parentheses, so fields are counted
    /// from the last `)`.
    pub(super) fn parse_stat(stat: &str) -> Option<(char, u64)> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let start_time = fields.nth(18)?.parse().ok()?;
        Some((state, start_time))
    }
}

#[cfg(target_os = "macos")]
mod platform {
    use std::ffi::OsString;
    use std::io;
    use std::os::unix::ffi::OsStringExt;
    use std::path::PathBuf;

    use super::ProcInfo;

    /// Asks the kernel through libproc.
    pub(super) fn inspect(pid: u32) -> io::Result<Option<ProcInfo>> {
        let Ok(pid) = libc::c_int::try_from(pid) else {
            return Ok(None);
        };
        // SAFETY: proc_bsdinfo is plain old data; all-zero is a valid value.
        let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
        let size = size_of::<libc::proc_bsdinfo>() as libc::c_int;
        // SAFETY: the buffer is a proc_bsdinfo of the size given.
        let got = unsafe {
            libc::proc_pidinfo(pid, libc::PROC_PIDTBSDINFO, 0, (&raw mut info).cast(), size)
        };
        if got != size {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::ESRCH) | Some(0) | None => Ok(None),
                Some(libc::EPERM) => Err(io::Error::from_raw_os_error(libc::EPERM)),
                Some(_) => Ok(None),
            };
        }
        if info.pbi_status == libc::SZOMB {
            return Ok(None);
        }
        let start_time = info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec;

        let mut buf = vec![0u8; libc::PROC_PIDPATHINFO_MAXSIZE as usize];
        // SAFETY: the buffer has the size given.
        let len = unsafe { libc::proc_pidpath(pid, buf.as_mut_ptr().cast(), buf.len() as u32) };
        let exe = (len > 0).then(|| {
            buf.truncate(len as usize);
            PathBuf::from(OsString::from_vec(buf))
        });
        Ok(Some(ProcInfo { start_time, exe }))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod platform {
    use std::io;

    use super::ProcInfo;

    /// Other systems have no portable process table; only the pid can be checked.
    pub(super) fn inspect(pid: u32) -> io::Result<Option<ProcInfo>> {
        Ok(super::pid_exists(pid).then_some(ProcInfo {
            start_time: 0,
            exe: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use super::*;

    /// A child process that is killed and reaped when the test ends, pass or fail.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper() -> Reaped {
        Reaped(
            Command::new("sleep")
                .arg("300")
                .spawn()
                .expect("spawn sleep"),
        )
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 10000 100";
        assert_eq!(platform::parse_stat(line), Some(('S', 987654)));
        assert_eq!(platform::parse_stat("42 (x) S 1"), None);
    }

    #[test]
    fn own_identity_is_alive() {
        let me = Identity::current().unwrap();
        assert_eq!(me.pid, std::process::id());
        assert_eq!(me.exe, std::env::current_exe().unwrap());
        assert!(is_alive(&me));
    }

    #[test]
    fn a_live_unrelated_process_at_the_recorded_pid_is_not_the_agent() {
        let child = sleeper();
        let pid = child.0.id();
        let me = Identity::current().unwrap();

        // The recorded identity is ours (the "agent"), but the pid now belongs to `sleep`:
        // what a pid file looks like after the agent died and its pid was reused.
        let reused = Identity { pid, ..me.clone() };
        assert!(pid_exists(pid), "the pid alone says alive");
        assert!(!is_alive(&reused), "the identity says it is someone else");

        // Same executable but another start time is another process too.
        let sleep = Identity::of_pid(pid).unwrap().unwrap();
        assert!(is_alive(&sleep));
        let restarted = Identity {
            start_time: sleep.start_time + 1,
            ..sleep.clone()
        };
        assert!(!is_alive(&restarted));
    }

    #[test]
    fn a_dead_pid_is_not_alive() {
        let mut child = sleeper();
        let identity = Identity::of_pid(child.0.id()).unwrap().unwrap();
        assert!(is_alive(&identity));

        child.0.kill().unwrap();
        // Not yet reaped: a zombie, which must already count as dead.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!is_alive(&identity));
        child.0.wait().unwrap();
        assert!(!is_alive(&identity));
        assert!(Identity::of_pid(identity.pid).unwrap().is_none());
        assert!(!pid_exists(identity.pid));
    }

    #[test]
    fn identity_and_pid_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("vmoat-process-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let me = Identity::current().unwrap();

        write_identity(&dir.join("id.json"), &me).unwrap();
        assert_eq!(read_identity(&dir.join("id.json")).unwrap(), Some(me));
        assert_eq!(read_identity(&dir.join("none.json")).unwrap(), None);

        write_pid_file(&dir.join("ha.pid"), 1234).unwrap();
        assert_eq!(read_pid_file(&dir.join("ha.pid")).unwrap(), Some(1234));
        std::fs::write(dir.join("bad.pid"), "12ab\n").unwrap();
        let err = read_pid_file(&dir.join("bad.pid")).unwrap_err();
        assert!(err.to_string().contains("bad.pid"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
