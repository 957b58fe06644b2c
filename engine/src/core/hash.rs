//! The core's hash tables, all seeded from [`Config::hash_seed`](crate::core::Config): the
//! server picks the seed at random (keys are topic names and user keys that clients choose, and
//! a known seed would let them aim collisions), the simulation fixes it, so a seed replays
//! exactly, iteration orders included.

use ahash::RandomState;

pub(crate) type Map<K, V> = std::collections::HashMap<K, V, RandomState>;
pub(crate) type Set<K> = std::collections::HashSet<K, RandomState>;

/// The four ahash keys every table of one shard is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seeds([u64; 4]);

impl Seeds {
    pub(crate) fn new(seed: u64) -> Seeds {
        // splitmix64: four well-mixed keys from one number.
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Seeds([next(), next(), next(), next()])
    }

    pub(crate) fn state(&self) -> RandomState {
        let [a, b, c, d] = self.0;
        RandomState::with_seeds(a, b, c, d)
    }

    pub(crate) fn map<K, V>(&self) -> Map<K, V> {
        Map::with_hasher(self.state())
    }

    pub(crate) fn set<K>(&self) -> Set<K> {
        Set::with_hasher(self.state())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_one_hashing() {
        let (a, b) = (Seeds::new(7), Seeds::new(7));
        assert_eq!(a, b);
        assert_eq!(a.state().hash_one("room:1"), b.state().hash_one("room:1"));
        assert_ne!(
            Seeds::new(8).state().hash_one("room:1"),
            a.state().hash_one("room:1")
        );
    }
}
