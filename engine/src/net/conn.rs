//! One connection's task: the HTTP upgrade, then a single poll loop that writes whatever the
//! shard queued for it and feeds what it reads to tungstenite and the core.

use std::borrow::Cow;
use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketContext};
use tungstenite::{Error as WsError, Message};

use crate::core::{ConnId, Frame};
use crate::identity::Identity;
use crate::net::admission::Ticket;
use crate::net::handshake::{self, Handshake, Reject};
use crate::net::runtime::{CloseReason, Runtime, Stats};
use crate::net::ws::{self, FrameCursor, Io};

/// A refused connection's request is read (so closing does not reset the refusal away) for at
/// most this long before the refusal is written.
const REFUSAL_READ: Duration = Duration::from_millis(20);
/// Read bursts handled before yielding to other tasks of the shard.
const BURSTS_PER_POLL: usize = 16;
/// After a close frame is queued, how long to wait for it to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes owed to a client past which it is not read from until they are written.
const MAX_UNSENT_BYTES: usize = 64 << 10;
/// Frames from this size on are written from the shared frame, not copied per connection,
/// and always by the connection's task (never by `Runtime::write_listed`).
pub(super) const BIG_FRAME_BYTES: usize = 64 << 10;

pub async fn serve(rt: Rc<Runtime>, mut stream: TcpStream) {
    // The handshake and closing phases are boxed: a task's future is allocated at the size of its
    // largest state and kept for the connection's whole life, and only the middle phase lasts.
    // A block, so that nothing but `c` is kept in the task across the awaits below.
    let mut c = {
        let Some((identity, ticket, leftover)) = Box::pin(handshake_phase(&rt, &mut stream)).await
        else {
            rt.stats
                .handshake_failures
                .set(rt.stats.handshake_failures.get() + 1);
            return;
        };
        if rt.shutting_down.get() {
            return;
        }
        let mut c = Conn {
            rt: rt.clone(),
            conn: rt.open(identity, std::os::fd::AsRawFd::as_raw_fd(&stream)),
            ws: WebSocketContext::new(Role::Server, Some(ws::config(rt.config.max_frame_bytes))),
            wbuf: Vec::new(),
            written: 0,
            big: None,
            closing: false,
            read_closed: false,
            cursor: FrameCursor::default(),
            partial: false,
            _ticket: ticket.map(Box::new),
        };
        if !leftover.is_empty() {
            c.feed(&leftover);
        }
        c
    };
    let conn = c.conn;
    poll_fn(|cx| {
        let r = c.poll(cx, &mut stream);
        c.publish_direct(&stream);
        r
    })
    .await;
    // From here on only this task writes.
    rt.set_direct(conn, None);
    if c.closing {
        Box::pin(close_phase(&mut c, &mut stream)).await;
    } else if c.read_closed {
        Box::pin(half_closed_phase(&mut c, &mut stream)).await;
    }
    rt.closed(conn);
}

/// The client shut its side down (EOF) without a close frame. It may still be reading: what
/// it asked for before (a join's reply, its state) is written out, bounded in time, and then
/// the connection ends.
async fn half_closed_phase(c: &mut Conn, stream: &mut TcpStream) {
    let _ = glommio::timer::timeout(CLOSE_TIMEOUT, async {
        poll_fn(|cx| match c.poll_outbound(cx, stream) {
            Poll::Ready(Err(())) => Poll::Ready(()),
            Poll::Ready(Ok(())) if c.closing || !c.rt.awaiting_reply(c.conn) => Poll::Ready(()),
            _ => Poll::Pending,
        })
        .await;
        Ok(())
    })
    .await;
}

/// Takes the connection's place among the counted ones, then reads and answers its upgrade
/// request within the handshake deadline (else 408).
async fn handshake_phase(rt: &Runtime, stream: &mut TcpStream) -> Option<Admitted> {
    let _ = stream.set_nodelay(true);
    let ip = stream.peer_addr().ok()?.ip();
    let mut ticket = match rt.admission.admit(ip) {
        Ok(t) => t,
        Err(r) => {
            // Not read yet: take what has arrived, so that closing does not reset the answer.
            let mut sink = [0u8; 1024];
            let _ = glommio::timer::timeout(REFUSAL_READ, async {
                let _ = stream.read(&mut sink).await;
                Ok(())
            })
            .await;
            return refuse(rt, stream, r).await;
        }
    };
    let upgraded = glommio::timer::timeout(rt.config.handshake_timeout, async {
        Ok(upgrade(rt, stream).await)
    })
    .await;
    match upgraded {
        Ok(Some((identity, leftover))) => {
            if let Some(t) = ticket.as_mut() {
                t.upgraded();
            }
            if !rt.admission.counts_connections() {
                // Only upgrades in progress are bounded: nothing to keep per connection.
                ticket = None;
            }
            Some((identity, ticket, leftover))
        }
        Ok(None) => None,
        Err(_) => {
            let late = Reject::new(408, "upgrade request not received in time");
            refuse(rt, stream, late).await
        }
    }
}

