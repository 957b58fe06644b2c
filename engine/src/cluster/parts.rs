//! The other nodes' parts of one name (a topic, or a user key for watch lists) that this node
//! holds because its own clients touch the name. Pure: the owner shard feeds it what comes from
//! NATS and applies the [`Change`]s to what its clients see.
//!
//! A first fetch buffers deltas until every holder answered (see [`Fetch`]); a gap in one
//! origin's deltas re-fetches that origin's part alone, its deltas buffered meanwhile; either
//! way what the clients see changes by the net difference only.

use std::collections::BTreeMap;

use crate::cluster::chain::{Chain, Fetch, Verdict};
use crate::cluster::frame::{Delta, Origin, Part, Presence};
// One allocation per remote presence, shared with the topic's table (or a watcher's list)
// rather than copied into it.
use crate::core::Meta;

/// The incarnation of a holder named in an answer but not heard from yet.
const UNKNOWN: u64 = 0;

/// A change to what this node's clients see of the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Join {
        key: String,
        phx_ref: u64,
        meta: Meta,
    },
    /// With the meta it had (a watcher's diff shows it).
    Leave {
        key: String,
        phx_ref: u64,
        meta: Meta,
    },
}

/// What an input did: changes to apply, and origins whose parts must be fetched again
/// (directly from them).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<Change>,
    pub refetch: Vec<Origin>,
}

/// One origin's part: (key, ref) -> meta, and the last delta applied.
#[derive(Debug)]
struct RemotePart {
    chain: Chain,
    presences: BTreeMap<(String, u64), Meta>,
    /// A re-fetch of this part in progress: chunks so far, and deltas that came meanwhile.
    refetch: Option<Chunks>,
}

/// Chunks of one origin's part as they come.
#[derive(Debug)]
struct Chunks {
    origin: Origin,
    seq: u64,
    floor: u64,
    of: u32,
    got: BTreeMap<u32, Vec<Presence>>,
    buffered: Vec<Delta>,
}

impl Chunks {
    /// Before the first chunk of a part asked for.
    fn awaiting(origin: Origin) -> Chunks {
        Chunks {
            origin,
            seq: 0,
            floor: 0,
            of: 0,
            got: BTreeMap::new(),
            buffered: Vec::new(),
        }
    }

    fn new(part: &Part) -> Chunks {
        Chunks {
            origin: part.origin,
            seq: part.seq,
            floor: part.floor,
            of: part.chunks,
            got: BTreeMap::new(),
            buffered: Vec::new(),
        }
    }

    /// Takes a chunk; true once all are in. A chunk of another incarnation or seq than the
    /// first starts over (the part changed while it was being sent).
    fn take(&mut self, part: Part) -> bool {
        if (part.origin, part.seq, part.floor, part.chunks)
            != (self.origin, self.seq, self.floor, self.of)
        {
            let buffered = std::mem::take(&mut self.buffered);
            *self = Chunks::new(&part);
            self.buffered = buffered;
        }
        self.got.insert(part.chunk, part.presences);
        self.got.len() as u32 == self.of
    }

    /// Where the origin's deltas go on from, once this part is in.
    fn chain(&self) -> Chain {
        Chain::at(self.origin, self.seq, self.floor)
    }

    fn presences(&mut self) -> BTreeMap<(String, u64), Meta> {
        let chunks = std::mem::take(&mut self.got).into_values().flatten();
        chunks
            .map(|p| ((p.key, p.phx_ref), Meta::new(&p.meta)))
            .collect()
    }
}

/// The first fetch of the name.
#[derive(Debug)]
struct Fetching {
    fetch: Fetch,
    parts: BTreeMap<u64, Chunks>,
    buffered: Vec<Delta>,
}

#[derive(Debug)]
pub struct RemoteParts {
    me: u64,
    parts: BTreeMap<u64, RemotePart>,
    fetching: Option<Fetching>,
}

impl RemoteParts {
    /// Held by node `me`, fetching: deltas wait until every holder has answered.
    pub fn fetching(me: u64) -> RemoteParts {
        RemoteParts {
            me,
            parts: BTreeMap::new(),
            fetching: Some(Fetching {
                fetch: Fetch::new(me),
                parts: BTreeMap::new(),
                buffered: Vec::new(),
            }),
        }
    }

