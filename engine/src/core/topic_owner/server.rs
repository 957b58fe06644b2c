//! Server-side presences: a key tracked in a topic by the application's backend (the admin
//! API), with a meta and no socket: a bot, an "in a call" state. They are this node's own
//! presences like any connection's (deltas, diffs, watch lists, events all see them), kept
//! until removed or until their TTL runs out. One per (topic, key): a second PUT updates it.
//!
//! A restart with a state file keeps them: they are exported apart from the connections'
//! presences and come back live (not held for a client), each with the rest of its TTL.

use roster_proto::{ClientMeta, PhxRef};

use super::{Env, TopicOwner};
use crate::core::event::Reason;
use crate::core::hash::Set;
use crate::core::ids::next_ref;
use crate::core::{Meta, Millis, TopicName, Track, UserKey};

/// A server-side presence: its ref, and when its TTL ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerPresence {
    phx_ref: PhxRef,
    until: Option<Millis>,
}

impl TopicOwner {
    /// Tracks `key` in `topic` with `meta` (a JSON object, checked by the caller), or updates
    /// its server-side presence there; `ttl`: it leaves after that long.
    pub(crate) fn server_track(
        &mut self,
        topic: &str,
        key: &str,
        meta: ClientMeta<'_>,
        ttl: Option<Millis>,
        env: &mut Env<'_>,
    ) {
        let name = self.owned_name(&TopicName::new(topic), env);
        let key = UserKey::new(key);
        let phx_ref = next_ref(self.shard, &mut self.minted, self.config.ref_seed);
        let old = self.server.get(&(name.clone(), key.clone())).copied();
        env.buf.clear();
        meta.encode(env.buf, None, phx_ref, old.map(|o| o.phx_ref));
        let track = Track {
            key: key.clone(),
            phx_ref,
            meta: Meta::new(env.buf),
        };
        self.keep_server(&name, key, phx_ref, ttl, env.now);
        match old {
            Some(old) => self.replace(&name, old.phx_ref, track, env),
            None => self.announce(&name, track, true, env.tx),
        }
        self.forget_if_idle(&name, env.tx);
    }

    /// The server-side presence of `key` in `topic` leaves (if there is one).
    pub(crate) fn server_untrack(
        &mut self,
        topic: &str,
        key: &str,
        why: Reason,
        env: &mut Env<'_>,
    ) {
        let at = (TopicName::new(topic), UserKey::new(key));
        let Some(p) = self.server.remove(&at) else {
            return;
        };
        let Some(name) = self.topics.get_key_value(&at.0).map(|(n, _)| n.clone()) else {
            return;
        };
        self.untrack(&name, at.1, p.phx_ref, Some(why), env.tx);
        self.forget_if_idle(&name, env.tx);
    }

    /// Server-side presences whose TTL ended leave.
    pub(super) fn expire_server(&mut self, env: &mut Env<'_>) {
        while let Some((until, ..)) = self.server_due.first() {
            if until.0 > env.now.0 {
                break;
            }
            let (until, topic, key) = self.server_due.pop_first().expect("first exists");
            // Put again since with another TTL (or none): that one counts.
            let current = self.server.get(&(topic.clone(), key.clone()));
            if current.is_some_and(|p| p.until == Some(until)) {
                self.server_untrack(topic.as_str(), key.as_str(), Reason::TtlExpired, env);
            }
        }
    }

    /// This node's server-side presences (in topics owned here), each with what is left of its
    /// TTL at `now`, for the state file.
    pub(crate) fn export_server(&self, now: Millis) -> Vec<(TopicName, Track, Option<Millis>)> {
        let mut out = Vec::with_capacity(self.server.len());
        for ((name, key), p) in &self.server {
            let Some(meta) = self.topics.get(name).and_then(|t| t.meta(key, p.phx_ref)) else {
                continue;
            };
            let track = Track {
                key: key.clone(),
                phx_ref: p.phx_ref,
                meta: meta.clone(),
            };
            let left = p.until.map(|u| Millis(u.0.saturating_sub(now.0)));
            out.push((name.clone(), track, left));
        }
        out
    }

    /// The refs of the server-side presences (unique on a node, like every ref): what a walk
    /// over all presences leaves out, without a key's lookup per presence.
    pub(super) fn server_refs(&self) -> Set<PhxRef> {
        let mut refs = self.seeds.set();
        refs.extend(self.server.values().map(|p| p.phx_ref));
        refs
    }

    /// Takes back a server-side presence of this node's previous run, as it was (its ref and
    /// meta, no event: the backend never saw it go), for the rest of its TTL (`ttl`).
    pub(crate) fn server_restore(
        &mut self,
        topic: &str,
        track: Track,
        ttl: Option<Millis>,
        env: &mut Env<'_>,
    ) {
        let name = self.owned_name(&TopicName::new(topic), env);
        if self.server.contains_key(&(name.clone(), track.key.clone())) {
            return; // The same presence twice (a file lists each once).
        }
        self.keep_server(&name, track.key.clone(), track.phx_ref, ttl, env.now);
        self.announce(&name, track, false, env.tx);
    }

    /// Records `key`'s server-side presence `phx_ref` in `name`, leaving `ttl` after `now`.
    fn keep_server(
        &mut self,
        name: &TopicName,
        key: UserKey,
        phx_ref: PhxRef,
        ttl: Option<Millis>,
        now: Millis,
    ) {
        let until = ttl.map(|t| Millis(now.0.saturating_add(t.0)));
        if let Some(until) = until {
            self.server_due.insert((until, name.clone(), key.clone()));
        }
        self.server
            .insert((name.clone(), key), ServerPresence { phx_ref, until });
    }

    /// When the next TTL ends.
    pub(super) fn next_server_expiry(&self) -> Option<Millis> {
        self.server_due.first().map(|d| d.0)
    }
}
