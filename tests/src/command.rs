//! One run of the real `vmoat` binary: arguments, environment, stdin and a time limit in;
//! exit status, stdout, stderr and the time it took out. Assertions on an [`Outcome`] print
//! the whole run, and the tail of every agent log of the group's VMs, when they fail.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::binary::vmoat_bin;
use crate::log::note;

/// Set to `1` to echo every vmoat command's stderr, line by line, as it runs.
const ECHO_VAR: &str = "VMOAT_E2E_ECHO";

/// Variables of the caller's environment that would steer vmoat or docker elsewhere.
const SCRUBBED: &[&str] = &[
    "LIMA_HOME",
    "LIMA_INSTANCE",
    "COLIMA_PROFILE",
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
];

/// A `vmoat` command to run in a worktree of a [`crate::Group`].
#[must_use = "a command does nothing until it is run"]
pub struct VmoatCmd {
    group: String,
    colima_home: PathBuf,
    docker_config: PathBuf,
    dir: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl VmoatCmd {
    pub(crate) fn new(group: &str, colima_home: &Path, docker_config: &Path, dir: &Path) -> Self {
        VmoatCmd {
            group: group.to_owned(),
            colima_home: colima_home.to_owned(),
            docker_config: docker_config.to_owned(),
            dir: dir.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            timeout: Duration::from_secs(40 * 60),
        }
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for this run (over the group's own).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable for this run.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// Feeds `bytes` on stdin (stdin is empty, and never a terminal, otherwise).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Ends the run with SIGKILL after `limit` (default 40 minutes); the outcome then has
    /// no exit code and says it timed out.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// The command as a person would type it, for messages.
    pub fn display(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                // A script given as one argument shows as its first line.
                let text = a.to_string_lossy();
                match text.split_once('\n') {
                    Some((first, _)) => format!("'{first} …'"),
                    None => text.into_owned(),
                }
            })
            .collect();
        format!("(cd {} && vmoat {})", self.dir.display(), args.join(" "))
    }

    /// Runs the command to its end (or its time limit).
    pub fn run(self) -> Outcome {
        let display = self.display();
        let mut command = Command::new(vmoat_bin());
        command
            .args(&self.args)
            .current_dir(&self.dir)
            .env("COLIMA_HOME", &self.colima_home)
            .env("DOCKER_CONFIG", &self.docker_config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for key in SCRUBBED {
            command.env_remove(key);
        }
        for (key, value) in &self.env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }

        let started = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {display}: {e}"));

        // stdin, stdout and stderr each on a thread, so no pipe fills up and blocks vmoat.
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = self.stdin.unwrap_or_default();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let mut out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let stdout = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = out.read_to_end(&mut bytes);
            bytes
        });
        let echo = std::env::var_os(ECHO_VAR).is_some_and(|v| v == "1");
        let group = self.group.clone();
        let stderr = std::thread::spawn(move || {
            if !echo {
                let mut bytes = Vec::new();
                let _ = err.read_to_end(&mut bytes);
                return bytes;
            }
            // Line by line, each echoed as it comes, for watching a long run.
            let mut bytes = Vec::new();
            let mut reader = std::io::BufReader::new(err);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                note(
                    &group,
                    format!("  | {}", String::from_utf8_lossy(&line).trim_end()),
                );
                bytes.append(&mut line);
            }
            bytes
        });

        let deadline = started + self.timeout;
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    // Our own child, ended by its pid.
                    let _ = child.kill();
                    timed_out = true;
                    break child.wait().expect("wait for the killed vmoat");
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("waiting for {display}: {e}"),
            }
        };
        let _ = feeder.join();
        let stdout = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
        let elapsed = started.elapsed();

        let outcome = Outcome {
            command: display,
            status,
            timed_out,
            stdout,
            stderr,
            elapsed,
            colima_home: self.colima_home,
        };
        note(
            &self.group,
            format!(
                "{} → {} in {:.1} s",
                outcome.command,
                outcome.status_text(),
                elapsed.as_secs_f64()
            ),
        );
        outcome
    }
}

/// How a `vmoat` run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The command as typed (with its directory).
    pub command: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Whether the harness ended it at its time limit.
    pub timed_out: bool,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
    colima_home: PathBuf,
}

impl Outcome {
    /// The exit code (`None` if it was killed by a signal, or timed out).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Asserts exit code 0.
    #[track_caller]
    pub fn success(self) -> Outcome {
        self.code_is(0)
    }

    /// Asserts exit code `code`.
    #[track_caller]
    pub fn code_is(self, code: i32) -> Outcome {
        if self.code() != Some(code) {
            panic!("expected exit code {code}\n{}", self.details());
        }
        self
    }

    /// Asserts that stdout contains `text`.
    #[track_caller]
    pub fn stdout_has(self, text: &str) -> Outcome {
        if !self.stdout.contains(text) {
            panic!("expected {text:?} on stdout\n{}", self.details());
        }
        self
    }

    /// Asserts that stderr contains `text`.
    #[track_caller]
    pub fn stderr_has(self, text: &str) -> Outcome {
        if !self.stderr.contains(text) {
            panic!("expected {text:?} on stderr\n{}", self.details());
        }
        self
    }

    /// Asserts `condition` about this run, printing the run when it fails.
    #[track_caller]
    pub fn expect(self, condition: bool, what: &str) -> Outcome {
        if !condition {
            panic!("{what}\n{}", self.details());
        }
        self
    }

    /// stdout's lines, trimmed, without empty ones.
    pub fn lines(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", self.details()))
    }

    /// "exit N", "killed by signal N" or "timed out".
    pub fn status_text(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        if self.timed_out {
            return format!("timed out after {:.0} s", self.elapsed.as_secs_f64());
        }
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => self.status.to_string(),
        }
    }

    /// Everything about this run: the command, status, time, stdout, stderr, and the tail of
    /// every agent log in the group's Colima home.
    pub fn details(&self) -> String {
        let mut text = format!(
            "command: {}\nstatus:  {} after {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}\n",
            self.command,
            self.status_text(),
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        );
        text.push_str(&agent_logs(&self.colima_home, 30));
        text
    }
}

/// The last `lines` lines of each agent log of every instance under `colima_home`.
pub(crate) fn agent_logs(colima_home: &Path, lines: usize) -> String {
    let mut text = String::new();
    let Ok(entries) = std::fs::read_dir(colima_home.join("_lima")) else {
        return text;
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('_'))
        })
        .collect();
    dirs.sort();
    for dir in dirs {
        for log in ["ha.stderr.log", "ha.stdout.log"] {
            let tail = tail_of(&dir.join(log), lines);
            if !tail.is_empty() {
                text.push_str(&format!(
                    "--- last lines of {} ---\n{tail}\n",
                    dir.join(log).display()
                ));
            }
        }
    }
    text
}

/// The last `lines` lines of a text file (empty if it is missing).
pub(crate) fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
