//! Subscriber side: for each topic, which local connections receive its diffs or counts. Only
//! connections whose join the owner has confirmed are here, so nobody gets a diff before its state.

use std::collections::{HashMap, HashSet};

use ahash::RandomState;
use roster_proto::PresenceMode;

use crate::core::{ConnId, TopicName};

#[derive(Debug, Default)]
struct Subscribers {
    full: HashSet<ConnId, RandomState>,
    count: HashSet<ConnId, RandomState>,
}

#[derive(Debug, Default)]
pub(crate) struct LocalSubs {
    topics: HashMap<TopicName, Subscribers, RandomState>,
}

impl LocalSubs {
    pub(crate) fn add(&mut self, topic: &TopicName, conn: ConnId, mode: PresenceMode) {
        let set = match mode {
            PresenceMode::None => return,
            PresenceMode::Full => &mut self.topics.entry(topic.clone()).or_default().full,
            PresenceMode::Count => &mut self.topics.entry(topic.clone()).or_default().count,
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
