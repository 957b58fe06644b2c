//! The heartbeat timeout. Only text messages are activity: phoenix.js sends a `heartbeat`
//! message every 30 s, and a client that only pings, or dribbles one message forever, is not
//! alive as far as presence goes. Pure: the driver keeps when each connection last sent a text
//! message and asks here when its deadline comes up.

/// What the driver does with a connection whose heartbeat deadline came up.
#[derive(Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// Silent for the whole timeout: close it (1000 "heartbeat timeout").
    Expired,
    /// Look again at this time (ms).
    CheckAt(u64),
}

/// `last_seen_ms` is when the client last sent a text message, on the driver's clock in ms
/// wrapped to 32 bits (only the difference to `now_ms` is read). `paused`: the driver stopped
/// reading the connection (its own backpressure), so a heartbeat may be waiting unread: it is
/// not held against the client.
pub fn heartbeat(last_seen_ms: u32, now_ms: u64, timeout_ms: u64, paused: bool) -> Heartbeat {
    let silent = (now_ms as u32).wrapping_sub(last_seen_ms) as u64;
    if silent >= timeout_ms && !paused {
        Heartbeat::Expired
    } else {
        Heartbeat::CheckAt(now_ms + timeout_ms.saturating_sub(silent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_for_the_timeout_expires_unless_paused() {
        assert_eq!(heartbeat(1_000, 61_000, 60_000, false), Heartbeat::Expired);
        assert_eq!(
            heartbeat(1_000, 61_000, 60_000, true),
            Heartbeat::CheckAt(61_000)
        );
        assert_eq!(
            heartbeat(31_000, 61_000, 60_000, false),
            Heartbeat::CheckAt(91_000)
        );
        // The clock wraps at 32 bits (49 days): differences still read right.
        let now = (u32::MAX as u64) + 10;
        assert_eq!(
            heartbeat(u32::MAX - 5, now, 60_000, false),
            Heartbeat::CheckAt(now + 60_000 - 15)
        );
    }
}
