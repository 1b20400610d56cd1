//! Host processes as the tests see them through `/proc`: whether a pid is alive (a zombie is
//! not), its command line, ending one by pid, and finding the qemu processes of a disk.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Whether `pid` names a live process (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The command line of `pid`, its arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    Some(words.join(" "))
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: Signal) -> nix::Result<()> {
    kill(Pid::from_raw(pid as i32), signal)
}

/// SIGKILL to `pid`, then waits up to `wait` for it to be gone. Returns whether it is gone.
pub fn kill9(pid: u32, wait: Duration) -> bool {
    let _ = signal(pid, Signal::SIGKILL);
    wait_gone(pid, wait)
}

/// Waits up to `wait` for `pid` to end. Returns whether it ended.
pub fn wait_gone(pid: u32, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Every live process (but this one) whose command line contains `needle`, as `(pid,
/// command line)`: what `pgrep -af NEEDLE` shows.
pub fn mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, String)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && alive(pid))
        .filter_map(|pid| Some((pid, cmdline(pid)?)))
        .filter(|(_, line)| line.contains(needle))
        .collect();
    found.sort();
    found
}

/// The live qemu processes whose command line names `disk`: more than one would mean a VM
/// started twice on one disk.
pub fn qemu_processes_on(disk: &Path) -> Vec<u32> {
    let disk = disk.display().to_string();
    mentioning(&disk)
        .into_iter()
        .filter(|(_, line)| {
            line.split(' ')
                .next()
                .is_some_and(|argv0| argv0.contains("qemu-system"))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Reads a pid file (`ha.pid`, `qemu.pid`).
pub fn read_pid(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_seen_alive_by_its_command_line_and_dead_once_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30.25")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(alive(pid));
        // Until the child has exec'd, its command line is not sleep's yet.
        let deadline = Instant::now() + Duration::from_secs(10);
        while cmdline(pid).as_deref() != Some("sleep 30.25") {
            assert!(Instant::now() < deadline, "{:?}", cmdline(pid));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(mentioning("sleep 30.25").iter().any(|(p, _)| *p == pid));

        // Killed but not yet reaped, it is a zombie: dead all the same.
        signal(pid, Signal::SIGKILL).unwrap();
        assert!(wait_gone(pid, Duration::from_secs(10)));
        child.wait().unwrap();
        assert!(cmdline(pid).is_none_or(|l| l.is_empty()));
    }
}
