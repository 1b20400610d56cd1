//! The health probe: one HTTP GET sent from inside the guest's network through an SSH
//! channel, so the guest needs no curl and the answer is what the stack really serves there.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::ProbeResult;

/// The part of the body kept for messages.
const BODY_HEAD: usize = 200;

/// The largest response head read before giving up on it.
const MAX_HEAD: usize = 16 * 1024;

/// An `http://` URL taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpTarget {
    /// Host name or address, as the guest resolves it (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The `Host` header value.
    pub authority: String,
}

/// Parses an `http://` URL; `https://` and anything else is refused with the reason.
pub fn parse_url(url: &str) -> Result<HttpTarget, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs can be probed through SSH"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: the URL has no host"));
    }

    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("{url}: unclosed [ in the host"))?;
        let port = match &v6[end + 1..] {
            "" => 80,
            p => parse_port(url, p.strip_prefix(':').unwrap_or(p))?,
        };
        (v6[..end].to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), parse_port(url, port)?),
            None => (authority.to_owned(), 80),
        }
    };

    Ok(HttpTarget {
        host,
        port,
        path: path.to_owned(),
        authority: authority.to_owned(),
    })
}

fn parse_port(url: &str, text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("{url}: bad port {text:?}"))
}

/// Sends one GET on `stream` and reads the status line and the start of the body.
pub async fn get<S>(mut stream: S, target: &HttpTarget, timeout: Duration) -> ProbeResult
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: vmoat-health\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n",
            target.path, target.authority
        );
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;

        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let head_end = find(&response, b"\r\n\r\n");
            let enough = head_end.is_some_and(|end| response.len() >= end + 4 + BODY_HEAD);
            if enough || response.len() > MAX_HEAD {
                break;
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(response)
    };

    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => failure(format!("no answer within {} s", timeout.as_secs_f32())),
        Ok(Err(err)) => failure(err.to_string()),
        Ok(Ok(response)) => parse_response(&response),
    }
}

fn parse_response(response: &[u8]) -> ProbeResult {
    if response.is_empty() {
        return failure("the connection closed without an answer".into());
    }
    let line_end = find(response, b"\r\n").unwrap_or(response.len());
    let status_line = String::from_utf8_lossy(&response[..line_end]);
    let status = status_line
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok());
    let Some(status) = status else {
        return failure(format!(
            "not an HTTP answer: {:?}",
            truncate(&status_line, 80)
        ));
    };

    let body = find(response, b"\r\n\r\n")
        .map(|end| &response[end + 4..])
        .unwrap_or_default();
    ProbeResult {
        status: Some(status),
        error: None,
        body_head: truncate(&String::from_utf8_lossy(body), BODY_HEAD),
    }
}

/// A probe that got no HTTP answer.
pub fn failure(error: String) -> ProbeResult {
    ProbeResult {
        status: None,
        error: Some(error),
        body_head: String::new(),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart() {
        let t = parse_url("http://127.0.0.1:8080/health?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8080, "/health?x=1")
        );
        let t = parse_url("http://localhost").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        let t = parse_url("http://[::1]:9000/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        assert!(parse_url("https://x/").is_err());
        assert!(parse_url("http://x:0/").is_err());
        assert!(parse_url("http://x:99999/").is_err());
        assert!(parse_url("http:///").is_err());
    }

    #[tokio::test]
    async fn a_server_answer_is_read() {
        let (client, mut server) = tokio::io::duplex(8192);
        let serve = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = server.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            server
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\n\r\nwarming")
                .await
                .unwrap();
            drop(server);
            request
        });

        let target = parse_url("http://127.0.0.1:8080/health").unwrap();
        let result = get(client, &target, Duration::from_secs(5)).await;
        let request = serve.await.unwrap();
        assert!(request.starts_with("GET /health HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert_eq!(result.status, Some(503));
        assert_eq!(result.body_head, "warming");
        assert!(!result.healthy());
    }

    #[tokio::test]
    async fn silence_is_a_timeout_and_garbage_is_named() {
        let (client, _server) = tokio::io::duplex(64);
        let target = parse_url("http://h/").unwrap();
        let result = get(client, &target, Duration::from_millis(100)).await;
        assert!(result.error.unwrap().contains("no answer"));

        let result = parse_response(b"SSH-2.0-OpenSSH\r\n");
        assert!(result.error.unwrap().contains("not an HTTP answer"));
    }
}