/// Gives the close frame (and what was queued before it) a bounded time to leave.
async fn close_phase(c: &mut Conn, stream: &mut TcpStream) {
    let _ = glommio::timer::timeout(CLOSE_TIMEOUT, async {
        let _ = poll_fn(|cx| c.poll_write(cx, stream)).await;
        // Closing with unread bytes in our receive queue makes the kernel send a reset, and the
        // client may then never see the close frame (it gets 1006). Half-close and drain what
        // the client still sends, briefly.
        let _ = stream.shutdown(std::net::Shutdown::Write).await;
        let mut sink = [0u8; 512];
        let drain = async {
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            Ok(())
        };
        let _ = glommio::timer::timeout(Duration::from_secs(1), drain).await;
        Ok(())
    })
    .await;
}

/// Who the client is, its place among the counted connections, and any bytes that came after
/// its upgrade request.
type Admitted = (Identity, Option<Ticket>, Vec<u8>);

/// Reads the HTTP upgrade request and answers it: origin and identity are checked before the
/// 101. None when the request was refused or the peer went away.
async fn upgrade(rt: &Runtime, stream: &mut TcpStream) -> Option<(Identity, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        match handshake::parse(&buf, rt.config.max_request_bytes) {
            Handshake::Incomplete => continue,
            Handshake::Reject(r) => return refuse(rt, stream, r).await,
            Handshake::Accept(u) => {
                let admitted = rt
                    .admission
                    .check_origin(u.origin.as_deref())
                    .and_then(|()| rt.identify(&u));
                let identity = match admitted {
                    Ok(identity) => identity,
                    Err(r) if r.status == 401 && rt.config.refusals_in_band => {
                        return refuse_in_band(rt, stream, &u.response, r).await
                    }
                    Err(r) => return refuse(rt, stream, r).await,
                };
                stream.write_all(&u.response).await.ok()?;
                let leftover = buf.split_off(u.consumed);
                return Some((identity, leftover));
            }
        }
    }
}

