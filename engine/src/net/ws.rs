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

/// Small buffers: tungstenite allocates its read buffer eagerly for every connection, and never
/// shrinks it.
pub fn config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(128)
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
