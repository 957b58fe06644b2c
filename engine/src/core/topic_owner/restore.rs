//! A restart that keeps presence, on the owner's side: what this node's presences in the topics
//! owned here are (for the state file a graceful stop writes), and taking them back as held
//! presences on the next start, as the leave grace holds a closed connection's: a reconnecting
//! client's join with the same key and an equal meta takes one over with its old ref and no
//! diff; what nobody takes back leaves when the restart grace ends.

use std::collections::VecDeque;

use crate::core::part::ref_of;
use crate::core::topic_owner::{Env, Sink, TopicOwner};
use crate::core::{Millis, TopicName, Track, UserKey};
use roster_proto::PhxRef;

impl TopicOwner {
    /// This node's own presences in the topics owned here (another node's part excluded),
    /// held ones included: they are still someone's. Server-side presences are not among them
    /// ([`TopicOwner::export_server`]).
    pub(crate) fn export(&self) -> Vec<(TopicName, Track)> {
        let mut out = Vec::new();
        let server = self.server_refs();
        for (name, t) in &self.topics {
            let mut push = |key: &UserKey, meta: &crate::core::Meta| {
                let text = meta.ref_text();
                let phx_ref = std::str::from_utf8(&text).ok().and_then(PhxRef::parse);
                if let Some(phx_ref) = phx_ref.filter(|r| !server.contains(r)) {
                    let (key, meta) = (key.clone(), meta.clone());
                    out.push((name.clone(), Track { key, phx_ref, meta }));
                }
            };
            match t.cluster() {
                // This node's part (what it took back of its previous run included).
                Some(c) => t.each_presence(&mut |k, m| {
                    if c.owns(k, ref_of(m)) {
                        push(k, m);
                    }
                }),
                None => t.each_presence(&mut push),
            }
        }
        out
    }

    /// Takes back a presence of this node's previous run in `topic` (owned here), held until
    /// `until`. Called before the node takes connections, so the queue stays in deadline order.
    pub(crate) fn restore(&mut self, topic: &str, track: Track, until: Millis, env: &mut Env<'_>) {
        let name = self.owned_name(&TopicName::new(topic), env);
        let t = self.topics.get_mut(&name).expect("created above");
        if t.meta(&track.key, track.phx_ref).is_some() {
            return; // The same presence twice (a file lists each once).
        }
        let (key, phx_ref) = (track.key.clone(), track.phx_ref);
        let mut sink = Sink {
            router: &self.router,
            tx: env.tx,
            changed: &mut self.changed,
        };
        sink.announce_restored(t, &name, track);
        t.hold(&key, phx_ref, until);
        push_sorted(&mut self.restored, (until, name, key, phx_ref));
    }
}

/// Restores normally all come at start with one deadline; a later one still keeps the order.
fn push_sorted(
    queue: &mut VecDeque<(Millis, TopicName, UserKey, PhxRef)>,
    entry: (Millis, TopicName, UserKey, PhxRef),
) {
    let at = queue.partition_point(|e| e.0 <= entry.0);
    queue.insert(at, entry);
}
