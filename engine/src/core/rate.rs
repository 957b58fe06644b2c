//! The message-rate limit: a token bucket per connection, holding one second's worth. The shard
//! keeps one in each connection's record and closes the connection (1008) when it runs dry.

/// Messages a connection may still send: a token bucket holding one second's worth, in
/// thousandths of a message so that it refills every millisecond.
#[derive(Debug)]
pub struct MessageRate {
    milli: u32,
    at_ms: u32,
}

impl MessageRate {
    pub fn full(per_sec: u32, now_ms: u64) -> Self {
        MessageRate {
            milli: per_sec.saturating_mul(1000),
            at_ms: now_ms as u32,
        }
    }

    /// Takes one message's worth; false when there is none (0 = no limit).
    pub fn take(&mut self, per_sec: u32, now_ms: u64) -> bool {
        if per_sec == 0 {
            return true;
        }
        let now = now_ms as u32;
        let elapsed = now.wrapping_sub(self.at_ms);
        self.at_ms = now;
        let cap = per_sec.saturating_mul(1000);
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(per_sec))
            .min(cap);
        if self.milli < 1000 {
            return false;
        }
        self.milli -= 1000;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::MessageRate;

    #[test]
    fn the_bucket_holds_a_second_and_refills() {
        let mut b = MessageRate::full(10, 1_000);
        assert_eq!((0..20).filter(|_| b.take(10, 1_000)).count(), 10);
        assert!(!b.take(10, 1_050), "half a message refilled");
        assert!(b.take(10, 1_150));
        assert_eq!(
            (0..20).filter(|_| b.take(10, 10_000)).count(),
            10,
            "never more than a second's worth"
        );
        assert!(MessageRate::full(0, 0).take(0, 0), "0 = no limit");
    }
}
