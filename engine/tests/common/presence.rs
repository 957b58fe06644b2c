//! phoenix.js `Presence` semantics, so tests hold each client's view exactly as the real client
//! would: `syncState` on presence_state, `syncDiff` on presence_diff.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// key -> metas, as phoenix.js keeps it.
pub type View = BTreeMap<String, Vec<Value>>;

fn fail(msg: String) -> ! {
    panic!("{msg}")
}

fn metas(p: &Value) -> Vec<Value> {
    p["metas"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| fail(format!("no metas in {p}")))
}

fn refs(metas: &[Value]) -> Vec<Value> {
    metas.iter().map(|m| m["phx_ref"].clone()).collect()
}

/// phoenix.js `Presence.syncState`.
pub fn sync_state(state: &mut View, new_state: &Value) {
    let new_state = new_state
        .as_object()
        .unwrap_or_else(|| fail(format!("state not an object: {new_state}")));
    let mut joins = serde_json::Map::new();
    let mut leaves = serde_json::Map::new();
    for (key, presence) in state.iter() {
        if !new_state.contains_key(key) {
            leaves.insert(key.clone(), json!({"metas": presence}));
        }
    }
    for (key, new_presence) in new_state {
        let new_metas = metas(new_presence);
        match state.get(key) {
            Some(current) => {
                let new_refs = refs(&new_metas);
                let cur_refs = refs(current);
                let joined: Vec<Value> = new_metas
                    .iter()
                    .filter(|m| !cur_refs.contains(&m["phx_ref"]))
                    .cloned()
                    .collect();
                let left: Vec<Value> = current
                    .iter()
                    .filter(|m| !new_refs.contains(&m["phx_ref"]))
                    .cloned()
                    .collect();
                if !joined.is_empty() {
                    joins.insert(key.clone(), json!({"metas": joined}));
                }
                if !left.is_empty() {
                    leaves.insert(key.clone(), json!({"metas": left}));
                }
            }
            None => {
                joins.insert(key.clone(), new_presence.clone());
            }
        }
    }
    sync_diff(state, &json!({"joins": joins, "leaves": leaves}));
}

/// phoenix.js `Presence.syncDiff`: joins first (keeping current metas not re-joined), then leaves
/// by `phx_ref`, dropping keys left without metas.
pub fn sync_diff(state: &mut View, diff: &Value) {
    let obj = |v: &Value| {
        v.as_object()
            .cloned()
            .unwrap_or_else(|| fail(format!("diff part not an object: {diff}")))
    };
    for (key, new_presence) in obj(&diff["joins"]) {
        let mut new_metas = metas(&new_presence);
        if let Some(current) = state.get(&key) {
            let joined_refs = refs(&new_metas);
            let mut cur: Vec<Value> = current
                .iter()
                .filter(|m| !joined_refs.contains(&m["phx_ref"]))
                .cloned()
                .collect();
            cur.append(&mut new_metas);
            new_metas = cur;
        }
        state.insert(key, new_metas);
    }
    for (key, left) in obj(&diff["leaves"]) {
        let Some(current) = state.get_mut(&key) else {
            continue;
        };
        let gone = refs(&metas(&left));
        current.retain(|m| !gone.contains(&m["phx_ref"]));
        if current.is_empty() {
            state.remove(&key);
        }
    }
}

/// A server frame as phoenix.js `Presence` takes it: states and diffs change `view`, the rest
/// does not.
pub fn see(view: &mut View, frame: &[u8]) {
    let v: Value = serde_json::from_slice(frame).unwrap_or_else(|e| fail(format!("not JSON: {e}")));
    match v[3].as_str() {
        Some("presence_state") => sync_state(view, &v[4]),
        Some("presence_diff") => sync_diff(view, &v[4]),
        _ => {}
    }
}
