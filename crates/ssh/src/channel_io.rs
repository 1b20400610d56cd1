//! Byte-stream halves over one SSH channel: [`ChannelWriter`] (stdin of an exec, the upload
//! half of a tunnel) and [`ChannelReader`] (the download half of a tunnel), and the state they
//! share: whether the channel is done, and who sent EOF.
//!
//! Two russh behaviours shape this. Its writer waits for window space forever, even after the
//! channel has closed, so the halves share a "done" signal and a write to a finished channel
//! fails with `BrokenPipe`. And once the client sends CLOSE first, russh drops everything
//! further on that channel, the server's CLOSE included, so a reader would wait forever: the
//! same signal ends every waiter when we close. To close first as rarely as possible, a channel
//! whose two EOFs were both exchanged is left for the server to close (OpenSSH does so at once).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

type BoxedWriter = Pin<Box<dyn AsyncWrite + Send + Sync>>;
type DoneFuture = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;
type WaitFuture = Pin<Box<dyn Future<Output = (ChannelReadHalf, Option<ChannelMsg>)> + Send>>;

/// How long a channel whose EOFs were both exchanged may wait for the server's CLOSE before we
/// close it ourselves.
const CLOSE_GRACE: Duration = Duration::from_secs(30);

/// What the halves of one channel share.
pub(crate) struct ChannelState {
    write: Arc<ChannelWriteHalf<Msg>>,
    done: watch::Sender<bool>,
    sent_eof: AtomicBool,
    got_eof: AtomicBool,
}

impl fmt::Debug for ChannelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelState")
            .field("channel", &self.write.id())
            .field("done", &self.is_done())
            .finish()
    }
}

impl ChannelState {
    pub(crate) fn new(write: Arc<ChannelWriteHalf<Msg>>) -> Arc<ChannelState> {
        let (done, _) = watch::channel(false);
        Arc::new(ChannelState {
            write,
            done,
            sent_eof: AtomicBool::new(false),
            got_eof: AtomicBool::new(false),
        })
    }

    pub(crate) fn write_half(&self) -> &ChannelWriteHalf<Msg> {
        &self.write
    }

    pub(crate) fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Resolves once the channel is done (closed by either side, or the connection lost).
    pub(crate) fn done(&self) -> DoneFuture {
        let mut rx = self.done.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|d| *d).await;
        })
    }

    /// The channel has ended: wake every waiter.
    pub(crate) fn mark_done(&self) {
        self.done.send_replace(true);
    }

    pub(crate) fn mark_got_eof(&self) {
        self.got_eof.store(true, Ordering::Release);
    }

    /// Close the channel from our side now.
    pub(crate) async fn close(&self) -> Result<(), russh::Error> {
        let first = !self.done.send_replace(true);
        if first {
            self.write.close().await
        } else {
            Ok(())
        }
    }

    /// The last user went away: close now, or, if both EOFs were exchanged, give the server a
    /// grace period to close first.
    fn release(self: Arc<Self>) {
        if self.is_done() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let both_eof =
            self.sent_eof.load(Ordering::Acquire) && self.got_eof.load(Ordering::Acquire);
        runtime.spawn(async move {
            if both_eof && tokio::time::timeout(CLOSE_GRACE, self.done()).await.is_ok() {
                return;
            }
            let _ = self.close().await;
        });
    }
}

/// Releases the channel (see `ChannelState::release`) when dropped, unless disarmed.
#[derive(Debug)]
pub(crate) struct CloseGuard {
    state: Arc<ChannelState>,
    armed: bool,
}

impl CloseGuard {
    pub(crate) fn new(state: Arc<ChannelState>) -> CloseGuard {
        CloseGuard { state, armed: true }
    }

    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        if self.armed {
            Arc::clone(&self.state).release();
        }
    }
}

/// The writing half of a channel. Writes wait for the channel's window (backpressure); once
/// the channel is done they fail with `BrokenPipe`. Shutting it down sends EOF, which leaves
/// the other direction open (half-close).
pub struct ChannelWriter {
    writer: BoxedWriter,
    state: Arc<ChannelState>,
    done: DoneFuture,
    is_done: bool,
}

