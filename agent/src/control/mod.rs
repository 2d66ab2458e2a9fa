//! The control socket's wire contract: the protocol (frames, requests, replies, their bounds)
//! and the client the CLI uses. The daemon's server speaks the same protocol from the `daemon`
//! wing; nothing here knows the daemon.

pub mod client;
pub mod protocol;
