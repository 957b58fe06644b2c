//! Which surviving node tells the backend that a dead node's presences in a topic left: the
//! dead node cannot, and every node holding its part sees the leaves. The nodes that can
//! answer for the topic are those with presences there (each holds every other's part, since
//! presence means interest); of them the one ranked first for (topic, dead node) by
//! rendezvous hashing reports, so every node picks the same one from the same parts and the
//! choice spreads over the nodes. Pure function, no state.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The reporter among `candidates` (node ids) for `dead`'s leaves in `name`; None if there is
/// no candidate.
pub fn reporter(name: &str, dead: u64, candidates: impl IntoIterator<Item = u64>) -> Option<u64> {
    let rank = |node: u64| {
        (
            xxh3_64_with_seed(name.as_bytes(), dead ^ node.rotate_left(32)),
            node,
        )
    };
    candidates.into_iter().max_by_key(|n| rank(*n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_of_the_candidates_picks_the_same_one() {
        let a = reporter("room:1", 7, [1, 2, 3, 4]);
        assert_eq!(a, reporter("room:1", 7, [4, 3, 2, 1]));
        assert_eq!(a, reporter("room:1", 7, [2, 4, 1, 3]));
        assert_eq!(reporter("room:1", 7, []), None);
    }

    #[test]
    fn topics_spread_over_the_candidates() {
        let mut picked = [0u32; 4];
        for i in 0..400 {
            let r = reporter(&format!("room:{i}"), 99, [0, 1, 2, 3]).expect("candidates");
            picked[r as usize] += 1;
        }
        assert!(picked.iter().all(|n| *n > 50), "{picked:?}");
    }
}
