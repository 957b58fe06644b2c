//! A restart that keeps presence, on the shard's side: what it holds for the state file a
//! graceful stop writes (its connections' presences, and the presences of the topics it owns),
//! and the presences of the previous run taken back on the next start (see
//! `topic_owner/restore.rs`). The driver reads and writes the file (`state_file.rs`).

use roster_proto::PhxRef;

use crate::core::shard::Shard;
use crate::core::{Meta, Millis, TopicName, Track, UserKey};

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

    /// Takes back a presence of this node's previous run (its state file): held until `until`
    /// for a client of `key` to take over with an equal meta (same ref, no diff; a changed meta
    /// is one update), leaving then if nobody does. Watchers and counts see it as present
    /// meanwhile. For the topics this shard owns, before it takes connections; false (and
    /// nothing done) for another shard's topic, or a presence the file should not hold: a
    /// topic or meta over this node's limits, a meta without its ref.
    pub fn restore(&mut self, topic: &str, key: &str, stored_meta: &[u8], until: Millis) -> bool {
        if self.router.topic_owner(topic) != self.id
            || topic.is_empty()
            || topic.len() > self.config.max_topic_bytes
            // The stored meta is the client's plus the ref fields.
            || stored_meta.len() > self.config.max_meta_bytes + 64
        {
            return false;
        }
        // Frames splice stored metas in as they are: only a JSON object may come back.
        let object = stored_meta.first() == Some(&b'{')
            && serde_json::from_slice::<serde::de::IgnoredAny>(stored_meta).is_ok();
        if !object {
            return false;
        }
        let meta = Meta::new(stored_meta);
        let text = meta.ref_text();
        let Some(phx_ref) = std::str::from_utf8(&text).ok().and_then(PhxRef::parse) else {
            return false;
        };
        if !meta.is_ref(phx_ref) {
            return false;
        }
        let track = Track {
            key: UserKey::new(key),
            phx_ref,
            meta,
        };
        let (owner, mut env) = self.owner_env();
        owner.restore(topic, track, until, &mut env);
        self.drain_local();
        self.flush();
        true
    }
}
