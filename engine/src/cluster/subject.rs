//! NATS subjects of a cluster. Clients choose topic names and user keys, so a name never becomes
//! a subject token: subjects carry a stable hash of it (xxh3, the same on every node and every
//! version), and the name travels in the frame, where the receiver checks it. Two names with one
//! hash share a subject; each node drops frames for names it does not hold.

use xxhash_rust::xxh3::xxh3_64;

/// What a subject is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Topic,
    User,
}

impl From<crate::cluster::frame::Kind> for Scope {
    fn from(k: crate::cluster::frame::Kind) -> Scope {
        match k {
            crate::cluster::frame::Kind::Topic => Scope::Topic,
            crate::cluster::frame::Kind::User => Scope::User,
        }
    }
}

impl Scope {
    fn token(self) -> &'static str {
        match self {
            Scope::Topic => "t",
            Scope::User => "u",
        }
    }
}

/// Builds a cluster's subjects under its prefix (`--nats-prefix`, so that clusters can share one
/// NATS).
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

/// Why a prefix cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub struct BadPrefix(pub String);

impl Subjects {
    /// A prefix is one or more dot-separated tokens of letters, digits, `_` and `-`: no
    /// wildcards, no spaces, nothing a NATS parser would read as structure.
    pub fn new(prefix: &str) -> Result<Subjects, BadPrefix> {
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if prefix.len() > 64 || !prefix.split('.').all(token_ok) {
            return Err(BadPrefix(format!(
                "--nats-prefix {prefix:?}: use dot-separated tokens of letters, digits, _ and - \
                 (64 bytes at most)"
            )));
        }
        Ok(Subjects {
            prefix: prefix.to_owned(),
        })
    }

    /// Deltas of `name`'s parts: published by every node holding presences there, subscribed
    /// by every node interested in it.
    pub fn deltas(&self, scope: Scope, name: &str) -> String {
        format!(
            "{}.{}.{:016x}.d",
            self.prefix,
            scope.token(),
            name_hash(name)
        )
    }

    /// Requests for `name`'s parts, answered by the nodes holding presences there.
    pub fn parts(&self, scope: Scope, name: &str) -> String {
        format!(
            "{}.{}.{:016x}.q",
            self.prefix,
            scope.token(),
            name_hash(name)
        )
    }

    /// Requests meant for one node (a part re-fetched after a gap).
    pub fn node(&self, node: u64) -> String {
        format!("{}.n.{node:016x}", self.prefix)
    }

    /// Every node's heartbeats and goodbyes.
    pub fn heartbeats(&self) -> String {
        format!("{}.hb", self.prefix)
    }
}

/// The stable hash of a name in subjects.
pub fn name_hash(name: &str) -> u64 {
    xxh3_64(name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_never_become_tokens() {
        let s = Subjects::new("roster").unwrap();
        for name in ["room:1", "a.b.*", ">", "with space", "ünï", ""] {
            let subject = s.deltas(Scope::Topic, name);
            let tokens: Vec<&str> = subject.split('.').collect();
            assert_eq!(tokens.len(), 4, "{subject}");
            assert!(
                tokens[2].bytes().all(|b| b.is_ascii_hexdigit()),
                "{subject}"
            );
        }
        assert_ne!(s.deltas(Scope::Topic, "x"), s.deltas(Scope::User, "x"));
        assert_ne!(s.deltas(Scope::Topic, "x"), s.parts(Scope::Topic, "x"));
        // Stable: the same on every node and every build.
        assert_eq!(
            s.deltas(Scope::Topic, "room:1"),
            Subjects::new("roster")
                .unwrap()
                .deltas(Scope::Topic, "room:1")
        );
    }

    #[test]
    fn a_prefix_is_plain_tokens() {
        assert!(Subjects::new("roster").is_ok());
        assert!(Subjects::new("acme.roster-2").is_ok());
        for bad in ["", "a..b", "a.*", ">", "a b", ".a", "a.", &"x".repeat(65)] {
            assert!(Subjects::new(bad).is_err(), "{bad:?}");
        }
    }
}
