//! Subscriber side: for each topic, which local connections receive its diffs or counts. Only
//! connections whose join the owner has confirmed are here, so nobody gets a diff before its state.

use roster_proto::PresenceMode;

use crate::core::hash::{Map, Seeds, Set};
use crate::core::{ConnId, TopicName};

#[derive(Debug)]
struct Subscribers {
    full: Set<ConnId>,
    count: Set<ConnId>,
}

#[derive(Debug)]
pub(crate) struct LocalSubs {
    seeds: Seeds,
    topics: Map<TopicName, Subscribers>,
}

impl LocalSubs {
    pub(crate) fn new(seeds: Seeds) -> Self {
        LocalSubs {
            seeds,
            topics: seeds.map(),
        }
    }

    pub(crate) fn add(&mut self, topic: &TopicName, conn: ConnId, mode: PresenceMode) {
        if mode == PresenceMode::None {
            return;
        }
        let seeds = self.seeds;
        let subs = self
            .topics
            .entry(topic.clone())
            .or_insert_with(|| Subscribers {
                full: seeds.set(),
                count: seeds.set(),
            });
        let set = match mode {
            PresenceMode::Full => &mut subs.full,
            _ => &mut subs.count,
        };
        set.insert(conn);
    }

    pub(crate) fn remove(&mut self, topic: &str, conn: ConnId, mode: PresenceMode) {
        let Some(subs) = self.topics.get_mut(topic) else {
            return;
        };
        match mode {
            PresenceMode::Full => subs.full.remove(&conn),
            PresenceMode::Count => subs.count.remove(&conn),
            PresenceMode::None => false,
        };
        if subs.full.is_empty() && subs.count.is_empty() {
            self.topics.remove(topic);
        }
    }

    pub(crate) fn full(&self, topic: &str) -> impl Iterator<Item = ConnId> + '_ {
        self.topics
            .get(topic)
            .into_iter()
            .flat_map(|s| s.full.iter().copied())
    }

    pub(crate) fn count(&self, topic: &str) -> impl Iterator<Item = ConnId> + '_ {
        self.topics
            .get(topic)
            .into_iter()
            .flat_map(|s| s.count.iter().copied())
    }

    pub(crate) fn topics(&self) -> usize {
        self.topics.len()
    }
}
