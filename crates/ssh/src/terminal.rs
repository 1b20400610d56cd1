//! The local side of an interactive session: put the user's terminal in raw mode and always
//! put it back, and report its size and size changes.
//!
//! These helpers know nothing of SSH: the CLI process uses them on its own terminal while the
//! bytes travel through the host agent, which owns the session and applies the window changes
//! the CLI sends it ([`crate::ExecControl::window_change`]).
//!
//! The terminal is restored when the guard drops, when the process panics (a panic hook), and
//! when SIGINT, SIGTERM or SIGHUP arrive: then the terminal is restored and the process ends by
//! that signal, as it would have without the guard. Once a guard has been entered, those three
//! signals keep this behaviour for the rest of the process (tokio cannot uninstall a handler).

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Mutex, Once};

use nix::sys::signal::{SigHandler, Signal};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{SignalKind, signal};

use crate::error::TerminalError;
use crate::exec::PtySize;

/// The terminal state to put back: which fd, and its settings before raw mode.
static SAVED: Mutex<Option<(RawFd, Termios)>> = Mutex::new(None);
static HOOKS: Once = Once::new();

/// Raw mode on a terminal, undone when dropped (and on panic and SIGINT/SIGTERM/SIGHUP).
///
/// Only one guard can be active at a time.
#[derive(Debug)]
pub struct RawTerminal {
    fd: RawFd,
}

impl RawTerminal {
    /// Put the terminal on `fd` (usually stdin) in raw mode. Must be called inside a tokio
    /// runtime (the signal watch runs on it). `fd` must stay open while the guard lives.
    pub fn enter(fd: BorrowedFd<'_>) -> Result<RawTerminal, TerminalError> {
        let raw_fd = fd.as_raw_fd();
        if !nix::unistd::isatty(fd).unwrap_or(false) {
            return Err(TerminalError::NotATerminal { fd: raw_fd });
        }
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TerminalError::NoRuntime)?;

        let sys = |action| {
            move |source| TerminalError::Sys {
                action,
                fd: raw_fd,
                source,
            }
        };
        let original = termios::tcgetattr(fd).map_err(sys("read the settings"))?;
        let mut saved = lock_saved();
        if saved.is_some() {
            return Err(TerminalError::AlreadyRaw { fd: raw_fd });
        }

        HOOKS.call_once(|| install_hooks(&runtime));
        let mut raw = original.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSADRAIN, &raw).map_err(sys("enter raw mode"))?;
        *saved = Some((raw_fd, original));
        Ok(RawTerminal { fd: raw_fd })
    }

    /// The terminal's file descriptor.
    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_saved();
    }
}

fn lock_saved() -> std::sync::MutexGuard<'static, Option<(RawFd, Termios)>> {
    // A panic while holding the lock leaves valid data behind; keep using it.
    SAVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Put back the saved terminal settings, if a guard is active.
fn restore_saved() {
    // try_lock: the panic hook may run while this thread holds the lock.
    let mut saved = match SAVED.try_lock() {
        Ok(saved) => saved,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    if let Some((fd, original)) = saved.take() {
        // SAFETY: the guard's contract keeps `fd` open while the settings are saved.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = termios::tcsetattr(fd, SetArg::TCSADRAIN, &original);
    }
}

/// The panic hook and the signal watch, installed once per process.
fn install_hooks(runtime: &tokio::runtime::Handle) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_saved();
        previous(info);
    }));

    let kinds = [
        (SignalKind::interrupt(), Signal::SIGINT),
        (SignalKind::terminate(), Signal::SIGTERM),
        (SignalKind::hangup(), Signal::SIGHUP),
    ];
    for (kind, number) in kinds {
        let Ok(mut stream) = signal(kind) else {
            tracing::warn!(signal = %number, "cannot watch signal; terminal may stay raw on it");
            continue;
        };
        runtime.spawn(async move {
            if stream.recv().await.is_some() {
                restore_saved();
                die_by(number);
            }
        });
    }
}

/// End the process by `number` with its default action, so the parent sees the signal.
fn die_by(number: Signal) {
    // SAFETY: resetting a disposition to the default has no memory-safety preconditions.
    let _ = unsafe { nix::sys::signal::signal(number, SigHandler::SigDfl) };
    let _ = nix::sys::signal::raise(number);
    // Only reached if the signal is blocked on this thread.
    std::process::exit(128 + number as i32);
}

