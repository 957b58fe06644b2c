//! A connection's messages: each is checked and dispatched, and answered with a reply or an
//! error; a connection that broke the protocol is closed.

use super::join::{forced, stored_meta};
use super::*;
use crate::core::ids::next_ref;

impl Shard {
    pub(super) fn client_message(&mut self, conn: ConnId, msg: ClientMessage<'_>) {
        let jr = msg.join_ref.as_deref();
        let r = msg.msg_ref.as_deref();
        let topic = msg.topic.as_ref();
        if jr.map_or(0, str::len) > self.config.max_ref_bytes
            || r.map_or(0, str::len) > self.config.max_ref_bytes
        {
            return self.close_with(
                conn,
                CloseCode::INVALID_PAYLOAD,
                "invalid frame: join_ref or ref too long",
            );
        }
        if topic.len() > self.config.max_topic_bytes {
            return self.reply_error(conn, jr, r, topic, "topic too long");
        }
        if topic == TOKEN_TOPIC {
            return self.token_message(conn, msg);
        }
        if topic == "phoenix" {
            match msg.event {
                ClientEvent::Heartbeat => self.reply_ok(conn, jr, r, topic),
                _ => self.reply_error(conn, jr, r, topic, "unknown event"),
            }
            return;
        }
        let event = match msg.event {
            ClientEvent::Join(req) => return self.join(conn, jr, r, topic, req),
            // Payload errors say what is wrong, joined or not (a bad phx_join is not "unmatched").
            ClientEvent::Invalid(e) => return self.reply_error(conn, jr, r, topic, e.reason()),
            event => event,
        };
        let Some(at) = self.joined(conn, topic, jr) else {
            return self.reply_error(conn, jr, r, topic, "unmatched topic");
        };
        match event {
            ClientEvent::Leave => {
                let c = self.conns.get_mut(&conn).expect("joined implies open");
                let joined = c.joins.swap_remove(at);
                let key = c.key.clone();
                self.abandon_join(conn, &joined);
                self.part(conn, &key, joined, Reason::Left);
                self.reply_ok(conn, jr, r, topic);
            }
            ClientEvent::PresenceUpdate(meta) => self.update(conn, at, jr, r, topic, meta),
            ClientEvent::WatchAdd(users) if is_watch_topic(topic) => {
                let Some(users) = self.watch_users(conn, jr, r, topic, &users) else {
                    return;
                };
                self.reply_ok(conn, jr, r, topic);
                self.watches.add(
                    conn,
                    topic,
                    users,
                    &self.router,
                    &mut self.tx,
                    &mut self.buf,
                );
            }
            ClientEvent::WatchRemove(users) if is_watch_topic(topic) => {
                let users: Vec<UserKey> = users.iter().map(|u| UserKey::new(u)).collect();
                self.reply_ok(conn, jr, r, topic);
                let done = self.watches.remove(
                    conn,
                    topic,
                    &users,
                    &self.router,
                    &mut self.tx,
                    &mut self.buf,
                );
                if done {
                    self.complete_watch_join(conn, topic);
                }
            }
            _ => self.reply_error(conn, jr, r, topic, "unknown event"),
        }
    }

    pub(super) fn joined(&self, conn: ConnId, topic: &str, jr: Option<&str>) -> Option<usize> {
        self.conns.get(&conn)?.matching(topic, jr)
    }

    pub(super) fn update(
        &mut self,
        conn: ConnId,
        at: usize,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        meta: ClientMeta<'_>,
    ) {
        if meta.len() > self.config.max_meta_bytes {
            return self.reply_error(conn, jr, r, topic, "meta too large");
        }
        let c = self.conns.get_mut(&conn).expect("joined implies open");
        let Some(old) = c.joins[at].tracked() else {
            return self.reply_error(conn, jr, r, topic, "not tracked");
        };
        let phx_ref = next_ref(self.id, &mut self.next_ref, self.config.ref_seed);
        let new = Track {
            key: c.key.clone(),
            phx_ref,
            meta: stored_meta(&mut self.buf, meta, forced(c), phx_ref, Some(old)),
        };
        let joined = &mut c.joins[at];
        joined.set_tracked(phx_ref);
        let msg = MeshMsg::Update {
            topic: joined.topic.clone(),
            from: ConnAddr {
                shard: self.id,
                conn,
            },
            old,
            new,
        };
        self.tx.mesh(self.router.topic_owner(topic), msg);
        self.reply_ok(conn, jr, r, topic);
    }

    pub(super) fn close_with(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        count_error(&mut self.errors, reason);
        self.close_uncounted(conn, code, reason);
    }

    /// A close whose count is kept elsewhere (or under another name).
    pub(super) fn close_uncounted(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        self.close_for(conn, code, reason, Reason::Policy);
    }

    /// Closes `conn`; its presences leave (or are held) for `why`.
    pub(super) fn close_for(
        &mut self,
        conn: ConnId,
        code: CloseCode,
        reason: impl Into<std::borrow::Cow<'static, str>>,
        why: Reason,
    ) {
        let reason = reason.into();
        self.tx.out.push(Output::Close { conn, code, reason });
        if let Some(c) = self.conns.remove(&conn) {
            self.part_all(conn, c, why);
        }
    }

    pub(super) fn reply_ok(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
    ) {
        self.buf.clear();
        encode::reply_ok(&mut self.buf, jr, r, topic, REPLY_EMPTY);
        self.tx.send(conn, &self.buf);
    }

    pub(super) fn reply_error(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        reason: &'static str,
    ) {
        count_error(&mut self.errors, reason);
        self.buf.clear();
        encode::reply_error(&mut self.buf, jr, r, topic, reason);
        self.tx.send(conn, &self.buf);
    }
}
