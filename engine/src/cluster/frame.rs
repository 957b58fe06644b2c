//! Node-to-node frames: what a node publishes on NATS, as rkyv archives behind a fixed envelope
//! (magic, format version). Anyone who may publish on the prefix can send bytes, so a frame is
//! only ever read through rkyv's validation, then checked for what roster needs (bounded names
//! and keys, metas that are JSON objects); a bad frame is an error to count, never a panic.
//!
//! rkyv has no schema evolution: a change to these types is a new `VERSION`, and a node refuses
//! frames of another version (counted and logged by the caller), so that rolling upgrades are
//! explicit. The archive format is pinned by the crate features in engine/Cargo.toml
//! (little-endian, 32-bit relative pointers, aligned).

use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::cluster::subject::Scope;

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"RSTR";
/// The format of the bytes after the envelope.
pub const VERSION: u16 = 2;
/// magic (4), version (2, little-endian), reserved (2).
pub const ENVELOPE: usize = 8;

/// Longest topic name or user key a frame may carry.
pub const MAX_NAME: usize = 4096;
/// Longest close reason: a WebSocket close frame's payload is at most 125 bytes, 2 of them
/// the code.
pub const MAX_CLOSE_REASON: usize = 123;
/// Longest stored meta a frame may carry (a node's own limit is --max-meta-bytes, far below).
pub const MAX_META: usize = 64 << 10;

/// A node's life: `node` is stable across restarts (from its name), `incarnation` is random per
/// start, so that a restarted node's parts replace the old ones at once.
#[derive(
    Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub struct Origin {
    pub node: u64,
    pub incarnation: u64,
}

/// What a subject's frames are about.
#[derive(
    Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum Kind {
    Topic,
    User,
}

impl From<Scope> for Kind {
    fn from(s: Scope) -> Kind {
        match s {
            Scope::Topic => Kind::Topic,
            Scope::User => Kind::User,
        }
    }
}

/// One presence of a part: its key, its ref (unique in the cluster), and its stored meta
/// (JSON, the same `phx_ref` in it). `held`: no connection has it (the node took it back from
/// its state file and no client claimed it yet), so a join on any node may take it over.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub key: String,
    pub phx_ref: u64,
    pub meta: Vec<u8>,
    pub held: bool,
}

/// A presence that left a part.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub key: String,
    pub phx_ref: u64,
}

/// Changes to one origin's part of one name. `prev` is the seq of that origin's previous delta
/// on this name (0: the part was empty before): a receiver whose last applied seq differs has
/// missed something and re-fetches the part.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub kind: Kind,
    pub name: String,
    pub origin: Origin,
    pub seq: u64,
    pub prev: u64,
    pub joins: Vec<Presence>,
    pub leaves: Vec<Left>,
}

/// Ask every holder of `name` (or one node, on its own subject) for its part.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PartRequest {
    pub kind: Kind,
    pub name: String,
    pub from: Origin,
    /// Which interest of the asker's this is (it changes each time the asker forgets the name
    /// and takes it up again): an answer carries it back, so that a late answer to an old
    /// interest is not taken for one to the new.
    pub ask: u64,
}

/// One chunk of an origin's part of `name`, as of its delta `seq` (the next delta's `prev`),
/// with the holders of `name` the origin knows (so the asker can tell when every holder has
/// answered). Every delta of the origin's up to `floor` is in it already (its seqs count over
/// all its names, so older deltas of a name it forgot and made again are told apart).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub kind: Kind,
    pub name: String,
    pub origin: Origin,
    pub seq: u64,
    pub floor: u64,
    pub presences: Vec<Presence>,
    pub holders: Vec<u64>,
    /// The request's `ask` this answers; 0 for a part nobody asked for.
    pub ask: u64,
    /// This chunk's place, from 0, and how many there are.
    pub chunk: u32,
    pub chunks: u32,
    /// Not the answering node's own part: what it holds of `origin`, a node that ended under
    /// a grace (its presences all `held`). A node that took an interest in the name after the
    /// end learns of them this way, so that its clients see them and may take them over.
    pub relayed: bool,
}

