use ahash::RandomState;

/// Index of a shard, `0..shards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl ShardId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Decides ownership by hash. Every shard builds its own `Router` from the shard count, and they
/// must all agree, so the hasher's seeds are fixed rather than random per process.
#[derive(Clone, Debug)]
pub struct Router {
    shards: u16,
    hasher: RandomState,
}

// Arbitrary constants; changing them moves every topic to another shard, which only matters
// within one running process.
const SEEDS: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];

impl Router {
    pub fn new(shards: u16) -> Self {
        assert!(shards > 0, "at least one shard");
        Router {
            shards,
            hasher: RandomState::with_seeds(SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3]),
        }
    }

    /// The shard that holds the authoritative presence list of `topic`.
    pub fn topic_owner(&self, topic: &str) -> ShardId {
        self.owner(b't', topic)
    }

    /// The shard that knows where user `key` is present and who watches it.
    pub fn user_owner(&self, key: &str) -> ShardId {
        self.owner(b'u', key)
    }

    // The kind byte keeps a topic and a user key with the same text from always landing together.
    fn owner(&self, kind: u8, name: &str) -> ShardId {
        let h = self.hasher.hash_one((kind, name));
        ShardId((h % self.shards as u64) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers_agree_and_spread() {
        let a = Router::new(7);
        let b = Router::new(7);
        let mut counts = [0u32; 7];
        for i in 0..7000 {
            let t = format!("room:{i}");
            assert_eq!(a.topic_owner(&t), b.topic_owner(&t));
            counts[a.topic_owner(&t).index()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
        assert_eq!(Router::new(1).user_owner("x"), ShardId(0));
    }
}
