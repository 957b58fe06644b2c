//! One shared allocation per topic name per shard. Every joined topic of every connection names
//! its topic; without this each join would allocate its own copy of the name.
//!
//! Names are not released one by one: messages in flight hold clones, so a count at release time
//! says little. Instead, names only this set still holds are swept out whenever the set has
//! doubled since the last sweep, which keeps the cost amortised O(1) per new name.

use std::sync::Arc;

use crate::core::hash::{Seeds, Set};
use crate::core::TopicName;

#[derive(Debug)]
pub(crate) struct Names {
    set: Set<TopicName>,
    len_after_sweep: usize,
}

impl Names {
    pub(crate) fn new(seeds: Seeds) -> Self {
        Names {
            set: seeds.set(),
            len_after_sweep: 0,
        }
    }

    pub(crate) fn intern(&mut self, name: &str) -> TopicName {
        if let Some(n) = self.set.get(name) {
            return n.clone();
        }
        if self.set.len() >= 2 * self.len_after_sweep + 64 {
            self.sweep();
        }
        let n = TopicName::new(name);
        self.set.insert(n.clone());
        n
    }

    fn sweep(&mut self) {
        self.set.retain(|n| Arc::strong_count(&n.0) > 1);
        self.len_after_sweep = self.set.len();
    }

    /// Names something other than this set still uses.
    pub(crate) fn in_use(&self) -> usize {
        self.set
            .iter()
            .filter(|n| Arc::strong_count(&n.0) > 1)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_names_share_one_allocation_and_are_swept() {
        let mut names = Names::new(Seeds::new(0));
        let a = names.intern("room:1");
        let b = names.intern("room:1");
        assert!(Arc::ptr_eq(&a.0, &b.0));
        drop((a, b));
        assert_eq!(names.in_use(), 0);
        let keep: Vec<TopicName> = (0..200).map(|i| names.intern(&format!("t{i}"))).collect();
        assert!(
            names.set.len() <= 200,
            "room:1 was swept: {}",
            names.set.len()
        );
        assert_eq!(names.in_use(), 200);
        drop(keep);
        assert_eq!(names.in_use(), 0);
    }
}
