//! Joining and changing `watch:` topics: which users, within the connection's limit, and the
//! state once every watched user's replica is here.

use super::*;

impl Shard {
    /// The users of a watch request, or None after replying with the error. Checks the
    /// connection's `max_watch` against the users it would add.
    pub(super) fn watch_users(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        users: &[std::borrow::Cow<'_, str>],
    ) -> Option<Vec<UserKey>> {
        if users.iter().any(|u| u.len() > MAX_KEY_BYTES) {
            self.reply_error(conn, jr, r, topic, "user key too long");
            return None;
        }
        let users: Vec<UserKey> = users.iter().map(|u| UserKey::new(u)).collect();
        let adding = self.watches.new_in(conn, topic, &users);
        if self.watches.watched_by(conn) + adding > self.config.max_watch {
            self.reply_error(conn, jr, r, topic, "too many users watched");
            return None;
        }
        Some(users)
    }

    /// Joining `watch:NAME`: nothing is tracked; the reply and state come once every watched
    /// user's replica is here.
    pub(super) fn watch_join(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        req: JoinRequest<'_>,
    ) {
        let listed = req.users.unwrap_or_default();
        let Some(users) = self.watch_users(conn, jr, r, topic, &listed) else {
            return;
        };
        let name = self.names.intern(topic);
        self.push_join(conn, &name, jr, r, PresenceMode::Full, None);
        let ready = self
            .watches
            .join(conn, name, users, &self.router, &mut self.tx, &mut self.buf);
        if ready {
            self.complete_watch_join(conn, topic);
        }
    }

    /// Every user of a joining watch set has a replica: reply ok, then its state.
    pub(super) fn complete_watch_join(&mut self, conn: ConnId, topic: &str) {
        let Some(joined) = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.joins.iter_mut().find(|j| j.topic.as_str() == topic))
        else {
            return;
        };
        if !std::mem::take(&mut joined.awaiting_reply) {
            return;
        }
        let seq = joined.seq;
        let jr: Option<Box<str>> = joined.join_ref().map(Box::from);
        let resyncing = self.resyncing.contains(conn);
        if resyncing {
            // Its diffs would be dropped: the state comes once the connection drains.
            joined.stale = true;
            self.watches.suspend_joining(conn, topic);
        }
        let msg_ref = self.answered(conn, seq).flatten();
        self.reply_ok(conn, jr.as_deref(), msg_ref.as_deref(), topic);
        if !resyncing {
            self.send_watch_state(conn, topic, jr.as_deref());
        }
    }

    pub(super) fn send_watch_state(&mut self, conn: ConnId, topic: &str, jr: Option<&str>) {
        let mut state = std::mem::take(&mut self.buf);
        self.watches.go_live(conn, topic, &mut self.tx, &mut state);
        self.buf.clear();
        encode::presence_state(&mut self.buf, jr, topic, &state);
        self.tx
            .send_frame(conn, Rc::from(self.buf.as_slice()), FrameKind::State);
        if state.capacity() > self.buf.capacity() {
            self.buf = state;
        }
    }
}
