//! The load generator's reading of server frames: WebSocket frames as a server sends them
//! (unmasked), split out of the bytes read, with the payload handed out in place. tungstenite
//! writes the client's frames (masking); it does not read them, for two reasons: it copies every
//! message into an owned one, at hundreds of thousands of frames a second a cost on the side
//! that must cost less than the server it measures, and it keeps bytes of its own that no API
//! gives back, so a connection could not move from a client task to the epoll receiver
//! (`receiver.rs`) mid-stream. Here what is not yet a whole frame is always in [`Inbox`].

use tungstenite::protocol::frame::Frame;

/// What a frame brought, its payload borrowed from the inbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole text message (fragments joined).
    Text(&'a [u8]),
    /// A ping, whose payload the pong carries back.
    Ping(&'a [u8]),
    /// The server closed the WebSocket.
    Close,
}

/// Bytes read and not yet consumed as frames (`buf[start..filled]`), and a fragmented message
/// being assembled. Room handed out for a read is only counted once committed, so a read
/// dropped half-way (a timeout) leaves the inbox as it was.
#[derive(Default)]
pub struct Inbox {
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    message: Vec<u8>,
    fragmented: bool,
}

/// Frames or messages larger than this end the connection (a load generator has no use for
/// them, and a bound keeps a confused stream from eating memory).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Past this, an empty inbox gives its memory back (it grew for a large frame, a room's
/// presence_state say): a load generator holds tens of thousands of idle clients, and ~12 KB
/// kept by each for its first state was 9.6 KB of RSS per client at 19k.
const KEEP_BYTES: usize = 1024;

impl Inbox {
    /// Room for `n` more bytes at the end; read into it, then [`Inbox::commit`] what was read.
    pub fn spare(&mut self, n: usize) -> &mut [u8] {
        if self.start == self.filled {
            (self.start, self.filled) = (0, 0);
            if self.buf.capacity() > KEEP_BYTES {
                self.buf = Vec::new();
            }
        } else if self.start > 0 && self.buf.len() - self.filled < n {
            self.buf.copy_within(self.start..self.filled, 0);
            (self.start, self.filled) = (0, self.filled - self.start);
        }
        if self.buf.len() < self.filled + n {
            // Exactly: doubling would leave a client that once read a large frame in pieces
            // with up to twice its size, and a fragmented heap.
            self.buf.reserve_exact(self.filled + n - self.buf.len());
            self.buf.resize(self.filled + n, 0);
        }
        &mut self.buf[self.filled..self.filled + n]
    }

    /// `n` bytes were read into the room [`Inbox::spare`] last handed out.
    pub fn commit(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.buf.len());
    }

    /// Appends bytes received elsewhere.
    pub fn push(&mut self, bytes: &[u8]) {
        self.spare(bytes.len()).copy_from_slice(bytes);
        self.commit(bytes.len());
    }

    /// Whether no bytes wait that are not yet a whole frame.
    pub fn is_empty(&self) -> bool {
        self.start == self.filled && !self.fragmented
    }

    /// Takes what remains unconsumed (for handing the stream to another reader). A fragmented
    /// message's first fragments are lost: roster and Phoenix do not fragment.
    pub fn into_pending(mut self) -> Vec<u8> {
        self.buf.truncate(self.filled);
        self.buf.drain(..self.start);
        self.buf
    }

    /// The next event from the bytes so far: None until a whole frame (or, fragmented, a whole
    /// message) is there; an error for what no server may send.
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, String> {
        loop {
            let Some((head, len)) = header(&self.buf[self.start..self.filled])? else {
                return Ok(None);
            };
            if len > MAX_MESSAGE_BYTES as u64 {
                return Err(format!("a frame of {len} bytes"));
            }
            let total = head.len + len as usize;
            if self.filled - self.start < total {
                return Ok(None);
            }
            let at = self.start + head.len;
            self.start += total;
            let payload = at..at + len as usize;
            match head.opcode {
                0x1 if head.fin && !self.fragmented => {
                    return Ok(Some(Event::Text(&self.buf[payload])));
                }
                0x1 | 0x2 if self.fragmented => return Err("a new message inside another".into()),
                0x1 => {
                    self.message.clear();
                    self.message.extend_from_slice(&self.buf[payload]);
                    self.fragmented = true;
                }
                0x0 if self.fragmented => {
                    if self.message.len() + payload.len() > MAX_MESSAGE_BYTES {
                        return Err("a fragmented message too large".into());
                    }
                    self.message.extend_from_slice(&self.buf[payload]);
                    if head.fin {
                        self.fragmented = false;
                        return Ok(Some(Event::Text(&self.message)));
                    }
                }
                0x0 => return Err("a continuation with no message".into()),
                // Binary messages mean nothing to a Phoenix client: skipped whole.
                0x2 => self.fragmented = !head.fin,
                0x8 => return Ok(Some(Event::Close)),
                0x9 => return Ok(Some(Event::Ping(&self.buf[payload]))),
                0xA => {}
                op => return Err(format!("opcode {op:#x}")),
            }
        }
    }
}

struct Head {
    len: usize,
    opcode: u8,
    fin: bool,
}

/// A server frame's header and payload length, once the header is all there.
fn header(b: &[u8]) -> Result<Option<(Head, u64)>, String> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[1] & 0x80 != 0 {
        return Err("a masked frame from the server".into());
    }
    if b[0] & 0x70 != 0 {
        return Err("reserved bits set (no extension was agreed)".into());
    }
    let (len, ext) = match b[1] & 0x7f {
        126 => (
            b.get(2..4).map(|x| u16::from_be_bytes([x[0], x[1]]) as u64),
            2,
        ),
        127 => (
            b.get(2..10)
                .and_then(|x| x.try_into().ok())
                .map(u64::from_be_bytes),
            8,
        ),
        n => (Some(n as u64), 0),
    };
    Ok(len.map(|len| {
        let head = Head {
            len: 2 + ext,
            opcode: b[0] & 0x0f,
            fin: b[0] & 0x80 != 0,
        };
        (head, len)
    }))
}

