//! Listening sockets: one per shard on the same address (SO_REUSEPORT), built with socket2 so the
//! backlog is ours to choose (glommio's own bind hard-codes 1024, too small for a reconnect
//! storm), and the accept loop that survives running out of file descriptors.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use glommio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

use crate::net::conn;
use crate::net::runtime::Runtime;

/// Fails if something already listens on `addr`. The shards' sockets share their port through
/// SO_REUSEPORT, which would just as quietly share it with a second roster (or anything else of
/// the same user) left running: connections would be split between two servers that do not know
/// of each other. A plain bind, without SO_REUSEPORT, cannot share, so it tells.
pub fn ensure_free(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())
}

/// A shard's socket, bound to the listen address but not listening yet: bound at start-up so
/// that a bad address fails at once, listening only once the node can serve (in a cluster,
/// once it has joined), so that an open port means a ready server: connections made meanwhile
/// are refused and retried, rather than left in the backlog (on Linux a full accept queue
/// drops SYNs, which clients retry only after a second).
pub struct Bound(Socket);

pub fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(Bound(socket))
}

impl Bound {
    /// Starts listening; the fd is handed to a shard's executor.
    pub fn listen(self, backlog: u32) -> std::io::Result<RawFd> {
        self.0.listen(backlog.min(i32::MAX as u32) as i32)?;
        Ok(self.0.into_raw_fd())
    }
}

/// Accepts until the shard shuts down. Out of descriptors (EMFILE/ENFILE): log, count, pause
/// briefly and retry; never crash and never spin.
pub async fn accept_loop(rt: Rc<Runtime>, fd: RawFd) {
    // SAFETY: `fd` is a listening socket from `bind`, owned by this shard alone from here on.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let mut last_warning = None::<std::time::Instant>;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            rt.stop_accepting.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                rt.stats.accepted.set(rt.stats.accepted.get() + 1);
                glommio::spawn_local(conn::serve(rt.clone(), stream)).detach();
            }
            Some(Err(e)) => {
                rt.stats.accept_errors.set(rt.stats.accept_errors.get() + 1);
                let out_of_fds = matches!(
                    &e,
                    glommio::GlommioError::IoError(io) if matches!(io.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
                );
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    if out_of_fds {
                        tracing::warn!(
                            shard = rt.id.0,
                            connections = rt.conns.borrow().len(),
                            "out of file descriptors: pausing accept (raise the open-files limit)"
                        );
                    } else {
                        tracing::warn!(shard = rt.id.0, error = %e, "accept failed");
                    }
                    last_warning = Some(std::time::Instant::now());
                }
                glommio::timer::sleep(Duration::from_millis(if out_of_fds { 100 } else { 10 }))
                    .await;
            }
        }
    }
}
