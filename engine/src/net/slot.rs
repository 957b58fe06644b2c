//! What the runtime keeps per connection beside the core's record (its outbound queue, a
//! close asked for, its task's waker), and how a connection's task takes its frames.

use std::borrow::Cow;
use std::task::Waker;

use crate::core::outbound::OutQueue;
use crate::core::{ConnId, Frame};
use crate::net::conn::BIG_FRAME_BYTES;
use crate::net::runtime::Runtime;
use crate::net::ws::{write_text_frame, write_text_frame_header};

/// Why the server closes a connection: WebSocket close code and reason.
pub type CloseReason = (u16, Cow<'static, str>);

/// What the runtime keeps per connection, next to the core's record. One per connection in a
/// slab that grows by doubling, so it is kept small (64 bytes): the close reason, rare, is boxed.
pub struct Slot {
    /// Frames not yet taken by the connection's task.
    pub(super) out: OutQueue<Frame>,
    pub(super) close: Option<Box<CloseReason>>,
    waker: Option<Waker>,
    /// When the oldest frame in `out` was queued (µs, wrapping), for the delivery latency.
    pub(super) queued_us: u32,
    /// The connection's socket while the shard may write its frames without its task (see
    /// [`Runtime::write_listed`]); -1 while its task owes the socket bytes of frames queued
    /// earlier, or is closing, so that nothing overtakes them.
    pub(super) direct_fd: i32,
}

impl Slot {
    pub fn set_waker(&mut self, w: &Waker) {
        if !self.waker.as_ref().is_some_and(|old| old.will_wake(w)) {
            self.waker = Some(w.clone());
        }
    }

    pub(super) fn wake(&mut self) {
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }
}

impl Slot {
    pub(super) fn new(fd: i32) -> Slot {
        Slot {
            out: OutQueue::default(),
            close: None,
            waker: None,
            queued_us: 0,
            direct_fd: fd,
        }
    }
}

impl Runtime {
    /// Writes the frames queued for the connections listed in `to_write` straight to their
    /// sockets, from one task: in a fan-out every subscriber's socket usually has room, and
    /// waking one task per subscriber to write one frame (a wake, a poll, a copy into the write
    /// buffer, its own borrow of the queue) costs more than the write. A connection is listed
    /// only while its task owes the socket nothing (`direct_fd`), and the frames stay in its
    /// queue until written, so their order is kept whoever writes them. What a socket does not
    /// take is left to the connection's task, woken for it.
    pub fn write_listed(&self) {
        let listed = std::mem::take(&mut *self.to_write.borrow_mut());
        let mut conns = self.conns.borrow_mut();
        let mut buf = self.write_scratch.borrow_mut();
        let now = self.now_us() as u32;
        for conn in &listed {
            let Some(slot) = conns.get_mut(conn.0 as usize) else {
                continue;
            };
            if slot.out.is_empty() || slot.close.is_some() {
                // Its task took the frames (or an overflow dropped them and woke it), or it was
                // woken to close.
                continue;
            }
            let fd = slot.direct_fd;
            if fd < 0 || slot.out.frames().iter().any(|f| f.len() >= BIG_FRAME_BYTES) {
                slot.wake();
                continue;
            }
            buf.clear();
            for frame in slot.out.frames() {
                write_text_frame(&mut buf, frame);
            }
            // SAFETY: `buf` is valid for `buf.len()` bytes, which the kernel only reads.
            let sent = unsafe {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if sent <= 0 {
                // Full (or failing): its task waits for the socket, or meets the error.
                slot.wake();
                continue;
            }
            self.delivery
                .borrow_mut()
                .record(now.wrapping_sub(slot.queued_us) as u64);
            let n = slot.out.frames().len();
            slot.out.consume(n);
            // A slow consumer's task was woken by its overflow: it reports `drained` (for the
            // fresh states) on its next poll, whoever wrote the frames.
            let sent = sent as usize;
            if sent < buf.len() {
                // The rest goes first when its task writes next.
                slot.direct_fd = -1;
                slot.queued_us = now;
                self.partial_writes
                    .borrow_mut()
                    .push((*conn, buf[sent..].to_vec()));
                slot.wake();
            }
        }
        if buf.capacity() > 1 << 20 {
            *buf = Vec::new();
        }
        let mut list = self.to_write.borrow_mut();
        if list.is_empty() {
            // Keep the list's capacity for the next fan-out.
            *list = listed;
            list.clear();
        }
    }

    /// The task's side: whether the shard may write to `conn`'s socket directly now.
    pub fn set_direct(&self, conn: ConnId, fd: Option<i32>) {
        if let Some(slot) = self.conns.borrow_mut().get_mut(conn.0 as usize) {
            slot.direct_fd = fd.unwrap_or(-1);
        }
    }

    /// Whether the connection must close (without taking its frames); registers the waker.
    /// If it must, the frames queued before the close are appended to `wbuf` first (an error
    /// reply queued just before a close still goes out).
    pub fn take_close(
        &self,
        conn: ConnId,
        waker: &Waker,
        wbuf: &mut Vec<u8>,
    ) -> Option<CloseReason> {
        let closing = {
            let mut conns = self.conns.borrow_mut();
            let slot = conns.get_mut(conn.0 as usize)?;
            slot.set_waker(waker);
            slot.close.is_some()
        };
        if closing {
            self.take_outbound(conn, waker, wbuf, usize::MAX).0
        } else {
            None
        }
    }

    /// Appends the frames queued for `conn` to `wbuf` as WebSocket frames and says whether the
    /// connection must close; registers the task's waker. A frame of `big` bytes or more stops
    /// the walk: only its header goes into `wbuf`, and the frame itself is returned for the
    /// caller to write from (the frames after it stay queued).
    pub fn take_outbound(
        &self,
        conn: ConnId,
        waker: &Waker,
        wbuf: &mut Vec<u8>,
        big: usize,
    ) -> (Option<CloseReason>, Option<Frame>) {
        let mut conns = self.conns.borrow_mut();
        let Some(slot) = conns.get_mut(conn.0 as usize) else {
            return (None, None);
        };
        slot.set_waker(waker);
        // The rest of a direct write goes before anything queued after it.
        if !self.partial_writes.borrow().is_empty() {
            let mut partial = self.partial_writes.borrow_mut();
            if let Some(i) = partial.iter().position(|(c, _)| *c == conn) {
                wbuf.extend_from_slice(&partial.swap_remove(i).1);
            }
        }
        if !slot.out.is_empty() {
            let now = self.now_us() as u32;
            self.delivery
                .borrow_mut()
                .record(now.wrapping_sub(slot.queued_us) as u64);
            // What stays queued (behind a large frame) is timed from now.
            slot.queued_us = now;
        }
        let mut taken = 0;
        let mut large = None;
        for frame in slot.out.frames() {
            taken += 1;
            if frame.len() >= big {
                write_text_frame_header(wbuf, frame.len());
                large = Some(frame.clone());
                break;
            }
            write_text_frame(wbuf, frame);
        }
        slot.out.consume(taken);
        if large.is_some() {
            // The rest waits until the large frame is out; the task comes back for it.
            return (None, large);
        }
        (slot.close.take().map(|b| *b), None)
    }
}

#[cfg(test)]
mod tests {
    /// One per connection in a slab that doubles: the comment on `Slot` promises this size.
    #[test]
    fn a_slot_is_64_bytes() {
        assert_eq!(std::mem::size_of::<super::Slot>(), 64);
    }
}
