//! roster benchmarks: programs that print figures (throughput, hdrhistogram percentiles, bytes per
//! presence). Nothing here asserts on time; machines are shared and noisy, so every program runs
//! several rounds and prints the median with the spread.

pub mod alloc;
pub mod client;
pub mod receiver;
pub mod report;
pub mod stamps;
pub mod view;
pub mod wire;
