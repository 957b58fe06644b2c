//! What a shard tells the operator: its counters, its figures on the admin board once a
//! second, and answers to the admin API's queries.

use std::cell::{Cell, RefCell};

use crate::net::admin::{Figure, LatencyOf, Query, Shown, ERRORS, REFUSALS};
use crate::net::runtime::Runtime;

/// Counters for logs now and metrics later.
#[derive(Default)]
pub struct Stats {
    pub accepted: Cell<u64>,
    pub handshake_failures: Cell<u64>,
    pub accept_errors: Cell<u64>,
    /// Slow consumers whose queued diffs were dropped (each gets fresh states once drained).
    pub slow_resyncs: Cell<u64>,
    pub messages_in: Cell<u64>,
    pub frames_out: Cell<u64>,
    /// Closes the connection layer decided (bad frames, rate limit), by reason.
    pub closes: RefCell<Vec<(&'static str, u64)>>,
    /// Upgrade requests refused, by reason.
    pub refusals: RefCell<Vec<(&'static str, u64)>>,
}

impl Stats {
    pub fn count(list: &RefCell<Vec<(&'static str, u64)>>, reason: &'static str) {
        let mut list = list.borrow_mut();
        match list.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => list.push((reason, 1)),
        }
    }
}

impl Runtime {
    /// Answers the admin API's queries waiting on the board.
    pub(super) fn answer_queries(&self) {
        let board = &self.board.shards[self.id.index()];
        let queries = board.take_queries();
        if queries.is_empty() {
            return;
        }
        let mut commands = Vec::new();
        let core = self.core.borrow();
        for q in queries {
            // A closed API connection dropped its receiver: nothing to do about it.
            let _ = match q {
                Query::Topic(name, reply) => {
                    let view = core.topic_view(name.as_str()).map(|v| v.presences);
                    let presences = view.into_iter().flatten().flat_map(|(key, metas)| {
                        metas.into_iter().map(move |m| (key.as_str().to_owned(), m))
                    });
                    let shown = Shown {
                        presences: presences.collect(),
                        whole: core.topic_is_whole(name.as_str()),
                    };
                    reply.send(shown).is_ok()
                }
                Query::User(key, reply) => {
                    let view = core.user_view(&key).into_iter();
                    let shown = Shown {
                        presences: view.map(|(t, m)| (t.as_str().to_owned(), m)).collect(),
                        whole: core.user_is_whole(&key),
                    };
                    reply.send(shown).is_ok()
                }
                Query::Command(c) => {
                    commands.push(c);
                    true
                }
            };
        }
        drop(core);
        if !commands.is_empty() {
            let mut core = self.core();
            for c in commands {
                core.command(c);
            }
            drop(core);
            self.dispatch();
        }
    }

    /// Puts this shard's figures on the board.
    pub(super) fn publish(&self) {
        let board = &self.board.shards[self.id.index()];
        let core = self.core.borrow();
        let stats = core.stats();
        board.publish_core(&stats);
        board.set_latency(LatencyOf::Join, core.join_latency());
        board.set_latency(LatencyOf::Delivery, &self.delivery.borrow());
        let backlog: usize = self.peer_queues.iter().map(|q| q.borrow().len()).sum();
        let s = &self.stats;
        for (f, v) in [
            (Figure::RingBacklog, backlog as u64),
            (Figure::Accepted, s.accepted.get()),
            (Figure::HandshakeFailures, s.handshake_failures.get()),
            (Figure::AcceptErrors, s.accept_errors.get()),
            (Figure::MessagesIn, s.messages_in.get()),
            (Figure::FramesOut, s.frames_out.get()),
            (Figure::Resyncs, s.slow_resyncs.get()),
            (Figure::SlowCloses, stats.slow_closes),
            (Figure::HeartbeatCloses, stats.heartbeat_closes),
        ] {
            board.set(f, v);
        }
        let (closes, refusals) = (s.closes.borrow(), s.refusals.borrow());
        let errors = core.errors().iter().chain(closes.iter());
        let errors = errors.map(|&(r, n)| (ERRORS, r, n));
        board.publish_reasons(errors.chain(refusals.iter().map(|&(r, n)| (REFUSALS, r, n))));
    }
}
