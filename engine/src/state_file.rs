//! The state file a node writes on a graceful stop (`--state-file`) and its next start loads, so
//! that a restart keeps presence: every connection's presences (topic, key, phx_ref, stored
//! meta), grouped by the connection that held them, so that a reconnecting client takes its
//! own back, and the presences the backend put through the admin API, with when their TTLs
//! end. An rkyv archive behind an envelope: magic, format version, payload length and an
//! xxh3 checksum of the payload; written to a temporary file beside the target, synced, then
//! renamed, so a crash mid-write leaves the old file or none, never half of one.
//!
//! What it must not do: trust the file. A file that is missing, stale, truncated, corrupt or of
//! another version is refused with its reason ([`Refused`]), which the caller logs before
//! starting empty; nothing here panics on what it reads. Turning the state into held presences
//! is the core's business, not this module's.
//!
//! rkyv has no schema evolution: a change to these types is a new `VERSION`, and a file of
//! another version is refused (a restart across an upgrade of the format starts empty).

use std::io::Write;
use std::path::{Path, PathBuf};

use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

/// The first bytes of every state file.
pub const MAGIC: [u8; 4] = *b"RSTS";
/// The format of the payload.
pub const VERSION: u16 = 2;
/// magic (4), version (2, little-endian), reserved (2), payload length (8), xxh3-64 of the
/// payload (8).
pub const ENVELOPE: usize = 24;

/// A file written this far in the future (by this host's clock) is refused: the clock jumped,
/// or the file is not what it says.
const FUTURE_SLACK_MS: u64 = 5_000;

/// What a node held when it stopped.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// When it was written (ms since the Unix epoch): a file older than the restart grace is
    /// refused, its presences long gone for everyone else.
    pub written_at_ms: u64,
    /// The node's name in a cluster (empty alone): a state file is only taken back by the same
    /// node.
    pub node: String,
    pub conns: Vec<HeldConn>,
    /// The presences the application's backend put through the admin API (no connection).
    pub server: Vec<HeldServerPresence>,
}

/// One connection's presences.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HeldConn {
    pub key: String,
    pub presences: Vec<HeldPresence>,
}

/// One presence: its topic, its ref, and its stored meta (JSON, as the core keeps it).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HeldPresence {
    pub topic: String,
    pub phx_ref: u64,
    pub meta: Vec<u8>,
}

/// A server-side presence: taken back as it was, not held for a client, until the end of its
/// TTL.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HeldServerPresence {
    pub topic: String,
    pub key: String,
    pub meta: Vec<u8>,
    /// When its TTL ends (ms since the Unix epoch, this host's clock: it runs on while the node
    /// is down); None: until the backend removes it.
    pub until_ms: Option<u64>,
}

impl State {
    /// Presences over all connections, and the server-side ones.
    pub fn presences(&self) -> usize {
        self.conns.iter().map(|c| c.presences.len()).sum::<usize>() + self.server.len()
    }

    /// Every presence as `(topic, key, stored meta)`, as `Shard::restore` takes them.
    pub fn each_presence(&self) -> impl Iterator<Item = (&str, &str, &[u8])> {
        self.conns.iter().flat_map(|c| {
            let key = c.key.as_str();
            c.presences
                .iter()
                .map(move |p| (p.topic.as_str(), key, p.meta.as_slice()))
        })
    }
}

/// Why a state file was not loaded. Each is logged by the caller; the node then starts empty.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Missing,
    /// It could not be read (permissions, an I/O error).
    Unreadable(String),
    /// Shorter than its envelope says.
    Truncated {
        have: usize,
        want: usize,
    },
    NotAStateFile,
    OtherVersion(u16),
    /// The payload's checksum does not match: the bytes changed after they were written.
    Corrupt,
    /// The checksum matched but the archive did not validate (written by something else).
    Invalid,
    Stale {
        age_ms: u64,
        grace_ms: u64,
    },
    FromTheFuture {
        ahead_ms: u64,
    },
    /// Written by another node of the cluster.
    OtherNode(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Missing => write!(f, "no state file"),
            Refused::Unreadable(e) => write!(f, "cannot read it: {e}"),
            Refused::Truncated { have, want } => {
                write!(f, "truncated: {have} bytes of {want}")
            }
            Refused::NotAStateFile => write!(f, "not a roster state file"),
            Refused::OtherVersion(v) => {
                write!(f, "format version {v}, this build reads {VERSION}")
            }
            Refused::Corrupt => write!(f, "corrupt: its checksum does not match"),
            Refused::Invalid => write!(f, "its contents do not validate"),
            Refused::Stale { age_ms, grace_ms } => write!(
                f,
                "stale: written {age_ms} ms ago, past the restart grace of {grace_ms} ms"
            ),
            Refused::FromTheFuture { ahead_ms } => {
                write!(
                    f,
                    "written {ahead_ms} ms in the future by this host's clock"
                )
            }
            Refused::OtherNode(n) => write!(f, "written by node {n:?}"),
        }
    }
}

