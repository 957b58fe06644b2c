//! The `roster` server binary.
//!
//! Not yet a server: the glommio shards and the WebSocket listener are being built (issue 3). It
//! says so and exits with a non-zero status rather than pretending to serve.

fn main() {
    eprintln!(
        "roster {}: the network server is not built yet (issue 3); the presence core is in \
         roster_engine::core, measured by `cargo run --release -p roster-bench --bin core-bench`",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
