//! Confinement of Virtualization.framework objects to one serial dispatch queue.
//!
//! A `VZVirtualMachine` must only be used on the queue it was created with, and its Rust
//! binding is neither `Send` nor `Sync`. [`Confined`] owns such objects together with their
//! queue and only ever touches them inside blocks run on that queue, so the handle itself can
//! move between threads and be shared: the agent calls the driver from any blocking task.

use dispatch2::{DispatchQueue, DispatchRetained};

/// Lets a value cross into or out of a dispatch block; each use says why that is sound.
pub(super) struct AssertSend<T>(T);

// SAFETY: only constructed for values that are created on, used on and dropped on the owning
// serial queue (see `Confined`), or for plain data whose only non-`Send` part is a pointer to
// such a value; moving the wrapper moves pointers, never touches the objects.
unsafe impl<T> Send for AssertSend<T> {}

impl<T> AssertSend<T> {
    /// Wraps `value`; the caller keeps the queue discipline described on the type.
    pub(super) fn new(value: T) -> AssertSend<T> {
        AssertSend(value)
    }

    /// Unwraps the value. A method, not field access, so closures capture the whole wrapper.
    pub(super) fn into_inner(self) -> T {
        self.0
    }
}

/// A value created on, used on and dropped on its own serial dispatch queue.
pub(super) struct Confined<T> {
    queue: DispatchRetained<DispatchQueue>,
    value: Option<T>,
}

// SAFETY: the value is created inside a block on `queue`, dereferenced only inside blocks run
// synchronously on `queue` (`run`), and dropped inside a block on `queue` (`Drop`). The queue
// is serial, so those blocks never overlap. Sharing or moving the `Confined` handle moves or
// shares only the pointer-sized `Retained` values, which no thread but the queue's ever
// dereferences.
unsafe impl<T> Send for Confined<T> {}
// SAFETY: as above; `&Confined` only gives access through `run`, which serialises on the queue.
unsafe impl<T> Sync for Confined<T> {}

impl<T> Confined<T> {
    /// Creates the value by running `make` on `queue`.
    pub(super) fn new<E: Send>(
        queue: DispatchRetained<DispatchQueue>,
        make: impl FnOnce() -> Result<T, E> + Send,
    ) -> Result<Confined<T>, E> {
        let mut made: Option<Result<AssertSend<T>, E>> = None;
        queue.exec_sync(|| made = Some(make().map(AssertSend::new)));

        let made = made.expect("dispatch_sync runs its block before returning");
        Ok(Confined {
            queue,
            value: Some(made?.into_inner()),
        })
    }

    /// Runs `f` with the value, on the queue, and returns its result.
    ///
    /// Must not be called from a block already running on this queue (it would deadlock);
    /// nothing in this crate calls it from completion handlers or delegate methods.
    pub(super) fn run<R: Send>(&self, f: impl FnOnce(&T) -> R + Send) -> R {
        let value = self
            .value
            .as_ref()
            .expect("the value lives until Confined is dropped");
        let value = AssertSend::new(value as *const T);

        let mut out = None;
        self.queue.exec_sync(|| {
            // SAFETY: `value` points into `self`, which outlives this synchronous call, and we
            // are on the value's queue, the only place it is ever dereferenced.
            let value = unsafe { &*value.into_inner() };
            out = Some(f(value));
        });

        out.expect("dispatch_sync runs its block before returning")
    }
}

impl<T> Drop for Confined<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            // The framework's objects are released where they were used.
            let value = AssertSend::new(value);
            self.queue.exec_sync(move || drop(value.into_inner()));
        }
    }
}