/// The envelope and the archive, ready to write.
pub fn encode(state: &State) -> Vec<u8> {
    // Serializing plain owned data into memory cannot fail.
    let archive = rkyv::to_bytes::<RkyvError>(state).expect("rkyv writes to memory");
    let mut out = Vec::with_capacity(ENVELOPE + archive.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(archive.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&archive).to_le_bytes());
    out.extend_from_slice(&archive);
    out
}

/// Reads a state file's bytes, refusing one written by another node (`node`, empty alone) or
/// older than `grace_ms` at `now_ms` (ms since the Unix epoch).
pub fn decode(bytes: &[u8], node: &str, now_ms: u64, grace_ms: u64) -> Result<State, Refused> {
    let m = bytes.len().min(MAGIC.len());
    if bytes[..m] != MAGIC[..m] {
        return Err(Refused::NotAStateFile);
    }
    if bytes.len() < 8 {
        return Err(Refused::Truncated {
            have: bytes.len(),
            want: ENVELOPE,
        });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(Refused::OtherVersion(version));
    }
    if bytes.len() < ENVELOPE {
        return Err(Refused::Truncated {
            have: bytes.len(),
            want: ENVELOPE,
        });
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let (len, sum) = (word(8), word(16));
    let payload = &bytes[ENVELOPE..];
    let want = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(ENVELOPE))
        .unwrap_or(usize::MAX);
    if bytes.len() < want {
        return Err(Refused::Truncated {
            have: bytes.len(),
            want,
        });
    }
    if bytes.len() > want {
        // Bytes past the payload: not what was written.
        return Err(Refused::Corrupt);
    }
    if xxhash_rust::xxh3::xxh3_64(payload) != sum {
        return Err(Refused::Corrupt);
    }
    // Validation needs the archive aligned; a file's bytes are not.
    let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let state = rkyv::from_bytes::<State, RkyvError>(&aligned).map_err(|_| Refused::Invalid)?;
    if state.node != node {
        return Err(Refused::OtherNode(state.node));
    }
    if state.written_at_ms > now_ms + FUTURE_SLACK_MS {
        return Err(Refused::FromTheFuture {
            ahead_ms: state.written_at_ms - now_ms,
        });
    }
    let age_ms = now_ms.saturating_sub(state.written_at_ms);
    if age_ms > grace_ms {
        return Err(Refused::Stale { age_ms, grace_ms });
    }
    Ok(state)
}

