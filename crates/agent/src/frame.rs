//! Framing of an exec session once `POST /vmoat/v1/exec` has upgraded the connection.
//!
//! Each frame is a kind byte, a big-endian `u32` length and that many payload bytes. A client
//! opens with [`Kind::Start`] (a JSON `ExecRequest`), then sends stdin, EOF and resizes; the
//! agent sends stdout, stderr and finally [`Kind::Exit`] or [`Kind::Error`]. Keeping stdout
//! and stderr apart end to end is what lets `vmoat ssh cmd` behave like a local command.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest payload accepted, so a confused peer cannot make the other allocate gigabytes.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client → agent, first: the JSON `ExecRequest`.
    Start = 0,
    /// Client → agent: bytes for the command's stdin.
    Stdin = 1,
    /// Client → agent: stdin is finished.
    StdinEof = 2,
    /// Client → agent: JSON `PtySize`, the terminal was resized.
    Resize = 3,
    /// Agent → client: bytes the command wrote to stdout.
    Stdout = 17,
    /// Agent → client: bytes the command wrote to stderr.
    Stderr = 18,
    /// Agent → client, last: JSON `ExecExit`.
    Exit = 19,
    /// Agent → client, last: JSON `ApiError`, the command could not run or the link broke.
    Error = 20,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            0 => Kind::Start,
            1 => Kind::Stdin,
            2 => Kind::StdinEof,
            3 => Kind::Resize,
            17 => Kind::Stdout,
            18 => Kind::Stderr,
            19 => Kind::Exit,
            20 => Kind::Error,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame holding JSON.
    pub fn json(kind: Kind, value: &impl serde::Serialize) -> Frame {
        Frame {
            kind,
            payload: serde_json::to_vec(value).expect("JSON of plain data"),
        }
    }

    /// Decodes a JSON payload.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> std::io::Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad {:?} frame: {e}", self.kind),
            )
        })
    }
}

/// Writes one frame and flushes.
pub async fn write<W: AsyncWrite + Unpin>(
    writer: &mut W,
    kind: Kind,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&len| len as usize <= MAX_PAYLOAD)
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame payload too large")
        })?;
    let mut header = [0u8; 5];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&len.to_be_bytes());
    writer.write_all(&header).await?;
    writer.write_all(payload).await?;
    writer.flush().await
}

/// Writes a frame, splitting a large payload into several of the same kind.
pub async fn write_chunked<W: AsyncWrite + Unpin>(
    writer: &mut W,
    kind: Kind,
    payload: &[u8],
) -> std::io::Result<()> {
    for chunk in payload.chunks(MAX_PAYLOAD) {
        write(writer, kind, chunk).await?;
    }
    Ok(())
}

/// Reads one frame; `Ok(None)` at a clean end of stream between frames.
pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    let mut filled = 0;
    while filled < header.len() {
        let n = reader.read(&mut header[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }

    let kind = Kind::from_byte(header[0]).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", header[0]),
        )
    })?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit"),
        ));
    }

    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok(Some(Frame { kind, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write(&mut a, Kind::Stdout, b"hello").await.unwrap();
            write(&mut a, Kind::StdinEof, b"").await.unwrap();
            write_chunked(&mut a, Kind::Stderr, &vec![7u8; MAX_PAYLOAD + 3])
                .await
                .unwrap();
        });

        let first = read(&mut b).await.unwrap().unwrap();
        assert_eq!(first.kind, Kind::Stdout);
        assert_eq!(first.payload, b"hello");
        assert_eq!(read(&mut b).await.unwrap().unwrap().kind, Kind::StdinEof);
        assert_eq!(
            read(&mut b).await.unwrap().unwrap().payload.len(),
            MAX_PAYLOAD
        );
        assert_eq!(read(&mut b).await.unwrap().unwrap().payload.len(), 3);
        writer.await.unwrap();
        assert!(read(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[99, 0, 0, 0, 0]).await.unwrap();
        assert!(read(&mut b).await.is_err());

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[1, 255, 255, 255, 255]).await.unwrap();
        assert!(read(&mut b).await.is_err());
    }

    #[tokio::test]
    async fn truncated_header_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[1, 0]).await.unwrap();
        drop(a);
        assert!(read(&mut b).await.is_err());
    }
}
