//! What the shard's tables must always agree on, checked by the simulation after every step
//! (and by nothing on the server's hot path). Each is something the code relies on but cannot
//! state in a type: deadline queues in order, lists that mirror per-topic flags, counts that
//! mirror the tables they count.

use crate::core::Shard;

impl Shard {
    /// Every invariant, or the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let sorted = |what: &str, mut times: Vec<u64>| {
            let ok = times.windows(2).all(|w| w[0] <= w[1]);
            times.dedup();
            if ok {
                Ok(())
            } else {
                Err(format!("{what} out of order: {times:?}"))
            }
        };
        sorted("held presences", self.held.iter().map(|h| h.0 .0).collect())?;
        sorted("twins", self.twins_due.iter().map(|t| t.0 .0).collect())?;
        for (name, t) in &self.topics {
            t.check()
                .map_err(|e| format!("topic {}: {e}", name.as_str()))?;
            let listed = |list: &[crate::core::TopicName]| list.iter().any(|n| n == name);
            if t.listed_for_flush != listed(&self.to_flush) {
                return Err(format!(
                    "topic {}: flush flag and list disagree",
                    name.as_str()
                ));
            }
            if t.listed_for_count != listed(&self.to_count) {
                return Err(format!(
                    "topic {}: count flag and list disagree",
                    name.as_str()
                ));
            }
            if t.window_until.is_some() != listed(&self.windows) {
                return Err(format!(
                    "topic {}: window and window list disagree",
                    name.as_str()
                ));
            }
        }
        for list in [&self.to_flush, &self.to_count, &self.windows] {
            let mut names: Vec<&str> = list.iter().map(|n| n.as_str()).collect();
            let len = names.len();
            names.sort_unstable();
            names.dedup();
            if names.len() != len {
                return Err(format!("a topic listed twice: {list:?}"));
            }
        }
        self.check_connections()
    }
}

#[cfg(test)]
mod tests {
    use crate::core::{Config, Millis, Shard, TopicName, UserKey};
    use crate::mesh::ShardId;
    use roster_proto::PhxRef;

    #[test]
    fn broken_invariants_are_named() {
        let mut s = Shard::new(ShardId(0), Config::default());
        assert_eq!(s.check_invariants(), Ok(()));
        let (t, k) = (TopicName::new("t"), UserKey::new("k"));
        s.held
            .push_back((Millis(10), t.clone(), k.clone(), PhxRef(1)));
        s.held.push_back((Millis(5), t.clone(), k, PhxRef(2)));
        assert!(s
            .check_invariants()
            .unwrap_err()
            .contains("held presences out of order"));
        s.held.clear();
        s.windows.push(t.clone());
        s.windows.push(t);
        assert!(s.check_invariants().unwrap_err().contains("listed twice"));
    }
}
