//! Leaving a topic, or all of them when the connection ends: the owner hears of it.

use super::*;

impl Shard {
    /// The connection no longer has `joined`: stop delivering to it and tell the owner.
    /// `why`: a connection that ended has its presence held for the leave grace.
    pub(super) fn part(&mut self, conn: ConnId, key: &UserKey, joined: Joined, why: Reason) {
        if joined.awaiting_reply {
            self.awaiting.remove(&(conn, joined.seq));
        } else {
            self.subs.remove(joined.topic.as_str(), conn, joined.mode);
        }
        if is_watch_topic(joined.topic.as_str()) {
            self.watches
                .part(conn, joined.topic.as_str(), &self.router, &mut self.tx);
            return;
        }
        let owner = self.router.topic_owner(joined.topic.as_str());
        let tracked = joined.tracked().map(|r| (key.clone(), r));
        let msg = MeshMsg::Leave {
            topic: joined.topic,
            from: ConnAddr {
                shard: self.id,
                conn,
            },
            mode: joined.mode,
            tracked,
            why,
        };
        self.tx.mesh(owner, msg);
    }

    pub(super) fn part_all(&mut self, conn: ConnId, c: Connection, why: Reason) {
        self.resyncing.end(conn);
        self.liveness.closed(conn);
        self.expiries.remove(conn);
        for joined in c.joins {
            self.part(conn, &c.key, joined, why);
        }
    }
}
