//! vmoat's exit codes, in one place, and how an error becomes one.
//!
//! Library crates return typed errors; the CLI wraps them with `anyhow` context. An error that
//! must end with a specific code carries an [`Exit`] in its chain (see [`WithExit`]); anything
//! else is an in-VM or internal failure and exits 1.

use std::fmt;

/// A process exit status with a meaning, as `spec.md` lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Success.
    Ok,
    /// The command in the VM failed, or vmoat failed in a way no other code covers.
    Failed,
    /// Usage or config error.
    Usage,
    /// The VM is not running or not created.
    NotRunning,
    /// A boot stage or the health wait timed out.
    Timeout,
    /// This host cannot run VMs.
    HostUnsupported,
    /// An image download or verification failed.
    Image,
    /// The status of a command run in the VM (`test`, `ssh CMD`), passed through as is.
    Passthrough(u8),
}

impl Exit {
    /// The numeric status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::NotRunning => 3,
            Exit::Timeout => 4,
            Exit::HostUnsupported => 5,
            Exit::Image => 6,
            Exit::Passthrough(code) => code,
        }
    }
}

/// A marker in an error chain that fixes the exit status. It displays as nothing so the
/// printed chain stays about the problem.
#[derive(Debug)]
pub struct Coded(pub Exit);

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {}", self.0.code())
    }
}

impl std::error::Error for Coded {}

/// An error with its exit status and the message to print.
#[derive(Debug)]
pub struct CodedError {
    /// Exit status.
    pub exit: Exit,
    /// The message; its chain is printed once, at the edge.
    pub error: anyhow::Error,
}

impl CodedError {
    /// An error with an explicit status.
    pub fn new(exit: Exit, error: impl Into<anyhow::Error>) -> CodedError {
        CodedError {
            exit,
            error: error.into(),
        }
    }

    /// A message with an explicit status.
    pub fn msg(exit: Exit, message: impl fmt::Display) -> CodedError {
        CodedError::new(exit, anyhow::anyhow!("{message}"))
    }
}

impl fmt::Display for CodedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for CodedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// Gives a result an exit status.
pub trait WithExit<T> {
    /// Marks the error, if any, to end the process with `exit`.
    fn exit_with(self, exit: Exit) -> Result<T, CodedError>;
}

impl<T, E: Into<anyhow::Error>> WithExit<T> for Result<T, E> {
    fn exit_with(self, exit: Exit) -> Result<T, CodedError> {
        self.map_err(|e| CodedError::new(exit, e))
    }
}

impl From<anyhow::Error> for CodedError {
    fn from(error: anyhow::Error) -> CodedError {
        let exit = error
            .chain()
            .find_map(|e| {
                e.downcast_ref::<CodedError>()
                    .map(|c| c.exit)
                    .or_else(|| e.downcast_ref::<Coded>().map(|c| c.0))
            })
            .unwrap_or(Exit::Failed);
        CodedError { exit, error }
    }
}

/// Result type of every command.
pub type CmdResult<T = Exit> = Result<T, CodedError>;

/// Help text listing the exit codes, shown under `vmoat --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  the command in the VM failed (test and ssh CMD exit with its own status)
  2  usage or config error
  3  VM not running or not created
  4  boot or health timeout
  5  this host cannot run VMs (no hypervisor, no qemu)
  6  image download or verification failed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anyhow_keeps_the_code_through_context() {
        let inner: Result<(), _> = Err(anyhow::anyhow!("boom")).exit_with(Exit::Timeout);
        let outer = anyhow::Error::new(inner.unwrap_err()).context("while booting");
        assert_eq!(CodedError::from(outer).exit, Exit::Timeout);
    }

    #[test]
    fn uncoded_errors_exit_one() {
        assert_eq!(CodedError::from(anyhow::anyhow!("x")).exit, Exit::Failed);
    }
}
