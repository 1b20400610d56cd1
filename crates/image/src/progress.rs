//! Progress of long image work on stderr: a live bar (bytes, rate, ETA) or spinner when
//! stderr is a terminal, plain timestamped lines every few seconds when it is not (CI logs,
//! scripts, coding agents). The stage name is always `image`.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The stage name shown for image downloads and builds.
pub const STAGE: &str = "image";

/// How often plain lines repeat while nothing else changes.
const LINE_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Hidden,
    Bar,
    Lines,
}

/// Where and how progress is shown. Cheap to share by reference across tasks.
#[derive(Debug)]
pub struct Progress {
    mode: Mode,
}

impl Progress {
    /// Progress on stderr: a bar when stderr is a terminal, plain lines otherwise.
    pub fn stderr() -> Progress {
        let mode = if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        };
        Progress { mode }
    }

    /// Plain timestamped lines on stderr, even on a terminal.
    pub fn lines() -> Progress {
        Progress { mode: Mode::Lines }
    }

    /// No progress output at all (`-q`, tests).
    pub fn hidden() -> Progress {
        Progress { mode: Mode::Hidden }
    }

    /// Starts a transfer of `total` bytes (if known), `done` of them already on disk.
    pub fn bytes(&self, what: &str, total: Option<u64>, done: u64) -> BytesTask {
        let bar = (self.mode == Mode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{prefix} {wide_msg} {bar:24} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
            } else {
                "{prefix} {wide_msg} {spinner} {bytes} {bytes_per_sec}"
            };
            bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
            bar.set_prefix(format!("{STAGE}:"));
            bar.set_message(what.to_owned());
            bar.set_position(done);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });

        let task = BytesTask {
            mode: self.mode,
            what: what.to_owned(),
            total,
            done,
            start_done: done,
            started: Instant::now(),
            last_line: Mutex::new(Instant::now()),
            bar,
        };
        task.line(&task.status());
        task
    }

    /// Starts a wait with changing messages (a build); shows elapsed time.
    pub fn wait(&self, what: &str) -> WaitTask {
        let bar = (self.mode == Mode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{prefix} {spinner} {wide_msg} {elapsed}")
                .expect("valid template");
            bar.set_style(style);
            bar.set_prefix(format!("{STAGE}:"));
            bar.set_message(what.to_owned());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });

        let task = WaitTask {
            mode: self.mode,
            message: Mutex::new(what.to_owned()),
            started: Instant::now(),
            last_line: Mutex::new(Instant::now()),
            bar,
        };
        emit(self.mode, what);
        task
    }

    /// One plain message under the stage name (a cache hit, a decision).
    pub fn note(&self, text: &str) {
        match self.mode {
            Mode::Hidden => {}
            Mode::Bar => {
                let _ = writeln!(std::io::stderr(), "{STAGE}: {text}");
            }
            Mode::Lines => emit(Mode::Lines, text),
        }
    }
}

/// A running transfer. Finishes (and clears the bar) when dropped.
#[derive(Debug)]
pub struct BytesTask {
    mode: Mode,
    what: String,
    total: Option<u64>,
    done: u64,
    start_done: u64,
    started: Instant,
    last_line: Mutex<Instant>,
    bar: Option<ProgressBar>,
}

