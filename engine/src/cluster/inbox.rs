//! Where answers to this node's requests come back. One NATS subscription takes them all (a
//! request may have several answers, and a part several chunks, so NATS's one-answer request
//! does not fit); each request gets a reply subject under it naming the shard that asked and a
//! number, and the name it asked about is kept for NATS's "no responders", which carries only
//! a status. Pure: the bridge gives it the time.

use std::collections::{BTreeMap, VecDeque};

use crate::cluster::frame::Kind;
use crate::core::Millis;
use crate::mesh::ShardId;

/// The token of a lookup's reply subject where a shard's number would be.
const LOOKUP: &str = "lookup";

#[derive(Debug)]
struct Asked {
    shard: ShardId,
    kind: Kind,
    name: String,
}

#[derive(Debug)]
pub struct Inbox {
    prefix: String,
    shards: u16,
    next: u64,
    asked: BTreeMap<u64, Asked>,
    /// When each request's record may go, oldest first.
    expiry: VecDeque<(Millis, u64)>,
    keep: Millis,
}

impl Inbox {
    /// `prefix` is the client's own inbox prefix (unique per connection); a request's record is
    /// kept `keep` long, past which a "no responders" for it is ignored (it comes at once).
    pub fn new(prefix: String, shards: u16, keep: Millis) -> Inbox {
        Inbox {
            prefix,
            shards,
            next: 0,
            asked: BTreeMap::new(),
            expiry: VecDeque::new(),
            keep,
        }
    }

    /// What the bridge subscribes to.
    pub fn subscription(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// The reply subject of a new request of `shard` about `name`.
    pub fn ask(&mut self, shard: ShardId, kind: Kind, name: &str, now: Millis) -> String {
        self.expire(now);
        self.next += 1;
        let id = self.next;
        let name = name.to_owned();
        self.asked.insert(id, Asked { shard, kind, name });
        self.expiry.push_back((Millis(now.0 + self.keep.0), id));
        format!("{}.{}.{}", self.prefix, shard.0, id)
    }

    /// The reply subject of lookup `id` (`cluster::lookup`), answered in the bridge.
    pub fn lookup(&self, id: u64) -> String {
        format!("{}.{LOOKUP}.{id}", self.prefix)
    }

    /// The lookup an answer on `subject` is for, if it is for one.
    pub fn lookup_of(&self, subject: &str) -> Option<u64> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        rest.strip_prefix(LOOKUP)?.strip_prefix('.')?.parse().ok()
    }

    /// The shard an answer on `subject` goes to (None: not one of ours, or malformed).
    pub fn answer(&self, subject: &str) -> Option<ShardId> {
        self.parse(subject).map(|(shard, _)| shard)
    }

    /// NATS said nobody subscribes to what the request on `subject` asked: the shard and the
    /// name it asked about. Once per request.
    pub fn no_responders(&mut self, subject: &str) -> Option<(ShardId, Kind, String)> {
        let (_, id) = self.parse(subject)?;
        self.asked.remove(&id).map(|a| (a.shard, a.kind, a.name))
    }

    /// Requests whose records are kept now.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.asked.len()
    }

    fn expire(&mut self, now: Millis) {
        while let Some(&(at, id)) = self.expiry.front() {
            if at > now {
                break;
            }
            self.expiry.pop_front();
            self.asked.remove(&id);
        }
    }

    fn parse(&self, subject: &str) -> Option<(ShardId, u64)> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let (shard, id) = rest.split_once('.')?;
        let shard: u16 = shard.parse().ok()?;
        let id: u64 = id.parse().ok()?;
        (shard < self.shards).then_some((ShardId(shard), id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_go_to_the_shard_that_asked_and_no_responders_names_the_topic() {
        let mut inbox = Inbox::new("_INBOX.abc".into(), 4, Millis(1000));
        assert_eq!(inbox.subscription(), "_INBOX.abc.>");
        let a = inbox.ask(ShardId(2), Kind::Topic, "room:1", Millis(0));
        let b = inbox.ask(ShardId(3), Kind::User, "room:2", Millis(10));
        assert_ne!(a, b);
        assert_eq!(inbox.answer(&a), Some(ShardId(2)));
        assert_eq!(inbox.answer(&b), Some(ShardId(3)));
        assert_eq!(
            inbox.no_responders(&b),
            Some((ShardId(3), Kind::User, "room:2".to_owned()))
        );
        assert_eq!(inbox.no_responders(&b), None, "once per request");
        // Not ours, malformed, or a shard this process does not have.
        for s in [
            "_INBOX.abd.1.1",
            "_INBOX.abc.1",
            "_INBOX.abc.x.1",
            "_INBOX.abc.9.1",
            "_INBOX.abc",
        ] {
            assert_eq!(inbox.answer(s), None, "{s}");
        }
        // Lookups' answers are told apart from the shards'.
        let l = inbox.lookup(7);
        assert_eq!(inbox.lookup_of(&l), Some(7));
        assert_eq!(inbox.answer(&l), None);
        assert_eq!(inbox.lookup_of(&a), None);
        assert_eq!(inbox.lookup_of("_INBOX.abd.lookup.7"), None);
        // Records are kept `keep` long.
        inbox.ask(ShardId(0), Kind::Topic, "room:3", Millis(2000));
        assert_eq!(inbox.no_responders(&a), None);
        assert_eq!(inbox.pending(), 1);
    }
}
