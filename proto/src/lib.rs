//! Wire format of roster's client contract: Phoenix Channels V2 (JSON text frames
//! `[join_ref, ref, topic, event, payload]`), as spoken by the official `phoenix` npm client.
//!
//! What this crate is for: turning any byte string a client sends into a typed message or a typed
//! error ([`decode`]), and writing server frames into reusable buffers ([`encode`]) with metas that
//! are already encoded JSON, copied into frames as they are ([`meta`]).
//!
//! What it must not do: I/O, clocks, allocation per delivered message on the fan-out path, or
//! panicking on anything a client sent.

pub mod decode;
pub mod encode;
pub mod meta;

pub use decode::{
    decode, ClientEvent, ClientMessage, FrameError, JoinRequest, PayloadError, PresenceMode,
};
pub use meta::{stored_phx_ref, ClientMeta, PhxRef};
