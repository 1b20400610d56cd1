//! A small QMP client: JSON lines over qemu's unix control socket, with timeouts.
//!
//! vmoat needs only the greeting and capabilities handshake, `query-status`,
//! `system_powerdown`, `quit`, and the events qemu sends in between, so this is a few lines of
//! serde_json rather than a generated binding of qemu's whole schema (`crates.md` Q4). Every
//! read is bounded by the caller's timeout; events that arrive while a command waits for its
//! answer are kept for [`Qmp::next_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

/// Events kept while nobody reads them; older ones are dropped.
const MAX_QUEUED_EVENTS: usize = 64;

/// Errors talking to QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached (qemu not up yet, or gone).
    #[error("connecting to QMP socket {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("QMP gave no answer to {what} within {timeout:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The limit.
        timeout: Duration,
    },
    /// qemu closed the socket.
    #[error("qemu closed the QMP socket while waiting for {what}")]
    Closed {
        /// What was waited for.
        what: String,
    },
    /// qemu sent something that is not QMP.
    #[error("unexpected QMP message while waiting for {what}: {line}")]
    Protocol {
        /// What was waited for.
        what: String,
        /// The message.
        line: String,
    },
    /// qemu refused a command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// qemu's error class.
        class: String,
        /// qemu's description.
        desc: String,
    },
}

/// An asynchronous event qemu sent (`SHUTDOWN`, `POWERDOWN`, `STOP`, …).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct QmpEvent {
    /// The event name.
    pub event: String,
    /// Its data, `null` when it has none.
    #[serde(default)]
    pub data: Value,
}

/// The answer to `query-status`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct VmStatus {
    /// qemu's run state (`running`, `paused`, `shutdown`, `prelaunch`, …).
    pub status: String,
    /// Whether the guest CPUs run.
    pub running: bool,
}

