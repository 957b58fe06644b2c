//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod http;
pub mod presence;
pub mod server;

/// A token's grants that allow every topic and force the meta claims `meta` (none if empty).
pub fn claims(meta: &str) -> Option<Box<roster_engine::core::Grants>> {
    (!meta.is_empty()).then(|| {
        Box::new(roster_engine::core::Grants {
            topics: None,
            meta: Some(meta.into()),
        })
    })
}

/// What a caught panic said.
pub fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}
