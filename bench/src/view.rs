//! What a client needs to know about a topic's presence for benchmarks: which refs each key has,
//! kept the way phoenix.js Presence keeps it (joins add refs, leaves remove them).

use std::collections::HashMap;

use serde_json::Value;

#[derive(Default)]
pub struct View {
    keys: HashMap<String, Vec<String>>,
}

impl View {
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    pub fn has(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    pub fn state(&mut self, state: &Value) {
        self.keys.clear();
        self.join(state);
    }

    /// Applies a presence_diff payload.
    pub fn diff(&mut self, diff: &Value) {
        self.join(&diff["joins"]);
        if let Some(leaves) = diff["leaves"].as_object() {
            for (key, p) in leaves {
                if let Some(refs) = self.keys.get_mut(key) {
                    for m in p["metas"].as_array().into_iter().flatten() {
                        refs.retain(|r| m["phx_ref"].as_str() != Some(r.as_str()));
                    }
                    if refs.is_empty() {
                        self.keys.remove(key);
                    }
                }
            }
        }
    }

    fn join(&mut self, joins: &Value) {
        if let Some(joins) = joins.as_object() {
            for (key, p) in joins {
                let refs = self.keys.entry(key.clone()).or_default();
                for m in p["metas"].as_array().into_iter().flatten() {
                    if let Some(r) = m["phx_ref"].as_str() {
                        if !refs.iter().any(|x| x == r) {
                            refs.push(r.to_owned());
                        }
                    }
                }
            }
        }
    }
}
