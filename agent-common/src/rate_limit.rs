//! Per-source rate limiting and bans. Sources are keyed by their address cut to a prefix
//! (IPv4 /32 and IPv6 /64 by default, see [`crate::settings::RateSettings`]), so one host with a
//! whole IPv6 /64 counts once.
//!
//! The limiter is GCRA (the token bucket written as a theoretical arrival time, TAT): a packet
//! conforms when `max(TAT, now) - now <= burst`, and then moves TAT forward by its cost. TAT is
//! updated with compare-and-swap, so concurrent CPUs never lose an update.

use crate::pod;

pub const FAMILY_V4: u32 = 4;
pub const FAMILY_V6: u32 = 6;

/// A source as the limiter and the ban list see it: the address cut to the configured prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
    /// IPv4 in the first four bytes, the rest zero.
    pub addr: [u8; 16],
}

/// The limiter's state for one source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    /// Theoretical arrival time of the next packet under the packet limit (monotonic ns).
    pub packets_tat: u64,
    /// The same under the bit limit.
    pub bits_tat: u64,
    /// Start of the current streak of packets over the limit (0: none).
    pub over_since: u64,
    /// The last packet over the limit; a pause longer than the gap ends a streak.
    pub last_over: u64,
    /// Packets and bytes that conformed since the entry was created (`moat top` reads them).
    pub passed_packets: u64,
    pub passed_bytes: u64,
    /// The source is banned until then (0: never banned). The program writes it with the ban's
    /// `BANS` entry, so that a tracked source's packets need one lookup, not two; `BANS` stays
    /// the list of record (listing, saving, restoring), read on a miss here.
    pub banned_until: u64,
}

/// A ban: packets from the source are dropped until `expires_at` (monotonic ns, on the
/// program's clock: see [`crate::clock`]); the program checks the expiry itself on every
/// lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ban {
    pub expires_at: u64,
    /// One of the `lists::SOURCE_*` constants.
    pub source: u32,
    pub _pad: u32,
}

pod!(SourceKey, RateState, Ban);

impl crate::settings::RateSettings {
    /// Whether any limit is configured.
    #[inline(always)]
    pub const fn is_on(&self) -> bool {
        self.ns_per_packet != 0 || self.ps_per_byte != 0
    }
}
