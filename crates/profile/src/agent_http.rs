//! A small blocking HTTP/1.1 client over a unix socket, for the host agent's `ha.sock`.
//!
//! Lima's tools decide an instance is running by asking its host agent `GET /v1/info` over
//! `ha.sock` (with `Host: lima-hostagent`) within 3 s; vmoat asks the same way, so a vmoat
//! agent and a Lima agent are checked alike. One request per connection (`Connection:
//! close`); bodies come with `Content-Length`, chunked, or until the peer closes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The `Host` header Lima's host agent expects.
pub const AGENT_HOST: &str = "lima-hostagent";

/// How long Lima gives the agent to answer `/v1/info`.
pub const INFO_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest response body read; the agent's answers are tiny.
const MAX_BODY: usize = 1 << 20;

/// A response: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

/// What `GET /v1/info` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct AgentInfo {
    /// The host port forwarded to the guest's sshd.
    #[serde(rename = "sshLocalPort")]
    pub ssh_local_port: u16,
}

/// An HTTP exchange over the agent's socket failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing listens on the socket (or it does not exist).
    #[error("cannot connect to {}", .socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed, or the deadline passed.
    #[error("no answer to GET {path} on {} in time", .socket.display())]
    Io {
        /// The socket.
        socket: PathBuf,
        /// The request path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The answer is not HTTP as expected.
    #[error("bad answer to GET {path} on {}: {detail}", .socket.display())]
    BadResponse {
        /// The socket.
        socket: PathBuf,
        /// The request path.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// The agent answered with a non-2xx status.
    #[error("GET {path} on {} answered {status}: {body}", .socket.display())]
    Status {
        /// The socket.
        socket: PathBuf,
        /// The request path.
        path: String,
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
}

/// Sends `GET path` over the unix socket and reads the response, all within `timeout`.
pub fn get(socket: &Path, path: &str, timeout: Duration) -> Result<Response, HttpError> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(socket).map_err(|source| HttpError::Connect {
        socket: socket.to_owned(),
        source,
    })?;

    let io_err = |source| HttpError::Io {
        socket: socket.to_owned(),
        path: path.to_owned(),
        source,
    };
    let bad = |detail: String| HttpError::BadResponse {
        socket: socket.to_owned(),
        path: path.to_owned(),
        detail,
    };

    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {AGENT_HOST}\r\nUser-Agent: vmoat\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    let mut conn = Conn {
        reader: BufReader::new(stream),
        deadline,
    };
    conn.arm().map_err(io_err)?;
    conn.reader
        .get_mut()
        .write_all(request.as_bytes())
        .map_err(io_err)?;

    let head = conn.read_head().map_err(io_err)?;
    let (status, framing) = parse_head(&head).map_err(bad)?;
    let body = match framing {
        Framing::Length(len) if len > MAX_BODY => {
            return Err(bad(format!("body of {len} bytes is too large")));
        }
        Framing::Length(len) => conn.read_exact_body(len).map_err(io_err)?,
        Framing::Chunked => conn.read_chunked().map_err(io_err)?,
        Framing::UntilClose => conn.read_to_close().map_err(io_err)?,
    };

    if !(200..300).contains(&status) {
        let text = String::from_utf8_lossy(&body);
        return Err(HttpError::Status {
            socket: socket.to_owned(),
            path: path.to_owned(),
            status,
            body: text.trim().chars().take(200).collect(),
        });
    }
    Ok(Response { status, body })
}

/// Asks a host agent `GET /v1/info`, as Lima does, within [`INFO_TIMEOUT`].
pub fn agent_info(ha_sock: &Path) -> Result<AgentInfo, HttpError> {
    let response = get(ha_sock, "/v1/info", INFO_TIMEOUT)?;
    serde_json::from_slice(&response.body).map_err(|err| HttpError::BadResponse {
        socket: ha_sock.to_owned(),
        path: "/v1/info".to_owned(),
        detail: format!("expected {{\"sshLocalPort\":N}}: {err}"),
    })
}

/// How the body's end is found.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Parses the status line and the headers that matter.
fn parse_head(head: &str) -> Result<(u16, Framing), String> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?} is not HTTP/1.x"));
    }
    let status = parts
        .next()
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("status line {status_line:?} has no status code"))?;

    let mut framing = Framing::UntilClose;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("header line {line:?} has no ':'"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.eq_ignore_ascii_case("chunked") {
                framing = Framing::Chunked;
            }
        } else if name.eq_ignore_ascii_case("content-length")
            && !matches!(framing, Framing::Chunked)
        {
            let len = value
                .parse()
                .map_err(|_| format!("Content-Length {value:?} is not a number"))?;
            framing = Framing::Length(len);
        }
    }
    Ok((status, framing))
}

/// A connection with one deadline for the whole exchange.
struct Conn {
    reader: BufReader<UnixStream>,
    deadline: Instant,
}