/// The size of the terminal on `fd`, or `None` if it is not a terminal.
pub fn terminal_size(fd: BorrowedFd<'_>) -> Option<PtySize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which is valid and aligned.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0).then(|| PtySize {
        cols: u32::from(size.ws_col),
        rows: u32::from(size.ws_row),
        pixel_width: u32::from(size.ws_xpixel),
        pixel_height: u32::from(size.ws_ypixel),
    })
}

/// Size changes of a terminal, from SIGWINCH.
#[derive(Debug)]
pub struct WindowChanges {
    fd: RawFd,
    signal: tokio::signal::unix::Signal,
    last: Option<PtySize>,
}

impl WindowChanges {
    /// Watch the terminal on `fd` (which must stay open while this lives). Needs a tokio
    /// runtime.
    pub fn new(fd: BorrowedFd<'_>) -> Result<WindowChanges, TerminalError> {
        tokio::runtime::Handle::try_current().map_err(|_| TerminalError::NoRuntime)?;
        let signal = signal(SignalKind::window_change()).map_err(|e| TerminalError::Sys {
            action: "watch SIGWINCH",
            fd: fd.as_raw_fd(),
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
        })?;
        Ok(WindowChanges {
            fd: fd.as_raw_fd(),
            signal,
            last: terminal_size(fd),
        })
    }

    /// The next new size; `None` if the terminal went away.
    pub async fn next(&mut self) -> Option<PtySize> {
        loop {
            self.signal.recv().await?;
            // SAFETY: the constructor's contract keeps `fd` open while this lives.
            let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
            let size = terminal_size(fd)?;
            if self.last != Some(size) {
                self.last = Some(size);
                return Some(size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;
    use std::os::fd::AsFd;

    fn set_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one valid `winsize`.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn size_of_a_pty_and_of_a_non_terminal() {
        let pty = openpty(None, None).unwrap();
        set_size(pty.master.as_fd(), 33, 101);
        let size = terminal_size(pty.slave.as_fd()).unwrap();
        assert_eq!((size.rows, size.cols), (33, 101));

        let file = tempfile::tempfile().unwrap();
        assert_eq!(terminal_size(file.as_fd()), None);
    }

    // One test drives the process-wide guard so no other test races on it.
    #[tokio::test]
    async fn raw_mode_is_entered_restored_and_exclusive() {
        let pty = openpty(None, None).unwrap();
        let before = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert!(before.local_flags.contains(termios::LocalFlags::ICANON));

        let guard = RawTerminal::enter(pty.slave.as_fd()).unwrap();
        let raw = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert!(!raw.local_flags.contains(termios::LocalFlags::ICANON));
        assert!(!raw.local_flags.contains(termios::LocalFlags::ECHO));
        let second = RawTerminal::enter(pty.slave.as_fd()).unwrap_err();
        assert!(
            matches!(second, TerminalError::AlreadyRaw { .. }),
            "{second:?}"
        );
        drop(guard);

        let after = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert_eq!(after.local_flags, before.local_flags);
        assert_eq!(after.input_flags, before.input_flags);

        // A panic with the guard alive restores the terminal through the hook and unwinding.
        let slave = pty.slave.try_clone().unwrap();
        let caught = std::panic::catch_unwind(move || {
            let _guard = RawTerminal::enter(slave.as_fd()).unwrap();
            panic!("deliberate");
        });
        assert!(caught.is_err());
        let after_panic = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert_eq!(after_panic.local_flags, before.local_flags);
    }

    #[test]
    fn a_file_is_not_a_terminal() {
        let file = tempfile::tempfile().unwrap();
        let err = RawTerminal::enter(file.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not a terminal"), "{err}");
    }

    #[tokio::test]
    async fn window_changes_report_new_sizes() {
        let pty = openpty(None, None).unwrap();
        set_size(pty.master.as_fd(), 24, 80);
        let mut changes = WindowChanges::new(pty.slave.as_fd()).unwrap();

        set_size(pty.master.as_fd(), 50, 132);
        nix::sys::signal::raise(Signal::SIGWINCH).unwrap();
        let size = tokio::time::timeout(std::time::Duration::from_secs(30), changes.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((size.rows, size.cols), (50, 132));
    }
}
