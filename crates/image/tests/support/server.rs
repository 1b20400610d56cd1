//! A small HTTP/1.1 file server on 127.0.0.1 for download tests: serves byte bodies by path,
//! honours `Range`/`If-Range`, can redirect, answer 404, throttle, or break a transfer off
//! halfway, and records every request. It stops when dropped.
//!
//! Shared by the image crate's tests and the CLI tests (included by `#[path]`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How a path is answered.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with the body (206 for a range), in one go.
    File(Vec<u8>),
    /// Like `File`, but sends `chunk` bytes every `pause`.
    Slow {
        /// The body.
        body: Vec<u8>,
        /// Bytes per write.
        chunk: usize,
        /// Pause between writes.
        pause: Duration,
    },
    /// Promises the whole body, sends only the first `sent` bytes, then closes the socket
    /// (a server dying mid-transfer). Later requests get `then`.
    CutOff {
        /// The body.
        body: Vec<u8>,
        /// Bytes sent before the connection dies.
        sent: usize,
    },
    /// 302 to another path.
    Redirect(String),
    /// 404.
    NotFound,
}

/// One request the server saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The path.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The status answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Reply>,
    seen: Vec<Seen>,
}

/// The running server.
pub struct Server {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts a server on 127.0.0.1 with a free port.
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));

        let thread = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let state = Arc::clone(&state);
                            std::thread::spawn(move || serve(stream, &state));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };

        Server {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Sets how `path` is answered.
    pub fn route(&self, path: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .routes
            .insert(path.to_owned(), reply);
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The `GET` requests for `path` so far.
    pub fn gets(&self, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "GET" && s.path == path)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A weak validator for a body: its length and a cheap checksum.
pub fn etag(body: &[u8]) -> String {
    let sum = body.iter().fold(0u64, |acc, &b| {
        acc.wrapping_mul(31).wrapping_add(u64::from(b))
    });
    format!("\"{}-{sum:x}\"", body.len())
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();

    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let range = headers.get("range").cloned();

    let reply = state.lock().unwrap().routes.get(&path).cloned();
    let record = |status: u16| {
        state.lock().unwrap().seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            status,
        });
    };

    match reply {
        None | Some(Reply::NotFound) => {
            record(404);
            let _ = write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"
            );
        }
        Some(Reply::Redirect(to)) => {
            record(302);
            let _ = write!(
                stream,
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: \
                 close\r\n\r\n"
            );
        }
        Some(Reply::File(body)) => send_body(
            &mut stream,
            &method,
            &headers,
            &body,
            None,
            usize::MAX,
            record,
        ),
        Some(Reply::Slow { body, chunk, pause }) => send_body(
            &mut stream,
            &method,
            &headers,
            &body,
            Some(pause),
            chunk,
            record,
        ),
        Some(Reply::CutOff { body, sent }) => {
            // Later requests for this path succeed: the "restarted" server is healthy.
            state
                .lock()
                .unwrap()
                .routes
                .insert(path.clone(), Reply::File(body.clone()));
            record(200);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {}\r\nAccept-Ranges: bytes\r\n\
                 Connection: close\r\n\r\n",
                body.len(),
                etag(&body)
            );
            let _ = stream.write_all(&body[..sent.min(body.len())]);
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn send_body(
    stream: &mut TcpStream,
    method: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
    pause: Option<Duration>,
    chunk: usize,
    record: impl Fn(u16),
) {
    let tag = etag(body);
    let if_range_ok = headers.get("if-range").is_none_or(|v| *v == tag);
    let start = headers
        .get("range")
        .filter(|_| if_range_ok)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());

    let (status, from) = match start {
        Some(n) if n >= body.len() => {
            record(416);
            let _ = write!(
                stream,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n",
                body.len()
            );
            return;
        }
        Some(n) => (206, n),
        None => (200, 0),
    };
    record(status);

    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nContent-Type: application/gzip\r\nETag: {tag}\r\n\
         Last-Modified: Fri, 04 Dec 2026 00:00:00 GMT\r\nAccept-Ranges: bytes\r\n\
         Connection: close\r\n",
        status,
        if status == 206 {
            "Partial Content"
        } else {
            "OK"
        },
        body.len() - from
    );
    if status == 206 {
        head.push_str(&format!(
            "Content-Range: bytes {from}-{}/{}\r\n",
            body.len() - 1,
            body.len()
        ));
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).is_err() || method == "HEAD" {
        return;
    }
    for piece in body[from..].chunks(chunk.max(1)) {
        if stream.write_all(piece).is_err() {
            return;
        }
        if let Some(pause) = pause {
            std::thread::sleep(pause);
        }
    }
    let _ = stream.flush();
}

/// Deterministic pseudo-random bytes (xorshift), for bodies that do not compress away.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A small raw "disk" (an MBR boot signature, noise, zeros) and its gzip.
pub fn gz_disk(len: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    use std::io::Write as _;

    let mut raw = vec![0u8; len];
    let noisy = noise(len / 2, seed);
    raw[4096..4096 + noisy.len() - 4096].copy_from_slice(&noisy[..noisy.len() - 4096]);
    raw[510] = 0x55;
    raw[511] = 0xaa;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    (raw, gz.finish().unwrap())
}

/// The sha512 hex of `bytes`.
pub fn sha512_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha512::digest(bytes))
}
