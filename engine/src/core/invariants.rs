//! What the shard's tables must always agree on, checked by the simulation after every step
//! (and by nothing on the server's hot path). Each is something the code relies on but cannot
//! state in a type: deadline queues in order, lists that mirror per-topic flags, counts that
//! mirror the tables they count, replies awaited only by joins that wait. Each part checks its
//! own (`TopicOwner::check`, `Topic::check`); this gathers them.

use crate::core::Shard;

impl Shard {
    /// Every invariant, or the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.owner().check()?;
        self.check_liveness()?;
        self.check_connections()
    }
}
