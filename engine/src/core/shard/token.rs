//! Token lifetimes: a connection whose token has an `exp` is closed then (4001 "token expired",
//! its presences leave as `token_expired`), unless it sent a fresh token for the same key first,
//! on the reserved topic `roster:token`:
//!
//! ```text
//! ["1","1","roster:token","phx_join",{}]                -> ok
//! ["1","2","roster:token","refresh",{"token":"<JWT>"}]  -> ok, or error with the reason
//! ```
//!
//! The core does not verify tokens (no clock, no crypto here): it hands the token to the driver
//! (`Output::Refresh`), which answers with [`Shard::refreshed`]. The fresh token's grants apply
//! from then on: topics it does not allow are left (`phx_close`), and its meta claims replace
//! the old token's in every presence of the connection (a presence_update each) and in later
//! joins and updates.

use super::*;
use crate::core::ids::next_ref;

/// The reserved topic of token refreshes.
pub const TOKEN_TOPIC: &str = "roster:token";
/// Close code of a connection whose token expired (the application's range: phoenix.js hands
/// it to `onClose`).
pub const TOKEN_EXPIRED: CloseCode = CloseCode(4001);
/// Longest token a refresh may carry (the upgrade request's own bound is 8 KiB).
const MAX_TOKEN_BYTES: usize = 8192;

/// What the driver found a fresh token to say: its key, grants and expiry (the driver's clock).
pub type Refreshed = Result<(UserKey, Option<Box<Grants>>, Option<Millis>), &'static str>;

impl Shard {
    /// A message on the token topic.
    pub(super) fn token_message(&mut self, conn: ConnId, msg: ClientMessage<'_>) {
        let (jr, r) = (msg.join_ref.as_deref(), msg.msg_ref.as_deref());
        match msg.event {
            ClientEvent::Join(_) | ClientEvent::Leave => self.reply_ok(conn, jr, r, TOKEN_TOPIC),
            ClientEvent::Refresh(token) if token.len() > MAX_TOKEN_BYTES => {
                self.reply_error(conn, jr, r, TOKEN_TOPIC, "token too long")
            }
            ClientEvent::Refresh(token) => self.tx.out.push(Output::Refresh {
                conn,
                token: token.into(),
                join_ref: jr.map(Into::into),
                msg_ref: r.map(Into::into),
            }),
            ClientEvent::Invalid(e) => self.reply_error(conn, jr, r, TOKEN_TOPIC, e.reason()),
            _ => self.reply_error(conn, jr, r, TOKEN_TOPIC, "unknown event"),
        }
    }

    /// The driver's verdict on a refresh `conn` sent (its `join_ref` and `ref` echoed).
    pub fn refreshed(
        &mut self,
        conn: ConnId,
        verdict: Refreshed,
        jr: Option<&str>,
        r: Option<&str>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let (key, grants, expires) = match verdict {
            Ok(v) => v,
            Err(why) => return self.reply_error(conn, jr, r, TOKEN_TOPIC, why),
        };
        if key != c.key {
            return self.reply_error(conn, jr, r, TOKEN_TOPIC, "token names another key");
        }
        let claims = |g: &Option<Box<Grants>>| g.as_ref().and_then(|g| g.meta.clone());
        let (was, forced) = (claims(&c.grants), claims(&grants));
        c.grants = grants;
        self.expiries.set(conn, expires);
        let disallowed: Vec<usize> = (0..c.joins.len())
            .rev()
            .filter(|&at| !c.allowed(c.joins[at].topic.as_str()))
            .collect();
        for at in disallowed {
            let c = self.conns.get_mut(&conn).expect("looked up above");
            let joined = c.joins.swap_remove(at);
            let key = c.key.clone();
            self.abandon_join(conn, &joined);
            self.buf.clear();
            encode::phx_close(&mut self.buf, joined.join_ref(), joined.topic.as_str());
            self.tx.send(conn, &self.buf);
            self.part(conn, &key, joined, Reason::Left);
        }
        if was != forced {
            self.reforce(conn, was, forced);
        }
        self.reply_ok(conn, jr, r, TOKEN_TOPIC);
        self.drain_local();
    }

    /// Each presence of `conn` is made anew with the claims `forced` in place of `was`, by its
    /// topic's owner (which holds the client's fields), as an update would.
    fn reforce(&mut self, conn: ConnId, was: Option<Box<str>>, forced: Option<Box<str>>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        for joined in c.joins.iter_mut() {
            let Some(old) = joined.tracked() else {
                continue;
            };
            let new = next_ref(self.id, &mut self.next_ref, self.config.ref_seed);
            joined.set_tracked(new);
            let msg = Reforce {
                topic: joined.topic.clone(),
                key: c.key.clone(),
                old,
                new,
                was: was.clone(),
                forced: forced.clone(),
            };
            let owner = self.router.topic_owner(joined.topic.as_str());
            self.tx.mesh(owner, MeshMsg::Reforce(Box::new(msg)));
        }
    }

    /// Connections whose token expired are closed.
    pub(super) fn close_expired(&mut self) {
        for conn in self.expiries.expired(self.now) {
            let reason = "token expired";
            self.close_for(conn, TOKEN_EXPIRED, reason, Reason::TokenExpired);
        }
    }
}
