//! The slow-consumer policy, decided here so that the server's driver and the simulation decide
//! alike: which frames count against a connection's outbound bound, when a queue has overflowed,
//! and what an overflow drops. Presence is state, not a log: an overflowing queue loses its
//! diffs (replies, counts and states stay), the shard resyncs the connection
//! ([`Shard::resync`](crate::core::Shard::resync)), and once it has written everything it gets
//! fresh states ([`Shard::drained`](crate::core::Shard::drained)). One that does not drain within
//! the slow-consumer timeout is closed by the shard (1008). [`OutQueue`] is the queue both
//! drivers keep per connection; when it is written, and so when it drained, is the driver's:
//! that depends on the socket.

use roster_proto::encode::{frame_kind, FrameKind};
use smallvec::SmallVec;

use crate::core::Frame;

/// Bytes of a frame that count toward the outbound bound. A state is what the client asked for
/// by joining, bounded by the topics it may join; only the rest counts, or a joiner of a room
/// whose state is over the bound would be resynced by its first diff.
pub fn counted(kind: FrameKind, len: usize) -> usize {
    if kind == FrameKind::State {
        0
    } else {
        len
    }
}

/// Whether queueing a frame of `counted` bytes behind `queued` counted bytes overflows the
/// bound. An empty queue never does: a single frame, however large, is written as it is.
pub fn overflows(queued: usize, counted: usize, max_bytes: usize, empty: bool) -> bool {
    !empty && queued.saturating_add(counted) > max_bytes
}

/// Whether an overflow drops this frame (queued, or the one that overflowed).
pub fn dropped_on_overflow(kind: FrameKind) -> bool {
    kind == FrameKind::Diff
}

/// What an [`OutQueue`] holds: a frame's bytes, whose kind is read back from them on an
/// overflow only (rather than kept beside each frame).
pub trait Queued {
    fn bytes(&self) -> &[u8];
}

impl Queued for Frame {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// What [`OutQueue::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue overflowed: its diffs were dropped (and this frame with them if it is one,
    /// else `queued`). The connection must resync ([`Shard::resync`](crate::core::Shard::resync)).
    Overflowed {
        queued: bool,
    },
}

/// A connection's frames waiting for its socket, bounded in counted bytes. One frame fits
/// inline: a connection that gets one frame per burst (the common fan-out case) never
/// allocates here.
pub struct OutQueue<F> {
    counted: u32,
    frames: SmallVec<[F; 1]>,
}

impl<F> Default for OutQueue<F> {
    fn default() -> Self {
        OutQueue {
            counted: 0,
            frames: SmallVec::new(),
        }
    }
}

impl<F: Queued> OutQueue<F> {
    /// Queues `frame` of `kind` under the bound of `max_bytes` counted bytes.
    pub fn push(&mut self, frame: F, kind: FrameKind, max_bytes: usize) -> Pushed {
        let counted = counted(kind, frame.bytes().len());
        let empty = self.frames.is_empty();
        let overflowed = overflows(self.counted as usize, counted, max_bytes, empty);
        if overflowed {
            self.frames
                .retain(|f| !dropped_on_overflow(frame_kind(f.bytes())));
            self.recount();
            if dropped_on_overflow(kind) {
                return Pushed::Overflowed { queued: false };
            }
        }
        self.counted = (self.counted as usize + counted).min(u32::MAX as usize) as u32;
        self.frames.push(frame);
        if overflowed {
            Pushed::Overflowed { queued: true }
        } else {
            Pushed::Queued
        }
    }

    pub fn frames(&self) -> &[F] {
        &self.frames
    }

    /// For marks of the driver's own beside the bytes; bytes must not change.
    pub fn frames_mut(&mut self) -> &mut [F] {
        &mut self.frames
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The first `n` frames were written. An emptied queue gives back what it grew to: a burst
    /// is over, and an idle connection holds no queue.
    pub fn consume(&mut self, n: usize) {
        self.frames.drain(..n.min(self.frames.len()));
        if self.frames.is_empty() {
            self.counted = 0;
            if self.frames.spilled() {
                self.frames = SmallVec::new();
            }
        } else {
            self.recount();
        }
    }

    fn recount(&mut self) {
        let n: usize = self
            .frames
            .iter()
            .map(|f| counted(frame_kind(f.bytes()), f.bytes().len()))
            .sum();
        self.counted = n.min(u32::MAX as usize) as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_do_not_count_and_only_diffs_drop() {
        assert_eq!(counted(FrameKind::State, 500_000), 0);
        assert_eq!(counted(FrameKind::Diff, 500), 500);
        assert!(
            !overflows(0, 2_000_000, 1 << 20, true),
            "a lone frame goes out"
        );
        assert!(overflows(1 << 20, 1, 1 << 20, false));
        assert!(!overflows((1 << 20) - 1, 1, 1 << 20, false));
        assert!(dropped_on_overflow(FrameKind::Diff));
        assert!(!dropped_on_overflow(FrameKind::State) && !dropped_on_overflow(FrameKind::Other));
    }

    #[test]
    fn an_overflow_drops_the_queued_diffs_and_keeps_the_rest() {
        let diff: Frame = std::rc::Rc::from(&br#"[null,null,"t","presence_diff",{}]"#[..]);
        let reply: Frame = std::rc::Rc::from(&br#"["1","1","t","phx_reply",{}]"#[..]);
        let state: Frame = std::rc::Rc::from(&br#"["1",null,"t","presence_state",{}]"#[..]);
        let mut q = OutQueue::default();
        let max = diff.len() * 2;
        assert_eq!(q.push(state.clone(), FrameKind::State, 1), Pushed::Queued);
        assert_eq!(q.push(diff.clone(), FrameKind::Diff, max), Pushed::Queued);
        assert_eq!(q.push(diff.clone(), FrameKind::Diff, max), Pushed::Queued);
        assert_eq!(
            q.push(reply.clone(), FrameKind::Other, max),
            Pushed::Overflowed { queued: true }
        );
        let kinds: Vec<FrameKind> = q.frames().iter().map(|f| frame_kind(f)).collect();
        assert_eq!(kinds, [FrameKind::State, FrameKind::Other]);
        q.consume(1);
        assert_eq!(q.push(diff.clone(), FrameKind::Diff, max), Pushed::Queued);
        assert_eq!(
            q.push(diff, FrameKind::Diff, reply.len()),
            Pushed::Overflowed { queued: false }
        );
        q.consume(usize::MAX);
        assert!(q.is_empty());
    }
}
