//! The order of one origin's deltas on one name, and when a first fetch of a name's parts is
//! complete. Pure: the topic and user owners keep one [`Chain`] per remote part and one
//! [`Fetch`] per name being fetched, and act on the verdicts.

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster::frame::Origin;

/// What to do with a delta for a part this node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next one: apply it.
    Apply,
    /// Applied already (it was buffered during a fetch that saw it): drop it.
    Duplicate,
    /// The first delta of a new incarnation of the origin: its old part goes, this applies.
    Replace,
    /// Something was missed: fetch the origin's part again.
    Gap,
}

/// The last delta applied from one origin on one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub origin: Origin,
    pub seq: u64,
    /// Deltas up to this seq are in what is held already.
    pub floor: u64,
}

impl Chain {
    /// As of a part fetched at `seq` (0: the origin had sent nothing on this name), with every
    /// delta of the origin up to `floor` in it.
    pub fn at(origin: Origin, seq: u64, floor: u64) -> Chain {
        Chain {
            origin,
            seq,
            floor: floor.max(seq),
        }
    }

    pub fn verdict(&self, origin: Origin, seq: u64, prev: u64) -> Verdict {
        debug_assert_eq!(origin.node, self.origin.node);
        if origin.incarnation != self.origin.incarnation {
            return if prev == 0 {
                Verdict::Replace
            } else {
                Verdict::Gap
            };
        }
        if seq <= self.floor {
            Verdict::Duplicate
        } else if prev == self.seq {
            Verdict::Apply
        } else {
            Verdict::Gap
        }
    }

    /// `seq` was applied (or replaced the part).
    pub fn applied(&mut self, origin: Origin, seq: u64) {
        *self = Chain::at(origin, seq, seq);
    }
}

/// A first fetch of one name's parts. Every holder answers with its part (in chunks) and the
/// holders it knows; the fetch is complete when every holder named in any answer has sent all
/// its chunks. NATS never says how many responders there are, hence the naming.
#[derive(Debug)]
pub struct Fetch {
    me: u64,
    /// Holders named so far (by any answer), by node.
    named: BTreeSet<u64>,
    /// Chunks received and expected, by answering node.
    chunks: BTreeMap<u64, (BTreeSet<u32>, u32)>,
    /// NATS said nobody subscribes to the requests: nobody holds anything.
    nobody: bool,
}

impl Fetch {
    /// A fetch by node `me` (its own part is local, not fetched).
    pub fn new(me: u64) -> Fetch {
        Fetch {
            me,
            named: BTreeSet::new(),
            chunks: BTreeMap::new(),
            nobody: false,
        }
    }

    /// A chunk of `node`'s part came, naming `holders`.
    pub fn answer(&mut self, node: u64, holders: &[u64], chunk: u32, chunks: u32) {
        if node == self.me {
            return;
        }
        self.named.insert(node);
        self.named
            .extend(holders.iter().copied().filter(|&h| h != self.me));
        let (got, of) = self.chunks.entry(node).or_insert((BTreeSet::new(), chunks));
        *of = chunks;
        got.insert(chunk);
    }

    /// The request had no responders.
    /// `node` must answer (again) before the fetch is complete: its answer, or deltas that
    /// came after it, may have been lost.
    pub fn expect(&mut self, node: u64) {
        if node != self.me {
            self.named.insert(node);
            self.chunks.remove(&node);
        }
    }

    pub fn no_responders(&mut self) {
        self.nobody = true;
    }

    /// `node` is down (its heartbeats stopped): it will not answer.
    pub fn node_down(&mut self, node: u64) {
        self.named.remove(&node);
        self.chunks.remove(&node);
    }

    fn answered(&self, node: u64) -> bool {
        self.chunks
            .get(&node)
            .is_some_and(|(got, of)| got.len() as u32 == *of)
    }

    pub fn is_complete(&self) -> bool {
        let all = self.named.iter().all(|&n| self.answered(n));
        (self.nobody && self.named.is_empty()) || (!self.named.is_empty() && all)
    }

    /// The fetch's deadline passed: it is complete with what came (a holder that did not answer
    /// in time is heard of again through its deltas, or its part announced when it fetched).
    pub fn expire(&mut self) {
        let answered: BTreeSet<u64> = self
            .named
            .iter()
            .copied()
            .filter(|&n| self.answered(n))
            .collect();
        self.chunks.retain(|n, _| answered.contains(n));
        self.named = answered;
        self.nobody = true;
    }

    /// Holders named that have not answered in full: asked again directly after a deadline.
    pub fn missing(&self) -> Vec<u64> {
        let missing = self.named.iter().copied();
        missing.filter(|&n| !self.answered(n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(node: u64, incarnation: u64) -> Origin {
        Origin { node, incarnation }
    }

    #[test]
    fn deltas_apply_in_order_and_gaps_are_seen() {
        let mut c = Chain::at(o(1, 10), 5, 5);
        assert_eq!(c.verdict(o(1, 10), 8, 5), Verdict::Apply);
        c.applied(o(1, 10), 8);
        assert_eq!(c.verdict(o(1, 10), 8, 5), Verdict::Duplicate);
        assert_eq!(c.verdict(o(1, 10), 3, 0), Verdict::Duplicate);
        assert_eq!(c.verdict(o(1, 10), 12, 9), Verdict::Gap, "9 was missed");
        assert_eq!(
            c.verdict(o(1, 11), 1, 0),
            Verdict::Replace,
            "a restart's first"
        );
        assert_eq!(
            c.verdict(o(1, 11), 4, 2),
            Verdict::Gap,
            "a restart's later one"
        );
        c.applied(o(1, 11), 1);
        assert_eq!(c.verdict(o(1, 11), 2, 1), Verdict::Apply);
        // A part at seq 2 that already holds everything up to 9 (the origin forgot the name
        // and made it again): 7 is old news, 12 after 2 is the next.
        let c = Chain::at(o(1, 11), 2, 9);
        assert_eq!(c.verdict(o(1, 11), 7, 6), Verdict::Duplicate);
        assert_eq!(c.verdict(o(1, 11), 12, 2), Verdict::Apply);
    }

    #[test]
    fn a_fetch_completes_when_every_named_holder_answered_in_full() {
        let mut f = Fetch::new(1);
        assert!(!f.is_complete(), "nothing heard yet");
        f.answer(2, &[1, 2, 3], 0, 1);
        assert!(!f.is_complete(), "3 was named and has not answered");
        assert_eq!(f.missing(), [3]);
        f.answer(3, &[2, 3, 4], 0, 2);
        assert!(!f.is_complete(), "3 owes a chunk, 4 was named");
        f.answer(3, &[2, 3, 4], 1, 2);
        f.answer(4, &[], 0, 1);
        assert!(f.is_complete());
        let mut f = Fetch::new(1);
        f.no_responders();
        assert!(f.is_complete(), "nobody holds anything");
        let mut f = Fetch::new(1);
        f.answer(2, &[5], 0, 1);
        f.node_down(5);
        assert!(f.is_complete(), "a dead holder is not waited for");
        let mut f = Fetch::new(1);
        f.answer(2, &[5], 0, 1);
        f.answer(6, &[], 0, 2);
        f.expire();
        assert!(f.is_complete(), "past its deadline, with what came");
        let mut f = Fetch::new(1);
        f.expire();
        assert!(f.is_complete(), "nobody answered in time");
    }
}
