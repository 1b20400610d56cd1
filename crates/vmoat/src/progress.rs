//! Stage lines on stderr for long work (`boot`, `ssh`, `cloud-init`, `docker`, `provision`,
//! `up`, `health`): a spinner with the elapsed time when stderr is a terminal, plain
//! timestamped lines when it is not, and in both cases a heartbeat every 30 s saying what is
//! awaited, for how long already and how long is left.
#![allow(clippy::print_stderr)]

use std::io::IsTerminal;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a wait says it is still waiting.
pub const HEARTBEAT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Hidden,
    Spinner,
    Lines,
}

/// How progress is shown for this invocation.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    mode: Mode,
}

impl Progress {
    /// Spinner on a terminal, lines otherwise, nothing with `-q`.
    pub fn new(quiet: bool) -> Progress {
        let mode = if quiet {
            Mode::Hidden
        } else if std::io::stderr().is_terminal() {
            Mode::Spinner
        } else {
            Mode::Lines
        };
        Progress { mode }
    }

    /// The image crate's progress with the same choice.
    pub fn for_images(self) -> vmoat_image::Progress {
        match self.mode {
            Mode::Hidden => vmoat_image::Progress::hidden(),
            Mode::Spinner => vmoat_image::Progress::stderr(),
            Mode::Lines => vmoat_image::Progress::lines(),
        }
    }

    /// Starts a stage: `waiting_on` says what it waits for; `limit` is its timeout, if any.
    pub fn stage(self, stage: &str, waiting_on: &str, limit: Option<Duration>) -> StageLine {
        StageLine::start(self.mode, stage, waiting_on, limit)
    }

    /// A one-off line under a stage name.
    pub fn note(self, stage: &str, text: &str) {
        if self.mode != Mode::Hidden {
            emit(stage, text);
        }
    }
}

struct Shared {
    stage: String,
    message: Mutex<String>,
    started: Instant,
    limit: Option<Duration>,
    finished: Mutex<bool>,
    wake: Condvar,
}

/// One running stage; finish it with [`StageLine::done`] or [`StageLine::failed`] (dropping
/// it ends it quietly).
pub struct StageLine {
    mode: Mode,
    shared: Arc<Shared>,
    bar: Option<ProgressBar>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl StageLine {
    fn start(mode: Mode, stage: &str, waiting_on: &str, limit: Option<Duration>) -> StageLine {
        let shared = Arc::new(Shared {
            stage: stage.to_owned(),
            message: Mutex::new(waiting_on.to_owned()),
            started: Instant::now(),
            limit,
            finished: Mutex::new(false),
            wake: Condvar::new(),
        });

        let bar = (mode == Mode::Spinner).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix}: {wide_msg} {elapsed}")
                    .expect("valid template"),
            );
            bar.set_prefix(stage.to_owned());
            bar.set_message(format!("waiting for {waiting_on}"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if mode == Mode::Lines {
            let limit_text = limit
                .map(|l| format!(" (limit {} s)", l.as_secs()))
                .unwrap_or_default();
            emit(stage, &format!("waiting for {waiting_on}{limit_text}"));
        }

        let heartbeat = (mode != Mode::Hidden).then(|| {
            let shared = shared.clone();
            let bar = bar.clone();
            std::thread::spawn(move || heartbeat_loop(&shared, bar.as_ref()))
        });

        StageLine {
            mode,
            shared,
            bar,
            heartbeat,
        }
    }

    /// Says what the stage waits on now.
    pub fn update(&self, waiting_on: &str) {
        let mut message = self.shared.message.lock().expect("progress lock");
        if *message == waiting_on {
            return;
        }
        waiting_on.clone_into(&mut message);
        drop(message);
        match self.mode {
            Mode::Spinner => {
                if let Some(bar) = &self.bar {
                    bar.set_message(format!("waiting for {waiting_on}"));
                }
            }
            Mode::Lines => emit(&self.shared.stage, &format!("waiting for {waiting_on}")),
            Mode::Hidden => {}
        }
    }

    /// Prints a line under this stage without ending it.
    pub fn println(&self, text: &str) {
        match (self.mode, &self.bar) {
            (Mode::Spinner, Some(bar)) => bar.suspend(|| emit(&self.shared.stage, text)),
            (Mode::Hidden, _) => {}
            _ => emit(&self.shared.stage, text),
        }
    }

    /// Ends the stage successfully with a summary.
    pub fn done(mut self, summary: &str) {
        let secs = self.shared.started.elapsed().as_secs_f64();
        self.finish();
        if self.mode != Mode::Hidden {
            emit(&self.shared.stage, &format!("{summary} ({secs:.1} s)"));
        }
    }

    /// Ends the stage as failed (the error itself is printed by the caller).
    pub fn failed(mut self) {
        let secs = self.shared.started.elapsed().as_secs_f64();
        self.finish();
        if self.mode != Mode::Hidden {
            emit(&self.shared.stage, &format!("failed after {secs:.1} s"));
        }
    }

    fn finish(&mut self) {
        *self.shared.finished.lock().expect("progress lock") = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.heartbeat.take() {
            let _ = handle.join();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for StageLine {
    fn drop(&mut self) {
        self.finish();
    }
}

fn heartbeat_loop(shared: &Shared, bar: Option<&ProgressBar>) {
    let mut finished = shared.finished.lock().expect("progress lock");
    loop {
        // A stage done before this thread got here has already notified: waiting now would
        // hold `done` (which joins this thread) for a whole heartbeat.
        if *finished {
            return;
        }
        let (guard, timeout) = shared
            .wake
            .wait_timeout(finished, HEARTBEAT)
            .expect("progress lock");
        finished = guard;
        if *finished {
            return;
        }
        if !timeout.timed_out() {
            continue;
        }

        let elapsed = shared.started.elapsed();
        let message = shared.message.lock().expect("progress lock").clone();
        let left = shared
            .limit
            .map(|l| format!(", {} s left", l.saturating_sub(elapsed).as_secs()))
            .unwrap_or_default();
        let text = format!(
            "still waiting for {message}: {} s so far{left}",
            elapsed.as_secs()
        );
        match bar {
            Some(bar) => bar.suspend(|| emit(&shared.stage, &text)),
            None => emit(&shared.stage, &text),
        }
    }
}

/// One `HH:MM:SS stage: text` line on stderr (UTC, so logs from several hosts line up).
fn emit(stage: &str, text: &str) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    eprintln!("{h:02}:{m:02}:{s:02} {stage}: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_done_at_once_does_not_wait_for_its_heartbeat() {
        // Replaying a booted VM's stages starts and ends each at once; each used to wait out
        // a whole heartbeat when `done` came before the heartbeat thread waited.
        let started = Instant::now();
        for _ in 0..10 {
            StageLine::start(Mode::Lines, "test", "nothing", None).done("done");
        }
        assert!(
            started.elapsed() < HEARTBEAT / 2,
            "10 instant stages took {:?}",
            started.elapsed()
        );
    }
}
