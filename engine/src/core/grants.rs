//! What a verified token lets a connection do: the topics it may join, and meta fields it carries
//! that its client cannot override. Connections without a token (development mode) have none.

use roster_proto::ClientMeta;

/// A topic a token allows: the exact name, or, ending in `*`, every topic with that prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern(Box<str>);

impl TopicPattern {
    pub fn new(pattern: &str) -> Self {
        TopicPattern(pattern.into())
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => topic.starts_with(prefix),
            None => *self.0 == *topic,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// `None`: any topic.
    pub topics: Option<Vec<TopicPattern>>,
    /// A JSON object merged into every meta the connection tracks, over the client's fields.
    pub meta: Option<Box<str>>,
}

impl Grants {
    pub fn allows(&self, topic: &str) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(topic)))
    }

    /// The forced meta, if the token has one (checked to be an object when it was verified).
    pub fn meta(&self) -> Option<ClientMeta<'_>> {
        claims(self.meta.as_deref())
    }
}

/// Meta claims as a token carried them (checked to be an object when it was verified).
pub(crate) fn claims(meta: Option<&str>) -> Option<ClientMeta<'_>> {
    ClientMeta::from_json(meta?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        let g = Grants {
            topics: Some(vec![
                TopicPattern::new("room:lobby"),
                TopicPattern::new("doc:42:*"),
            ]),
            meta: None,
        };
        assert!(g.allows("room:lobby"));
        assert!(!g.allows("room:lobby2"));
        assert!(!g.allows("room:other"));
        assert!(g.allows("doc:42:"));
        assert!(g.allows("doc:42:page:1"));
        assert!(!g.allows("doc:4"));
        assert!(Grants::default().allows("anything"));
        let none = Grants {
            topics: Some(Vec::new()),
            meta: None,
        };
        assert!(!none.allows("room:lobby"), "an empty list allows nothing");
        assert!(Grants {
            topics: Some(vec![TopicPattern::new("*")]),
            meta: None
        }
        .allows("x"));
    }
}
