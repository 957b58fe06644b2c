//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod http;
pub mod presence;
pub mod server;

/// What a caught panic said.
pub fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}
