//! The control socket: the daemon serves it, the CLI is its client.

pub mod client;
pub mod protocol;
pub mod server;
