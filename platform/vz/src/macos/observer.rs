//! The VM's delegate: Virtualization.framework tells it when the guest powers off or the VM
//! stops on an error, and it hands that to whoever waits in [`StopSignal`]. The delegate runs
//! on the VM's queue; waiters block on a condition variable on their own threads.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use objc2::rc::Retained;
use objc2::runtime::NSObject;
use objc2::{AllocAnyThread, DefinedClass, define_class, msg_send};
use objc2_foundation::{NSError, NSObjectProtocol};
use objc2_virtualization::{VZVirtualMachine, VZVirtualMachineDelegate};

/// Why the VM stopped without being asked to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum StopReason {
    /// The guest powered itself off.
    GuestStopped,
    /// The framework stopped the VM on an error, described here.
    Error(String),
}

/// The last stop the framework reported, with a way to wait for one.
#[derive(Default)]
pub(super) struct StopSignal {
    reason: Mutex<Option<StopReason>>,
    changed: Condvar,
}

impl StopSignal {
    /// Records a stop and wakes the waiters.
    fn record(&self, reason: StopReason) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.changed.notify_all();
    }

    /// The stop reported so far, if any.
    pub(super) fn get(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `timeout` for a stop.
    pub(super) fn wait(&self, timeout: Duration) -> Option<StopReason> {
        let deadline = Instant::now() + timeout;
        let mut reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);

        while reason.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            reason = self
                .changed
                .wait_timeout(reason, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }

        reason.clone()
    }
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and StopObserver implements no Drop.
    #[unsafe(super(NSObject))]
    #[name = "VmoatVzStopObserver"]
    #[ivars = Arc<StopSignal>]
    pub(super) struct StopObserver;

    unsafe impl NSObjectProtocol for StopObserver {}

    unsafe impl VZVirtualMachineDelegate for StopObserver {
        #[unsafe(method(guestDidStopVirtualMachine:))]
        fn guest_did_stop(&self, _vm: &VZVirtualMachine) {
            self.ivars().record(StopReason::GuestStopped);
        }

        #[unsafe(method(virtualMachine:didStopWithError:))]
        fn did_stop_with_error(&self, _vm: &VZVirtualMachine, error: &NSError) {
            let description = error.localizedDescription().to_string();
            self.ivars().record(StopReason::Error(description));
        }
    }
);

impl StopObserver {
    /// A delegate reporting into `signal`.
    pub(super) fn new(signal: Arc<StopSignal>) -> Retained<StopObserver> {
        let this = Self::alloc().set_ivars(signal);
        // SAFETY: `init` is NSObject's designated initialiser and the ivars are set.
        unsafe { msg_send![super(this), init] }
    }
}
