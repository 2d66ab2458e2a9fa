//! Events the program sends to the agent through the `EVENTS` ring buffer.

use crate::pod;

/// The rate limiter banned a source.
pub const EVENT_BAN: u32 = 1;
/// A sample of a packet: dropped ones at the configured rate, passed ones only while
/// `moat capture --passed` asks for them.
pub const EVENT_SAMPLE: u32 = 2;
/// A sample of the traffic of a protected destination (`detail`: the entry), paced per entry
/// ([`crate::protect::PROTECT_SAMPLE_INTERVAL_NS`]); `reason` is `dst_limit` or `fingerprint`
/// for a packet over the limit or matching the fingerprint, `no_match` otherwise.
pub const EVENT_PROTECT_SAMPLE: u32 = 3;

/// Bytes of the frame a sample carries.
pub const SAMPLE_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u32,
    /// The `stats::Reason` of the verdict.
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
    /// The `stats::Action` taken.
    pub action: u32,
    /// How many packets this sample stands for (the sampling interval it was taken at).
    pub weight: u32,
    /// The list entry source, rule or protected entry of the verdict.
    pub detail: u32,
    pub _pad: u32,
    pub data: [u8; SAMPLE_BYTES],
}

/// Sampling asked for at run time by `moat capture`, on top of the configuration's: the one
/// slot of the `CAPTURE` array. 0: no override.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureSettings {
    /// Sample one in this many dropped packets instead of the configuration's `sample_every`.
    pub dropped_every: u32,
    /// Sample one in this many passed packets (passed packets are never sampled otherwise).
    pub passed_every: u32,
}

pod!(Event, CaptureSettings);
