//! User-owner side: for each user key hashed to this shard, every topic the user is tracked in
//! (with the stored meta), and which shards have connections watching the user. This is what
//! "where is X" and watch lists read.

use roster_proto::PhxRef;
use smallvec::SmallVec;

use crate::core::hash::{Map, Seeds};
use crate::core::user_cluster::UserClusters;
use crate::core::{ClusterConfig, Meta, TopicName, UserKey};
use crate::mesh::ShardId;

#[derive(Debug)]
pub(super) struct UserPresence {
    topic: TopicName,
    /// Shared with the topic's table; its phx_ref is read from its bytes.
    meta: Meta,
}

#[derive(Debug)]
pub(crate) struct Users {
    pub(super) users: Map<UserKey, SmallVec<[UserPresence; 1]>>,
    /// Only watched users are here, so watch lists cost nothing to everyone else.
    pub(super) watchers: Map<UserKey, SmallVec<[ShardId; 2]>>,
    /// In a cluster: the other nodes' parts of the keys with interest here (`user_cluster.rs`).
    pub(super) cluster: Option<Box<UserClusters>>,
    /// The presence that left last (with events on): a `user_offline` names it.
    pub(super) last_left: Option<(TopicName, Meta)>,
}

impl Users {
    pub(crate) fn new(seeds: Seeds, cluster: Option<ClusterConfig>) -> Self {
        Users {
            users: seeds.map(),
            watchers: seeds.map(),
            cluster: cluster.map(|c| Box::new(UserClusters::new(c, seeds))),
            last_left: None,
        }
    }

    pub(crate) fn tracked(&mut self, key: UserKey, topic: TopicName, meta: Meta) {
        self.users
            .entry(key)
            .or_default()
            .push(UserPresence { topic, meta });
    }

    /// Removes presence `phx_ref` of `key` in `topic`, returning its meta.
    pub(crate) fn untracked(
        &mut self,
        key: &UserKey,
        topic: &TopicName,
        phx_ref: PhxRef,
    ) -> Option<Meta> {
        let ps = self.users.get_mut(key)?;
        let gone = ps
            .iter()
            .position(|p| &p.topic == topic && p.meta.is_ref(phx_ref))
            .map(|at| ps.remove(at).meta);
        if ps.is_empty() {
            self.users.remove(key);
        }
        gone
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

    pub(crate) fn watch(&mut self, key: UserKey, shard: ShardId) {
        let shards = self.watchers.entry(key).or_default();
        if !shards.contains(&shard) {
            shards.push(shard);
        }
    }

    pub(crate) fn unwatch(&mut self, key: &UserKey, shard: ShardId) {
        if let Some(shards) = self.watchers.get_mut(key) {
            shards.retain(|s| *s != shard);
            if shards.is_empty() {
                self.watchers.remove(key);
            }
        }
    }

    /// Shards watching `key`.
    pub(crate) fn watchers(&self, key: &str) -> &[ShardId] {
        self.watchers.get(key).map_or(&[], |s| s.as_slice())
    }

    /// Users with a presence here.
    pub(crate) fn len(&self) -> usize {
        self.users.len()
    }

    /// No presence, no watcher, and no key with interest in the cluster.
    pub(crate) fn is_empty(&self) -> bool {
        self.users.is_empty()
            && self.watchers.is_empty()
            && self.cluster.as_ref().is_none_or(|c| c.len() == 0)
    }
}