    pub fn is_fetching(&self) -> bool {
        self.fetching.is_some()
    }

    /// Holders named in answers that have not answered in full (asked again directly).
    pub fn missing(&self) -> Vec<u64> {
        self.fetching
            .as_ref()
            .map_or(Vec::new(), |f| f.fetch.missing())
    }

    /// The first fetch's deadline passed: complete with what came. Holders named but silent
    /// are asked again directly (in `refetch`), their deltas buffered until they answer.
    pub fn fetch_expired(&mut self) -> Applied {
        let Some(f) = self.fetching.as_mut() else {
            return Applied::default();
        };
        let missing = f.fetch.missing();
        f.fetch.expire();
        f.parts.retain(|_, c| c.got.len() as u32 == c.of);
        let silent = missing.into_iter().map(|node| Origin {
            node,
            incarnation: UNKNOWN,
        });
        self.finish_fetch(silent.collect())
    }

    /// The request for parts had no responders: nobody else holds anything.
    pub fn no_responders(&mut self) -> Applied {
        let Some(f) = self.fetching.as_mut() else {
            return Applied::default();
        };
        f.fetch.no_responders();
        self.finish_fetch(Vec::new())
    }

    /// A chunk of some origin's part: an answer to the first fetch, or to a re-fetch.
    pub fn part(&mut self, part: Part) -> Applied {
        let node = part.origin.node;
        if node == self.me {
            return Applied::default();
        }
        if let Some(f) = self.fetching.as_mut() {
            f.fetch.answer(node, &part.holders, part.chunk, part.chunks);
            let chunks = f.parts.entry(node).or_insert_with(|| Chunks::new(&part));
            chunks.take(part);
            return self.finish_fetch(Vec::new());
        }
        let Some(rp) = self.parts.get_mut(&node) else {
            // A part nobody asked for (or of a node dropped since): taken as it is.
            let mut chunks = Chunks::new(&part);
            if !chunks.take(part) {
                let presences = BTreeMap::new();
                let rp = RemotePart::new(Chain::at(chunks.origin, 0, 0), presences, Some(chunks));
                self.parts.insert(node, rp);
                return Applied::default();
            }
            let presences = chunks.presences();
            let mut applied = Applied::default();
            joins(&presences, &mut applied.changes);
            let rp = RemotePart::new(chunks.chain(), presences, None);
            self.parts.insert(node, rp);
            return applied;
        };
        if rp.refetch.is_none() && part.origin == rp.chain.origin && part.floor < rp.chain.seq {
            // Older than deltas applied since: an answer overtaken by the origin's deltas
            // (answers come through the inbox, not in order with them).
            return Applied::default();
        }
        let chunks = rp.refetch.get_or_insert_with(|| Chunks::new(&part));
        if !chunks.take(part) {
            return Applied::default();
        }
        let mut chunks = rp.refetch.take().expect("taken above");
        let mut applied = Applied::default();
        let fresh = chunks.presences();
        net_changes(&rp.presences, &fresh, &mut applied.changes);
        rp.presences = fresh;
        rp.chain = chunks.chain();
        // Deltas of another incarnation than the part's are of a process that has ended (or
        // will show again in a later gap): applying them would ask again and again.
        let buffered = std::mem::take(&mut chunks.buffered);
        for d in sorted(buffered)
            .into_iter()
            .filter(|d| d.origin == chunks.origin)
        {
            self.apply(d, &mut applied);
        }
        applied
    }

    /// A delta from some origin.
    pub fn delta(&mut self, d: Delta) -> Applied {
        if d.origin.node == self.me {
            return Applied::default();
        }
        if let Some(f) = self.fetching.as_mut() {
            f.buffered.push(d);
            return Applied::default();
        }
        let mut applied = Applied::default();
        self.apply(d, &mut applied);
        applied
    }

