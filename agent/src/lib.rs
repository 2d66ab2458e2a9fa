//! moat's agent: configuration, loading and attaching the XDP program, filling its maps, and
//! reading its counters. The `moat` binary is a thin command line over this library; the test
//! lab uses it to read counters back from the kernel.

pub mod bans;
pub mod capture;
pub mod cli;
pub mod client_commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod events;
pub mod lists;
pub mod live;
pub mod loader;
pub mod logging;
pub mod map_access;
mod mapped_array;
pub mod metrics;
pub mod observe_commands;
pub mod pins;
pub mod policy;
pub mod rule_tables;
pub mod state;
pub mod stats;
pub mod top;

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
