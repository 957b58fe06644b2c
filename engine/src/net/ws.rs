//! WebSocket framing glue. tungstenite parses what clients send (masking, fragmentation, control
//! frames, size limits, UTF-8) through [`Io`], a Read/Write view over bytes this shard already
//! received; roster writes its own server frames, because a broadcast's payload is one shared
//! buffer and tungstenite's `Message` would want its own copy per connection.

use std::io::{self, Read, Write};

use tungstenite::protocol::WebSocketConfig;

/// Bytes received so far (read side) and the connection's outbound buffer (write side, where
/// tungstenite puts pongs and close replies).
pub struct Io<'a> {
    pub input: &'a [u8],
    pub output: &'a mut Vec<u8>,
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a client's byte stream stands between WebSocket frames, followed byte by byte beside
/// tungstenite: tungstenite's read buffer grows to the largest frame and never shrinks, and it
/// holds a fragmented message until its last fragment, but it cannot say when it holds nothing.
/// This can: when [`FrameCursor::idle`] after a large frame, a fresh tungstenite context is
/// exactly equivalent to the old one, and the connection swaps it in to give the memory back.
#[derive(Default)]
pub struct FrameCursor {
    /// The current frame's header bytes so far (at most 14).
    head: [u8; 14],
    head_len: u8,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// A data frame without FIN has come and its final continuation has not.
    fragmented: bool,
    /// Since the connection last swapped in a fresh tungstenite context, a frame or message
    /// made tungstenite's buffers grow past their initial size.
    pub grew: bool,
}

impl FrameCursor {
    /// Follows `bytes`, the next ones the client sent.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.head[self.head_len as usize] = bytes[0];
            self.head_len += 1;
            bytes = &bytes[1..];
            if let Some(len) = payload_len(&self.head[..self.head_len as usize]) {
                let (fin, opcode) = (self.head[0] & 0x80 != 0, self.head[0] & 0x0f);
                match opcode {
                    // A continuation: the message ends with its final fragment.
                    0 => self.fragmented &= !fin,
                    // Text, binary (and reserved data opcodes, which tungstenite refuses).
                    1..=7 => {
                        self.fragmented = !fin;
                        self.grew |= !fin;
                    }
                    _ => {} // Control frames come between fragments and end nothing.
                }
                self.grew |= len > GROWS_PAST;
                self.payload_left = len;
                self.head_len = 0;
            }
        }
    }

    /// Between frames, with no message partly received: tungstenite holds no client bytes.
    pub fn idle(&self) -> bool {
        self.head_len == 0 && self.payload_left == 0 && !self.fragmented
    }
}

/// A frame's payload length once its header (`head`, complete or not) is all there.
fn payload_len(head: &[u8]) -> Option<u64> {
    let second = *head.get(1)?;
    let (ext, mask) = match second & 0x7f {
        126 => (2, 4 * (second >> 7) as usize),
        127 => (8, 4 * (second >> 7) as usize),
        _ => (0, 4 * (second >> 7) as usize),
    };
    if head.len() < 2 + ext + mask {
        return None;
    }
    Some(match ext {
        0 => (second & 0x7f) as u64,
        2 => u16::from_be_bytes([head[2], head[3]]) as u64,
        _ => u64::from_be_bytes(head[2..10].try_into().ok()?),
    })
}

/// tungstenite's read buffer starts at this size (see [`config`]).
const READ_BUFFER_BYTES: usize = 128;
/// Frames with more payload than this made tungstenite's read buffer grow.
const GROWS_PAST: u64 = (READ_BUFFER_BYTES - 14) as u64;

/// Small buffers: tungstenite allocates its read buffer eagerly for every connection, and never
/// shrinks it.
pub fn config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_frame_size(Some(max_frame_bytes))
        .max_message_size(Some(max_frame_bytes))
}

/// Appends one unmasked, final text frame carrying `payload`.
pub fn write_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    write_text_frame_header(out, payload.len());
    out.extend_from_slice(payload);
}

/// Appends the header of a text frame whose `len` payload bytes the caller writes next.
pub fn write_text_frame_header(out: &mut Vec<u8>, len: usize) {
    const FIN_TEXT: u8 = 0x81;
    out.push(FIN_TEXT);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as tungstenite writes one: the cursor is checked against an
    /// encoder that is not its own.
    fn client_frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        use tungstenite::protocol::frame::{coding::OpCode, Frame};
        let payload = vec![b'x'; len];
        // Control frames have constructors of their own (`message` asserts a data opcode).
        let mut frame = match opcode {
            9 => Frame::ping(payload),
            10 => Frame::pong(payload),
            _ => Frame::message(payload, OpCode::from(opcode), fin),
        };
        frame.header_mut().mask = Some([1, 2, 3, 4]);
        let mut out = Vec::new();
        frame.format(&mut out).expect("a frame");
        out
    }

    #[test]
    fn the_cursor_knows_when_nothing_is_half_read() {
        let mut wire = client_frame(true, 1, 60_000);
        wire.extend(client_frame(true, 9, 4)); // a ping
        let mut c = FrameCursor::default();
        // Byte by byte and in one go end the same way.
        for chunk in wire.chunks(7) {
            c.advance(chunk);
        }
        assert!(c.idle() && c.grew);
        c = FrameCursor::default();
        c.advance(&wire[..3]);
        assert!(!c.idle(), "inside a header");
        c.advance(&wire[3..100]);
        assert!(!c.idle(), "inside a payload");
        c.advance(&wire[100..]);
        assert!(c.idle());
        // A fragmented message stays open across a ping until its final continuation.
        let mut c = FrameCursor::default();
        c.advance(&client_frame(false, 1, 10));
        assert!(!c.idle() && c.grew);
        c.advance(&client_frame(true, 10, 0));
        c.advance(&client_frame(false, 0, 10));
        assert!(!c.idle());
        c.advance(&client_frame(true, 0, 10));
        assert!(c.idle());
        let mut small = FrameCursor::default();
        small.advance(&client_frame(true, 1, 100));
        assert!(small.idle() && !small.grew);
    }
    use tungstenite::protocol::{Role, WebSocketContext};
    use tungstenite::Message;

    #[test]
    fn our_frames_parse_as_tungstenite_text_messages() {
        for len in [0, 5, 125, 126, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            let mut wire = Vec::new();
            write_text_frame(&mut wire, &payload);
            let mut client = WebSocketContext::new(Role::Client, Some(config(1 << 20)));
            let mut sink = Vec::new();
            let msg = client
                .read(&mut Io {
                    input: &wire,
                    output: &mut sink,
                })
                .expect("a frame");
            assert_eq!(
                msg,
                Message::text(String::from_utf8(payload).unwrap()),
                "len {len}"
            );
        }
    }
}