impl Conn {
    /// Sets the socket timeouts to what is left before the deadline.
    fn arm(&mut self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        let stream = self.reader.get_ref();
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(left))
    }

    /// Reads one CRLF-terminated line (without the CRLF).
    fn read_line(&mut self) -> io::Result<String> {
        self.arm()?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(16 * 1024)
            .read_until(b'\n', &mut line)?;
        if n == 0 || !line.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-line",
            ));
        }
        line.pop();
        if line.ends_with(b"\r") {
            line.pop();
        }
        String::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Reads the status line and headers, up to the empty line.
    fn read_head(&mut self) -> io::Result<String> {
        let mut head = String::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                return Ok(head);
            }
            if head.len() > 64 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "headers too large",
                ));
            }
            head.push_str(&line);
            head.push_str("\r\n");
        }
    }

    fn read_exact_body(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut body = vec![0; len];
        let mut filled = 0;
        while filled < len {
            self.arm()?;
            let n = self.reader.read(&mut body[filled..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body cut short",
                ));
            }
            filled += n;
        }
        Ok(body)
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let size_line = self.read_line()?;
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk size {size_hex:?}"),
                )
            })?;
            if size == 0 {
                // Trailers, if any, up to the final empty line.
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > MAX_BODY {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
            }
            body.extend(self.read_exact_body(size)?);
            if !self.read_line()?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk not followed by CRLF",
                ));
            }
        }
    }

    fn read_to_close(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            self.arm()?;
            let n = self.reader.read(&mut buf)?;
            if n == 0 {
                return Ok(body);
            }
            if body.len() + n > MAX_BODY {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
            }
            body.extend_from_slice(&buf[..n]);
        }
    }
}

/// A fake host agent for tests: answers each connection on a unix socket with a canned
/// response, and records the requests it saw.
#[cfg(test)]
pub(crate) mod fake {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::thread;

    /// The server; stops accepting when dropped.
    pub(crate) struct FakeAgent {
        socket: PathBuf,
        /// The request heads received.
        pub(crate) requests: Arc<Mutex<Vec<String>>>,
    }

    impl FakeAgent {
        /// Serves `response` (raw bytes, status line included) on `socket`; `None` accepts
        /// and reads but never answers.
        pub(crate) fn serve(socket: &Path, response: Option<&str>) -> FakeAgent {
            let _ = std::fs::remove_file(socket);
            let listener = UnixListener::bind(socket).unwrap();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let seen = requests.clone();
            let response = response.map(str::to_owned);
            thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { return };
                    let mut head = String::new();
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    while let Ok(n) = reader.read_line(&mut head) {
                        if n == 0 || head.ends_with("\r\n\r\n") {
                            break;
                        }
                    }
                    if head.contains("X-Stop: 1") {
                        return;
                    }
                    seen.lock().unwrap().push(head);
                    match &response {
                        Some(r) => {
                            let _ = conn.write_all(r.as_bytes());
                        }
                        // Hold the connection open without answering until the client quits.
                        None => {
                            let _ = reader.read_line(&mut String::new());
                        }
                    }
                }
            });
            FakeAgent {
                socket: socket.to_owned(),
                requests,
            }
        }
    }

    impl Drop for FakeAgent {
        fn drop(&mut self) {
            // Wake the accept loop so its thread ends, then remove the socket.
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nX-Stop: 1\r\n\r\n");
            }
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeAgent;
    use super::*;

    fn socket(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmoat-http-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("ha.sock")
    }

    #[test]
    fn info_is_read_like_lima_reads_it() {
        let sock = socket("info");
        let agent = FakeAgent::serve(
            &sock,
            Some(concat!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
                "Content-Length: 21\r\n\r\n{\"sshLocalPort\":2222}",
            )),
        );

        assert_eq!(agent_info(&sock).unwrap().ssh_local_port, 2222);
        let requests = agent.requests.lock().unwrap();
        assert!(
            requests[0].starts_with("GET /v1/info HTTP/1.1\r\n"),
            "{}",
            requests[0]
        );
        assert!(requests[0].contains("Host: lima-hostagent\r\n"));
        assert!(requests[0].contains("Connection: close\r\n"));
    }

    #[test]
    fn chunked_and_close_delimited_bodies_are_read() {
        let sock = socket("chunked");
        let _agent = FakeAgent::serve(
            &sock,
            Some(concat!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "5\r\n{\"ssh\r\na;x=y\r\nLocalPort\"\r\n4\r\n:22}\r\n0\r\n\r\n",
            )),
        );
        assert_eq!(agent_info(&sock).unwrap().ssh_local_port, 22);

        let sock = socket("close");
        let _agent = FakeAgent::serve(&sock, Some("HTTP/1.0 200 OK\r\n\r\n{\"sshLocalPort\":7}"));
        assert_eq!(agent_info(&sock).unwrap().ssh_local_port, 7);
    }

    #[test]
    fn errors_say_what_went_wrong() {
        let sock = socket("errors");
        let _ = std::fs::remove_file(&sock);
        assert!(matches!(agent_info(&sock), Err(HttpError::Connect { .. })));

        let agent = FakeAgent::serve(
            &sock,
            Some("HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nboom"),
        );
        let err = agent_info(&sock).unwrap_err();
        assert!(err.to_string().ends_with("answered 500: boom"), "{err}");
        drop(agent);

        let agent = FakeAgent::serve(
            &sock,
            Some("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"),
        );
        let err = agent_info(&sock).unwrap_err();
        assert!(err.to_string().contains("sshLocalPort"), "{err}");
        drop(agent);

        let _agent = FakeAgent::serve(&sock, Some("SSH-2.0-OpenSSH\r\n\r\n"));
        assert!(matches!(
            agent_info(&sock),
            Err(HttpError::BadResponse { .. })
        ));
    }

    #[test]
    fn a_silent_agent_times_out() {
        let sock = socket("silent");
        let _agent = FakeAgent::serve(&sock, None);
        let started = Instant::now();
        let err = get(&sock, "/v1/info", Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, HttpError::Io { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
