//! The message-rate limit: a bucket per connection holding one second's worth, kept as one
//! number (GCRA, the generic cell rate algorithm: the time at which the bucket would be full
//! again), so that it costs a connection's record 4 bytes. The shard keeps one in each
//! connection's record and closes the connection (1008) when it runs dry.

/// Messages a connection may still send. `tat` ("theoretical arrival time") is in µs on the
/// driver's clock, wrapping at 32 bits (71 minutes): only differences are read, and a
/// legitimate one is never more than a second ahead of now. A connection silent for about 71
/// minutes could read as having sent a burst just now; none is, as the heartbeat timeout
/// closes it first (every message, text or ping, moves `tat`).
#[derive(Debug)]
pub struct MessageRate {
    tat: u32,
}

impl MessageRate {
    pub fn full(now_ms: u64) -> Self {
        MessageRate {
            tat: (now_ms * 1000) as u32,
        }
    }

    /// Takes one message's worth; false when there is none (0 = no limit).
    pub fn take(&mut self, per_sec: u32, now_ms: u64) -> bool {
        if per_sec == 0 {
            return true;
        }
        let now = (now_ms * 1000) as u32;
        let interval = (1_000_000 / per_sec).max(1);
        // A second's worth at once: the last of them may start `tolerance` ahead.
        let tolerance = interval.saturating_mul(per_sec - 1);
        let ahead = self.tat.wrapping_sub(now);
        // Behind now (the bucket is full), or so far ahead that it can only be a connection
        // idle for longer than the clock's half-range: start from now.
        let ahead = if ahead > tolerance.saturating_add(interval) {
            0
        } else {
            ahead
        };
        if ahead > tolerance {
            return false;
        }
        self.tat = now.wrapping_add(ahead).wrapping_add(interval);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::MessageRate;

    #[test]
    fn the_bucket_holds_a_second_and_refills() {
        let mut b = MessageRate::full(1_000);
        assert_eq!((0..20).filter(|_| b.take(10, 1_000)).count(), 10);
        assert!(!b.take(10, 1_050), "half a message refilled");
        assert!(b.take(10, 1_150));
        assert_eq!(
            (0..20).filter(|_| b.take(10, 10_000)).count(),
            10,
            "never more than a second's worth"
        );
        assert!(MessageRate::full(0).take(0, 0), "0 = no limit");
        // Idle for half an hour, most of the clock's range: still a full second's worth.
        let mut b = MessageRate::full(0);
        assert!(b.take(10, 0));
        assert_eq!((0..20).filter(|_| b.take(10, 30 * 60_000)).count(), 10);
        // And past the middle of its range, where "ahead" wraps round to a large number.
        assert_eq!((0..20).filter(|_| b.take(10, 60 * 60_000)).count(), 10);
    }
}
