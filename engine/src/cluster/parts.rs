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

/// A live node's part took in a presence that another part (a held one, or another live
/// node's) shows already: a takeover, or its own restart taking its presence back (`held`: no
/// connection has it there); or a presence of its part held so far is a connection's now.
/// Nothing changes for clients; the owner checks it against its own part (two nodes may take
/// one held presence over at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: String,
    pub phx_ref: u64,
    pub node: u64,
    pub held: bool,
}

/// What an input did: changes to apply, origins whose parts must be fetched again (directly
/// from them), and takeovers seen.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<Change>,
    pub refetch: Vec<Origin>,
    pub claims: Vec<Claim>,
}

/// One origin's part: (key, ref) -> meta, and the last delta applied.
#[derive(Debug)]
struct RemotePart {
    chain: Chain,
    presences: BTreeMap<(String, u64), Meta>,
    /// Those of its presences no connection has (see `Presence::held`); mostly none.
    held: Flags,
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

    fn presences(&mut self) -> (Presences, Flags) {
        let chunks = std::mem::take(&mut self.got).into_values().flatten();
        let mut flags = Flags::new();
        let presences = chunks
            .map(|p| {
                if p.held {
                    flags.insert((p.key.clone(), p.phx_ref));
                }
                ((p.key, p.phx_ref), Meta::new(&p.meta))
            })
            .collect();
        (presences, flags)
    }
}

/// The first fetch of the name.
#[derive(Debug)]
struct Fetching {
    fetch: Fetch,
    parts: BTreeMap<u64, Chunks>,
    buffered: Vec<Delta>,
}

/// Presences by (key, ref).
type Presences = BTreeMap<(String, u64), Meta>;
/// Some presences, by (key, ref).
type Flags = std::collections::BTreeSet<(String, u64)>;

/// Clients see the union of the parts by ref: a presence taken over by another node (or by a
/// node's next incarnation) is in two parts for a while, and shows once. A change to one part
/// is a change for clients only where no other part (held or live) shows the presence.
#[derive(Debug)]
pub struct RemoteParts {
    me: u64,
    parts: BTreeMap<u64, RemotePart>,
    /// Parts of incarnations that ended (a node dead or stopped under a grace, or restarted)
    /// and still show until the node's down is final: `node_down` takes them away.
    held: BTreeMap<Origin, Presences>,
    fetching: Option<Fetching>,
}

