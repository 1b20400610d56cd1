//! Work that must run however a benchmark ends: a VM it booted is stopped and deleted, a
//! hypervisor it started by hand is killed. Each piece is registered when the thing it undoes
//! is made and runs exactly once: when its [`Guard`] drops (normal end, early return, panic
//! unwinding), from [`crate::fail`], or from the signal thread [`on_signals`] starts
//! (Ctrl-C, SIGTERM, SIGHUP), which then exits 130.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

type Work = Box<dyn FnOnce() + Send>;

/// Registered work not yet run, by id, in registration order.
static PENDING: Mutex<Vec<(u64, Work)>> = Mutex::new(Vec::new());

/// Ids for [`PENDING`].
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How many pieces of work are running right now (on any thread).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// How long an exit waits for work another thread is running (a `vmoat destroy` under way).
const DRAIN_LIMIT: Duration = Duration::from_secs(180);

/// Undoes one thing when dropped or [`run`](Guard::run), unless it already ran elsewhere.
#[must_use = "the work runs when the guard drops"]
#[derive(Debug)]
pub struct Guard {
    id: u64,
}

impl Guard {
    /// Runs the work now (if nothing ran it yet).
    pub fn run(self) {
        // Drop does it.
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        run_one(self.id);
    }
}

/// Registers `work` to run once, on whichever exit path comes first.
pub fn register(work: impl FnOnce() + Send + 'static) -> Guard {
    let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
    lock().push((id, Box::new(work)));
    Guard { id }
}

/// Runs every pending piece of work, newest first (what was made last is undone first), and
/// waits (bounded) for pieces other threads are running.
pub fn run_all() {
    loop {
        let next = lock().pop();
        let Some((_, work)) = next else { break };
        run_counted(work);
    }
    let deadline = Instant::now() + DRAIN_LIMIT;
    while RUNNING.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and starts a thread that waits for
/// them, runs [`run_all`] and exits 130. Call it first in `main`, before any other thread
/// starts, so every thread inherits the mask (child processes get a clean mask from std).
pub fn on_signals() {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    if let Err(err) = set.thread_block() {
        crate::note(&format!(
            "cannot block signals ({err}); Ctrl-C may leave a VM running"
        ));
        return;
    }
    std::thread::spawn(move || {
        if let Ok(signal) = set.wait() {
            crate::note(&format!("{signal:?}: stopping what this bench started"));
        }
        run_all();
        std::process::exit(130);
    });
}

fn run_one(id: u64) {
    let work = {
        let mut pending = lock();
        let at = pending.iter().position(|(i, _)| *i == id);
        at.map(|at| pending.remove(at).1)
    };
    if let Some(work) = work {
        run_counted(work);
    }
}

fn run_counted(work: Work) {
    RUNNING.fetch_add(1, Ordering::SeqCst);
    work();
    RUNNING.fetch_sub(1, Ordering::SeqCst);
}

fn lock() -> std::sync::MutexGuard<'static, Vec<(u64, Work)>> {
    // A panic while holding the lock cannot leave the list half-changed (push, pop, remove).
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn work_runs_once_whether_dropped_or_run_all() {
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        let guard = register(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        run_all();
        drop(guard);
        assert_eq!(count.load(Ordering::SeqCst), 1);

        let c = count.clone();
        let guard = register(move || {
            c.fetch_add(10, Ordering::SeqCst);
        });
        guard.run();
        run_all();
        assert_eq!(count.load(Ordering::SeqCst), 11);
    }
}
