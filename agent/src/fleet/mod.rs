//! The fleet: list entries shared by moat's nodes through a NATS JetStream key-value bucket.
//! `record` is what one entry looks like in the bucket; `client` is the task that talks to the
//! servers. The daemon applies what the task reads (`daemon::fleet_sync`).

pub mod client;
pub mod record;

pub use self::{
    client::{Change, FleetEvent, FleetHandle, FleetStatus},
    record::{FleetKey, FleetRecord},
};
