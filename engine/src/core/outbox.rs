//! What a shard hands to its driver, and the local queue for messages to itself.

use std::collections::VecDeque;
use std::rc::Rc;

use roster_proto::encode::FrameKind;

use crate::cluster::frame::Kind;
use crate::core::event::Event;
use crate::core::{CloseCode, ConnId, Frame, MeshMsg};
use crate::mesh::ShardId;

/// Something the driver must do.
#[derive(Debug)]
pub enum Output {
    /// Write `frame` to local connection `conn`. `kind` says what flow control may do with it
    /// (drop a diff for a slow consumer, not count a state), so the driver need not read it.
    Send {
        conn: ConnId,
        frame: Frame,
        kind: FrameKind,
    },
    /// Close `conn` with this WebSocket close code and reason. The shard has already forgotten the
    /// connection (its presences are leaving); feeding it more frames does nothing.
    Close {
        conn: ConnId,
        code: CloseCode,
        /// The core's own reasons are static; the admin API's are the backend's.
        reason: std::borrow::Cow<'static, str>,
    },
    /// Put `msg` on the ring to shard `to`. Rings must deliver in order per (from, to) pair.
    Mesh { to: ShardId, msg: MeshMsg },
    /// Something for NATS (cluster mode only).
    Nats(NatsOut),
    /// Something for the application's backend (only with `Config::events`).
    Event(Box<Event>),
    /// `conn` sent a fresh token (see `shard/token.rs`): the driver verifies it and answers
    /// with `Shard::refreshed`, echoing the refs.
    Refresh {
        conn: ConnId,
        token: Box<str>,
        join_ref: Option<Box<str>>,
        msg_ref: Option<Box<str>>,
    },
}

/// What a shard asks of the node's NATS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsOut {
    Subscribe(String),
    Unsubscribe(String),
    Publish {
        subject: String,
        frame: Vec<u8>,
    },
    /// Publish, with the answers (and "no responders") coming back as inputs for `name`.
    Request {
        subject: String,
        kind: Kind,
        name: String,
        frame: Vec<u8>,
    },
    /// Answer a request on its reply subject.
    Reply {
        to: String,
        frame: Vec<u8>,
    },
}

/// Messages to this shard itself go through a local queue instead of a ring, but are handled by
/// the same code as messages from other shards.
pub(crate) struct Outbox {
    pub(crate) me: ShardId,
    /// Whether presence events are wanted (`Config::events`).
    pub(crate) events: bool,
    pub(crate) local: VecDeque<MeshMsg>,
    pub(crate) out: Vec<Output>,
}

impl Outbox {
    pub(crate) fn new(me: ShardId, events: bool) -> Self {
        Outbox {
            me,
            events,
            local: VecDeque::new(),
            out: Vec::new(),
        }
    }

    /// Reports an event, made only if someone wants it.
    pub(crate) fn event(&mut self, make: impl FnOnce() -> Event) {
        if self.events {
            self.out.push(Output::Event(Box::new(make())));
        }
    }

    pub(crate) fn nats(&mut self, out: NatsOut) {
        self.out.push(Output::Nats(out));
    }

    pub(crate) fn mesh(&mut self, to: ShardId, msg: MeshMsg) {
        if to == self.me {
            self.local.push_back(msg);
        } else {
            self.out.push(Output::Mesh { to, msg });
        }
    }

    /// Sends a copy of `bytes` (a reply, a count, a close...) to one connection.
    pub(crate) fn send(&mut self, conn: ConnId, bytes: &[u8]) {
        self.send_frame(conn, Rc::from(bytes), FrameKind::Other);
    }

    pub(crate) fn send_frame(&mut self, conn: ConnId, frame: Frame, kind: FrameKind) {
        self.out.push(Output::Send { conn, frame, kind });
    }
}
