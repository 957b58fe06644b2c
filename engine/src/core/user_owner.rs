//! The shard as user owner: it hears from topic owners where each of its users is tracked, and
//! tells the shards that watch a user of every change (see `watch.rs` for the other end).

use crate::core::outbox::Outbox;
use crate::core::topic_owner::Env;
use crate::core::user::Users;
use crate::core::{MeshMsg, Meta, TopicName, UserKey};

impl Users {
    /// A message for the user owner (tracked, untracked, updated, watch, unwatch).
    pub(crate) fn message(&mut self, msg: MeshMsg, env: &mut Env<'_>) {
        let tx = &mut *env.tx;
        match msg {
            MeshMsg::UserTracked { topic, track } => {
                // A presence taken over from another node shows already.
                let shown = self.remote_shows(&track.key, &topic, track.phx_ref);
                self.cluster_tracked(&track.key, &topic, &track.meta, env);
                if shown || self.watchers(track.key.as_str()).is_empty() {
                    self.tracked(track.key, topic, track.meta);
                } else {
                    self.tracked(track.key.clone(), topic.clone(), track.meta.clone());
                    self.tell_watchers(&track.key, vec![(topic, track.meta)], Vec::new(), env.tx);
                }
            }
            MeshMsg::UserUntracked {
                topic,
                key,
                phx_ref,
            } => {
                if let Some(meta) = self.untracked(&key, &topic, phx_ref) {
                    self.cluster_untracked(&key, &topic, phx_ref);
                    if !self.remote_shows(&key, &topic, phx_ref) {
                        self.tell_watchers(&key, Vec::new(), vec![(topic, meta)], tx);
                    }
                }
            }
            MeshMsg::UserUpdated { topic, old, track } => {
                let left = self.untracked(&track.key, &topic, old);
                if left.is_some() {
                    self.cluster_untracked(&track.key, &topic, old);
                }
                // Either side may be a presence another node shows too (a takeover).
                let left = left.filter(|_| !self.remote_shows(&track.key, &topic, old));
                let shown = self.remote_shows(&track.key, &topic, track.phx_ref);
                self.cluster_tracked(&track.key, &topic, &track.meta, env);
                self.tracked(track.key.clone(), topic.clone(), track.meta.clone());
                let leaves = left.map(|m| vec![(topic.clone(), m)]).unwrap_or_default();
                let joins = if shown {
                    Vec::new()
                } else {
                    vec![(topic, track.meta)]
                };
                if !joins.is_empty() || !leaves.is_empty() {
                    self.tell_watchers(&track.key, joins, leaves, env.tx);
                }
            }
            MeshMsg::Watch { key, from, seq } if self.cluster.is_some() => {
                self.watch(key.clone(), from);
                self.cluster_watch(key, from, seq, env);
            }
            MeshMsg::Watch { key, from, seq } => {
                let presences = self.presences(key.as_str());
                self.watch(key.clone(), from);
                let msg = MeshMsg::UserState {
                    key,
                    seq,
                    presences,
                };
                tx.mesh(from, msg);
            }
            MeshMsg::Unwatch { key, from } => {
                self.unwatch(&key, from);
                self.cluster_unwatched(&key);
            }
            _ => debug_assert!(false, "not a user owner's message: {msg:?}"),
        }
    }

    pub(super) fn tell_watchers(
        &self,
        key: &UserKey,
        joins: Vec<(TopicName, Meta)>,
        leaves: Vec<(TopicName, Meta)>,
        tx: &mut Outbox,
    ) {
        let shards = self.watchers(key.as_str());
        let Some((&last, rest)) = shards.split_last() else {
            return;
        };
        for &shard in rest {
            let msg = MeshMsg::UserChanged {
                key: key.clone(),
                joins: joins.clone(),
                leaves: leaves.clone(),
            };
            tx.mesh(shard, msg);
        }
        let msg = MeshMsg::UserChanged {
            key: key.clone(),
            joins,
            leaves,
        };
        tx.mesh(last, msg);
    }
}