/// Writes `buf[*off..]` as far as the socket takes it, advancing `off`. Ready(Ok) once all of
/// it is written; Ready(Err) if the connection is gone.
fn write_from(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &[u8],
    off: &mut usize,
) -> Poll<Result<(), ()>> {
    while *off < buf.len() {
        match Pin::new(&mut *stream).poll_write(cx, &buf[*off..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
            Poll::Ready(Ok(n)) => *off += n,
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(()))
}

async fn refuse<T>(rt: &Runtime, stream: &mut TcpStream, r: Reject) -> Option<T> {
    tracing::debug!(status = r.status, reason = r.reason, "handshake refused");
    Stats::count(&rt.stats.refusals, r.reason);
    // A client that does not read cannot hold the connection open: the refusal is small, and
    // gets a bounded time to leave.
    let _ = glommio::timer::timeout(CLOSE_TIMEOUT, async {
        let _ = stream.write_all(&r.response()).await;
        Ok(())
    })
    .await;
    let _ = stream.close().await;
    None
}

/// `--refusals-in-band`: the upgrade goes through (`response`, the 101) and a close frame
/// follows at once, with 4001 for an expired token and 4003 for any other refusal, and the
/// reason: what a browser's WebSocket (and so phoenix.js's `onClose`) can read.
async fn refuse_in_band<T>(
    rt: &Runtime,
    stream: &mut TcpStream,
    response: &[u8],
    r: Reject,
) -> Option<T> {
    tracing::debug!(reason = r.reason, "handshake refused in band");
    Stats::count(&rt.stats.refusals, r.reason);
    let code: u16 = if r.reason == "token expired" {
        4001
    } else {
        4003
    };
    let reason = &r.reason.as_bytes()[..r.reason.len().min(123)];
    let mut out = response.to_vec();
    // A server's close frame: FIN and opcode 8, unmasked, the code then the reason.
    out.extend_from_slice(&[0x88, (2 + reason.len()) as u8]);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
    let _ = glommio::timer::timeout(CLOSE_TIMEOUT, async {
        let _ = stream.write_all(&out).await;
        // The client's close in answer (or its end), before the socket goes.
        let mut sink = [0u8; 256];
        let _ = stream.read(&mut sink).await;
        Ok(())
    })
    .await;
    let _ = stream.close().await;
    None
}

struct BigFrame {
    frame: Frame,
    written: usize,
    at: usize,
}

struct Conn {
    rt: Rc<Runtime>,
    conn: ConnId,
    ws: WebSocketContext,
    /// Bytes the socket has not taken yet, and tungstenite's own replies (pongs, close);
    /// empty and unallocated otherwise.
    wbuf: Vec<u8>,
    written: usize,
    /// The payload of a large frame (a big room's presence_state), written from the shared
    /// frame instead of being copied per connection. It goes out when `wbuf` has been written up
    /// to `at` (its header is just before); what is appended to `wbuf` later goes after it.
    big: Option<Box<BigFrame>>,
    /// A close frame is queued: write it, then end.
    closing: bool,
    /// The client sent EOF: nothing more to read, but it may still read what it is owed.
    read_closed: bool,
    /// Frame boundaries in what the client sent, to know when tungstenite holds nothing.
    cursor: FrameCursor,
    /// A message is partly received (its deadline runs in the runtime).
    partial: bool,
    /// Its place among the counted connections, given back when the task ends.
    _ticket: Option<Box<Ticket>>,
}

impl Conn {
    /// Ready(()) when the connection is over or closing (the caller then finishes writing).
    fn poll(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<()> {
        for _ in 0..BURSTS_PER_POLL {
            match self.poll_outbound(cx, stream) {
                Poll::Ready(Err(())) => {
                    self.closing = false;
                    return Poll::Ready(());
                }
                // Everything owed is written: a slow consumer may have fresh states to come.
                Poll::Ready(Ok(())) if !self.closing => self.rt.drained(self.conn),
                _ => {}
            }
            if self.closing {
                return Poll::Ready(());
            }
            let rt = self.rt.clone();
            // Read no more while the rings are backed up, or while this client is not reading what
            // we already owe it (a ping flood must not grow its pong buffer without bound); the
            // write side wakes us when that drains.
            if self.unsent() > MAX_UNSENT_BYTES || rt.pause_if_backlogged(self.conn) {
                return Poll::Pending;
            }
            // Nothing in feed() touches the scratch buffer, and no other task of this shard runs
            // until this poll returns.
            let mut scratch = rt.scratch.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch) {
                Poll::Ready(Ok(0)) => {
                    self.read_closed = true;
                    return Poll::Ready(());
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => self.feed(&scratch[..n]),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Let the shard's other tasks run; come back right after.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Tells the shard whether it may write this connection's frames to the socket itself
    /// (`Runtime::write_listed`): not while bytes wait here (of frames taken earlier, a pong, a
    /// close), which they would overtake. Called as each poll of the task ends: the shard's
    /// writer runs only between polls.
    fn publish_direct(&self, stream: &TcpStream) {
        let owes = self.closing || self.big.is_some() || self.wbuf.len() > self.written;
        let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
        self.rt.set_direct(self.conn, (!owes).then_some(fd));
    }

    /// Writes what the shard queued for this connection. While nothing is left over from an
    /// earlier write, frames are built in the shard's shared write buffer and only what the
    /// socket does not take at once is copied into this connection's own buffer: an idle
    /// connection holds no buffer, and a delivered frame costs no allocation.
    fn poll_outbound(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut TcpStream,
    ) -> Poll<Result<(), ()>> {
        if self.closing {
            return self.poll_write(cx, stream);
        }
        if !self.wbuf.is_empty() || self.big.is_some() {
            // The socket is backed up: new frames stay in the shard's queue, where they count
            // against max_outbound_bytes, until this buffer has gone out.
            if let Some(reason) = self.rt.take_close(self.conn, cx.waker(), &mut self.wbuf) {
                self.start_close(reason);
            }
            if let Poll::Ready(r) = self.poll_write(cx, stream) {
                r?;
                if !self.closing {
                    return self.poll_outbound(cx, stream);
                }
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
        let rt = self.rt.clone();
        let mut shared = rt.write_scratch.borrow_mut();
        shared.clear();
        let (close, big) = rt.take_outbound(self.conn, cx.waker(), &mut shared, BIG_FRAME_BYTES);
        let mut off = 0;
        if let Poll::Ready(Err(())) = write_from(stream, cx, &shared, &mut off) {
            return Poll::Ready(Err(()));
        }
        self.wbuf.extend_from_slice(&shared[off..]);
        let more = big.is_some();
        self.big = big.map(|frame| {
            Box::new(BigFrame {
                frame,
                written: 0,
                at: self.wbuf.len(),
            })
        });
        if shared.capacity() > 1 << 20 {
            *shared = Vec::new();
        }
        drop(shared);
        if let Some(reason) = close {
            self.start_close(reason);
        }
        match self.poll_write(cx, stream) {
            // Frames queued after the large one (and a close) are still in the shard's queue,
            // and nothing would wake this task for them.
            Poll::Ready(Ok(())) if more => self.poll_outbound(cx, stream),
            other => other,
        }
    }

    /// Writes as much of `wbuf`, and of the large frame at its place in it, as the socket
    /// takes. Ready(Ok) when it is all written.
    fn poll_write(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<Result<(), ()>> {
        loop {
            let upto = self.big.as_ref().map_or(self.wbuf.len(), |b| b.at);
            std::task::ready!(write_from(
                stream,
                cx,
                &self.wbuf[..upto],
                &mut self.written
            ))?;
            let Some(big) = self.big.as_mut() else {
                break;
            };
            std::task::ready!(write_from(stream, cx, &big.frame, &mut big.written))?;
            self.big = None;
        }
        self.written = 0;
        self.wbuf = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Bytes owed to the client that the socket has not taken.
    fn unsent(&self) -> usize {
        let big = self.big.as_ref().map_or(0, |b| b.frame.len() - b.written);
        self.wbuf.len() - self.written + big
    }

    /// Hands received bytes to tungstenite and every complete text message to the core.
    fn feed(&mut self, bytes: &[u8]) {
        self.cursor.advance(bytes);
        let mut io = Io {
            input: bytes,
            output: &mut self.wbuf,
        };
        loop {
            match self.ws.read(&mut io) {
                Ok(Message::Text(text)) => {
                    self.rt.client_frame(self.conn, text.as_bytes());
                    if self.rt.close_pending(self.conn) {
                        return; // The core closed it (a bad frame, the message rate).
                    }
                }
                Ok(Message::Binary(_)) => {
                    return self.refuse(
                        1003,
                        "binary frames are not supported; send V2 JSON text frames",
                    )
                }
                // Answered (tungstenite queues the pong), rate-limited by the core, but not
                // activity: only text messages keep a connection past the heartbeat timeout, so
                // a client that pings and never speaks V2 is still closed.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                    self.rt.control_frame(self.conn);
                    if self.rt.close_pending(self.conn) {
                        return;
                    }
                }
                Ok(Message::Close(_)) => {
                    // tungstenite has prepared its reply (the client's code echoed, or 1002 for
                    // a code RFC 6455 does not allow); flushing puts it in wbuf. The presences
                    // leave now, not after that reply has been written.
                    let _ = self.ws.flush(&mut io);
                    self.rt.forget(self.conn);
                    self.closing = true;
                    return;
                }
                Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(WsError::Capacity(_)) => return self.refuse(1009, "frame too large"),
                Err(WsError::Utf8(_)) => return self.refuse(1007, "text frame is not valid UTF-8"),
                Err(WsError::Protocol(e)) => {
                    return self.refuse(1002, format!("protocol error: {e}"))
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                    self.closing = true;
                    return;
                }
                Err(e) => return self.refuse(1011, format!("error: {e}")),
            }
        }
        // Every byte is in tungstenite now.
        if self.cursor.idle() {
            if std::mem::take(&mut self.cursor.grew) {
                // It holds nothing but buffers grown for a large frame or a fragmented message:
                // a fresh context is the same protocol state at its idle size.
                self.ws = WebSocketContext::new(
                    Role::Server,
                    Some(ws::config(self.rt.config.max_frame_bytes)),
                );
            }
            if std::mem::take(&mut self.partial) {
                self.rt.message_done(self.conn);
            }
        } else if !std::mem::replace(&mut self.partial, true) {
            self.rt.message_started(self.conn);
        }
    }

    /// Closes because of something the client sent: the core forgets the connection now (its
    /// presences leave), and the close frame goes out on the next poll.
    fn refuse(&mut self, code: u16, reason: impl Into<Cow<'static, str>>) {
        let kind = match code {
            1002 => "protocol error",
            1003 => "binary frame",
            1007 => "invalid UTF-8",
            1009 => "frame too large",
            _ => "internal error",
        };
        Stats::count(&self.rt.stats.closes, kind);
        self.rt.close(self.conn, code, reason);
    }

    fn start_close(&mut self, (code, reason): CloseReason) {
        let mut reason = reason.into_owned();
        // A close reason must fit in a control frame (125 bytes with the code).
        while reason.len() > 123 {
            reason.pop();
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let mut io = Io {
            input: &[],
            output: &mut self.wbuf,
        };
        let _ = self.ws.close(&mut io, Some(frame));
        let _ = self.ws.flush(&mut io);
        self.closing = true;
    }
}
