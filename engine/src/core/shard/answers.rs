//! Messages arriving for the connection side: answers to joins, diffs and counts to fan out,
//! watched users' changes. The rest go to the owner parts.

use super::join::{adopt, count_frame};
use super::*;

impl Shard {
    pub(super) fn drain_local(&mut self) {
        while let Some(msg) = self.tx.local.pop_front() {
            self.handle_mesh(msg);
        }
    }

    /// Messages for the connection side; the rest go to the owner side.
    pub(super) fn handle_mesh(&mut self, msg: MeshMsg) {
        match msg {
            MeshMsg::Joined {
                topic,
                conn,
                seq,
                reply,
                adopted,
            } => self.joined_reply(topic, conn, seq, reply, adopted),
            MeshMsg::Diff { topic, frame } => {
                let frame: Frame = Rc::from(frame);
                for conn in self.subs.full(topic.as_str()) {
                    self.tx.send_frame(conn, frame.clone(), FrameKind::Diff);
                }
            }
            MeshMsg::Count { topic, keys, metas } => {
                // A count push carries each subscriber's join_ref, but clients of one app mostly
                // share join_refs: consecutive subscribers with the same one share the frame.
                let mut last: Option<(Option<&str>, Frame)> = None;
                for conn in self.subs.count(topic.as_str()) {
                    let jr = self
                        .conns
                        .get(&conn)
                        .and_then(|c| c.join_ref(topic.as_str()));
                    let frame = match &last {
                        Some((last_jr, frame)) if *last_jr == jr => frame.clone(),
                        _ => {
                            count_frame(&mut self.buf, jr, topic.as_str(), (keys, metas));
                            let frame: Frame = Rc::from(self.buf.as_slice());
                            last = Some((jr, frame.clone()));
                            frame
                        }
                    };
                    self.tx.send_frame(conn, frame, FrameKind::Other);
                }
            }
            MeshMsg::Adopt {
                topic,
                conn,
                alias,
                adopted,
            } => {
                let joined = self
                    .conns
                    .get_mut(&conn)
                    .and_then(|c| c.joins.iter_mut().find(|j| j.topic == topic));
                if let Some(joined) = joined {
                    adopt(joined, (&self.router, &mut self.tx), topic, alias, adopted);
                }
            }
            MeshMsg::UserState {
                key,
                seq,
                presences,
            } => {
                let done =
                    self.watches
                        .user_state(key, seq, presences, &mut self.tx, &mut self.buf);
                for (conn, topic) in done {
                    self.complete_watch_join(conn, topic.as_str());
                }
            }
            MeshMsg::UserChanged { key, joins, leaves } => {
                self.watches.user_changed(key, joins, leaves)
            }
            msg @ (MeshMsg::UserTracked { .. }
            | MeshMsg::UserUntracked { .. }
            | MeshMsg::UserCheck(_)
            | MeshMsg::UserUpdated { .. }
            | MeshMsg::Watch { .. }
            | MeshMsg::Unwatch { .. }) => {
                let (users, mut env) = self.users_env();
                users.message(msg, &mut env);
            }
            msg => {
                let (owner, mut env) = self.owner_env();
                owner.message(msg, &mut env);
            }
        }
    }
}
