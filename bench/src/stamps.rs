//! Reading send-time stamps out of a presence_diff's text without parsing it: at hundreds of
//! thousands of diffs a second the load generator must cost less than the server it measures,
//! and a full JSON parse per frame (and a view per client) costs about as much as the server's
//! encoding of it.

/// The numbers `"sent_ns":N` of the metas in the `joins` half of a presence_diff (leaves carry
/// old metas with old stamps), with the meta's `"round":R` when it has one. Roster and Phoenix
/// both write `joins` before `leaves`. Handed to `on` one by one: a receiver calls this for
/// every frame it reads, and a list per frame would be an allocation per delivery.
pub fn joined_stamps(frame: &str, on: impl FnMut(u64, Option<u64>)) {
    joined_stamps_with(frame, "\"round\":", on)
}

/// [`joined_stamps`] with the number after `tag` (`"node":`, say: the key and its colon, so
/// that no string is built per frame) instead of the round.
pub fn joined_stamps_with(frame: &str, tag: &str, mut on: impl FnMut(u64, Option<u64>)) {
    let Some(start) = frame.find("\"joins\":") else {
        return;
    };
    let end = frame[start..]
        .find("\"leaves\":")
        .map_or(frame.len(), |e| start + e);
    let joins = &frame[start..end];
    let mut at = 0;
    while let Some(i) = joins[at..].find("\"sent_ns\":") {
        let pos = at + i;
        let Some(ns) = number_after(&joins[pos + "\"sent_ns\":".len()..]) else {
            break;
        };
        // The meta object around this stamp, for its round.
        let open = joins[..pos].rfind('{').unwrap_or(0);
        let close = joins[pos..].find('}').map_or(joins.len(), |c| pos + c);
        let round = joins[open..close]
            .find(tag)
            .and_then(|r| number_after(&joins[open + r + tag.len()..close]));
        on(ns, round);
        at = pos + 1;
    }
}

/// Nanoseconds on CLOCK_MONOTONIC: the same clock in every process, so a receiver in one
/// process can time stamps another process wrote.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn number_after(s: &str) -> Option<u64> {
    let s = s.trim_start();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    s[..digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_of_joins_only_with_their_rounds() {
        let diff = r#"[null,null,"room:fanout","presence_diff",{"joins":{"u0":{"metas":[{"round":7,"sent_ns":123,"phx_ref":"x","phx_ref_prev":"w"}]},"u9":{"metas":[{"sent_ns": 456,"phx_ref":"y"}]}},"leaves":{"u0":{"metas":[{"round":6,"sent_ns":100,"phx_ref":"w"}]}}}]"#;
        let all = |frame: &str| {
            let mut v = Vec::new();
            joined_stamps(frame, |ns, round| v.push((ns, round)));
            v
        };
        assert_eq!(all(diff), [(123, Some(7)), (456, None)]);
        assert!(all(r#"[null,null,"t","presence_state",{}]"#).is_empty());
        let phoenix_order =
            r#"{"joins":{"a":{"metas":[{"phx_ref":"F","sent_ns":5,"round":2}]}},"leaves":{}}"#;
        assert_eq!(all(phoenix_order), [(5, Some(2))]);
    }
}
