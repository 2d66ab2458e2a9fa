//! moat's agent, in wings (ARCHITECTURE.md draws them): `config` turns TOML into a validated
//! policy; `program` is the data path's user half, everything that touches the XDP object;
//! `control` is the socket's wire contract and its client; `daemon` is `moat run`; `observe` is
//! what the daemon offers watchers (top, capture, metrics); `netfilter` is what `[syn_proxy]`
//! sets up beside the program (nftables synproxy, sysctls); `fleet` shares list entries with
//! other nodes through NATS JetStream; `cli` is the command line. The
//! `moat` binary is a thin dispatcher over this library; the tests drive it directly.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fleet;
pub mod logging;
pub mod netfilter;
pub mod observe;
pub mod program;

/// An error and its causes on one line, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Sleeps until `at`, or for ever without one: a `select!` branch for a deadline that may not
/// be set.
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
