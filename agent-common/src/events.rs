//! Events the program sends to the agent through the `EVENTS` ring buffer.

use crate::pod;

/// The rate limiter banned a source.
pub const EVENT_BAN: u32 = 1;
/// A sample of a dropped packet.
pub const EVENT_DROP_SAMPLE: u32 = 2;

/// Bytes of the frame a sample carries.
pub const SAMPLE_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u32,
    /// The `stats::Reason` the packet was dropped for.
    pub reason: u32,
    pub if_index: u32,
    /// The source's family ([`crate::rate_limit::FAMILY_V4`] or `FAMILY_V6`).
    pub family: u32,
    /// The source address (IPv4 in the first four bytes); for bans, the banned key.
    pub source: [u8; 16],
    /// Monotonic time of the event (ns).
    pub timestamp: u64,
    /// For bans: when the ban expires (monotonic ns).
    pub expires_at: u64,
    /// Length of the whole frame, and how much of it `data` holds.
    pub frame_len: u32,
    pub captured_len: u32,
    pub data: [u8; SAMPLE_BYTES],
}

pod!(Event);