/// A node is alive. `beat` counts heartbeats of this incarnation: a gap says frames may have
/// been lost, and the receiver re-fetches that origin's parts.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub origin: Origin,
    pub name: String,
    pub beat: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Delta(Delta),
    PartRequest(PartRequest),
    Part(Part),
    Heartbeat(Heartbeat),
    /// The node stops gracefully.
    Goodbye(Goodbye),
    /// The admin API of some node acts on the whole cluster.
    Command(Command),
}

/// What the admin API asks of every node (`PREFIX.cmd`). Added after format 2's other
/// frames: a node of an older release counts it as a bad frame and does nothing.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Close every connection of `key` with `code` (4000-4999) and `reason`.
    Disconnect {
        key: String,
        code: u16,
        reason: String,
    },
    /// Node `owner` tracks `key` in `topic` with `meta` (a client meta object) and no
    /// connection, for `ttl_ms` (0: until removed); every other node drops its own such
    /// presence, so that there is one.
    Track {
        topic: String,
        key: String,
        meta: String,
        ttl_ms: u64,
        owner: u64,
    },
    /// Whoever has the server-side presence of `key` in `topic` removes it.
    Untrack { topic: String, key: String },
}

/// A graceful stop. `hold_ms` 0: the node's parts leave now. Otherwise it wrote a state file
/// and its next incarnation takes its presences back: the others hold its parts that long (its
/// restart grace), and joins anywhere may take its presences over meanwhile.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Goodbye {
    pub origin: Origin,
    pub hold_ms: u64,
}

/// Why bytes from NATS were not a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than the envelope, or not starting with [`MAGIC`].
    NotAFrame,
    /// Another format version (a node of another release).
    Version(u16),
    /// rkyv's validation refused the bytes.
    Malformed,
    /// Well formed, but not something roster accepts.
    Invalid(&'static str),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::NotAFrame => f.write_str("not a roster frame"),
            FrameError::Version(v) => write!(f, "frame format {v}, this node reads {VERSION}"),
            FrameError::Malformed => f.write_str("malformed frame"),
            FrameError::Invalid(why) => write!(f, "invalid frame: {why}"),
        }
    }
}

impl Frame {
    /// What the frame is about: a topic or a user, and its name (None for heartbeats and
    /// goodbyes, which are about a node). The owner shard of that name takes it.
    pub fn about(&self) -> Option<(Kind, &str)> {
        match self {
            Frame::Delta(d) => Some((d.kind, &d.name)),
            Frame::PartRequest(q) => Some((q.kind, &q.name)),
            Frame::Part(p) => Some((p.kind, &p.name)),
            Frame::Heartbeat(_) | Frame::Goodbye(_) | Frame::Command(_) => None,
        }
    }

    /// The envelope and the archive, ready to publish.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain owned data into memory cannot fail.
        let archive = rkyv::to_bytes::<RkyvError>(self).expect("rkyv writes to memory");
        let mut out = Vec::with_capacity(ENVELOPE + archive.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&archive);
        out
    }

    /// Reads a frame from bytes as they came (unaligned, untrusted).
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        if bytes.len() < ENVELOPE || bytes[..4] != MAGIC {
            return Err(FrameError::NotAFrame);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        // Payloads are not aligned; validation needs them to be.
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len() - ENVELOPE);
        aligned.extend_from_slice(&bytes[ENVELOPE..]);
        let frame =
            rkyv::from_bytes::<Frame, RkyvError>(&aligned).map_err(|_| FrameError::Malformed)?;
        frame.check()?;
        Ok(frame)
    }

    /// What validation cannot say: names, keys and metas roster can hold and send on.
    fn check(&self) -> Result<(), FrameError> {
        let name = |n: &str| {
            if n.len() > MAX_NAME {
                Err(FrameError::Invalid("name too long"))
            } else {
                Ok(())
            }
        };
        let presences = |ps: &[Presence]| ps.iter().try_for_each(check_presence);
        match self {
            Frame::Delta(d) => {
                name(&d.name)?;
                presences(&d.joins)?;
                d.leaves.iter().try_for_each(|l| check_key(&l.key))
            }
            Frame::PartRequest(r) => name(&r.name),
            Frame::Part(p) => {
                name(&p.name)?;
                if p.chunks == 0 || p.chunk >= p.chunks {
                    return Err(FrameError::Invalid("chunk out of range"));
                }
                presences(&p.presences)
            }
            Frame::Heartbeat(h) => name(&h.name),
            Frame::Goodbye(_) => Ok(()),
            Frame::Command(Command::Disconnect { key, code, reason }) => {
                check_key(key)?;
                if !(4000..=4999).contains(code) || reason.len() > MAX_CLOSE_REASON {
                    return Err(FrameError::Invalid("close code or reason out of range"));
                }
                Ok(())
            }
            Frame::Command(Command::Track {
                topic, key, meta, ..
            }) => {
                name(topic)?;
                check_key(key)?;
                if meta.len() > MAX_META {
                    return Err(FrameError::Invalid("meta too large"));
                }
                Ok(())
            }
            Frame::Command(Command::Untrack { topic, key }) => {
                name(topic)?;
                check_key(key)
            }
        }
    }
}

