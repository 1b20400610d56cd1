//! Fixtures shared by the tests of one test binary, and the work done when the process ends.
//!
//! A [`Shared`] fixture is built by the first test that asks for it (the others wait for
//! it) and lives until the process ends; a static is never dropped, so whatever it owns is
//! cleaned up by the exit hooks ([`at_exit`]), which run when the test harness returns or
//! exits, failures included. A fixture whose construction failed is not built again: every
//! later test fails at once with the first failure's message.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once, OnceLock};

type Hook = Box<dyn FnOnce() + Send>;

static HOOKS: Mutex<Vec<Hook>> = Mutex::new(Vec::new());
static REGISTER: Once = Once::new();
static PANICKED: AtomicBool = AtomicBool::new(false);

/// Runs `hook` when the process ends (in reverse order of registration).
pub(crate) fn at_exit(hook: impl FnOnce() + Send + 'static) {
    REGISTER.call_once(|| {
        // SAFETY: `run_hooks` is a plain `extern "C" fn` with no arguments, as atexit wants;
        // it catches every panic, so none unwinds into libc.
        unsafe {
            libc::atexit(run_hooks);
        }
        // Note every panic (a failed assertion anywhere), so an exit-time cleanup knows to
        // keep the evidence.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
    });
    HOOKS.lock().expect("hooks lock").push(Box::new(hook));
}

/// Whether any thread of this process has panicked (a test failed).
pub(crate) fn any_panic() -> bool {
    PANICKED.load(Ordering::SeqCst)
}

extern "C" fn run_hooks() {
    let hooks = std::mem::take(&mut *HOOKS.lock().unwrap_or_else(|e| e.into_inner()));
    for hook in hooks.into_iter().rev() {
        let _ = std::panic::catch_unwind(AssertUnwindSafe(hook));
    }
}

/// A fixture built once per test binary and shared by its tests.
///
/// ```ignore
/// static PAIR: Shared<Pair> = Shared::new();
/// let pair = PAIR.get(Pair::boot);
/// ```
pub struct Shared<T> {
    cell: OnceLock<Result<T, String>>,
}

impl<T: Sync> Shared<T> {
    /// An empty fixture, for a `static`.
    pub const fn new() -> Shared<T> {
        Shared {
            cell: OnceLock::new(),
        }
    }

    /// The fixture, built by `init` on first use. Panics (failing the calling test) when the
    /// fixture could not be built, now or by an earlier test.
    pub fn get(&'static self, init: impl FnOnce() -> T) -> &'static T {
        let built = self.cell.get_or_init(|| {
            std::panic::catch_unwind(AssertUnwindSafe(init))
                .map_err(|payload| crate::steps::panic_text(&*payload))
        });
        match built {
            Ok(fixture) => fixture,
            Err(message) => panic!("the shared fixture could not be built: {message}"),
        }
    }
}

impl<T: Sync> Default for Shared<T> {
    fn default() -> Self {
        Shared::new()
    }
}