/// Writes `state` to `path` whole or not at all: a temporary file beside it, synced, renamed
/// over it, and the directory synced so that the rename survives a crash.
pub fn write(path: &Path, state: &State) -> std::io::Result<()> {
    let bytes = encode(state);
    let tmp = temporary(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and checks the state file at `path` (see [`decode`]).
pub fn read(path: &Path, node: &str, now_ms: u64, grace_ms: u64) -> Result<State, Refused> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Refused::Missing),
        Err(e) => return Err(Refused::Unreadable(e.to_string())),
    };
    decode(&bytes, node, now_ms, grace_ms)
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;
    const GRACE: u64 = 30_000;

    fn state() -> State {
        State {
            written_at_ms: NOW - 1_000,
            node: String::new(),
            conns: vec![
                HeldConn {
                    key: "alice".into(),
                    presences: vec![
                        HeldPresence {
                            topic: "room:1".into(),
                            phx_ref: 7,
                            meta: br#"{"status":"away","phx_ref":"A7"}"#.to_vec(),
                        },
                        HeldPresence {
                            topic: "room:2".into(),
                            phx_ref: 8,
                            meta: br#"{"phx_ref":"A8"}"#.to_vec(),
                        },
                    ],
                },
                HeldConn {
                    key: "bob".into(),
                    presences: vec![],
                },
            ],
            server: vec![HeldServerPresence {
                topic: "room:1".into(),
                key: "bot".into(),
                meta: br#"{"kind":"bot","phx_ref":"A9"}"#.to_vec(),
                until_ms: Some(NOW + 1_500),
            }],
        }
    }

    #[test]
    fn a_state_comes_back_as_it_was_written() {
        let s = state();
        assert_eq!(decode(&encode(&s), "", NOW, GRACE), Ok(s.clone()));
        assert_eq!(s.presences(), 3);
        let empty = State {
            written_at_ms: NOW,
            ..State::default()
        };
        assert_eq!(decode(&encode(&empty), "", NOW, GRACE), Ok(empty));
    }

    #[test]
    fn every_bad_file_is_refused_with_its_reason() {
        let good = encode(&state());
        // Truncated anywhere: in the magic, the envelope, the payload.
        for cut in [0, 3, 5, 10, ENVELOPE, good.len() - 1] {
            assert!(
                matches!(
                    decode(&good[..cut], "", NOW, GRACE),
                    Err(Refused::Truncated { .. })
                ),
                "cut at {cut}: {:?}",
                decode(&good[..cut], "", NOW, GRACE)
            );
        }
        // A later format, and the one before server-side presences were in it.
        for v in [VERSION + 1, 1] {
            let mut other = good.clone();
            other[4..6].copy_from_slice(&v.to_le_bytes());
            assert_eq!(
                decode(&other, "", NOW, GRACE),
                Err(Refused::OtherVersion(v))
            );
        }
        assert_eq!(
            decode(b"{\"json\":true}", "", NOW, GRACE),
            Err(Refused::NotAStateFile)
        );
        // A flipped bit in the payload, and bytes appended.
        let mut flipped = good.clone();
        let last = flipped.len() - 5;
        flipped[last] ^= 0x10;
        assert_eq!(decode(&flipped, "", NOW, GRACE), Err(Refused::Corrupt));
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(decode(&longer, "", NOW, GRACE), Err(Refused::Corrupt));
        // A payload whose checksum matches but that is no archive of a State.
        let junk = vec![0xAB; 40];
        let mut forged = good[..8].to_vec();
        forged.extend_from_slice(&(junk.len() as u64).to_le_bytes());
        forged.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&junk).to_le_bytes());
        forged.extend_from_slice(&junk);
        assert_eq!(decode(&forged, "", NOW, GRACE), Err(Refused::Invalid));
        // A length that would overflow.
        let mut huge = good[..8].to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode(&huge, "", NOW, GRACE),
            Err(Refused::Truncated { .. })
        ));
    }

    #[test]
    fn age_clock_and_node_decide_whether_a_good_file_is_taken() {
        let bytes = encode(&state());
        assert_eq!(
            decode(&bytes, "", NOW + GRACE + 1, GRACE),
            Err(Refused::Stale {
                age_ms: GRACE + 1_001,
                grace_ms: GRACE
            })
        );
        assert!(decode(&bytes, "", NOW + GRACE - 1_000, GRACE).is_ok());
        assert_eq!(
            decode(&bytes, "", NOW - 10_000, GRACE),
            Err(Refused::FromTheFuture { ahead_ms: 9_000 })
        );
        assert_eq!(
            decode(&bytes, "node-b", NOW, GRACE),
            Err(Refused::OtherNode(String::new()))
        );
    }

    #[test]
    fn a_written_file_replaces_the_old_one_whole() {
        let dir = std::env::temp_dir().join(format!("roster-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.bin");
        assert_eq!(read(&path, "", NOW, GRACE), Err(Refused::Missing));
        write(&path, &state()).expect("write");
        let mut newer = state();
        newer.conns.truncate(1);
        write(&path, &newer).expect("write again");
        assert_eq!(read(&path, "", NOW, GRACE), Ok(newer));
        assert!(!temporary(&path).exists(), "no temporary file left");
        // A directory where the file should be cannot be read as one.
        assert!(matches!(
            read(&dir, "", NOW, GRACE),
            Err(Refused::Unreadable(_))
        ));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
