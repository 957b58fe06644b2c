//! The slow-consumer policy, decided here so that the server's driver and the simulation decide
//! alike: which frames count against a connection's outbound bound, when a queue has overflowed,
//! and what an overflow drops. Presence is state, not a log: an overflowing queue loses its
//! diffs (replies, counts and states stay), the shard resyncs the connection
//! ([`Shard::resync`](crate::core::Shard::resync)), and once it has written everything it gets
//! fresh states ([`Shard::drained`](crate::core::Shard::drained)). One that does not drain within
//! the slow-consumer timeout is closed by the shard (1008). The queue itself, and when it
//! drained, are the driver's: they depend on the socket.

use roster_proto::encode::FrameKind;

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
}
