//! Process plumbing: pid files, liveness with identity, signals, and log tails.
//!
//! A pid alone proves nothing after a crash or a host reboot: the number may belong to any
//! process by now. So a pid counts as "our qemu" only when the process's command line names
//! this instance's files (its QMP socket and its disk), which no other process's does.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often waits poll.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// Reads a pid file (a decimal number, possibly with a newline). `None` when absent or not a
/// pid.
pub(crate) fn read_pid_file(path: &Path) -> Option<u32> {
    let text = fs::read_to_string(path).ok()?;
    text.trim().parse().ok().filter(|pid: &u32| *pid > 1)
}

/// Whether a process with this pid exists (a zombie counts as gone).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match kill(Pid::from_raw(raw), None) {
        Ok(()) | Err(Errno::EPERM) => !is_zombie(pid),
        Err(_) => false,
    }
}

fn is_zombie(pid: u32) -> bool {
    // /proc/<pid>/stat: "pid (comm) state …"; comm may hold spaces and parentheses.
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X")
}

/// The command line of a live process, one string per argument.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    if cfg!(target_os = "linux") {
        let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        if raw.is_empty() {
            return None;
        }
        let args = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        return Some(args);
    }

    // Elsewhere (macOS) ps prints the arguments joined by spaces; identity only needs
    // substrings, so one string will do.
    let out = std::process::Command::new("ps")
        .args(["-ww", "-o", "command=", "-p", &pid.to_string()])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !line.is_empty()).then(|| vec![line])
}

/// Whether the live process `pid` has every one of `needles` somewhere in its arguments.
pub(crate) fn runs_with(pid: u32, needles: &[String]) -> bool {
    cmdline(pid).is_some_and(|args| {
        needles
            .iter()
            .all(|needle| args.iter().any(|arg| arg.contains(needle.as_str())))
    })
}

/// Sends `signal` to `pid`; a process already gone is not an error.
pub(crate) fn signal(pid: u32, signal: Signal) -> Result<(), Errno> {
    let raw = i32::try_from(pid).map_err(|_| Errno::ESRCH)?;
    match kill(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sends `signal` to the process group led by `pgid` (a process vmoat started as a group
/// leader); a group already gone is not an error.
pub(crate) fn signal_group(pgid: u32, signal: Signal) -> Result<(), Errno> {
    let raw = i32::try_from(pgid).map_err(|_| Errno::ESRCH)?;
    match kill(Pid::from_raw(-raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits until `done` returns true or `timeout` passes; returns whether it did.
pub(crate) fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// The last `lines` lines of a log file (reading at most its last 16 KiB), trimmed.
pub fn tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 16 * 1024;

    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.seek(SeekFrom::Start(len.saturating_sub(MAX))).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }

    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn identity_needs_every_needle() {
        let mut child = Command::new("sleep").arg("30.123").spawn().unwrap();
        let pid = child.id();

        assert!(alive(pid));
        // Right after spawn the kernel may not have set up the new command line yet (the
        // parent of a vfork resumes mid-exec), so give it a moment.
        let needles = ["sleep".to_owned(), "30.123".to_owned()];
        assert!(wait_until(Duration::from_secs(5), || runs_with(
            pid, &needles
        )));
        assert!(!runs_with(pid, &["sleep".into(), "qmp.sock".into()]));

        signal(pid, Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(!runs_with(pid, &["sleep".into()]));
    }

    #[test]
    fn zombies_are_not_alive() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie.
        assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
        child.wait().unwrap();
    }

    #[test]
    fn pid_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pid");
        assert_eq!(read_pid_file(&p), None);
        fs::write(&p, "1234\n").unwrap();
        assert_eq!(read_pid_file(&p), Some(1234));
        fs::write(&p, "garbage").unwrap();
        assert_eq!(read_pid_file(&p), None);
        fs::write(&p, "1").unwrap();
        assert_eq!(read_pid_file(&p), None, "never init");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c\nd");
        assert_eq!(tail(&p, 10), "a\nb\nc\nd");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }
}