impl ChannelWriter {
    pub(crate) fn new(state: &Arc<ChannelState>) -> ChannelWriter {
        ChannelWriter {
            writer: Box::pin(state.write.make_writer()),
            state: Arc::clone(state),
            done: state.done(),
            is_done: false,
        }
    }

    /// Send EOF: the other side reads end of input; reading from it goes on.
    pub async fn close(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::shutdown(self).await
    }

    fn poll_done(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.is_done && self.done.as_mut().poll(cx).is_ready() {
            self.is_done = true;
        }
        self.is_done
    }
}

fn channel_done() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the SSH channel has closed")
}

impl fmt::Debug for ChannelWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelWriter")
            .field("state", &self.state)
            .finish()
    }
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.poll_done(cx) {
            return Poll::Ready(Err(channel_done()));
        }
        if buf.is_empty() {
            // russh refuses empty writes; for every other writer they are a no-op.
            return Poll::Ready(Ok(0));
        }
        self.writer.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.sent_eof.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        if self.poll_done(cx) {
            return Poll::Ready(Err(channel_done()));
        }
        ready!(self.writer.as_mut().poll_shutdown(cx))?;
        self.state.sent_eof.store(true, Ordering::Release);
        Poll::Ready(Ok(()))
    }
}

/// The reading half of a channel: its data until the other side's EOF or close. A connection
/// lost before either is an error (`ConnectionAborted`), not a clean end.
pub struct ChannelReader {
    /// The wait for the next message; `None` once the stream has ended.
    next: Option<WaitFuture>,
    pending: Bytes,
    state: Arc<ChannelState>,
    done: DoneFuture,
}

fn wait_next(mut read: ChannelReadHalf) -> WaitFuture {
    Box::pin(async move {
        let msg = read.wait().await;
        (read, msg)
    })
}

impl ChannelReader {
    pub(crate) fn new(read: ChannelReadHalf, state: &Arc<ChannelState>) -> ChannelReader {
        ChannelReader {
            next: Some(wait_next(read)),
            pending: Bytes::new(),
            state: Arc::clone(state),
            done: state.done(),
        }
    }

    /// The next chunk as it arrived; `Ok(None)` at EOF or close.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }

        loop {
            let Some(next) = self.next.as_mut() else {
                return Poll::Ready(Ok(None));
            };
            let Poll::Ready((read, msg)) = next.as_mut().poll(cx) else {
                // Closed from our side: russh delivers nothing more, so stop waiting.
                if self.done.as_mut().poll(cx).is_ready() {
                    self.next = None;
                    return Poll::Ready(Ok(None));
                }
                return Poll::Pending;
            };
            self.next = None;

            match msg {
                Some(ChannelMsg::Data { data }) => {
                    self.next = Some(wait_next(read));
                    if !data.is_empty() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                Some(ChannelMsg::Eof) => {
                    self.state.mark_got_eof();
                    drain_until_close(read, Arc::clone(&self.state));
                    return Poll::Ready(Ok(None));
                }
                Some(ChannelMsg::Close) => {
                    self.state.mark_done();
                    return Poll::Ready(Ok(None));
                }
                None => {
                    self.state.mark_done();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the SSH connection was lost",
                    )));
                }
                Some(_) => self.next = Some(wait_next(read)),
            }
        }
    }
}

/// After EOF, drain the rest of the channel in the background so the connection never waits on
/// this channel's buffer, and mark the channel done when it closes (or we close it).
fn drain_until_close(mut read: ChannelReadHalf, state: Arc<ChannelState>) {
    tokio::spawn(async move {
        let mut done = state.done();
        loop {
            tokio::select! {
                msg = read.wait() => match msg {
                    Some(ChannelMsg::Close) | None => break,
                    Some(_) => {}
                },
                () = &mut done => return,
            }
        }
        state.mark_done();
    });
}

impl fmt::Debug for ChannelReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelReader")
            .field("ended", &self.next.is_none())
            .finish()
    }
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.poll_chunk(cx))? {
                Some(chunk) => self.pending = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        put_pending(&mut self.pending, buf)
    }
}

/// Copy as much of `pending` as fits into `buf` (the tail of a chunked `poll_read`).
pub(crate) fn put_pending(pending: &mut Bytes, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
    let n = buf.remaining().min(pending.len());
    buf.put_slice(&pending.split_to(n));
    Poll::Ready(Ok(()))
}