fn check_key(key: &str) -> Result<(), FrameError> {
    if key.is_empty() || key.len() > 255 {
        return Err(FrameError::Invalid("user key empty or too long"));
    }
    Ok(())
}

fn check_presence(p: &Presence) -> Result<(), FrameError> {
    check_key(&p.key)?;
    if p.meta.len() > MAX_META {
        return Err(FrameError::Invalid("meta too large"));
    }
    // It goes into clients' frames as it is: it must be one JSON object.
    let object = p.meta.first() == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(&p.meta).is_ok();
    if !object {
        return Err(FrameError::Invalid("meta is not a JSON object"));
    }
    Ok(())
}

/// An origin's whole part as frames of at most `max_payload` bytes each (NATS closes a
/// connection that publishes more), each with its chunk number.
pub fn part_frames(part: Part, max_payload: usize) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    split(part.presences.clone(), &part, max_payload, &mut chunks);
    let n = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, presences)| {
            Frame::Part(Part {
                presences,
                chunk: i as u32,
                chunks: n,
                ..part.clone()
            })
            .encode()
        })
        .collect()
}

/// Halves `presences` until each half's frame fits (a single presence always goes alone: a
/// meta is far below any max_payload NATS allows).
fn split(presences: Vec<Presence>, part: &Part, max: usize, out: &mut Vec<Vec<Presence>>) {
    let probe = Frame::Part(Part {
        presences,
        holders: part.holders.clone(),
        ..part_header(part)
    });
    let fits = probe.encode().len() <= max;
    let Frame::Part(Part { mut presences, .. }) = probe else {
        unreachable!("built above");
    };
    if fits || presences.len() <= 1 {
        out.push(presences);
        return;
    }
    let back = presences.split_off(presences.len() / 2);
    split(presences, part, max, out);
    split(back, part, max, out);
}