    /// That incarnation of a node is down (it died, or restarted): its part leaves. A part of
    /// its next incarnation stays: it may have come in before the news of the restart.
    pub fn node_down(&mut self, origin: Origin) -> Applied {
        let node = origin.node;
        let mut applied = Applied::default();
        if let Some(f) = self.fetching.as_mut() {
            if f.parts.get(&node).is_none_or(|c| c.origin == origin) {
                f.fetch.node_down(node);
                f.parts.remove(&node);
            }
            f.buffered.retain(|d| d.origin != origin);
            applied = self.finish_fetch(Vec::new());
        }
        let of = |o: Origin| {
            o == origin
                || o == Origin {
                    node,
                    incarnation: UNKNOWN,
                }
        };
        if self.parts.get(&node).is_some_and(|rp| of(rp.chain.origin)) {
            let rp = self.parts.remove(&node).expect("checked above");
            leaves(&rp.presences, &mut applied.changes);
        }
        applied
    }

    /// Frames to or from `origin` may have been lost (a heartbeat gap, a reconnect, a slow
    /// consumer): its part of this name is asked for again (true: ask it directly), whether
    /// this node holds one of it or not (a join whose delta was lost may have been its first
    /// here), its deltas buffered meanwhile. During the first fetch its answer is waited for
    /// anew (the answer, or a delta after it, may be what was lost).
    pub fn refetch(&mut self, origin: Origin) -> bool {
        if origin.node == self.me {
            return false;
        }
        if let Some(f) = self.fetching.as_mut() {
            f.fetch.expect(origin.node);
            f.parts.remove(&origin.node);
            return true;
        }
        let rp = self
            .parts
            .entry(origin.node)
            .or_insert_with(|| RemotePart::new(Chain::at(origin, 0, 0), BTreeMap::new(), None));
        if rp.refetch.is_none() {
            rp.refetch = Some(Chunks::awaiting(origin));
        }
        true
    }

    /// Nodes whose part is being fetched again and has not come in full: asked again when the
    /// retry time comes (the request or its answer may have been lost).
    pub fn awaiting(&self) -> Vec<u64> {
        let parts = self.parts.iter();
        parts
            .filter(|(_, rp)| rp.refetch.is_some())
            .map(|(&n, _)| n)
            .collect()
    }

    /// Every remote presence held: (key, ref, meta).
    pub fn presences(&self) -> impl Iterator<Item = (&str, u64, &Meta)> {
        let parts = self.parts.values();
        let all = parts.flat_map(|rp| rp.presences.iter());
        all.map(|((k, r), m)| (k.as_str(), *r, m))
    }

    /// The holders this node knows of (for its own answers to part requests).
    pub fn holders(&self) -> Vec<u64> {
        self.parts.keys().copied().collect()
    }

    /// Ends the first fetch if every holder named has answered; `silent` holders (named, gave
    /// no full answer in time) are asked again, their deltas buffered until they answer.
    fn finish_fetch(&mut self, silent: Vec<Origin>) -> Applied {
        let mut applied = Applied::default();
        if !self
            .fetching
            .as_ref()
            .is_some_and(|f| f.fetch.is_complete())
        {
            return applied;
        }
        let f = self.fetching.take().expect("checked above");
        for (node, mut chunks) in f.parts {
            let presences = chunks.presences();
            joins(&presences, &mut applied.changes);
            let rp = RemotePart::new(chunks.chain(), presences, None);
            self.parts.insert(node, rp);
        }
        for origin in silent {
            let awaiting = Some(Chunks::awaiting(origin));
            let rp = RemotePart::new(Chain::at(origin, 0, 0), BTreeMap::new(), awaiting);
            self.parts.insert(origin.node, rp);
            applied.refetch.push(origin);
        }
        for d in sorted(f.buffered) {
            self.apply(d, &mut applied);
        }
        applied
    }

