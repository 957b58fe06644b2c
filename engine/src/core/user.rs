//! User-owner side: for each user key hashed to this shard, every topic the user is tracked in,
//! with the stored meta. This is what "where is X" and watch lists read; the watching shards will
//! be recorded here too.

use std::collections::HashMap;

use ahash::RandomState;
use roster_proto::PhxRef;
use smallvec::SmallVec;

use crate::core::{Meta, TopicName, UserKey};

#[derive(Debug)]
struct UserPresence {
    topic: TopicName,
    /// Shared with the topic's table; its phx_ref is read from its bytes.
    meta: Meta,
}

#[derive(Debug, Default)]
pub(crate) struct Users {
    users: HashMap<UserKey, SmallVec<[UserPresence; 1]>, RandomState>,
}

impl Users {
    pub(crate) fn tracked(&mut self, key: UserKey, topic: TopicName, meta: Meta) {
        self.users
            .entry(key)
            .or_default()
            .push(UserPresence { topic, meta });
    }

    pub(crate) fn untracked(&mut self, key: &UserKey, topic: &TopicName, phx_ref: PhxRef) {
        let Some(ps) = self.users.get_mut(key) else {
            return;
        };
        if let Some(at) = ps
            .iter()
            .position(|p| &p.topic == topic && p.meta.is_ref(phx_ref))
        {
            ps.remove(at);
        }
        if ps.is_empty() {
            self.users.remove(key);
        }
    }

    /// `(topic, meta)` for every presence of `key`, sorted by topic then tracking order.
    pub(crate) fn presences(&self, key: &str) -> Vec<(TopicName, Meta)> {
        let mut v: Vec<(TopicName, Meta)> = self
            .users
            .get(key)
            .map(|ps| {
                ps.iter()
                    .map(|p| (p.topic.clone(), p.meta.clone()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub(crate) fn len(&self) -> usize {
        self.users.len()
    }
}
