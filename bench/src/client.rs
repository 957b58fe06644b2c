//! A lean Phoenix Channels V2 client for load generation: one glommio task per connection,
//! tungstenite to write (client role, masking), `wire.rs` to read, 512 bytes read at a time.
//! It binds to a chosen loopback source address so one process can open more connections than
//! one address's ephemeral ports allow. While it reads it sends Phoenix heartbeats as phoenix.js
//! does (every 30 s unless `set_heartbeat` says otherwise): servers close connections silent for
//! their timeout (Phoenix's and roster's: 60 s), which would end any longer run.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use roster_engine::net::ws::Io;
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

use crate::wire::{Event, Inbox};

const READ_BUFFER: usize = 512;

/// Channels a server crashed (`phx_error`), over every client of this process: each is
/// rejoined as phoenix.js would, after 1, 2, 5, then 10 s.
pub static CRASHED_CHANNELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// phoenix.js's default `rejoinAfterMs`.
const REJOIN_AFTER: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// Between a client's heartbeats (None: it sends none).
static HEARTBEAT: OnceLock<Option<Duration>> = OnceLock::new();

/// Sets every client's heartbeat interval (once, before any client connects; phoenix.js's
/// 30 s if never set).
pub fn set_heartbeat(every: Option<Duration>) {
    let _ = HEARTBEAT.set(every);
}

/// The heartbeat interval clients use, for reports.
pub fn heartbeat_text() -> String {
    heartbeat().map_or("no heartbeats".into(), |d| {
        format!("heartbeats every {} s", d.as_secs())
    })
}

/// Between a client's heartbeats (None: none are sent).
pub fn heartbeat() -> Option<Duration> {
    *HEARTBEAT.get_or_init(|| Some(Duration::from_secs(30)))
}

/// What the next frame asks of the client.
enum Step {
    Text(String),
    Pong(Vec<u8>),
    Closed,
    Read,
}

