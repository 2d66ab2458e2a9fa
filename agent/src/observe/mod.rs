//! What the daemon offers those who watch it: `moat top`'s tallies and rates, `moat capture`'s
//! hub that streams sampled frames to clients, and the Prometheus `/metrics` endpoint. Each
//! reads what the daemon hands it (samples, counter snapshots); none touches a map itself but
//! through the `program` wing's owners.

pub mod attacks;
pub mod capture;
pub mod fingerprint;
pub mod metrics;
pub mod top;
