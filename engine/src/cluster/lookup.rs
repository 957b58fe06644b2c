//! One-off reads of a name's parts across the cluster, for the admin API on a node that holds
//! nothing of the name (no client of its touches it). A lookup asks every holder at once and
//! takes their answers as a first fetch does (complete once every holder named in any answer
//! has sent all its chunks, or at once on "no responders"); holders named but silent halfway to
//! the deadline are asked directly; at the deadline it gives what came, marked incomplete. It
//! keeps nothing once answered: a lookup is not interest, so no deltas follow it.
//!
//! Pure: the bridge gives it the time and the frames, and sends the requests it returns.

use std::collections::BTreeMap;

use crate::cluster::frame::{Frame, Kind, Origin, Part, PartRequest, Presence};
use crate::cluster::parts::RemoteParts;
use crate::core::Millis;

/// A lookup's answer: every presence the other nodes hold of the name.
#[derive(Debug)]
pub struct Found {
    pub presences: Vec<Presence>,
    /// False: the deadline came before every holder named had answered.
    pub complete: bool,
}

/// A lookup answered, with the token it was started with.
pub type Done<T> = (T, Found);

/// A request for a lookup to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Ask {
    pub id: u64,
    pub to: To,
    pub frame: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum To {
    /// Every holder of the name (its parts subject).
    Holders(Kind, String),
    /// One node (its own subject).
    Node(u64),
}

#[derive(Debug)]
struct Open<T> {
    kind: Kind,
    name: String,
    parts: RemoteParts,
    /// When silent holders are asked directly (once), and when the lookup gives up.
    nudge: Option<Millis>,
    until: Millis,
    token: T,
}

#[derive(Debug)]
pub struct Lookups<T> {
    me: Origin,
    next: u64,
    open: BTreeMap<u64, Open<T>>,
}

impl<T> Lookups<T> {
    pub fn new(me: Origin) -> Lookups<T> {
        Lookups {
            me,
            next: 0,
            open: BTreeMap::new(),
        }
    }

    /// Starts a lookup of `name` answered by `wait` from `now`; returns the request to send to
    /// every holder.
    pub fn start(&mut self, kind: Kind, name: &str, now: Millis, wait: Millis, token: T) -> Ask {
        self.next += 1;
        let id = self.next;
        let open = Open {
            kind,
            name: name.to_owned(),
            parts: RemoteParts::fetching(self.me.node),
            nudge: Some(Millis(now.0 + wait.0 / 2)),
            until: Millis(now.0 + wait.0),
            token,
        };
        self.open.insert(id, open);
        self.ask(id, kind, name, To::Holders(kind, name.to_owned()))
    }

    /// A chunk of some holder's part, in answer to lookup `id`.
    pub fn part(&mut self, id: u64, part: Part) -> Option<Done<T>> {
        let open = self.open.get_mut(&id)?;
        if part.kind != open.kind || part.name != open.name {
            return None; // Not an answer to what was asked (a peer's bug, or forged).
        }
        open.parts.part(part);
        self.finish(id, true)
    }

    /// Nobody holds anything of the name lookup `id` asked about.
    pub fn no_responders(&mut self, id: u64) -> Option<Done<T>> {
        self.open.get_mut(&id)?.parts.no_responders();
        self.finish(id, true)
    }

    /// Lookups past their deadline, answered with what came; and requests to holders named
    /// but silent halfway there.
    pub fn tick(&mut self, now: Millis) -> (Vec<Done<T>>, Vec<Ask>) {
        let mut asks = Vec::new();
        let mut expired = Vec::new();
        for (&id, open) in &mut self.open {
            if open.until <= now {
                open.parts.fetch_expired();
                expired.push(id);
            } else if open.nudge.is_some_and(|at| at <= now) {
                open.nudge = None;
                for node in open.parts.missing() {
                    asks.push((id, open.kind, open.name.clone(), node));
                }
            }
        }
        let asks = asks
            .into_iter()
            .map(|(id, kind, name, node)| self.ask(id, kind, &name, To::Node(node)))
            .collect();
        let done = expired
            .into_iter()
            .filter_map(|id| self.finish(id, false))
            .collect();
        (done, asks)
    }

    /// The next time [`Lookups::tick`] has something to do.
    pub fn next_wake(&self) -> Option<Millis> {
        let times = self.open.values().map(|o| o.nudge.unwrap_or(o.until));
        times.min()
    }