pub struct Client {
    stream: TcpStream,
    ws: WebSocketContext,
    inbox: Inbox,
    out: Vec<u8>,
    /// When the next heartbeat is due, and how many were sent (their refs).
    next_beat: Option<Instant>,
    beats: u64,
    /// The join frame of each topic joined, to rejoin with after a crash, and how many times
    /// it crashed.
    joins: Vec<(String, String, usize)>,
    /// Rejoins due: (when, topic).
    rejoins: Vec<(Instant, String)>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Client {
    /// Connects from `source` (if given) to `addr` and upgrades to a WebSocket at
    /// `/socket/websocket?{query}`.
    pub async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        path: &str,
        query: &str,
    ) -> Result<Client, String> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(err)?;
        if let Some(ip) = source {
            // Let connect() pick the port knowing the destination (IP_BIND_ADDRESS_NO_PORT):
            // bind() alone would reserve a port per source address for every destination.
            let yes: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int of the
            // length we pass.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&yes as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            socket
                .bind(&SocketAddr::new(ip, 0).into())
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        socket.set_nonblocking(true).map_err(err)?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EINPROGRESS)
                    || e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("connect: {e}")),
        }
        // SAFETY: a socket we just created, handed over whole. glommio's first send on a socket
        // still connecting gets EAGAIN and waits for it to become writable.
        let mut stream = unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) };
        let request = format!(
            "GET {path}/websocket?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cm9zdGVyLWJlbmNoLWtleQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 256];
        let body_start = loop {
            let n = stream
                .read(&mut byte)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            if n == 0 {
                return Err("handshake: connection closed".into());
            }
            head.extend_from_slice(&byte[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if head.len() > 8192 {
                return Err("handshake: response too large".into());
            }
        };
        if !head.starts_with(b"HTTP/1.1 101") {
            let line = String::from_utf8_lossy(
                &head[..head.iter().position(|&b| b == b'\r').unwrap_or(head.len())],
            )
            .into_owned();
            return Err(format!("handshake refused: {line}"));
        }
        // tungstenite only writes here (`wire.rs` reads): its read buffer, allocated up front,
        // would be unused memory in every client.
        let config = WebSocketConfig::default().read_buffer_size(0);
        let mut inbox = Inbox::default();
        inbox.push(&head[body_start..]);
        Ok(Client {
            stream,
            ws: WebSocketContext::new(Role::Client, Some(config)),
            inbox,
            out: Vec::new(),
            next_beat: heartbeat().map(|d| Instant::now() + d),
            beats: 0,
            joins: Vec::new(),
            rejoins: Vec::new(),
        })
    }

    /// Sends one text frame (a join is remembered, to rejoin with if the channel crashes).
    pub async fn send(&mut self, text: String) -> Result<(), String> {
        if text.contains("\"phx_join\"") || text.contains("\"phx_leave\"") {
            self.remember(&text);
        }
        self.write_text(text).await
    }

    fn remember(&mut self, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let (Some(topic), Some(event)) = (v[2].as_str(), v[3].as_str()) else {
            return;
        };
        self.joins.retain(|(t, _, _)| t != topic);
        self.rejoins.retain(|(_, t)| t != topic);
        if event == "phx_join" {
            self.joins.push((topic.to_owned(), text.to_owned(), 0));
        }
    }

    /// A `phx_error` for a topic joined: count it, and rejoin after phoenix.js's backoff.
    fn crashed(&mut self, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let Some(topic) = v[2].as_str() else { return };
        let Some(join) = self.joins.iter_mut().find(|(t, _, _)| t == topic) else {
            return;
        };
        CRASHED_CHANNELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let after = REJOIN_AFTER[join.2.min(REJOIN_AFTER.len() - 1)];
        join.2 += 1;
        self.rejoins
            .push((Instant::now() + after, topic.to_owned()));
    }

    /// Heartbeats and rejoins whose time has come.
    async fn timers(&mut self) -> Result<(), String> {
        let now = Instant::now();
        if self.next_beat.is_some_and(|at| at <= now) {
            self.beat().await?;
        }
        let due: Vec<String> = self
            .rejoins
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, t)| t.clone())
            .collect();
        self.rejoins.retain(|(at, _)| *at > now);
        for topic in due {
            let frame = self.joins.iter().find(|(t, _, _)| *t == topic);
            if let Some(frame) = frame.map(|(_, f, _)| f.clone()) {
                self.write_text(frame).await?;
            }
        }
        Ok(())
    }

    async fn write_text(&mut self, text: String) -> Result<(), String> {
        self.write(Message::text(text)).await
    }

    async fn write(&mut self, message: Message) -> Result<(), String> {
        let mut io = Io {
            input: &[],
            output: &mut self.out,
        };
        self.ws.write(&mut io, message).map_err(err)?;
        self.ws.flush(&mut io).map_err(err)?;
        let r = self.stream.write_all(&self.out).await.map_err(err);
        self.out = Vec::new();
        r
    }

    /// The next text frame, parsed; None when the connection ends.
    pub async fn next(&mut self) -> Option<Value> {
        let text = self.next_text().await?;
        serde_json::from_str(&text).ok()
    }

    /// The next text frame as it came; None when the connection ends.
    pub async fn next_text(&mut self) -> Option<String> {
        loop {
            let step = match self.inbox.next_event() {
                Ok(Some(Event::Text(t))) => Step::Text(String::from_utf8_lossy(t).into_owned()),
                Ok(Some(Event::Ping(p))) => Step::Pong(p.to_vec()),
                Ok(Some(Event::Close)) => Step::Closed,
                Ok(None) => Step::Read,
                Err(_) => return None,
            };
            match step {
                Step::Text(t) => {
                    if t.contains("\"phx_error\"") {
                        self.crashed(&t);
                    }
                    return Some(t);
                }
                Step::Pong(p) => self.write(Message::Pong(p.into())).await.ok()?,
                Step::Closed => {
                    let _ = self.write_close().await;
                    return None;
                }
                Step::Read => {
                    let (stream, inbox) = (&mut self.stream, &mut self.inbox);
                    let space = inbox.spare(READ_BUFFER);
                    let n = match self
                        .next_beat
                        .iter()
                        .chain(self.rejoins.iter().map(|(at, _)| at))
                        .min()
                    {
                        None => stream.read(space).await.unwrap_or(0),
                        Some(at) => {
                            // glommio's reads wait for readiness, then read: a read dropped by
                            // the timeout loses no bytes.
                            let wait = at.saturating_duration_since(Instant::now());
                            let read = glommio::timer::timeout(wait, async {
                                Ok(stream.read(space).await)
                            })
                            .await;
                            match read {
                                Ok(r) => r.unwrap_or(0),
                                Err(_) => {
                                    self.timers().await.ok()?;
                                    continue;
                                }
                            }
                        }
                    };
                    inbox.commit(n);
                    if n == 0 {
                        return None;
                    }
                }
            }
        }
    }

    /// A Phoenix heartbeat, as phoenix.js sends it; the next is due an interval from now.
    async fn beat(&mut self) -> Result<(), String> {
        self.beats += 1;
        self.next_beat = heartbeat().map(|d| Instant::now() + d);
        let frame = format!(r#"[null,"hb{}","phoenix","heartbeat",{{}}]"#, self.beats);
        self.write_text(frame).await
    }

    /// Reads (and drops) what comes until `until`, heartbeats included: a client held idle.
    /// False if the connection ended first.
    pub async fn hold(&mut self, until: Instant) -> bool {
        loop {
            let wait = until.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return true;
            }
            match glommio::timer::timeout(wait, async { Ok(self.next().await) }).await {
                Ok(Some(_)) => {}
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.write_close().await;
    }

    async fn write_close(&mut self) -> Result<(), String> {
        let mut io = Io {
            input: &[],
            output: &mut self.out,
        };
        let _ = self.ws.close(&mut io, None);
        let _ = self.ws.flush(&mut io);
        let out = std::mem::take(&mut self.out);
        self.stream.write_all(&out).await.map_err(err)
    }

    /// The connection's socket and the bytes read from it that are not yet a whole frame, for
    /// another reader to go on from (the epoll receiver). The socket stays open until the
    /// returned descriptor is closed.
    pub fn into_socket(self) -> Result<(std::net::TcpStream, Vec<u8>), String> {
        use std::os::fd::AsRawFd;
        // SAFETY: dup of a descriptor this client owns; the copy is owned by the TcpStream
        // returned, the original closes with the glommio stream dropped here.
        let fd = unsafe { libc::dup(self.stream.as_raw_fd()) };
        if fd < 0 {
            return Err(format!("dup: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let socket = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        Ok((socket, self.inbox.into_pending()))
    }
}