impl RemoteParts {
    /// Held by node `me`, fetching: deltas wait until every holder has answered.
    pub fn fetching(me: u64) -> RemoteParts {
        RemoteParts {
            me,
            parts: BTreeMap::new(),
            held: BTreeMap::new(),
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

    /// A chunk of some origin's part: an answer to the first fetch, or to a re-fetch; or what
    /// the answering node holds of an ended one (`relayed`).
    pub fn part(&mut self, part: Part) -> Applied {
        let node = part.origin.node;
        if node == self.me {
            return Applied::default();
        }
        if part.relayed {
            return self.relayed(part);
        }
        if let Some(f) = self.fetching.as_mut() {
            f.fetch.answer(node, &part.holders, part.chunk, part.chunks);
            let chunks = f.parts.entry(node).or_insert_with(|| Chunks::new(&part));
            chunks.take(part);
            return self.finish_fetch(Vec::new());
        }
        let mut applied = Applied::default();
        let Some(rp) = self.parts.get_mut(&node) else {
            // A part nobody asked for (or of a node dropped since): taken as it is.
            let mut chunks = Chunks::new(&part);
            if !chunks.take(part) {
                let presences = BTreeMap::new();
                let rp = RemotePart::new(Chain::at(chunks.origin, 0, 0), presences, Some(chunks));
                self.parts.insert(node, rp);
                return applied;
            }
            let (presences, flags) = chunks.presences();
            let mut changes = Vec::new();
            joins(&presences, &mut changes);
            let rp = RemotePart::new(chunks.chain(), presences, None).flagged(flags);
            self.parts.insert(node, rp);
            self.show(Some(node), changes, &mut applied);
            self.unhold(chunks.origin, &mut applied);
            return applied;
        };
        if rp.refetch.is_none() && part.origin == rp.chain.origin && part.floor < rp.chain.seq {
            // Older than deltas applied since: an answer overtaken by the origin's deltas
            // (answers come through the inbox, not in order with them).
            return applied;
        }
        let chunks = rp.refetch.get_or_insert_with(|| Chunks::new(&part));
        if !chunks.take(part) {
            return applied;
        }
        let mut chunks = rp.refetch.take().expect("taken above");
        let (fresh, flags) = chunks.presences();
        let old = std::mem::replace(&mut rp.presences, fresh);
        rp.held = flags;
        let was = rp.chain.origin;
        rp.chain = chunks.chain();
        let mut changes = Vec::new();
        if was.incarnation != chunks.origin.incarnation && was.incarnation != UNKNOWN {
            // A new incarnation's part: the old one's shows until its end is known.
            self.hold(was, old);
            joins(&self.parts[&node].presences, &mut changes);
        } else {
            net_changes(&old, &self.parts[&node].presences, &mut changes);
        }
        self.show(Some(node), changes, &mut applied);
        self.unhold(chunks.origin, &mut applied);
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

    /// That incarnation of a node is down for good (it died, stopped, or restarted, and any
    /// grace for it ended): its part leaves, live or held. A part of its next incarnation
    /// stays: it may have come in before the news of the restart.
    pub fn node_down(&mut self, origin: Origin) -> Applied {
        let mut applied = self.drop_from_fetch(origin, false);
        let mut changes = Vec::new();
        if let Some(rp) = self.take_part_of(origin) {
            leaves(&rp.presences, &mut changes);
        }
        if let Some(held) = self.held.remove(&origin) {
            leaves(&held, &mut changes);
        }
        self.show(None, changes, &mut applied);
        applied
    }

    /// That incarnation of a node ended but its presences stay for a grace (it died under a
    /// leave grace, or stopped to restart): its part is held as it is, nothing changes for
    /// clients, and presences of it may be taken over (see [`RemoteParts::adoptable`]) until
    /// [`RemoteParts::node_down`].
    pub fn node_held(&mut self, origin: Origin) -> Applied {
        let applied = self.drop_from_fetch(origin, true);
        if let Some(rp) = self.take_part_of(origin) {
            self.hold(origin, rp.presences);
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

    /// Every remote presence clients see: (key, ref, meta), each ref once.
    pub fn presences(&self) -> Vec<(&str, u64, &Meta)> {
        let live = self.parts.values().map(|rp| &rp.presences);
        let all = live.chain(self.held.values());
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for ((k, r), m) in all.flat_map(|p| p.iter()) {
            if seen.insert((k.as_str(), *r)) {
                out.push((k.as_str(), *r, m));
            }
        }
        out
    }

    /// Whether some part, live or held, shows presence `phx_ref` of `key`.
    pub fn holds(&self, key: &str, phx_ref: u64) -> bool {
        if self.parts.is_empty() && self.held.is_empty() {
            return false;
        }
        self.shown_except(None, &(key.to_owned(), phx_ref))
    }

    /// A presence of `key` that only held parts show (no live node has taken it over) and that
    /// `fits`: what a join of `key` here may take over, with its stored meta.
    pub fn adoptable(&self, key: &str, fits: impl Fn(u64, &Meta) -> bool) -> Option<(u64, Meta)> {
        let flagged = self.parts.values().any(|rp| !rp.held.is_empty());
        if self.held.is_empty() && !flagged {
            return None;
        }
        let (from, to) = ((key.to_owned(), 0), (key.to_owned(), u64::MAX));
        let ended = self
            .held
            .values()
            .flat_map(|h| h.range(from.clone()..=to.clone()));
        // Presences a restarted node took back and no client claimed there yet.
        let parts = self.parts.values();
        let unclaimed = parts.flat_map(|rp| {
            let flags = rp.held.range(from.clone()..=to.clone());
            flags.filter_map(|id| rp.presences.get_key_value(id))
        });
        let live = |id: &(String, u64)| {
            let mut parts = self.parts.values();
            parts.any(|rp| rp.presences.contains_key(id) && !rp.held.contains(id))
        };
        let mut candidates = ended
            .chain(unclaimed)
            .filter(|(id, m)| !live(id) && fits(id.1, m));
        candidates.next().map(|((_, r), m)| (*r, m.clone()))
    }

    /// The live node whose part shows presence `phx_ref` of `key`, and whether no connection
    /// has it there (a connection's first, if several show it).
    pub fn claimant(&self, key: &str, phx_ref: u64) -> Option<(u64, bool)> {
        let id = (key.to_owned(), phx_ref);
        let showing = self
            .parts
            .iter()
            .filter(|(_, rp)| rp.presences.contains_key(&id));
        let mut first = None;
        for (node, rp) in showing {
            if !rp.held.contains(&id) {
                return Some((*node, false));
            }
            first.get_or_insert((*node, true));
        }
        first
    }

    /// Nodes whose live part shows a presence.
    pub fn nodes_present(&self) -> impl Iterator<Item = u64> + '_ {
        let present = self.parts.iter().filter(|(_, rp)| !rp.presences.is_empty());
        present.map(|(node, _)| *node)
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
        // Parts held during the fetch were never shown: they show now, each ref once.
        for (k, r, m) in self.presences() {
            applied.changes.push(Change::Join {
                key: k.to_owned(),
                phx_ref: r,
                meta: m.clone(),
            });
        }
        for (node, mut chunks) in f.parts {
            let (presences, flags) = chunks.presences();
            let mut changes = Vec::new();
            joins(&presences, &mut changes);
            let rp = RemotePart::new(chunks.chain(), presences, None).flagged(flags);
            self.parts.insert(node, rp);
            self.show(Some(node), changes, &mut applied);
            // Relayed as ended by some node, yet it answered: it speaks for itself.
            self.unhold(chunks.origin, &mut applied);
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
            let mut changes = Vec::new();
            let (left, _) = rp.apply(d, &mut changes);
            self.parts.insert(node, rp);
            self.leave_held(node, left, &mut changes);
            self.show(Some(node), changes, applied);
            return;
        };
        if let Some(chunks) = rp.refetch.as_mut() {
            chunks.buffered.push(d);
            return;
        }
        let mut changes = Vec::new();
        match rp.chain.verdict(d.origin, d.seq, d.prev) {
            Verdict::Apply => {
                let (left, claimed) = rp.apply(d, &mut changes);
                self.leave_held(node, left, &mut changes);
                for (key, phx_ref) in claimed {
                    let held = false;
                    applied.claims.push(Claim {
                        key,
                        phx_ref,
                        node,
                        held,
                    });
                }
            }
            Verdict::Duplicate => {}
            Verdict::Replace => {
                // The node's next incarnation: the old one's part shows until its end is
                // known (then `node_down`), and what the new one takes back of it is unseen.
                let old = std::mem::take(&mut rp.presences);
                let was = rp.chain.origin;
                let (left, _) = rp.apply(d, &mut changes);
                self.hold(was, old);
                self.leave_held(node, left, &mut changes);
            }
            Verdict::Gap => {
                let mut chunks = Chunks::awaiting(d.origin);
                applied.refetch.push(d.origin);
                chunks.buffered.push(d);
                rp.refetch = Some(chunks);
            }
        }
        self.show(Some(node), changes, applied);
    }

    /// Leaves of `node`'s that its live part did not have: presences of its previous
    /// incarnation, which it took back on restart (its state file) without a client claiming
    /// them yet, leave from what is held of that incarnation.
    fn leave_held(&mut self, node: u64, left: Vec<(String, u64)>, changes: &mut Vec<Change>) {
        for id in left {
            let held = self.held.iter_mut().filter(|(o, _)| o.node == node);
            for (_, h) in held {
                if let Some(meta) = h.remove(&id) {
                    let (key, phx_ref) = id.clone();
                    changes.push(Change::Leave { key, phx_ref, meta });
                }
            }
        }
        self.held.retain(|_, h| !h.is_empty());
    }

    /// A presence this node's own part takes over (a join here): it is no longer held for an
    /// ended node. True if some part showed it (clients see it already).
    pub fn claim(&mut self, key: &str, phx_ref: u64) -> bool {
        if self.parts.is_empty() && self.held.is_empty() {
            return false;
        }
        let id = (key.to_owned(), phx_ref);
        let shown = self.shown_except(None, &id);
        if shown && !self.held.is_empty() {
            for h in self.held.values_mut() {
                h.remove(&id);
            }
            self.held.retain(|_, h| !h.is_empty());
        }
        shown
    }

    /// Another node's answer says what it holds of `part.origin`, which ended under a grace:
    /// held here too (unless a live part of that incarnation is here: it speaks for itself).
    /// Several nodes may say it; what shows already is not shown twice.
    fn relayed(&mut self, part: Part) -> Applied {
        let mut applied = Applied::default();
        let origin = part.origin;
        if self
            .parts
            .get(&origin.node)
            .is_some_and(|rp| rp.chain.origin == origin)
        {
            return applied;
        }
        for p in part.presences {
            let id = (p.key, p.phx_ref);
            if self.parts.values().any(|rp| rp.presences.contains_key(&id)) {
                continue; // Claimed by a live node since.
            }
            let shown = self.shown_except(None, &id);
            let meta = Meta::new(&p.meta);
            let held = self.held.entry(origin).or_default();
            if held.insert(id.clone(), meta.clone()).is_none() && !shown && self.fetching.is_none()
            {
                let (key, phx_ref) = id;
                applied.changes.push(Change::Join { key, phx_ref, meta });
            }
        }
        applied
    }

    /// What this node holds of ended nodes, as presences of a part (all `held`), for its
    /// answers to part requests.
    pub fn ended_parts(&self) -> Vec<(Origin, Vec<Presence>)> {
        let held = self.held.iter();
        let parts = held.map(|(o, h)| {
            let presences = h.iter().map(|((key, phx_ref), meta)| Presence {
                key: key.clone(),
                phx_ref: *phx_ref,
                meta: meta.bytes().to_vec(),
                held: true,
            });
            (*o, presences.collect())
        });
        parts.collect()
    }

    /// Keeps `presences` of an ended incarnation showing (nothing changes for clients).
    fn hold(&mut self, origin: Origin, presences: Presences) {
        if !presences.is_empty() && origin.incarnation != UNKNOWN {
            self.held.entry(origin).or_default().extend(presences);
        }
    }

    /// `origin`'s live part came in full: what was held of that incarnation (it was taken for
    /// dead and is heard again) goes, where the fresh part does not show it.
    fn unhold(&mut self, origin: Origin, applied: &mut Applied) {
        if let Some(held) = self.held.remove(&origin) {
            let mut changes = Vec::new();
            leaves(&held, &mut changes);
            self.show(None, changes, applied);
        }
    }

    /// Takes `origin`'s live part off the table, if the part is of that incarnation (or of one
    /// not heard from yet).
    fn take_part_of(&mut self, origin: Origin) -> Option<RemotePart> {
        let of = |o: Origin| {
            o == origin
                || o == Origin {
                    node: origin.node,
                    incarnation: UNKNOWN,
                }
        };
        let rp = self.parts.get(&origin.node)?;
        if !of(rp.chain.origin) {
            return None;
        }
        self.parts.remove(&origin.node)
    }

    /// A first fetch stops waiting for `origin`; what came of it in full is held if `keep`.
    fn drop_from_fetch(&mut self, origin: Origin, keep: bool) -> Applied {
        let node = origin.node;
        let Some(f) = self.fetching.as_mut() else {
            return Applied::default();
        };
        if f.parts.get(&node).is_none_or(|c| c.origin == origin) {
            f.fetch.node_down(node);
            if let Some(mut c) = f.parts.remove(&node) {
                if keep && c.got.len() as u32 == c.of {
                    let (presences, _) = c.presences();
                    self.hold(origin, presences);
                }
            }
        }
        if let Some(f) = self.fetching.as_mut() {
            f.buffered.retain(|d| d.origin != origin);
        }
        self.finish_fetch(Vec::new())
    }

    /// Changes already made to live part `of` (or to a part taken away: None), as clients
    /// see them: only where no other part shows the presence. A join of a presence shown
    /// elsewhere is a takeover (a claim).
    /// A presence a live part claims leaves what is held of ended nodes: it is that node's now
    /// (its leave is seen when it leaves that part).
    fn show(&mut self, of: Option<u64>, changes: Vec<Change>, applied: &mut Applied) {
        let mut claimed = false;
        for change in changes {
            let (key, phx_ref, join) = match &change {
                Change::Join { key, phx_ref, .. } => (key, *phx_ref, true),
                Change::Leave { key, phx_ref, .. } => (key, *phx_ref, false),
            };
            let id = (key.clone(), phx_ref);
            if !self.shown_except(of, &id) {
                applied.changes.push(change);
                continue;
            }
            let (true, Some(node)) = (join, of) else {
                continue;
            };
            for h in self.held.values_mut() {
                claimed |= h.remove(&id).is_some();
            }
            let held = self
                .parts
                .get(&node)
                .is_some_and(|rp| rp.held.contains(&id));
            applied.claims.push(Claim {
                key: id.0,
                phx_ref,
                node,
                held,
            });
        }
        if claimed {
            self.held.retain(|_, h| !h.is_empty());
        }
    }

    /// Whether a part other than `except`'s (every held part counts) shows presence `id`.
    fn shown_except(&self, except: Option<u64>, id: &(String, u64)) -> bool {
        let live = self.parts.iter().filter(|(n, _)| Some(**n) != except);
        live.map(|(_, rp)| &rp.presences)
            .chain(self.held.values())
            .any(|p| p.contains_key(id))
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
            held: Flags::new(),
            refetch,
        }
    }

    fn flagged(mut self, held: Flags) -> RemotePart {
        self.held = held;
        self
    }

    /// Applies the next delta: its joins, then its leaves. A ref joins once and leaves once,
    /// so a presence that joined and left between two deltas nets out; an update is a join and
    /// a leave of two refs. A join of a presence the part has changes its `held` flag only.
    /// Returns the leaves of presences the part did not have, and the presences held so far
    /// that a connection has now.
    fn apply(&mut self, d: Delta, changes: &mut Vec<Change>) -> (Vec<(String, u64)>, Flags) {
        let (mut missing, mut claimed) = (Vec::new(), Flags::new());
        for j in d.joins {
            let id = (j.key.clone(), j.phx_ref);
            let was_held = if j.held {
                self.held.insert(id.clone());
                false
            } else {
                self.held.remove(&id)
            };
            let meta = Meta::new(&j.meta);
            if self.presences.insert(id.clone(), meta.clone()).is_none() {
                changes.push(Change::Join {
                    key: j.key,
                    phx_ref: j.phx_ref,
                    meta,
                });
            } else if was_held && !j.held {
                claimed.insert(id);
            }
        }
        for l in d.leaves {
            let id = (l.key, l.phx_ref);
            self.held.remove(&id);
            match self.presences.remove(&id) {
                Some(meta) => changes.push(Change::Leave {
                    key: id.0,
                    phx_ref: id.1,
                    meta,
                }),
                None => missing.push(id),
            }
        }
        self.chain.applied(d.origin, d.seq);
        (missing, claimed)
    }
}

/// Deltas in the order to apply them: by origin, then seq (their relative order across origins
/// does not matter: a presence in two parts shows once).
fn sorted(mut deltas: Vec<Delta>) -> Vec<Delta> {
    deltas.sort_by_key(|d| (d.origin.node, d.origin.incarnation, d.seq));
    deltas
}

fn joins(presences: &Presences, changes: &mut Vec<Change>) {
    for ((key, phx_ref), meta) in presences {
        changes.push(Change::Join {
            key: key.clone(),
            phx_ref: *phx_ref,
            meta: meta.clone(),
        });
    }
}

fn leaves(presences: &Presences, changes: &mut Vec<Change>) {
    for ((key, phx_ref), meta) in presences {
        changes.push(Change::Leave {
            key: key.clone(),
            phx_ref: *phx_ref,
            meta: meta.clone(),
        });
    }
}

/// What changed from `old` to `new` (a ref names one meta for good, so equal ids are equal).
fn net_changes(old: &Presences, new: &Presences, changes: &mut Vec<Change>) {
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
            held: false,
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
            relayed: false,
        }
    }

    fn held(r: &RemoteParts) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = r
            .presences()
            .into_iter()
            .map(|(k, r, _)| (k.to_owned(), r))
            .collect();
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
                refetch: vec![a],
                ..Applied::default()
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
        // The news of the restart may come after the new incarnation's delta: the old part
        // shows until that news, which leaves the new one's part alone.
        assert_eq!(restarted.changes, [join("ann", 99)]);
        assert_eq!(held(&r), [("ann".into(), 10), ("ann".into(), 99)]);
        assert_eq!(r.node_down(a).changes, [leave("ann", 10)]);
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

    #[test]
    fn a_held_part_shows_until_down_and_its_presences_can_be_claimed_once_each() {
        let (a, b, c) = (o(2, 20), o(3, 30), o(4, 40));
        let mut r = RemoteParts::fetching(1);
        r.no_responders();
        r.delta(delta(
            a,
            1,
            vec![p("ann", 10), p("ann", 11), p("al", 12)],
            &[],
        ));
        // a dies under a grace: nothing changes, its presences may be taken over.
        assert_eq!(r.node_held(a), Applied::default());
        assert_eq!(held(&r).len(), 3);
        let fits = |r: u64, _: &Meta| r != 10;
        assert_eq!(r.adoptable("ann", fits).map(|(r, _)| r), Some(11));
        assert_eq!(r.adoptable("bob", |_, _| true), None);
        // b claims ann's 10, then c claims it too: claims, no change; it shows once.
        let got = r.delta(delta(b, 1, vec![p("ann", 10)], &[]));
        assert!(got.changes.is_empty());
        let claim = |node| Claim {
            key: "ann".into(),
            phx_ref: 10,
            node,
            held: false,
        };
        assert_eq!(got.claims, [claim(3)]);
        assert_eq!(r.adoptable("ann", |_, _| true).map(|(r, _)| r), Some(11));
        let twice = r.delta(delta(c, 1, vec![p("ann", 10)], &[]));
        assert!(twice.changes.is_empty());
        assert_eq!(twice.claims, [claim(4)]);
        assert_eq!(held(&r).len(), 3, "each ref once");
        // b's leave is not seen while c holds it; c's is.
        assert!(r
            .delta(delta(b, 2, vec![], &[("ann", 10)]))
            .changes
            .is_empty());
        let gone = r.delta(delta(c, 2, vec![], &[("ann", 10)]));
        assert_eq!(gone.changes, [leave("ann", 10)]);
        // This node claims 11 for a join of its own: a claimed presence is held no more.
        assert!(r.claim("ann", 11));
        assert!(!r.holds("ann", 11));
        // The grace ends: what nobody claimed leaves.
        assert_eq!(r.node_down(a).changes, [leave("al", 12)]);
        assert!(held(&r).is_empty());
    }

    #[test]
    fn a_restarted_node_speaks_for_what_is_held_of_its_last_run() {
        let (a, a2) = (o(2, 20), o(2, 21));
        let mut r = RemoteParts::fetching(1);
        // Held while this node was fetching: shown when the fetch completes.
        r.part(part(a, 1, vec![p("ann", 10), p("amy", 11)], &[2], (0, 1)));
        let mut f = RemoteParts::fetching(1);
        f.part(part(
            a,
            1,
            vec![p("ann", 10), p("amy", 11)],
            &[2, 3],
            (0, 1),
        ));
        assert_eq!(f.node_held(a), Applied::default(), "still fetching");
        let done = f.part(part(o(3, 30), 1, vec![], &[], (0, 1)));
        assert_eq!(done.changes, [join("amy", 11), join("ann", 10)]);
        r.node_held(a);
        // The next incarnation took its presences back (its state file): a client claims ann
        // there (unseen), and amy, claimed by nobody, leaves when the restart grace ends.
        assert!(r
            .delta(delta(a2, 1, vec![p("ann", 10)], &[]))
            .changes
            .is_empty());
        let expired = r.delta(delta(a2, 2, vec![], &[("amy", 11)]));
        assert_eq!(expired.changes, [leave("amy", 11)]);
        assert_eq!(r.node_down(a), Applied::default());
        assert_eq!(held(&r), [("ann".into(), 10)]);
        // A held incarnation heard again (a partition healed): its fresh part replaces what
        // was held, by the net change.
        let b = o(3, 30);
        r.delta(delta(b, 1, vec![p("bob", 30), p("bea", 31)], &[]));
        r.node_held(b);
        assert!(r.refetch(b));
        let back = r.part(part(b, 2, vec![p("bob", 30)], &[], (0, 1)));
        assert_eq!(back.changes, [leave("bea", 31)]);
    }
}
