//! The admin listener's event loop: one thread, non-blocking sockets (mio), no thread per
//! request. Every connection has a deadline (`--admin-timeout-ms`) to send its request and
//! another to take the answer; past it, an unread request gets 408 and the socket is dropped.
//! At `--admin-max-conns`, a new connection takes the place of the one that has waited longest
//! without a complete request, so idle sockets can never shut out a health check. Out of
//! descriptors, accept backs off instead of spinning, and one descriptor held in reserve lets a
//! health check through.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::net::admin::api::{self, Answer, Pending, Response};
use crate::net::admin::Admin;

/// Largest admin request (line and headers).
const MAX_REQUEST_BYTES: usize = 16 << 10;
const LISTENER: Token = Token(usize::MAX);
/// Out of descriptors: how long accept waits before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Any other accept error: how long accept waits.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// While a shard's answer is awaited, how often the loop looks for it.
const ANSWER_POLL: Duration = Duration::from_millis(5);

/// The admin listener's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_conns: usize,
    pub timeout: Duration,
}

enum State {
    Reading,
    Waiting(Pending),
    Writing,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    opened: Instant,
    deadline: Instant,
    state: State,
}

pub struct Server {
    admin: Admin,
    limits: Limits,
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    /// A descriptor to give up when accept runs out of them (see the module doc).
    reserve: Option<File>,
    /// Out of descriptors: no accept before then.
    accept_after: Option<Instant>,
    last_warning: Option<Instant>,
}

