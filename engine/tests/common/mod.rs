//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod http;
pub mod presence;
pub mod server;
