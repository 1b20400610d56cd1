//! Progress lines of the tier on the real stderr, past the test harness's capture, so a run
//! of many minutes shows what it is doing while it does it.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `[e2e HH:MM:SS group] message` to stderr at once (not captured by the harness).
pub fn note(group: &str, message: impl AsRef<str>) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let line = format!("[e2e {h:02}:{m:02}:{s:02} {group}] {}\n", message.as_ref());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