impl BytesTask {
    /// Counts `n` more bytes.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        if self.mode == Mode::Lines {
            let mut last = self.last_line.lock().expect("progress lock");
            if last.elapsed() >= LINE_EVERY {
                *last = Instant::now();
                drop(last);
                self.line(&self.status());
            }
        }
    }

    /// Bytes done so far, including those that were on disk at the start.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Ends the transfer with a closing line.
    pub fn finish(self, outcome: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = (self.done - self.start_done) as f64 / secs.max(1e-3);
        let text = format!(
            "{}: {outcome}, {} in {secs:.1} s ({}/s)",
            self.what,
            human_bytes(self.done),
            human_bytes(rate as u64)
        );
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        match self.mode {
            Mode::Hidden => {}
            Mode::Bar => {
                let _ = writeln!(std::io::stderr(), "{STAGE}: {text}");
            }
            Mode::Lines => emit(Mode::Lines, &text),
        }
    }

    fn status(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = (self.done - self.start_done) as f64 / elapsed;
        match self.total {
            Some(total) if total > 0 => {
                let left = total.saturating_sub(self.done) as f64;
                let eta = if rate > 0.0 {
                    format!("{:.0} s", left / rate)
                } else {
                    "unknown".to_owned()
                };
                format!(
                    "{}: {} / {} ({:.0} %), {}/s, ETA {eta}",
                    self.what,
                    human_bytes(self.done),
                    human_bytes(total),
                    self.done as f64 * 100.0 / total as f64,
                    human_bytes(rate as u64)
                )
            }
            _ => format!(
                "{}: {}, {}/s",
                self.what,
                human_bytes(self.done),
                human_bytes(rate as u64)
            ),
        }
    }

    fn line(&self, text: &str) {
        if self.mode == Mode::Lines {
            emit(self.mode, text);
        }
    }
}

impl Drop for BytesTask {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A running wait with a changing message. Finishes when dropped.
#[derive(Debug)]
pub struct WaitTask {
    mode: Mode,
    message: Mutex<String>,
    started: Instant,
    last_line: Mutex<Instant>,
    bar: Option<ProgressBar>,
}

impl WaitTask {
    /// Shows a new message; plain mode prints it at once when it changed.
    pub fn set_message(&self, text: &str) {
        let mut message = self.message.lock().expect("progress lock");
        if *message == text {
            return;
        }
        text.clone_into(&mut message);
        drop(message);

        if let Some(bar) = &self.bar {
            bar.set_message(text.to_owned());
        }
        if self.mode == Mode::Lines {
            *self.last_line.lock().expect("progress lock") = Instant::now();
            emit(self.mode, &format!("{text} ({:.0} s)", self.elapsed_secs()));
        }
    }

    /// Repeats the message in plain mode when nothing was printed for a while.
    pub fn heartbeat(&self) {
        if self.mode != Mode::Lines {
            return;
        }
        let mut last = self.last_line.lock().expect("progress lock");
        if last.elapsed() >= LINE_EVERY * 2 {
            *last = Instant::now();
            drop(last);
            let message = self.message.lock().expect("progress lock").clone();
            emit(
                self.mode,
                &format!("{message} (still running, {:.0} s)", self.elapsed_secs()),
            );
        }
    }

    /// Seconds since the wait began.
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Ends the wait with a closing line.
    pub fn finish(self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let line = format!("{text} in {:.1} s", self.elapsed_secs());
        match self.mode {
            Mode::Hidden => {}
            Mode::Bar => {
                let _ = writeln!(std::io::stderr(), "{STAGE}: {line}");
            }
            Mode::Lines => emit(Mode::Lines, &line),
        }
    }
}

impl Drop for WaitTask {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Prints one plain progress line: `<UTC time> image: <text>`.
fn emit(mode: Mode, text: &str) {
    if mode == Mode::Lines {
        let _ = writeln!(std::io::stderr(), "{} {STAGE}: {text}", utc_now());
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_from_unix(secs)
}

/// Formats Unix seconds as an RFC 3339 UTC time (civil-from-days, proleptic Gregorian).
pub fn utc_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;

    // Days since 1970-01-01 to a civil date, counted in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);

    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting_matches_known_instants() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_from_unix(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn hidden_tasks_count_bytes() {
        let progress = Progress::hidden();
        let mut task = progress.bytes("x", Some(10), 4);
        task.inc(6);
        assert_eq!(task.done(), 10);
        assert!(task.status().contains("100 %"), "{}", task.status());
        task.finish("done");
    }
}
