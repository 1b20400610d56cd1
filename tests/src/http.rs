//! The host side of a tunnel: a plain HTTP GET and a port check on 127.0.0.1, with short
//! timeouts, so a test can tell what a URL printed by `vmoat tunnel` serves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response: its status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// `GET url` (`http://127.0.0.1:PORT/path` only) with HTTP/1.0, so the body ends at EOF.
pub fn get(url: &str) -> Result<Response, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .map_err(|e| format!("{url:?}: the host must be an IP:port ({e})"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{url:?} is not on the loopback interface"));
    }

    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("cannot read from {addr}: {e}"))?;

    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: no HTTP response, got {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}: no status in {head:?}"))?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
}

/// The port of an `http://127.0.0.1:PORT` URL.
pub fn port_of(url: &str) -> Option<u16> {
    url.trim()
        .strip_prefix("http://127.0.0.1:")?
        .trim_end_matches('/')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_get_reads_status_and_body_from_a_local_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let n = conn.read(&mut request).unwrap();
            assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /x HTTP/1.0"));
            conn.write_all(b"HTTP/1.0 404 Not Found\r\nA: b\r\n\r\nnope\n")
                .unwrap();
        });

        let url = format!("http://127.0.0.1:{port}/x");
        let response = get(&url).unwrap();
        server.join().unwrap();
        assert_eq!(response.status, 404);
        assert_eq!(response.body, "nope\n");
        assert_eq!(port_of(&format!("http://127.0.0.1:{port}")), Some(port));
        assert!(!port_open(port), "the server is gone");
        assert!(get("http://10.0.0.1:80/").is_err(), "only loopback");
    }
}
