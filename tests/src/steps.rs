//! A scenario on one VM as named steps: a failed check is recorded and the next steps still
//! run (they are independent assertions on the same VM); a failed requirement ends the
//! scenario, since what follows depends on it. [`Steps::finish`] fails the test with every
//! failed step listed.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use crate::log::note;

/// The steps of one scenario.
pub struct Steps {
    name: String,
    failed: Vec<String>,
}

impl Steps {
    /// A scenario called `name` (used in progress lines and the failure summary).
    pub fn new(name: &str) -> Steps {
        Steps {
            name: name.to_owned(),
            failed: Vec::new(),
        }
    }

    /// Runs a check; a panic in it is recorded and the scenario goes on. Returns whether it
    /// passed.
    pub fn check(&mut self, what: &str, check: impl FnOnce()) -> bool {
        match self.run(what, check) {
            Ok(()) => true,
            Err(message) => {
                self.failed.push(format!("{what}: {message}"));
                false
            }
        }
    }

    /// Runs a step the rest depends on; a panic in it fails the test at once, listing the
    /// checks that failed before it.
    pub fn require<T>(&mut self, what: &str, step: impl FnOnce() -> T) -> T {
        match self.run(what, step) {
            Ok(value) => value,
            Err(message) => {
                self.failed.push(format!("{what} (required): {message}"));
                panic!("{}", self.summary());
            }
        }
    }

    /// Fails the test if any step failed.
    pub fn finish(self) {
        if !self.failed.is_empty() {
            panic!("{}", self.summary());
        }
        note(&self.name, "all steps passed");
    }

    fn run<T>(&self, what: &str, step: impl FnOnce() -> T) -> Result<T, String> {
        note(&self.name, format!("step: {what}"));
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(step));
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(value) => {
                note(&self.name, format!("  ok ({secs:.1} s): {what}"));
                Ok(value)
            }
            Err(payload) => {
                note(&self.name, format!("  FAILED ({secs:.1} s): {what}"));
                Err(panic_text(&*payload))
            }
        }
    }

    fn summary(&self) -> String {
        format!(
            "{}: {} step(s) failed:\n\n{}",
            self.name,
            self.failed.len(),
            self.failed.join("\n\n")
        )
    }
}

/// The message of a panic payload.
pub(crate) fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}
