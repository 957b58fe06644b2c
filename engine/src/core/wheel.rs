//! A hashed timer wheel: one per shard instead of one reactor timer per connection (a million
//! heartbeat deadlines would be a million BTreeMap entries). Deadlines are coarse (one slot is
//! `granularity` ms) and may fire early when they lie beyond the wheel's horizon: whoever gets an
//! entry back checks the real deadline and puts it back if it is not due.

pub(crate) struct Wheel<K> {
    /// Entries in all slots, so that an empty wheel answers `next_due` at once.
    len: usize,
    slots: Vec<Vec<K>>,
    granularity: u64,
    /// First tick (time / granularity) not yet returned by `advance`.
    next_tick: u64,
}

impl<K> Wheel<K> {
    pub(crate) fn new(slots: usize, granularity_ms: u64, now_ms: u64) -> Self {
        assert!(slots > 0 && granularity_ms > 0);
        Wheel {
            len: 0,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            granularity: granularity_ms,
            next_tick: now_ms / granularity_ms,
        }
    }

    pub(crate) fn insert(&mut self, key: K, deadline_ms: u64) {
        let horizon = self.next_tick + self.slots.len() as u64 - 1;
        let tick = (deadline_ms / self.granularity).clamp(self.next_tick, horizon);
        let n = self.slots.len() as u64;
        self.slots[(tick % n) as usize].push(key);
        self.len += 1;
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// When `advance` would next return something (ms): the start of the first slot that
    /// holds an entry.
    pub(crate) fn next_due(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let n = self.slots.len() as u64;
        (self.next_tick..self.next_tick + n)
            .find(|t| !self.slots[(t % n) as usize].is_empty())
            .map(|t| t * self.granularity)
    }

    /// Moves every entry whose slot is at or before `now_ms` into `due`.
    pub(crate) fn advance(&mut self, now_ms: u64, due: &mut Vec<K>) {
        let target = now_ms / self.granularity;
        let n = self.slots.len() as u64;
        // After a long stall, one pass over every slot returns everything.
        let last = target.min(self.next_tick + n - 1);
        while self.next_tick <= last {
            let slot = &mut self.slots[(self.next_tick % n) as usize];
            self.len -= slot.len();
            due.append(slot);
            self.next_tick += 1;
        }
        self.next_tick = self.next_tick.max(target + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_at_their_slot() {
        let mut w = Wheel::new(8, 100, 1_000);
        w.insert("a", 1_250);
        w.insert("b", 1_050);
        w.insert("far", 99_000);
        assert_eq!(w.next_due(), Some(1_000));
        let mut due = Vec::new();
        w.advance(1_100, &mut due);
        assert_eq!(w.next_due(), Some(1_200));
        assert_eq!(due, ["b"]);
        due.clear();
        w.advance(1_299, &mut due);
        assert_eq!(due, ["a"]);
        due.clear();
        w.advance(1_700, &mut due);
        assert_eq!(
            due,
            ["far"],
            "beyond the horizon fires at the horizon, to be checked"
        );
        due.clear();
        w.insert("past", 0);
        w.advance(1_800, &mut due);
        assert_eq!(due, ["past"]);
        w.insert("late", 50_000);
        due.clear();
        w.advance(1_000_000, &mut due);
        assert_eq!(due, ["late"], "a long stall returns everything");
        assert_eq!(w.next_due(), None);
    }
}