/// One connection to qemu's QMP socket, past the capabilities handshake.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not finished when a read timed out.
    partial: Vec<u8>,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    timeout: Duration,
    /// qemu's version from the greeting, e.g. `10.0.2`.
    version: String,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities. `timeout` bounds each later
    /// command as well.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| QmpError::Io {
            what: "socket clone".into(),
            source,
        })?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            timeout,
            version: String::new(),
        };

        let deadline = Instant::now() + timeout;
        let greeting = qmp.read_message("the greeting", deadline)?;
        let Some(banner) = greeting.get("QMP") else {
            return Err(QmpError::Protocol {
                what: "the greeting".into(),
                line: greeting.to_string(),
            });
        };
        let v = &banner["version"]["qemu"];
        qmp.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);

        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// qemu's version, from the greeting.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;

        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                what: format!("sending {command}"),
                source,
            })?;

        let what = format!("`{command}`");
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self.read_message(&what, deadline)?;
            if message.get("event").is_some() {
                self.queue_event(message);
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                // An answer to an earlier command that timed out; not ours.
                continue;
            }
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: error["class"].as_str().unwrap_or("?").to_owned(),
                    desc: error["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            return Err(QmpError::Protocol {
                what,
                line: message.to_string(),
            });
        }
    }

    /// `query-status`: the VM's run state.
    pub fn query_status(&mut self) -> Result<VmStatus, QmpError> {
        let ret = self.execute("query-status", None)?;
        serde_json::from_value(ret.clone()).map_err(|_| QmpError::Protocol {
            what: "`query-status`".into(),
            line: ret.to_string(),
        })
    }

    /// `system_powerdown`: presses the ACPI power button. The guest decides what happens.
    pub fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).map(drop)
    }

    /// `quit`: qemu exits at once, without a guest shutdown. qemu may close the socket before
    /// its answer arrives; that counts as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(QmpError::Io { source, .. })
                if matches!(
                    source.kind(),
                    ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` when none came.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<QmpEvent>, QmpError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }

        let deadline = Instant::now() + timeout;
        loop {
            let message = match self.read_message("an event", deadline) {
                Ok(m) => m,
                Err(QmpError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if message.get("event").is_some() {
                self.queue_event(message);
                return Ok(self.events.pop_front());
            }
        }
    }

    fn queue_event(&mut self, message: Value) {
        if let Ok(event) = serde_json::from_value::<QmpEvent>(message) {
            if self.events.len() == MAX_QUEUED_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(event);
        }
    }

    /// Reads one JSON line, waiting until `deadline`.
    fn read_message(&mut self, what: &str, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.to_owned(),
                    timeout: self.timeout,
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|source| QmpError::Io {
                    what: "setting a read timeout".into(),
                    source,
                })?;

            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        what: what.to_owned(),
                    });
                }
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    let text = String::from_utf8_lossy(&line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    return serde_json::from_str(&text).map_err(|_| QmpError::Protocol {
                        what: what.to_owned(),
                        line: text.trim().to_owned(),
                    });
                }
                // EOF in the middle of a line.
                Ok(_) => {
                    return Err(QmpError::Closed {
                        what: what.to_owned(),
                    });
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(QmpError::Io {
                        what: format!("reading while waiting for {what}"),
                        source,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;

    const GREETING: &str = concat!(
        r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "#,
        r#""capabilities": ["oob"]}}"#
    );

    /// A fake qemu: sends the greeting, then answers each request with what `answer` returns
    /// (lines, possibly several, possibly none); `None` closes the socket.
    fn fake_qemu(
        answer: impl Fn(&Value) -> Option<Vec<String>> + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<Vec<String>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            writeln!(writer, "{GREETING}").unwrap();
            let mut seen = Vec::new();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let request: Value = serde_json::from_str(&line).unwrap();
                seen.push(request["execute"].as_str().unwrap().to_owned());
                let Some(replies) = answer(&request) else {
                    return seen;
                };
                for reply in replies {
                    if writeln!(writer, "{reply}").is_err() {
                        return seen;
                    }
                }
            }
            seen
        });
        (dir, path, server)
    }

    fn ok(request: &Value, ret: Value) -> String {
        json!({"return": ret, "id": request["id"]}).to_string()
    }

    #[test]
    fn handshake_status_and_events() {
        let (_dir, path, server) = fake_qemu(|req| match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => Some(vec![ok(req, json!({}))]),
            "query-status" => Some(vec![
                // An event arrives before the answer: it must be kept, not lost.
                r#"{"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#
                    .to_owned(),
                ok(req, json!({"status": "running", "singlestep": false, "running": true})),
            ]),
            "system_powerdown" => Some(vec![
                ok(req, json!({})),
                r#"{"event": "POWERDOWN", "timestamp": {"seconds": 1, "microseconds": 2}}"#
                    .to_owned(),
            ]),
            _ => Some(vec![]),
        });

        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.version(), "10.0.2");
        let status = qmp.query_status().unwrap();
        assert_eq!(status.status, "running");
        assert!(status.running);
        qmp.system_powerdown().unwrap();

        let first = qmp.next_event(Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(first.event, "RESUME");
        let second = qmp.next_event(Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(second.event, "POWERDOWN");
        assert_eq!(qmp.next_event(Duration::from_millis(50)).unwrap(), None);

        drop(qmp);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            ["qmp_capabilities", "query-status", "system_powerdown"]
        );
    }

    #[test]
    fn a_refused_command_carries_qemus_words() {
        let (_dir, path, _server) = fake_qemu(|req| match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => Some(vec![ok(req, json!({}))]),
            _ => Some(vec![
                json!({"error": {"class": "CommandNotFound",
                "desc": "The command nope has not been found"}, "id": req["id"]})
                .to_string(),
            ]),
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let err = qmp.execute("nope", None).unwrap_err().to_string();
        assert!(
            err.contains("CommandNotFound") && err.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn silence_times_out() {
        let (_dir, path, _server) = fake_qemu(|req| match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => Some(vec![ok(req, json!({}))]),
            _ => Some(vec![]),
        });
        let mut qmp = Qmp::connect(&path, Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let err = qmp.query_status().unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn quit_accepts_a_closed_socket() {
        let (_dir, path, server) = fake_qemu(|req| match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => Some(vec![ok(req, json!({}))]),
            // qemu may exit before answering `quit`: the fake closes without a reply.
            _ => None,
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        qmp.quit().unwrap();
        assert_eq!(server.join().unwrap(), ["qmp_capabilities", "quit"]);
    }

    #[test]
    fn a_missing_socket_names_its_path() {
        let err = Qmp::connect(Path::new("/nonexistent/qmp.sock"), Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/qmp.sock"), "{err}");
    }
}
