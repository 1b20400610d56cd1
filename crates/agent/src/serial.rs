//! Reading the guest's serial console log: its tail for error messages, whether the kernel has
//! started, and the messages that mean a boot can never finish (so the agent fails at once
//! instead of waiting out a stage's timeout).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the log's end is read for a tail.
const TAIL_BYTES: u64 = 64 * 1024;

/// Console messages after which a boot cannot succeed.
const FATAL: &[&str] = &[
    "Kernel panic - not syncing",
    "Gave up waiting for root file system device",
    "Dropping to a shell!",
    "You are in emergency mode",
    "Failed to mount /sysroot",
];

/// The last `lines` lines of the serial log, with terminal control sequences removed.
pub fn tail(path: &Path, lines: usize) -> Vec<String> {
    let text = read_end(path, TAIL_BYTES);
    let cleaned = strip_controls(&text);
    let all: Vec<&str> = cleaned
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

/// Whether the guest has printed anything yet.
pub fn has_output(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// The first fatal console message in the log's end, if the boot has failed for good.
pub fn fatal_message(path: &Path) -> Option<String> {
    let text = strip_controls(&read_end(path, TAIL_BYTES));
    text.lines()
        .find(|line| FATAL.iter().any(|marker| line.contains(marker)))
        .map(|line| line.trim().to_owned())
}

fn read_end(path: &Path, max: u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        let _ = file.seek(SeekFrom::Start(len - max));
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Removes ANSI escape sequences and other control characters except newlines and tabs.
fn strip_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: ESC + one char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_drops_colours_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(
            &log,
            "one\r\n\r\n\u{1b}[0;32m  OK  \u{1b}[0m] Started ssh\r\nthree\nfour\n",
        )
        .unwrap();
        assert_eq!(tail(&log, 3), ["  OK  ] Started ssh", "three", "four"]);
        assert_eq!(tail(&log, 10).len(), 4);
        assert!(has_output(&log));
        assert!(fatal_message(&log).is_none());
    }

    #[test]
    fn a_missing_root_is_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(
            &log,
            "Begin: Waiting for root file system ...\nGave up waiting for root file system \
             device.  Common problems:\nALERT!  LABEL=nope does not exist.  Dropping to a \
             shell!\n",
        )
        .unwrap();
        assert!(fatal_message(&log).unwrap().starts_with("Gave up waiting"));
    }

    #[test]
    fn a_missing_log_is_empty() {
        assert!(tail(Path::new("/nonexistent/serial.log"), 5).is_empty());
        assert!(!has_output(Path::new("/nonexistent/serial.log")));
    }
}