/// A client's masked text frame carrying `text` (tungstenite formats it).
pub fn client_text_frame(text: &str) -> Vec<u8> {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    masked(Frame::message(
        text.to_owned(),
        OpCode::Data(Data::Text),
        true,
    ))
}

/// A client's pong answering a ping's `payload`.
pub fn client_pong_frame(payload: &[u8]) -> Vec<u8> {
    masked(Frame::pong(payload.to_vec()))
}

fn masked(mut frame: Frame) -> Vec<u8> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Masks only need to differ from frame to frame; no server checks more.
    static NEXT_MASK: AtomicU32 = AtomicU32::new(0x9e37_79b9);
    let mask = NEXT_MASK.fetch_add(0x6d2b_79f5, Ordering::Relaxed);
    frame.header_mut().mask = Some(mask.to_le_bytes());
    let mut out = Vec::with_capacity(frame.len());
    // Formatting into a Vec cannot fail.
    let _ = frame.format(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        use tungstenite::protocol::frame::{coding::OpCode, Frame};
        let frame = match opcode {
            8 => Frame::close(None),
            9 => Frame::ping(payload.to_vec()),
            10 => Frame::pong(payload.to_vec()),
            _ => Frame::message(payload.to_vec(), OpCode::from(opcode), fin),
        };
        let mut out = Vec::new();
        frame.format(&mut out).expect("a frame");
        out
    }

    fn events(inbox: &mut Inbox) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(e) = inbox.next_event().expect("valid") {
            out.push(match e {
                Event::Text(t) => format!("text {}", String::from_utf8_lossy(t)),
                Event::Ping(p) => format!("ping {}", p.len()),
                Event::Close => "close".into(),
            });
        }
        out
    }

    /// tungstenite's server frames, fed in every split, come out as the same events.
    #[test]
    fn frames_come_out_whole_however_the_bytes_are_split() {
        let big = vec![b'y'; 70_000];
        let mut wire = server_frame(true, 1, b"hello");
        wire.extend(server_frame(true, 1, &vec![b'x'; 300]));
        wire.extend(server_frame(false, 1, b"frag"));
        wire.extend(server_frame(true, 9, b"pp"));
        wire.extend(server_frame(false, 0, b"men"));
        wire.extend(server_frame(true, 0, b"ted"));
        wire.extend(server_frame(true, 2, b"binary"));
        wire.extend(server_frame(true, 1, &big));
        wire.extend(server_frame(true, 8, b""));
        let want = vec![
            "text hello".to_owned(),
            format!("text {}", "x".repeat(300)),
            "ping 2".into(),
            "text fragmented".into(),
            format!("text {}", "y".repeat(70_000)),
            "close".into(),
        ];
        for chunk in [1, 7, 512, wire.len()] {
            let mut inbox = Inbox::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                inbox.push(piece);
                got.extend(events(&mut inbox));
            }
            assert_eq!(got, want, "chunks of {chunk}");
            assert!(inbox.is_empty());
        }
    }

    #[test]
    fn what_is_not_a_frame_yet_is_handed_over() {
        let mut wire = server_frame(true, 1, b"one");
        wire.extend(server_frame(true, 1, b"two"));
        let mut inbox = Inbox::default();
        inbox.push(&wire[..wire.len() - 2]);
        assert_eq!(events(&mut inbox), ["text one"]);
        assert!(!inbox.is_empty());
        let mut moved = Inbox::default();
        moved.push(&inbox.into_pending());
        moved.push(&wire[wire.len() - 2..]);
        assert_eq!(events(&mut moved), ["text two"]);
        // A read that filled less than the room asked for keeps only what it filled, and one
        // dropped before it committed leaves nothing.
        let mut inbox = Inbox::default();
        inbox.spare(512).fill(7);
        let spare = inbox.spare(512);
        spare[..wire.len()].copy_from_slice(&wire);
        inbox.commit(wire.len());
        assert_eq!(events(&mut inbox), ["text one", "text two"]);
        assert!(inbox.is_empty());
    }

    #[test]
    fn what_no_server_sends_is_an_error() {
        let mut masked = server_frame(true, 1, b"x");
        masked[1] |= 0x80;
        let mut continuation = server_frame(true, 0, b"x");
        let mut reserved = server_frame(true, 3, b"x");
        for bad in [&mut masked, &mut continuation, &mut reserved] {
            let mut inbox = Inbox::default();
            inbox.push(bad);
            assert!(inbox.next_event().is_err());
        }
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let mut inbox = Inbox::default();
        inbox.push(&huge);
        assert!(inbox.next_event().is_err());
    }

    #[test]
    fn a_client_frame_is_masked_text_tungstenite_reads() {
        let wire = client_text_frame("[null,\"1\",\"phoenix\",\"heartbeat\",{}]");
        assert_eq!(wire[0], 0x81);
        assert!(wire[1] & 0x80 != 0, "masked");
        let mut server =
            tungstenite::protocol::WebSocketContext::new(tungstenite::protocol::Role::Server, None);
        let mut sink = Vec::new();
        let msg = server
            .read(&mut roster_engine::net::ws::Io {
                input: &wire,
                output: &mut sink,
            })
            .expect("a frame");
        assert_eq!(
            msg.to_text().ok(),
            Some("[null,\"1\",\"phoenix\",\"heartbeat\",{}]")
        );
    }
}
