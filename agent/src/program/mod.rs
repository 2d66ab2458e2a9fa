//! The data path's user half: everything that touches the XDP object. Loading it with maps sized
//! for the policy, pinning, resolving every map once into typed handles, and one owning module
//! per map: the lists and rule tables of both generations and the switch between them (the live
//! policy), the settings record, the rate limiter's state and bans, the counters, the event ring
//! buffer and the capture override. Nothing here knows the daemon, the CLI or the observers; they
//! call in.

pub mod capacities;
pub mod clock;
pub mod counters;
pub mod events;
pub mod fingerprints;
pub mod limiter;
pub mod lists;
pub mod live;
pub mod loader;
mod map_batch;
pub mod map_source;
mod mapped_array;
pub mod maps;
pub mod pins;
pub mod protect_tables;
pub mod rule_tables;
pub mod sampling;
pub mod settings;
mod source_table;
mod v4_long_table;
pub mod v6_gate;
pub mod xdp_link;
