//! The topic owner in a cluster (see `cluster/`): interest in a topic starts when it is made
//! here (a client of this node joined it or is present) and ends when it is forgotten; this
//! node's part goes out as deltas at each flush; the other nodes' parts come in as deltas and
//! answers and change what this node's clients see. On a single node (`Config::cluster` None)
//! every function here does nothing.
//!
//! Partial: topics only (watch lists across nodes are not here yet), and no deadline for a
//! holder named in an answer that never answers.

use roster_proto::PhxRef;

use super::{Env, TopicOwner};
use crate::cluster::frame::{part_frames, Frame, Kind, PartRequest};
use crate::cluster::parts::{Applied, Change};
use crate::cluster::subject::Scope;
use crate::core::outbox::{NatsOut, Outbox};
use crate::core::{Meta, TopicName, UserKey};

impl TopicOwner {
    /// A topic was made here: subscribe to its deltas, and ask for the other nodes' parts (its
    /// joiners wait for them). Part requests are subscribed to once the fetch is complete:
    /// until then NATS's "no responders" must be able to say that nobody else holds anything.
    pub(super) fn cluster_interest(&mut self, name: &TopicName, tx: &mut Outbox) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        t.join_cluster(c.me.node);
        let subjects = &c.subjects;
        tx.nats(NatsOut::Subscribe(
            subjects.deltas(Scope::Topic, name.as_str()),
        ));
        let ask = Frame::PartRequest(PartRequest {
            kind: Kind::Topic,
            name: name.as_str().to_owned(),
            from: c.me,
        });
        tx.nats(NatsOut::Request {
            subject: subjects.parts(Scope::Topic, name.as_str()),
            name: name.as_str().to_owned(),
            frame: ask.encode(),
        });
    }

    /// The topic goes: so does this node's interest.
    pub(super) fn cluster_forget(&mut self, name: &TopicName, tx: &mut Outbox) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let fetched = self.topics.get(name).is_some_and(|t| !t.fetching());
        let subjects = &c.subjects;
        tx.nats(NatsOut::Unsubscribe(
            subjects.deltas(Scope::Topic, name.as_str()),
        ));
        if fetched {
            tx.nats(NatsOut::Unsubscribe(
                subjects.parts(Scope::Topic, name.as_str()),
            ));
        }
    }

    /// This node's part changed since its last delta: the next one goes out.
    pub(super) fn publish_delta(&mut self, name: &TopicName, tx: &mut Outbox) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let Some(tc) = self.topics.get_mut(name).and_then(|t| t.cluster_mut()) else {
            return;
        };
        if let Some(d) = tc.take_delta(name.as_str(), c.me) {
            let subject = c.subjects.deltas(Scope::Topic, name.as_str());
            let frame = Frame::Delta(d).encode();
            tx.nats(NatsOut::Publish { subject, frame });
        }
    }

    /// A frame from NATS about a topic (already validated); `reply` is where a request wants
    /// its answer.
    pub(crate) fn nats_frame(&mut self, frame: Frame, reply: Option<&str>, env: &mut Env<'_>) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let me = c.me;
        match frame {
            Frame::Delta(d) if d.kind == Kind::Topic => {
                let Some(name) = self.held(&d.name) else {
                    return; // Not of interest here (a hash shared with another name).
                };
                self.on_remote(&name, env, |r| r.delta(d));
            }
            Frame::Part(p) if p.kind == Kind::Topic => {
                let Some(name) = self.held(&p.name) else {
                    return;
                };
                self.on_remote(&name, env, |r| r.part(p));
            }
            Frame::PartRequest(q) if q.kind == Kind::Topic && q.from.node != me.node => {
                let (Some(name), Some(to)) = (self.held(&q.name), reply) else {
                    return;
                };
                let Some(tc) = self.topics.get(&name).and_then(|t| t.cluster()) else {
                    return;
                };
                let part = tc.own_part(name.as_str(), me);
                let max = self
                    .config
                    .cluster
                    .as_ref()
                    .map_or(1 << 20, |c| c.max_payload);
                for frame in part_frames(part, max) {
                    env.tx.nats(NatsOut::Reply {
                        to: to.to_owned(),
                        frame,
                    });
                }
            }
            _ => {}
        }
    }

    /// The request for `name`'s parts found no subscriber: nobody else holds anything there.
    pub(crate) fn no_responders(&mut self, name: &str, env: &mut Env<'_>) {
        if let Some(name) = self.held(name) {
            self.on_remote(&name, env, |r| r.no_responders());
        }
    }

    /// A node is down: its parts leave every topic here.
    pub(crate) fn node_down(&mut self, node: u64, env: &mut Env<'_>) {
        let names: Vec<TopicName> = self
            .topics
            .iter()
            .filter(|(_, t)| t.cluster().is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.on_remote(&name, env, |r| r.node_down(node));
        }
    }

    fn held(&self, name: &str) -> Option<TopicName> {
        self.topics.get_key_value(name).map(|(n, _)| n.clone())
    }

    /// Runs `input` on the topic's remote parts and carries out what it says: changes to what
    /// clients see, re-fetches, and once a first fetch completes, the joiners that waited.
    fn on_remote(
        &mut self,
        name: &TopicName,
        env: &mut Env<'_>,
        input: impl FnOnce(&mut crate::cluster::parts::RemoteParts) -> Applied,
    ) {
        let Some(c) = self.config.cluster.clone() else {
            return;
        };
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        let was_fetching = t.fetching();
        let Some(tc) = t.cluster_mut() else {
            return;
        };
        let applied = input(&mut tc.remote);
        for change in applied.changes {
            match change {
                Change::Join { key, meta, .. } => {
                    t.track_remote(UserKey::new(&key), Meta::new(&meta))
                }
                Change::Leave { key, phx_ref } => {
                    t.untrack_remote(&UserKey::new(&key), PhxRef(phx_ref));
                }
            }
        }
        self.changed.note(name, t);
        for origin in applied.refetch {
            let ask = Frame::PartRequest(PartRequest {
                kind: Kind::Topic,
                name: name.as_str().to_owned(),
                from: c.me,
            });
            env.tx.nats(NatsOut::Request {
                subject: c.subjects.node(origin.node),
                name: name.as_str().to_owned(),
                frame: ask.encode(),
            });
        }
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        if !was_fetching || t.fetching() {
            return;
        }
        // Everyone's parts are here. This node now answers part requests, and says what its
        // own part holds: a node whose request crossed ours unanswered (it was fetching too)
        // hears it that way.
        let subjects = &c.subjects;
        env.tx.nats(NatsOut::Subscribe(
            subjects.parts(Scope::Topic, name.as_str()),
        ));
        if let Some(tc) = t.cluster().filter(|tc| !tc.own_is_empty()) {
            let part = tc.own_part(name.as_str(), c.me);
            for frame in part_frames(part, c.max_payload) {
                let subject = subjects.deltas(Scope::Topic, name.as_str());
                env.tx.nats(NatsOut::Publish { subject, frame });
            }
        }
        if t.window_until.is_none() {
            // The joiners that waited get their state, after what changed goes to the
            // subscribers that were live already.
            let waiters = t.take_waiters();
            if t.has_pending() {
                self.flush_now(name, env);
            }
            self.answer_waiters(name, waiters, env);
        }
    }
}