    fn apply(&mut self, d: Delta, applied: &mut Applied) {
        let node = d.origin.node;
        let Some(rp) = self.parts.get_mut(&node) else {
            // The first we hear of this origin on this name: from empty, or we missed some.
            if d.prev != 0 {
                let mut chunks = Chunks::awaiting(d.origin);
                chunks.buffered.push(d.clone());
                let rp = RemotePart::new(Chain::at(d.origin, 0, 0), BTreeMap::new(), Some(chunks));
                self.parts.insert(node, rp);
                applied.refetch.push(d.origin);
                return;
            }
            let mut rp = RemotePart::new(Chain::at(d.origin, 0, 0), BTreeMap::new(), None);
            rp.apply(d, &mut applied.changes);
            self.parts.insert(node, rp);
            return;
        };
        if let Some(chunks) = rp.refetch.as_mut() {
            chunks.buffered.push(d);
            return;
        }
        match rp.chain.verdict(d.origin, d.seq, d.prev) {
            Verdict::Apply => rp.apply(d, &mut applied.changes),
            Verdict::Duplicate => {}
            Verdict::Replace => {
                leaves(&rp.presences, &mut applied.changes);
                rp.presences.clear();
                rp.apply(d, &mut applied.changes);
            }
            Verdict::Gap => {
                let mut chunks = Chunks::awaiting(d.origin);
                applied.refetch.push(d.origin);
                chunks.buffered.push(d);
                rp.refetch = Some(chunks);
            }
        }
    }
}

impl RemotePart {
    fn new(
        chain: Chain,
        presences: BTreeMap<(String, u64), Meta>,
        refetch: Option<Chunks>,
    ) -> RemotePart {
        RemotePart {
            chain,
            presences,
            refetch,
        }
    }

    /// Applies the next delta: its joins, then its leaves. A ref joins once and leaves once,
    /// so a presence that joined and left between two deltas nets out; an update is a join and
    /// a leave of two refs.
    fn apply(&mut self, d: Delta, changes: &mut Vec<Change>) {
        for j in d.joins {
            let id = (j.key.clone(), j.phx_ref);
            let meta = Meta::new(&j.meta);
            if self.presences.insert(id, meta.clone()).is_none() {
                changes.push(Change::Join {
                    key: j.key,
                    phx_ref: j.phx_ref,
                    meta,
                });
            }
        }
        for l in d.leaves {
            if let Some(meta) = self.presences.remove(&(l.key.clone(), l.phx_ref)) {
                changes.push(Change::Leave {
                    key: l.key,
                    phx_ref: l.phx_ref,
                    meta,
                });
            }
        }
        self.chain.applied(d.origin, d.seq);
    }
}

/// Deltas in the order to apply them: by origin, then seq (their relative order across origins
/// does not matter, as parts are disjoint).
fn sorted(mut deltas: Vec<Delta>) -> Vec<Delta> {
    deltas.sort_by_key(|d| (d.origin.node, d.origin.incarnation, d.seq));
    deltas
}

fn joins(presences: &BTreeMap<(String, u64), Meta>, changes: &mut Vec<Change>) {
    for ((key, phx_ref), meta) in presences {
        changes.push(Change::Join {
            key: key.clone(),
            phx_ref: *phx_ref,
            meta: meta.clone(),
        });
    }
}

fn leaves(presences: &BTreeMap<(String, u64), Meta>, changes: &mut Vec<Change>) {
    for ((key, phx_ref), meta) in presences {
        changes.push(Change::Leave {
            key: key.clone(),
            phx_ref: *phx_ref,
            meta: meta.clone(),
        });
    }
}