    fn ask(&self, id: u64, kind: Kind, name: &str, to: To) -> Ask {
        let frame = Frame::PartRequest(PartRequest {
            kind,
            name: name.to_owned(),
            from: self.me,
            ask: id,
        });
        Ask {
            id,
            to,
            frame: frame.encode(),
        }
    }

    /// The lookup's answer if its parts are in (or `in_time` is false: the deadline passed).
    fn finish(&mut self, id: u64, in_time: bool) -> Option<Done<T>> {
        if self.open.get(&id)?.parts.is_fetching() {
            return None;
        }
        let open = self.open.remove(&id)?;
        let presences = open.parts.presences();
        let presences = presences.into_iter().map(|(key, phx_ref, meta)| Presence {
            key: key.to_owned(),
            phx_ref,
            meta: meta.bytes().to_vec(),
            held: false,
        });
        let found = Found {
            presences: presences.collect(),
            complete: in_time,
        };
        Some((open.token, found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Origin = Origin {
        node: 1,
        incarnation: 10,
    };

    fn part(node: u64, keys: &[&str], holders: &[u64], chunk: u32, chunks: u32) -> Part {
        Part {
            kind: Kind::Topic,
            name: "room".into(),
            origin: Origin {
                node,
                incarnation: node * 10,
            },
            seq: 3,
            floor: 3,
            presences: keys
                .iter()
                .enumerate()
                .map(|(i, k)| Presence {
                    key: (*k).into(),
                    phx_ref: node * 100 + i as u64,
                    meta: b"{}".to_vec(),
                    held: false,
                })
                .collect(),
            holders: holders.to_vec(),
            ask: 1,
            chunk,
            chunks,
            relayed: false,
        }
    }

    fn keys(done: &Done<&str>) -> Vec<String> {
        let mut keys: Vec<String> = done.1.presences.iter().map(|p| p.key.clone()).collect();
        keys.sort();
        keys
    }

    #[test]
    fn complete_once_every_holder_named_has_sent_every_chunk() {
        let mut l = Lookups::new(ME);
        let ask = l.start(Kind::Topic, "room", Millis(0), Millis(1000), "a");
        assert_eq!(ask.to, To::Holders(Kind::Topic, "room".into()));
        assert!(matches!(Frame::decode(&ask.frame), Ok(Frame::PartRequest(q)) if q.ask == ask.id));
        // Node 2 names node 3, which has not answered yet.
        assert!(l.part(ask.id, part(2, &["x"], &[2, 3], 0, 1)).is_none());
        assert!(l.part(ask.id, part(3, &["y"], &[2, 3], 0, 2)).is_none());
        let done = l.part(ask.id, part(3, &["z"], &[2, 3], 1, 2)).unwrap();
        assert!(done.1.complete);
        assert_eq!(keys(&done), ["x", "y", "z"]);
        assert_eq!(l.next_wake(), None, "nothing kept once answered");
        assert!(l.part(ask.id, part(4, &["w"], &[4], 0, 1)).is_none());
    }

    #[test]
    fn no_responders_is_an_empty_answer_and_another_names_answer_is_ignored() {
        let mut l = Lookups::new(ME);
        let ask = l.start(Kind::Topic, "room", Millis(0), Millis(1000), "a");
        let mut other = part(2, &["x"], &[2], 0, 1);
        other.name = "hall".into();
        assert!(l.part(ask.id, other).is_none());
        let done = l.no_responders(ask.id).unwrap();
        assert!(done.1.complete && done.1.presences.is_empty());
    }

    #[test]
    fn silent_holders_are_asked_directly_then_the_deadline_gives_what_came() {
        let mut l = Lookups::new(ME);
        let ask = l.start(Kind::User, "ann", Millis(0), Millis(1000), "a");
        let mut p = part(2, &["room"], &[2, 5], 0, 1);
        p.kind = Kind::User;
        p.name = "ann".into();
        assert!(l.part(ask.id, p).is_none());
        assert_eq!(l.next_wake(), Some(Millis(500)));
        let (done, asks) = l.tick(Millis(499));
        assert!(done.is_empty() && asks.is_empty());
        let (done, asks) = l.tick(Millis(500));
        assert!(done.is_empty());
        assert_eq!(asks.len(), 1);
        assert_eq!((asks[0].id, &asks[0].to), (ask.id, &To::Node(5)));
        assert_eq!(l.next_wake(), Some(Millis(1000)));
        assert!(l.tick(Millis(900)).1.is_empty(), "asked once");
        let (done, _) = l.tick(Millis(1000));
        assert_eq!(done.len(), 1);
        assert!(!done[0].1.complete);
        assert_eq!(keys(&done[0]), ["room"]);
    }
}