/// `part` without its presences (and with a chunk count that encodes as large as any).
fn part_header(part: &Part) -> Part {
    Part {
        kind: part.kind,
        name: part.name.clone(),
        origin: part.origin,
        seq: part.seq,
        floor: part.floor,
        presences: Vec::new(),
        holders: Vec::new(),
        ask: part.ask,
        chunk: u32::MAX - 1,
        chunks: u32::MAX,
        relayed: part.relayed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            node: 7,
            incarnation: 0xdead_beef,
        }
    }

    fn presence(i: usize, meta_bytes: usize) -> Presence {
        Presence {
            key: format!("user-{i}"),
            phx_ref: i as u64,
            meta: format!(
                r#"{{"pad":"{}","phx_ref":"AAAAAAAAAAB"}}"#,
                "x".repeat(meta_bytes)
            )
            .into_bytes(),
            held: i % 2 == 1,
        }
    }

    fn every_kind() -> Vec<Frame> {
        vec![
            Frame::Delta(Delta {
                kind: Kind::Topic,
                name: "room:1".into(),
                origin: origin(),
                seq: 12,
                prev: 9,
                joins: vec![presence(1, 10)],
                leaves: vec![Left {
                    key: "user-2".into(),
                    phx_ref: 42,
                }],
            }),
            Frame::PartRequest(PartRequest {
                kind: Kind::User,
                name: "alice".into(),
                from: origin(),
                ask: 3,
            }),
            Frame::Part(Part {
                kind: Kind::Topic,
                name: "room:1".into(),
                origin: origin(),
                seq: 12,
                floor: 15,
                presences: vec![presence(1, 10), presence(3, 0)],
                holders: vec![7, 8],
                ask: 3,
                chunk: 0,
                chunks: 1,
                relayed: true,
            }),
            Frame::Heartbeat(Heartbeat {
                origin: origin(),
                name: "node-a".into(),
                beat: 99,
            }),
            Frame::Goodbye(Goodbye {
                origin: origin(),
                hold_ms: 30_000,
            }),
        ]
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        for f in every_kind() {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
    }

    #[test]
    fn foreign_bytes_are_refused_and_never_panic() {
        assert_eq!(Frame::decode(b""), Err(FrameError::NotAFrame));
        assert_eq!(Frame::decode(b"RSTR"), Err(FrameError::NotAFrame));
        assert_eq!(
            Frame::decode(b"NOPE\x01\0\0\0rest"),
            Err(FrameError::NotAFrame)
        );
        let mut other = every_kind()[0].encode();
        other[4] = 1;
        assert_eq!(
            Frame::decode(&other),
            Err(FrameError::Version(1)),
            "the first release's"
        );
        // Truncated at every length, and every single byte flipped: refused or read, never a
        // panic (a panic fails this test).
        for f in every_kind() {
            let bytes = f.encode();
            for len in 0..bytes.len() {
                let _ = Frame::decode(&bytes[..len]);
            }
            for i in ENVELOPE..bytes.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut b = bytes.clone();
                    b[i] ^= flip;
                    let _ = Frame::decode(&b);
                }
            }
        }
        // Random bodies behind a good envelope.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..2_000 {
            let mut b = Vec::from(&MAGIC[..]);
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&[0, 0]);
            for _ in 0..(n % 300) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b.push(seed as u8);
            }
            let _ = Frame::decode(&b);
        }
    }

    #[test]
    fn well_formed_but_unfit_frames_are_refused() {
        let bad_meta = Frame::Delta(Delta {
            kind: Kind::Topic,
            name: "t".into(),
            origin: origin(),
            seq: 1,
            prev: 0,
            joins: vec![Presence {
                key: "k".into(),
                phx_ref: 1,
                meta: b"[1,2]".to_vec(),
                held: false,
            }],
            leaves: vec![],
        });
        assert_eq!(
            Frame::decode(&bad_meta.encode()),
            Err(FrameError::Invalid("meta is not a JSON object"))
        );
        let long_key = Frame::Delta(Delta {
            kind: Kind::Topic,
            name: "t".into(),
            origin: origin(),
            seq: 1,
            prev: 0,
            joins: vec![],
            leaves: vec![Left {
                key: "k".repeat(256),
                phx_ref: 1,
            }],
        });
        assert!(matches!(
            Frame::decode(&long_key.encode()),
            Err(FrameError::Invalid(_))
        ));
        let Frame::Part(mut part) = every_kind()[2].clone() else {
            unreachable!()
        };
        part.chunk = 1;
        assert_eq!(
            Frame::decode(&Frame::Part(part).encode()),
            Err(FrameError::Invalid("chunk out of range"))
        );
    }

    #[test]
    fn a_large_part_goes_in_chunks_under_max_payload() {
        let presences: Vec<Presence> = (0..5_000).map(|i| presence(i, 200)).collect();
        let part = Part {
            kind: Kind::Topic,
            name: "big".into(),
            origin: origin(),
            seq: 5,
            floor: 5,
            presences: presences.clone(),
            holders: vec![7, 9],
            ask: 0,
            chunk: 0,
            chunks: 1,
            relayed: false,
        };
        let max = 64 << 10;
        let frames = part_frames(part, max);
        assert!(frames.len() > 10, "{} chunks", frames.len());
        let mut back = Vec::new();
        for (i, bytes) in frames.iter().enumerate() {
            assert!(bytes.len() <= max, "chunk {i} is {} bytes", bytes.len());
            let Ok(Frame::Part(p)) = Frame::decode(bytes) else {
                panic!("chunk {i} does not read back");
            };
            assert_eq!((p.chunk, p.chunks), (i as u32, frames.len() as u32));
            assert_eq!(p.holders, [7, 9]);
            back.extend(p.presences);
        }
        assert_eq!(back, presences);
    }
}