impl Server {
    pub fn bind(addr: SocketAddr, admin: Admin, limits: Limits) -> std::io::Result<Server> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(std_listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Server {
            admin,
            limits,
            poll,
            listener,
            conns: Slab::new(),
            reserve: File::open("/dev/null").ok(),
            accept_after: None,
            last_warning: None,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the process ends.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .next_wake()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::warn!("admin listener: poll failed: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(i) => self.service(i),
                }
            }
            let now = Instant::now();
            if self.accept_after.is_some_and(|t| t <= now) {
                self.accept_after = None;
                self.accept();
            }
            self.answer_waiting(now);
            self.expire(now);
        }
    }

    /// The earliest of the deadlines, the accept retry, and the next look for shard answers.
    fn next_wake(&self) -> Option<Instant> {
        let mut wake = self.accept_after;
        let now = Instant::now();
        for (_, c) in self.conns.iter() {
            let t = match c.state {
                State::Waiting(_) => c.deadline.min(now + ANSWER_POLL),
                _ => c.deadline,
            };
            wake = Some(wake.map_or(t, |w| w.min(t)));
        }
        wake
    }

    fn accept(&mut self) {
        if self.accept_after.is_some() {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let i = self.admit(stream);
                    // Its request has often arrived with it: read it before more connections can
                    // push it out.
                    if let Some(i) = i {
                        self.service(i);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if self.reserve.take().is_some() {
                        continue; // One descriptor freed: try once more with it.
                    }
                    if self
                        .last_warning
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
                    {
                        tracing::warn!("admin listener: out of file descriptors, pausing accept");
                        self.last_warning = Some(Instant::now());
                    }
                    self.accept_after = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
                // A connection that went away before it was accepted: the next one may be fine.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                // Anything else (no buffers, no memory) may last: retry shortly, never spin.
                Err(e) => {
                    if self
                        .last_warning
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
                    {
                        tracing::warn!("admin listener: accept failed: {e}");
                        self.last_warning = Some(Instant::now());
                    }
                    self.accept_after = Some(Instant::now() + ERROR_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Takes a new connection in, making room for it if the slots are full.
    fn admit(&mut self, mut stream: TcpStream) -> Option<usize> {
        if self.conns.len() >= self.limits.max_conns.max(1) {
            let oldest_idle = self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.state, State::Reading))
                .min_by_key(|(_, c)| c.opened)
                .map(|(i, _)| i);
            match oldest_idle {
                Some(i) => self.refuse(i, 503, "busy: too many admin connections\n"),
                None => {
                    // Every slot is answering a request: this one is told so.
                    let _ = stream.write(&Response::text(503, "busy\n").bytes());
                    return None;
                }
            }
        }
        let now = Instant::now();
        let entry = self.conns.vacant_entry();
        let i = entry.key();
        self.poll
            .registry()
            .register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .ok()?;
        entry.insert(Conn {
            stream,
            buf: Vec::new(),
            out: Vec::new(),
            written: 0,
            opened: now,
            deadline: now + self.limits.timeout,
            state: State::Reading,
        });
        Some(i)
    }

    /// Reads or writes what the socket allows.
    fn service(&mut self, i: usize) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if matches!(c.state, State::Reading) {
            let mut chunk = [0u8; 4096];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => return self.drop_conn(i),
                    Ok(n) => {
                        c.buf.extend_from_slice(&chunk[..n]);
                        if c.buf.len() > MAX_REQUEST_BYTES {
                            return self.refuse(i, 431, "request too large\n");
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return self.drop_conn(i),
                }
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let answer = match req.parse(&c.buf) {
                Ok(httparse::Status::Complete(head)) => {
                    let header = |name: &str| {
                        let h = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name));
                        h.map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
                    };
                    if header("transfer-encoding").is_some() {
                        return self.refuse(i, 411, "send a Content-Length\n");
                    }
                    let length = match header("content-length").map(|l| l.parse::<usize>()) {
                        None => 0,
                        Some(Ok(n)) => n,
                        Some(Err(_)) => return self.refuse(i, 400, "bad Content-Length\n"),
                    };
                    if head + length > MAX_REQUEST_BYTES {
                        return self.refuse(i, 413, "request too large\n");
                    }
                    let Some(body) = c.buf.get(head..head + length) else {
                        return; // The body is still coming.
                    };
                    api::answer(&self.admin, &req, body, Instant::now())
                }
                Ok(httparse::Status::Partial) => return,
                Err(_) => Answer::Now(Response::text(400, "bad request\n")),
            };
            match answer {
                Answer::Now(r) => return self.respond(i, r),
                Answer::Later(p) => c.state = State::Waiting(p),
            }
        }
        if matches!(c.state, State::Writing) {
            self.write(i);
        }
    }

    fn respond(&mut self, i: usize, r: Response) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        c.out = r.bytes();
        c.written = 0;
        c.buf = Vec::new();
        c.state = State::Writing;
        c.deadline = Instant::now() + self.limits.timeout;
        self.write(i);
    }

    /// An answer to a request that will not be read further: the socket goes once it is out.
    fn refuse(&mut self, i: usize, status: u16, body: &str) {
        self.respond(i, Response::text(status, body));
    }

    fn write(&mut self, i: usize) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        while c.written < c.out.len() {
            match c.stream.write(&c.out[c.written..]) {
                Ok(0) => return self.drop_conn(i),
                Ok(n) => c.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.drop_conn(i),
            }
        }
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        self.drop_conn(i);
    }

    fn drop_conn(&mut self, i: usize) {
        if let Some(mut c) = self.conns.try_remove(i) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
        if self.reserve.is_none() {
            self.reserve = File::open("/dev/null").ok();
        }
    }

    fn answer_waiting(&mut self, now: Instant) {
        let bridge = self.admin.bridge.as_ref();
        let ready: Vec<(usize, Response)> = self
            .conns
            .iter_mut()
            .filter_map(|(i, c)| match &mut c.state {
                State::Waiting(p) => p.poll(now, bridge).map(|r| (i, r)),
                _ => None,
            })
            .collect();
        for (i, r) in ready {
            self.respond(i, r);
        }
    }

    fn expire(&mut self, now: Instant) {
        let due: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now && !matches!(c.state, State::Waiting(_)))
            .map(|(i, c)| (i, matches!(c.state, State::Reading)))
            .collect();
        for (i, reading) in due {
            if reading {
                self.refuse(i, 408, "request not received in time\n");
            } else {
                self.drop_conn(i);
            }
        }
    }
}
