//! A restart that keeps presence, on the shard's side: what it holds for the state file a
//! graceful stop writes (its connections' presences, and the presences of the topics it owns),
//! and the presences of the previous run taken back on the next start (see
//! `topic_owner/restore.rs`). The driver reads and writes the file (`state_file.rs`).

use roster_proto::PhxRef;

use crate::core::shard::Shard;
use crate::core::{Meta, Millis, TopicName, Track, UserKey};

/// Presences restored between two flushes. What they tell the user owners and the topics'
/// changes are carried out in batches: a flush per presence cost 5% more instructions over
/// the whole of `state-bench --presences 30000` (callgrind: 420.2M against 398.8M at 1024, the
/// same as one flush at the end), and one flush at the end would first queue a message per
/// presence (half a million per shard at 1M).
const RESTORE_BATCH: usize = 1024;

impl Shard {
    /// Which of their presences each of this shard's connections holds: its key, and the
    /// topic and ref of each tracked join.
    pub fn export_conns(&self) -> Vec<(UserKey, Vec<(TopicName, PhxRef)>)> {
        self.conns
            .values()
            .map(|c| {
                let tracked = c
                    .joins
                    .iter()
                    .filter_map(|j| Some((j.topic.clone(), j.tracked()?)))
                    .collect();
                (c.key.clone(), tracked)
            })
            .collect()
    }

    /// This node's own presences in the topics this shard owns (held ones included), with
    /// their stored metas.
    pub fn export_presences(&self) -> Vec<(TopicName, Track)> {
        self.owner.export()
    }

    /// This node's server-side presences in the topics this shard owns, with their stored
    /// metas and what is left of their TTLs.
    pub fn export_server_presences(&self) -> Vec<(TopicName, Track, Option<Millis>)> {
        self.owner.export_server(self.now)
    }

    /// Takes back server-side presences of this node's previous run, each `(topic, key, stored
    /// meta, rest of its TTL)`: live again at once, with their refs, until removed or their
    /// TTL ends (at the first tick if nothing was left). Checked and skipped as
    /// [`Shard::restore`] does; returns how many were taken.
    pub fn restore_server<'a>(
        &mut self,
        presences: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8], Option<Millis>)>,
    ) -> usize {
        let mut taken = 0;
        for (topic, key, stored_meta, ttl) in presences {
            let Some(track) = self.restorable(topic, key, stored_meta) else {
                continue;
            };
            let (owner, mut env) = self.owner_env();
            owner.server_restore(topic, track, ttl, &mut env);
            taken += 1;
        }
        self.drain_local();
        self.flush();
        taken
    }

    /// Takes back presences of this node's previous run (its state file), each `(topic, key,
    /// stored meta)`: held until `until` for a client of `key` to take over with an equal meta
    /// (same ref, no diff; a changed meta is one update), leaving then if nobody does. Watchers
    /// and counts see them as present meanwhile. Only the topics this shard owns are taken,
    /// before it takes connections; a presence the file should not hold (a topic or meta over
    /// this node's limits, a meta that is not an object with its ref) is skipped. Returns how
    /// many were taken.
    pub fn restore<'a>(
        &mut self,
        presences: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8])>,
        until: Millis,
    ) -> usize {
        let mut taken = 0;
        for (topic, key, stored_meta) in presences {
            let Some(track) = self.restorable(topic, key, stored_meta) else {
                continue;
            };
            let (owner, mut env) = self.owner_env();
            owner.restore(topic, track, until, &mut env);
            taken += 1;
            if taken % RESTORE_BATCH == 0 {
                self.drain_local();
                self.flush();
            }
        }
        self.drain_local();
        self.flush();
        taken
    }

    /// The presence to restore, if it is this shard's and one the file may hold.
    fn restorable(&self, topic: &str, key: &str, stored_meta: &[u8]) -> Option<Track> {
        if self.router.topic_owner(topic) != self.id
            || topic.is_empty()
            || topic.len() > self.config.max_topic_bytes
            // The stored meta is the client's plus the ref fields.
            || stored_meta.len() > self.config.max_meta_bytes + 64
        {
            return None;
        }
        // Frames splice stored metas in as they are: only a JSON object may come back.
        let object = stored_meta.first() == Some(&b'{')
            && serde_json::from_slice::<serde::de::IgnoredAny>(stored_meta).is_ok();
        if !object {
            return None;
        }
        let meta = Meta::new(stored_meta);
        let text = meta.ref_text();
        let phx_ref = std::str::from_utf8(&text).ok().and_then(PhxRef::parse)?;
        meta.is_ref(phx_ref).then(|| Track {
            key: UserKey::new(key),
            phx_ref,
            meta,
        })
    }
}