/// What changed from `old` to `new` (a ref names one meta for good, so equal ids are equal).
fn net_changes(
    old: &BTreeMap<(String, u64), Meta>,
    new: &BTreeMap<(String, u64), Meta>,
    changes: &mut Vec<Change>,
) {
    for ((key, phx_ref), meta) in old.iter().filter(|(id, _)| !new.contains_key(*id)) {
        changes.push(Change::Leave {
            key: key.clone(),
            phx_ref: *phx_ref,
            meta: meta.clone(),
        });
    }
    for ((key, phx_ref), meta) in new.iter().filter(|(id, _)| !old.contains_key(*id)) {
        changes.push(Change::Join {
            key: key.clone(),
            phx_ref: *phx_ref,
            meta: meta.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::frame::{Kind, Left};

    fn o(node: u64, incarnation: u64) -> Origin {
        Origin { node, incarnation }
    }

    fn p(key: &str, phx_ref: u64) -> Presence {
        Presence {
            key: key.into(),
            phx_ref,
            meta: format!(r#"{{"r":{phx_ref}}}"#).into_bytes(),
        }
    }

    fn delta(origin: Origin, seq: u64, joins: Vec<Presence>, leaves: &[(&str, u64)]) -> Delta {
        Delta {
            kind: Kind::Topic,
            name: "t".into(),
            origin,
            seq,
            prev: seq - 1,
            joins,
            leaves: leaves
                .iter()
                .map(|&(k, r)| Left {
                    key: k.into(),
                    phx_ref: r,
                })
                .collect(),
        }
    }

    fn part(
        origin: Origin,
        seq: u64,
        presences: Vec<Presence>,
        holders: &[u64],
        chunk: (u32, u32),
    ) -> Part {
        Part {
            kind: Kind::Topic,
            name: "t".into(),
            origin,
            seq,
            floor: seq,
            presences,
            holders: holders.to_vec(),
            ask: 0,
            chunk: chunk.0,
            chunks: chunk.1,
        }
    }

    fn held(r: &RemoteParts) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = r.presences().map(|(k, r, _)| (k.to_owned(), r)).collect();
        v.sort();
        v
    }

    fn join(key: &str, phx_ref: u64) -> Change {
        Change::Join {
            key: key.into(),
            phx_ref,
            meta: Meta::new(&p(key, phx_ref).meta),
        }
    }

    fn leave(key: &str, phx_ref: u64) -> Change {
        Change::Leave {
            key: key.into(),
            phx_ref,
            meta: Meta::new(&p(key, phx_ref).meta),
        }
    }

    #[test]
    fn a_first_fetch_waits_for_every_holder_then_applies_what_came_meanwhile() {
        let (a, b) = (o(2, 20), o(3, 30));
        let mut r = RemoteParts::fetching(1);
        // b's delta 4 overtakes every answer.
        assert_eq!(
            r.delta(delta(b, 4, vec![p("bob2", 41)], &[])),
            Applied::default()
        );
        assert_eq!(
            r.part(part(a, 7, vec![p("ann", 10)], &[2, 3], (0, 1))),
            Applied::default()
        );
        assert!(r.is_fetching());
        assert_eq!(r.missing(), [3]);
        let done = r.part(part(b, 3, vec![p("bob", 40)], &[2], (0, 1)));
        assert!(!r.is_fetching());
        assert_eq!(
            done.changes,
            [join("ann", 10), join("bob", 40), join("bob2", 41)]
        );
        assert_eq!(
            held(&r),
            [("ann".into(), 10), ("bob".into(), 40), ("bob2".into(), 41)]
        );
        // Later deltas apply in order; a repeat is dropped.
        let next = r.delta(delta(a, 8, vec![], &[("ann", 10)]));
        assert_eq!(next.changes, [leave("ann", 10)]);
        assert_eq!(
            r.delta(delta(a, 8, vec![], &[("ann", 10)])),
            Applied::default()
        );
        let mut alone = RemoteParts::fetching(1);
        assert_eq!(alone.no_responders(), Applied::default());
        assert!(!alone.is_fetching());
    }

    #[test]
    fn a_gap_refetches_one_origin_and_ends_in_the_net_change() {
        let a = o(2, 20);
        let mut r = RemoteParts::fetching(1);
        r.part(part(a, 1, vec![p("ann", 10), p("amy", 11)], &[], (0, 1)));
        // Delta 2 was lost; 3 shows the gap.
        let gap = r.delta(delta(a, 3, vec![p("abe", 12)], &[]));
        assert_eq!(
            gap,
            Applied {
                changes: vec![],
                refetch: vec![a]
            }
        );
        // 4 comes while the part is on its way, in two chunks.
        assert_eq!(
            r.delta(delta(a, 4, vec![p("al", 13)], &[("amy", 11)])),
            Applied::default()
        );
        assert_eq!(
            r.part(part(a, 3, vec![p("ann", 10)], &[], (0, 2))),
            Applied::default()
        );
        let done = r.part(part(a, 3, vec![p("abe", 12)], &[], (1, 2)));
        // As of 3: amy left (in the lost 2), abe joined; then 4: amy's leave is moot, al joins.
        assert_eq!(
            done.changes,
            [leave("amy", 11), join("abe", 12), join("al", 13)]
        );
        assert_eq!(
            held(&r),
            [("abe".into(), 12), ("al".into(), 13), ("ann".into(), 10)]
        );
    }

    #[test]
    fn restarts_and_deaths_take_the_old_part_away() {
        let (a, a2) = (o(2, 20), o(2, 21));
        let mut r = RemoteParts::fetching(1);
        r.part(part(a, 5, vec![p("ann", 10)], &[], (0, 1)));
        let restarted = r.delta(delta(a2, 1, vec![p("ann", 99)], &[]));
        assert_eq!(restarted.changes, [leave("ann", 10), join("ann", 99)]);
        // The news of the restart may come after the new incarnation's delta: the old
        // incarnation's death leaves the new one's part alone.
        assert_eq!(r.node_down(a), Applied::default());
        let down = r.node_down(a2);
        assert_eq!(down.changes, [leave("ann", 99)]);
        assert!(held(&r).is_empty());
        // A node first heard mid-stream (not from empty) is fetched.
        let c = o(4, 40);
        let first = r.delta(delta(c, 6, vec![p("cy", 7)], &[]));
        assert_eq!(first.refetch, [c]);
        let got = r.part(part(c, 5, vec![p("cat", 6)], &[], (0, 1)));
        assert_eq!(got.changes, [join("cat", 6), join("cy", 7)]);
        // A holder that dies during a first fetch is not waited for.
        let mut f = RemoteParts::fetching(1);
        f.part(part(a, 1, vec![p("ann", 10)], &[2, 9], (0, 1)));
        assert!(f.is_fetching());
        let done = f.node_down(o(9, 90));
        assert!(!f.is_fetching());
        assert_eq!(done.changes, [join("ann", 10)]);
    }
    #[test]
    fn a_gap_asks_for_a_part_not_held_and_an_overtaken_answer_is_dropped() {
        let a = o(2, 20);
        let mut r = RemoteParts::fetching(1);
        r.no_responders();
        // a's first delta here (its join) was lost: the gap asks for its part all the same.
        assert!(r.refetch(a));
        assert_eq!(r.awaiting(), [2]);
        assert_eq!(
            r.delta(delta(a, 2, vec![p("al", 11)], &[])),
            Applied::default(),
            "waits for the part"
        );
        let got = r.part(part(a, 1, vec![p("ann", 10)], &[], (0, 1)));
        assert_eq!(got.changes, [join("ann", 10), join("al", 11)]);
        assert!(r.awaiting().is_empty());
        // An answer sent before delta 2 and delivered after it: dropped.
        assert_eq!(r.part(part(a, 1, vec![], &[], (0, 1))), Applied::default());
        assert_eq!(held(&r), [("al".into(), 11), ("ann".into(), 10)]);
    }

    #[test]
    fn silent_holders_of_an_expired_fetch_are_awaited_until_they_answer_or_die() {
        let (a, b) = (o(2, 20), o(3, 30));
        let mut r = RemoteParts::fetching(1);
        r.part(part(a, 1, vec![p("ann", 10)], &[2, 3], (0, 1)));
        assert_eq!(
            r.delta(delta(b, 5, vec![p("bo", 31)], &[])),
            Applied::default()
        );
        let done = r.fetch_expired();
        assert_eq!(done.changes, [join("ann", 10)]);
        let unknown = Origin {
            node: 3,
            incarnation: UNKNOWN,
        };
        assert_eq!(done.refetch, [unknown], "asked directly");
        assert_eq!(r.awaiting(), [3]);
        let got = r.part(part(b, 4, vec![p("bob", 30)], &[], (0, 1)));
        assert_eq!(got.changes, [join("bob", 30), join("bo", 31)]);
        assert!(r.awaiting().is_empty());
        // One that dies instead leaves nothing awaited.
        let mut f = RemoteParts::fetching(1);
        f.part(part(a, 1, vec![], &[2, 4], (0, 1)));
        f.fetch_expired();
        assert_eq!(f.awaiting(), [4]);
        f.node_down(o(4, 40));
        assert!(f.awaiting().is_empty());
    }
}
