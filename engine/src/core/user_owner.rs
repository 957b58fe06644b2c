//! The shard as user owner: it hears from topic owners where each of its users is tracked, and
//! tells the shards that watch a user of every change (see `watch.rs` for the other end).

use crate::cluster::frame::Origin;
use crate::core::event::{Event, EventKind};
use crate::core::outbox::Outbox;
use crate::core::topic_owner::Env;
use crate::core::user::Users;
use crate::core::{MeshMsg, Meta, TopicName, UserKey};

impl Users {
    /// A message for the user owner (tracked, untracked, updated, watch, unwatch).
    pub(crate) fn message(&mut self, msg: MeshMsg, env: &mut Env<'_>) {
        let key = match &msg {
            MeshMsg::UserTracked { track, .. } | MeshMsg::UserUpdated { track, .. } => {
                Some(track.key.clone())
            }
            MeshMsg::UserUntracked { key, .. } => Some(key.clone()),
            _ => None,
        };
        let had = key.as_ref().is_some_and(|k| self.users.contains_key(k));
        self.apply(msg, env);
        if let Some(key) = key {
            let has = self.users.contains_key(&key);
            if had != has {
                self.own_part_turned(&key, has, env);
            }
        }
    }

    /// `key`'s presences here went from none to some (`now_present`) or from some to none: the
    /// user is online or offline if no other node shows it (in a cluster, once the first fetch
    /// of its parts says so).
    fn own_part_turned(&mut self, key: &UserKey, now_present: bool, env: &mut Env<'_>) {
        if !env.tx.events {
            return;
        }
        if self.cluster.is_some() {
            return self.cluster_own_part_turned(key, now_present, env);
        }
        let (topic, meta) = match now_present {
            true => self.presences(key.as_str()).into_iter().next(),
            false => self.last_left.take(),
        }
        .unzip();
        let (Some(topic), Some(meta)) = (topic, meta) else {
            return;
        };
        let kind = if now_present {
            EventKind::Online
        } else {
            EventKind::Offline
        };
        env.tx
            .event(|| user_event(kind, key.clone(), topic, meta, None));
    }

    fn apply(&mut self, msg: MeshMsg, env: &mut Env<'_>) {
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
                    if tx.events {
                        self.last_left = Some((topic.clone(), meta.clone()));
                    }
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
            MeshMsg::UserCheck(check) => self.check_offline(*check, env),
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

/// A `user_online` or `user_offline` event: `topic` and `meta` are of the presence that made
/// it (the first, or the last to leave); `origin` the node that died, for an offline its
/// death caused.
pub(crate) fn user_event(
    kind: EventKind,
    key: UserKey,
    topic: TopicName,
    meta: Meta,
    origin: Option<Origin>,
) -> Event {
    Event {
        kind,
        topic,
        key,
        meta,
        prev: None,
        reason: None,
        origin,
    }
}
