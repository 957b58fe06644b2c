//! The epoll receiver: one thread reading server frames from many sockets with mio, for the
//! scenarios that time deliveries to thousands of subscribers (fanout), and for `floor`, which
//! reads its raw frames with this same code so that the ratio roster/floor compares servers
//! and not receivers. A glommio task per socket costs a task wake, a poll and an io_uring
//! completion per frame, and waking io_uring waiters costs the sender's kernel side too
//! (task work and an IPI per socket, charged to the server being measured); epoll wakes the
//! receiver once per batch of ready sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use crate::stamps::{joined_stamps, mono_ns};
use crate::wire::{client_pong_frame, client_text_frame, Event, Inbox};

/// How one socket's reading ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// `on_text` said it had what it wanted.
    Done,
    /// The server closed it, or it broke (a frame no server sends, a failed write).
    Closed,
    /// Still open when time ran out.
    TimedOut,
}

struct Sock {
    stream: mio::net::TcpStream,
    inbox: Inbox,
    ended: Option<Ended>,
}

/// Reads `sockets` (each with the bytes already read from it that were not yet a whole frame)
/// until every one is done, closed, or `until` passes, calling `on_text(i, text)` for each text
/// message of socket `i`; true means socket `i` is done. Sends a Phoenix heartbeat on every open
/// socket each `heartbeat`, and answers pings.
pub fn receive(
    sockets: Vec<(TcpStream, Vec<u8>)>,
    until: Instant,
    heartbeat: Option<Duration>,
    mut on_text: impl FnMut(usize, &[u8]) -> bool,
) -> Result<Vec<Ended>, String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut socks = Vec::with_capacity(sockets.len());
    for (i, (stream, pending)) in sockets.into_iter().enumerate() {
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut stream = mio::net::TcpStream::from_std(stream);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        let mut inbox = Inbox::default();
        inbox.push(&pending);
        socks.push(Sock {
            stream,
            inbox,
            ended: None,
        });
    }
    let mut open = socks.len();
    // What came before the handover may already be what a socket waits for.
    for (i, s) in socks.iter_mut().enumerate() {
        if frames(i, s, &mut on_text) {
            open -= 1;
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 << 10];
    let mut next_beat = heartbeat.map(|d| Instant::now() + d);
    let mut beats = 0u64;
    while open > 0 {
        let now = Instant::now();
        if now >= until {
            break;
        }
        if let (Some(at), Some(every)) = (next_beat, heartbeat) {
            if now >= at {
                beats += 1;
                let frame =
                    client_text_frame(&format!(r#"[null,"hb{beats}","phoenix","heartbeat",{{}}]"#));
                for s in socks.iter_mut().filter(|s| s.ended.is_none()) {
                    // A few dozen bytes into a send buffer that holds nothing else: all or
                    // nothing, and a socket that takes part of it is broken for our purpose.
                    if !matches!(s.stream.write(&frame), Ok(n) if n == frame.len()) {
                        s.ended = Some(Ended::Closed);
                        open -= 1;
                    }
                }
                next_beat = Some(now + every);
            }
        }
        let wait = [Some(until), next_beat]
            .into_iter()
            .flatten()
            .min()
            .map(|t| {
                t.saturating_duration_since(now)
                    .min(Duration::from_millis(100))
            });
        match poll.poll(&mut events, wait) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let s = &mut socks[i];
            if s.ended.is_some() {
                continue;
            }
            // Edge-triggered: read until the socket has nothing more.
            loop {
                match s.stream.read(&mut buf) {
                    Ok(0) => {
                        s.ended = Some(Ended::Closed);
                        break;
                    }
                    Ok(n) => {
                        s.inbox.push(&buf[..n]);
                        if frames(i, s, &mut on_text) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        s.ended = Some(Ended::Closed);
                        break;
                    }
                }
            }
            if s.ended.is_some() {
                open -= 1;
            }
        }
    }
    Ok(socks
        .into_iter()
        .map(|s| s.ended.unwrap_or(Ended::TimedOut))
        .collect())
}

/// Hands socket `i`'s whole messages to `on_text`, answers its pings; true once it ended.
fn frames(i: usize, s: &mut Sock, on_text: &mut impl FnMut(usize, &[u8]) -> bool) -> bool {
    loop {
        let pong = match s.inbox.next_event() {
            Ok(None) => return false,
            Ok(Some(Event::Text(t))) => {
                if on_text(i, t) {
                    s.ended = Some(Ended::Done);
                    return true;
                }
                continue;
            }
            Ok(Some(Event::Ping(p))) => client_pong_frame(p),
            Ok(Some(Event::Close)) | Err(_) => {
                s.ended = Some(Ended::Closed);
                return true;
            }
        };
        if !matches!(s.stream.write(&pong), Ok(n) if n == pong.len()) {
            s.ended = Some(Ended::Closed);
            return true;
        }
    }
}

/// Reads every join's send stamp off presence_diffs until `until` (churn's subscribers: no
/// socket is ever done), timing each against CLOCK_MONOTONIC.
pub fn receive_joins(
    sockets: Vec<(TcpStream, Vec<u8>)>,
    until: Instant,
    heartbeat: Option<Duration>,
) -> Result<(Histogram<u64>, Vec<Ended>), String> {
    let mut seen = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let ended = receive(sockets, until, heartbeat, |_, text| {
        diff_stamps(text, |sent, _| {
            seen.record(mono_ns().saturating_sub(sent) / 1000).ok();
        });
        false
    })?;
    Ok((seen, ended))
}

/// The joins' stamps of a presence_diff, to `on` (none for any other message).
fn diff_stamps(text: &[u8], on: impl FnMut(u64, Option<u64>)) {
    if let Ok(text) = std::str::from_utf8(text) {
        if text.contains("\"presence_diff\"") {
            joined_stamps(text, on);
        }
    }
}

/// What subscribers saw of `rounds` stamped changes (see [`receive_rounds`]).
pub struct Deliveries {
    /// Send -> read, every delivery (µs).
    pub one: Histogram<u64>,
    /// Per round, the slowest delivery (µs): when everyone had it.
    pub round_max: Vec<u64>,
    /// How each socket's reading ended: done once it saw every round.
    pub ended: Vec<Ended>,
}

/// Reads the stamped changes of `rounds` rounds off presence_diffs (the joins' `sent_ns` and
/// `round`, see `stamps.rs`), timing each against CLOCK_MONOTONIC; a socket is done once it has
/// seen `rounds` of them.
pub fn receive_rounds(
    sockets: Vec<(TcpStream, Vec<u8>)>,
    rounds: usize,
    until: Instant,
    heartbeat: Option<Duration>,
) -> Result<Deliveries, String> {
    let mut one = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut round_max = vec![0u64; rounds];
    let mut seen = vec![0usize; sockets.len()];
    let ended = receive(sockets, until, heartbeat, |i, text| {
        let now = mono_ns();
        diff_stamps(text, |sent, round| {
            let Some(slot) = round.and_then(|r| round_max.get_mut(r as usize)) else {
                return;
            };
            let us = now.saturating_sub(sent) / 1000;
            one.record(us).ok();
            *slot = (*slot).max(us);
            seen[i] += 1;
        });
        seen[i] >= rounds
    })?;
    Ok(Deliveries {
        one,
        round_max,
        ended,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn diff(round: usize, sent_ns: u64) -> Vec<u8> {
        let text = format!(
            r#"[null,null,"t","presence_diff",{{"joins":{{"u0":{{"metas":[{{"round":{round},"sent_ns":{sent_ns}}}]}}}},"leaves":{{}}}}]"#
        );
        let mut out = Vec::new();
        roster_engine::net::ws::write_text_frame(&mut out, text.as_bytes());
        out
    }

    /// Two sockets, one of them handed over with half a frame already read: both see every
    /// round, a heartbeat goes out on each, and a third closed by its peer counts as closed.
    #[test]
    fn rounds_are_read_from_every_socket_and_heartbeats_go_out() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut servers: Vec<TcpStream> = (0..3)
            .map(|_| listener.accept().expect("accept").0)
            .collect();
        let first = diff(0, mono_ns());
        let (head, rest) = first.split_at(9);
        let mut sockets: Vec<(TcpStream, Vec<u8>)> =
            clients.into_iter().map(|c| (c, Vec::new())).collect();
        sockets[0].1 = head.to_vec();
        servers[0].write_all(rest).expect("write");
        servers[1].write_all(&first).expect("write");
        drop(servers.pop());
        // The second round goes out once each socket's first heartbeat came.
        let writer = std::thread::spawn(move || {
            servers
                .into_iter()
                .map(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(4)))
                        .expect("timeout");
                    let mut b = [0u8; 64];
                    let n = s.read(&mut b).unwrap_or(0);
                    s.write_all(&diff(1, mono_ns())).expect("write");
                    b[..n].to_vec()
                })
                .collect::<Vec<_>>()
        });
        let until = Instant::now() + Duration::from_secs(5);
        let d =
            receive_rounds(sockets, 2, until, Some(Duration::from_millis(50))).expect("receive");
        assert_eq!(d.ended, [Ended::Done, Ended::Done, Ended::Closed]);
        assert_eq!(d.one.len(), 4);
        assert!(
            d.round_max[1] > 0 && d.round_max[1] < 2_000_000,
            "{:?}",
            d.round_max
        );
        for got in writer.join().expect("writer") {
            assert!(
                got.len() > 6 && got[0] == 0x81 && got[1] & 0x80 != 0,
                "{got:?}"
            );
        }
    }
}
