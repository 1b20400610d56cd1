//! What can go wrong reading a config: the files themselves (bash errors, bad values) and the
//! machinery around them (no bash, no temp dir). Every message names the file; value errors
//! also name the key and the value.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Why a config could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A config file exists but cannot be read.
    #[error("cannot read {}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// bash rejected the file's syntax.
    #[error("syntax error in {}, line {line}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The line bash reported.
        line: u32,
        /// bash's message.
        message: String,
    },

    /// A command in the file failed (a missing command, `$(false)`, an unset variable under
    /// `set -u`, …).
    #[error("{}, line {line}: {message}", file.display())]
    Command {
        /// The file.
        file: PathBuf,
        /// The line of the failing command.
        line: u32,
        /// bash's message, or the command's exit status and its last line on stderr.
        message: String,
    },

    /// The file ended bash with `exit`.
    #[error(
        "{} calls `exit {status}`; a config must not end the shell (use `return` to stop \
         reading it early)",
        file.display()
    )]
    Exited {
        /// The file.
        file: PathBuf,
        /// The status it exited with.
        status: i32,
    },

    /// bash died from a signal while reading the file.
    #[error("bash was killed by signal {signal} while reading {}", file.display())]
    Killed {
        /// The file.
        file: PathBuf,
        /// The signal number.
        signal: i32,
    },

    /// The file did not finish in time; vmoat killed bash and everything it started.
    #[error(
        "{} did not finish within {seconds} s, so vmoat stopped it; look for a command in it \
         that waits (for input, the network, a lock or `sleep`)",
        file.display()
    )]
    TimedOut {
        /// The file that was running.
        file: PathBuf,
        /// The time limit.
        seconds: u64,
    },

    /// A key holds the wrong kind of bash value (an array where one value is wanted, or an
    /// associative array).
    #[error("{key} in {} is {found}; {expected}", file.display())]
    Shape {
        /// The key.
        key: &'static str,
        /// The file that set it.
        file: PathBuf,
        /// What the file gave.
        found: &'static str,
        /// What to give instead.
        expected: String,
    },

    /// A value is not valid UTF-8 where text is needed.
    #[error("{key} in {} is not valid UTF-8; write it as plain text", file.display())]
    NotUtf8 {
        /// The key.
        key: &'static str,
        /// The file that set it.
        file: PathBuf,
    },

    /// A value has the wrong type or is out of range.
    #[error("invalid {key} in {}: {value:?} {problem}", file.display())]
    Invalid {
        /// The key.
        key: &'static str,
        /// The offending value (for lists, the offending element).
        value: String,
        /// The file that set it.
        file: PathBuf,
        /// What is wrong and what to write instead.
        problem: String,
    },

    /// bash could not be started.
    #[error("cannot run bash to read {}; install bash and make sure it is on PATH", file.display())]
    NoBash {
        /// The first config file.
        file: PathBuf,
        /// Why the process did not start.
        #[source]
        source: io::Error,
    },

    /// A scratch file for talking to bash could not be made or read.
    #[error("cannot {action} while reading the config")]
    Scratch {
        /// What failed.
        action: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// What bash wrote back does not have the expected form (a bug, or a config that
    /// tampered with vmoat's own variables).
    #[error("cannot read back the values of {}: {detail}", file.display())]
    Readback {
        /// The last config file.
        file: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

impl ConfigError {
    /// Whether this is an error in the user's config files (exit status 2), as opposed to a
    /// host problem (no bash, no temp dir) or a bug.
    pub fn is_config_error(&self) -> bool {
        !matches!(
            self,
            ConfigError::NoBash { .. } | ConfigError::Scratch { .. } | ConfigError::Readback { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_key_value_and_file() {
        let err = ConfigError::Invalid {
            key: "VM_MEMORY",
            value: "lots".into(),
            file: "/w/vmoat.conf".into(),
            problem: "is not a size in GiB".into(),
        };
        assert_eq!(
            err.to_string(),
            "invalid VM_MEMORY in /w/vmoat.conf: \"lots\" is not a size in GiB"
        );
        assert!(err.is_config_error());
    }

    #[test]
    fn host_problems_are_not_config_errors() {
        let err = ConfigError::NoBash {
            file: "/w/vmoat.conf".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(!err.is_config_error());
    }
}
