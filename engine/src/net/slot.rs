//! What the runtime keeps per connection beside the core's record (its outbound queue, a
//! close asked for, its task's waker), and how a connection's task takes its frames.

use std::borrow::Cow;
use std::task::Waker;

use crate::core::outbound::OutQueue;
use crate::core::{ConnId, Frame};
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
    pub(super) fn new() -> Slot {
        Slot {
            out: OutQueue::default(),
            close: None,
            waker: None,
            queued_us: 0,
        }
    }
}

impl Runtime {
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
