//! The SSH proxy that stands in for qemu's `hostfwd`: it listens on `127.0.0.1:<port>` and
//! joins each client to a fresh connection to the guest's sshd, made by a caller-supplied
//! function (vsock or the guest's NAT address, on vz). Plain threads, no runtime: the agent
//! keeps one or two SSH connections open, so two threads per connection cost nothing.
//!
//! When the guest cannot be reached the client's connection is closed at once, which an SSH
//! client sees exactly as it sees qemu's forward before sshd is up: it retries.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{debug, warn};
use vmoat_driver::DriverError;

/// Opens a new connection to the guest's sshd, once per client.
pub type Connect = Arc<dyn Fn() -> io::Result<OwnedFd> + Send + Sync>;

/// Binds `127.0.0.1:<port>`; a port already taken is [`DriverError::PortInUse`].
pub fn bind(port: u16) -> Result<TcpListener, DriverError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|err| {
        if err.kind() == io::ErrorKind::AddrInUse {
            DriverError::PortInUse { port }
        } else {
            DriverError::StartFailed {
                platform: crate::PLATFORM,
                detail: format!("could not listen on 127.0.0.1:{port} for SSH: {err}"),
            }
        }
    })
}

/// Connections being proxied, by id: the client side, kept so [`Forwarder::stop`] can end them.
type Live = Arc<Mutex<HashMap<u64, Arc<Socket>>>>;

/// A running proxy; stops when dropped.
pub struct Forwarder {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    live: Live,
    accept: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts accepting on `listener`, joining each client to a connection from `connect`.
    pub fn spawn(listener: TcpListener, connect: Connect) -> io::Result<Forwarder> {
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let live: Live = Arc::default();

        let accept = thread::Builder::new()
            .name(format!("vz-ssh-{}", addr.port()))
            .spawn({
                let stopping = stopping.clone();
                let live = live.clone();
                move || accept_loop(listener, connect, stopping, live)
            })?;

        Ok(Forwarder {
            addr,
            stopping,
            live,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends every proxied connection and waits for the accept thread.
    pub fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };

        // `accept` blocks; a connection of our own wakes it to see the flag.
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = accept.join();

        let live = std::mem::take(&mut *self.live.lock().unwrap_or_else(PoisonError::into_inner));
        for socket in live.values() {
            socket.shutdown(libc::SHUT_RDWR);
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts until told to stop.
fn accept_loop(listener: TcpListener, connect: Connect, stopping: Arc<AtomicBool>, live: Live) {
    let next_id = AtomicU64::new(0);

    for client in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }

        let client = match client {
            Ok(client) => client,
            Err(err) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(port = %listener.local_addr().map(|a| a.port()).unwrap_or(0),
                      "accepting an SSH client failed: {err}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };

        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let connect = connect.clone();
        let live = live.clone();
        let spawned = thread::Builder::new()
            .name(format!("vz-ssh-conn-{id}"))
            .spawn(move || proxy(id, client, connect, &live));
        if let Err(err) = spawned {
            warn!("could not start a thread for an SSH client: {err}");
        }
    }
}

/// Proxies one client until both directions end.
fn proxy(id: u64, client: TcpStream, connect: Connect, live: &Live) {
    let _ = client.set_nodelay(true);

    // `connect` may hold the VM; release it as soon as it has served, not when the client
    // disconnects.
    let upstream = connect();
    drop(connect);

    let upstream = match upstream {
        Ok(upstream) => Arc::new(Socket(File::from(upstream))),
        Err(err) => {
            // Dropping the client closes it; the SSH client retries.
            debug!("guest sshd not reachable yet: {err}");
            return;
        }
    };
    let client = Arc::new(Socket(File::from(OwnedFd::from(client))));

    live.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, client.clone());

    let to_guest = thread::Builder::new()
        .name(format!("vz-ssh-up-{id}"))
        .spawn({
            let (client, upstream) = (client.clone(), upstream.clone());
            move || pump(&client, &upstream)
        });
    pump(&upstream, &client);
    match to_guest {
        Ok(handle) => {
            let _ = handle.join();
        }
        Err(err) => warn!("could not start a thread for an SSH client: {err}"),
    }

    live.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
}

/// Copies `from` to `to` until end of stream, then passes the end on; on an error ends both.
fn pump(from: &Socket, to: &Socket) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match (&from.0).read(&mut buf) {
            Ok(0) => {
                to.shutdown(libc::SHUT_WR);
                return;
            }
            Ok(n) => {
                if (&to.0).write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }

    from.shutdown(libc::SHUT_RDWR);
    to.shutdown(libc::SHUT_RDWR);
}

/// A connected stream socket of any family (TCP, vsock), read and written through its
/// descriptor.
struct Socket(File);

impl Socket {
    /// `shutdown(2)`; errors (already closed, not connected) change nothing worth reporting.
    fn shutdown(&self, how: libc::c_int) {
        // SAFETY: the descriptor stays open for the call (we hold `self.0`), and shutdown only
        // changes the socket's state, never memory.
        unsafe {
            libc::shutdown(self.0.as_raw_fd(), how);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// An upstream that echoes everything back until the client half-closes.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                thread::spawn(move || {
                    let mut reader = stream.try_clone().unwrap();
                    io::copy(&mut reader, &mut stream).unwrap();
                    stream.shutdown(std::net::Shutdown::Write).unwrap();
                });
            }
        });
        addr
    }

    fn connect_to(addr: SocketAddr) -> Connect {
        Arc::new(move || TcpStream::connect(addr).map(OwnedFd::from))
    }

    fn start(connect: Connect) -> Forwarder {
        Forwarder::spawn(bind(0).unwrap(), connect).unwrap()
    }

    fn client(fwd: &Forwarder) -> TcpStream {
        let stream = TcpStream::connect(fwd.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    #[test]
    fn bytes_flow_both_ways_and_half_close_passes_through() {
        let fwd = start(connect_to(echo_server()));
        let mut stream = client(&fwd);

        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        stream.write_all(&payload).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();

        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).unwrap();
        assert_eq!(echoed, payload);
    }

    #[test]
    fn several_clients_at_once() {
        let fwd = start(connect_to(echo_server()));
        let mut streams: Vec<TcpStream> = (0..4).map(|_| client(&fwd)).collect();

        for (i, stream) in streams.iter_mut().enumerate() {
            stream.write_all(format!("client {i}").as_bytes()).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        }
        for (i, stream) in streams.iter_mut().enumerate() {
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            assert_eq!(text, format!("client {i}"));
        }
    }

    #[test]
    fn unreachable_guest_closes_the_client() {
        let fwd = start(Arc::new(|| Err(io::ErrorKind::ConnectionRefused.into())));
        let mut stream = client(&fwd);

        let mut buf = [0u8; 16];
        let read = stream.read(&mut buf);
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[test]
    fn taken_port_is_port_in_use() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();

        let err = bind(port).unwrap_err();
        assert!(
            matches!(err, DriverError::PortInUse { port: p } if p == port),
            "{err}"
        );
    }

    #[test]
    fn stop_closes_the_port_and_live_connections() {
        let mut fwd = start(connect_to(echo_server()));
        let addr = fwd.local_addr();
        let mut stream = client(&fwd);
        stream.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).unwrap();

        fwd.stop();

        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest);
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(
            TcpStream::connect(addr).is_err(),
            "still listening after stop"
        );

        // Idempotent.
        fwd.stop();
    }
}
