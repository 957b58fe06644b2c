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

    /// Commands of the admin API to every node (`frame::Command`).
    pub fn commands(&self) -> String {
        format!("{}.cmd", self.prefix)
    }

    /// Every node's heartbeats and goodbyes.
    pub fn heartbeats(&self) -> String {
        format!("{}.hb", self.prefix)
    }
}

/// Which of a name's two subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// [`Subjects::deltas`]
    Deltas,
    /// [`Subjects::parts`]
    Parts,
}

/// A name's subject as the stem its two subjects share and which of them it is, so that a
/// node wanting both subscribes once, to [`both`]: a subscription costs memory in the client
/// and in nats-server, and a node holds one or two per name it has an interest in.
pub fn split_name_subject(subject: &str) -> Option<(&str, Side)> {
    let (stem, last) = subject.rsplit_once('.')?;
    let side = match last {
        "d" => Side::Deltas,
        "q" => Side::Parts,
        _ => return None,
    };
    let (rest, hash) = stem.rsplit_once('.')?;
    let (_, scope) = rest.rsplit_once('.')?;
    let hash_ok = hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    (hash_ok && (scope == "t" || scope == "u")).then_some((stem, side))
}

/// The subject of `side` under a stem of [`split_name_subject`].
pub fn name_subject(stem: &str, side: Side) -> String {
    match side {
        Side::Deltas => format!("{stem}.d"),
        Side::Parts => format!("{stem}.q"),
    }
}

/// The one subscription that gets both subjects of a stem (they are the only ones under it).
pub fn both(stem: &str) -> String {
    format!("{stem}.*")
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
    fn a_names_two_subjects_share_a_stem_and_nothing_else_does() {
        let s = Subjects::new("acme.roster").unwrap();
        for scope in [Scope::Topic, Scope::User] {
            let (d, q) = (s.deltas(scope, "room:1"), s.parts(scope, "room:1"));
            let (stem, side) = split_name_subject(&d).unwrap();
            assert_eq!(side, Side::Deltas);
            assert_eq!(split_name_subject(&q), Some((stem, Side::Parts)));
            assert_eq!(name_subject(stem, Side::Deltas), d);
            assert_eq!(name_subject(stem, Side::Parts), q);
            assert_eq!(both(stem), format!("{stem}.*"));
            assert_ne!(
                split_name_subject(&s.deltas(scope, "room:2")).unwrap().0,
                stem
            );
        }
        for other in [
            s.heartbeats(),
            s.node(7),
            "acme.roster.t.12.d".into(),
            "d".into(),
        ] {
            assert_eq!(split_name_subject(&other), None, "{other}");
        }
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
