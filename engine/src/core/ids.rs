//! Small types that keep keys, refs and addresses from being mixed up.

use std::borrow::Borrow;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use roster_proto::{stored_phx_ref, PhxRef};
use triomphe::ThinArc;

use crate::mesh::ShardId;

/// A connection, numbered by the driver, unique within its shard while it is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u32);

/// A connection anywhere in the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnAddr {
    pub shard: ShardId,
    pub conn: ConnId,
}

/// Refs are unique per process run: shard id in the top 16 bits, a per-shard counter below,
/// scrambled by the run's seed (xor keeps them distinct). A shard's connections count from 1;
/// its topic owner, when it must give a presence a ref of its own, from [`OWNER_REFS`].
pub(crate) fn next_ref(shard: ShardId, counter: &mut u64, seed: u64) -> PhxRef {
    *counter += 1;
    PhxRef(((shard.0 as u64) << 48 | (*counter & ((1 << 48) - 1))) ^ seed)
}

/// Where a topic owner's refs start: far above what a shard's connections reach (2^47 joins).
pub(crate) const OWNER_REFS: u64 = 1 << 47;

/// Milliseconds on the driver's monotonic clock. The core never reads a clock itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Millis(pub u64);

/// WebSocket close code the driver must send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// RFC 6455 1000: a normal close (here: the heartbeat timeout, as Phoenix closes).
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// RFC 6455 1007: the frame's data is not consistent with the message type (not V2).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// RFC 6455 1008: the connection broke a policy (here: a slow consumer that did not drain).
    pub const POLICY: CloseCode = CloseCode(1008);
}

/// Bytes of one encoded server frame. Reference-counted without atomics: a broadcast is encoded
/// once and the same allocation is queued for every local subscriber.
pub type Frame = Rc<[u8]>;

/// One stored meta, encoded with its `phx_ref` (see `roster_proto::meta`). Shared between the
/// topic table and the user table, which may sit on different cores, hence an atomic count; it
/// is cloned on track and untrack only, never per delivered message. A thin pointer (8 bytes,
/// the length lives in the allocation): every table entry holds one.
#[derive(Clone)]
pub struct Meta(ThinArc<(), u8>);

impl Meta {
    pub fn new(stored: &[u8]) -> Meta {
        Meta(ThinArc::from_header_and_slice((), stored))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0.slice
    }

    /// Whether this is the meta of presence `r`. The ref is read from the stored bytes (it is
    /// always their tail) rather than kept beside them, which saves 8 bytes in every table entry.
    pub fn is_ref(&self, r: PhxRef) -> bool {
        stored_phx_ref(self.bytes()) == Some(&r.text()[..])
    }

    pub(crate) fn ref_text(&self) -> [u8; PhxRef::TEXT_LEN] {
        let mut t = [0u8; PhxRef::TEXT_LEN];
        if let Some(r) = stored_phx_ref(self.bytes()) {
            t.copy_from_slice(r);
        }
        t
    }
}

impl PartialEq for Meta {
    fn eq(&self, other: &Meta) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Meta {}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Meta({})", String::from_utf8_lossy(self.bytes()))
    }
}

macro_rules! shared_name {
    ($(#[$doc:meta])* $name:ident($storage:ty)) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Arc<$storage>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }
    };
}

shared_name!(
    /// A topic name. Shared (not copied) between the tables and messages that mention it; a thin
    /// pointer (8 bytes) because every joined topic of every connection and every entry of the
    /// user table holds one, while the name itself is allocated once per topic per shard.
    TopicName(Box<str>)
);
shared_name!(
    /// A presence key: the user's identity (a token's `sub`, or the development `user_id`). One
    /// allocation per connection, so the name sits in the `Arc` itself.
    UserKey(str)
);

impl TopicName {
    pub fn new(s: &str) -> Self {
        TopicName(Arc::new(Box::from(s)))
    }
}

impl UserKey {
    pub fn new(s: &str) -> Self {
        UserKey(Arc::from(s))
    }
}

/// A client's `join_ref`, kept for every joined topic of every connection. phoenix.js sends short
/// decimal strings, so up to 14 bytes are kept inline and only longer ones cost an allocation.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum JoinRef {
    Inline { len: u8, bytes: [u8; 14] },
    Heap(Box<str>),
}

impl JoinRef {
    pub(crate) fn new(s: &str) -> Self {
        if s.len() <= 14 {
            let mut bytes = [0u8; 14];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            JoinRef::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            JoinRef::Heap(s.into())
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Built from a &str cut at its own length, so always valid UTF-8.
            JoinRef::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or_default()
            }
            JoinRef::Heap(s) => s,
        }
    }
}

impl fmt::Debug for JoinRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}
