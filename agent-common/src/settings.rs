//! Runtime settings, written by the agent into the one-slot `SETTINGS` array.

use crate::{lists::ListShape, pod};

/// Drop what the policy says to drop.
pub const MODE_ENFORCE: u32 = 0;
/// Decide and count as in enforce mode, but pass everything.
pub const MODE_MONITOR: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateSettings {
    /// Nanoseconds per packet at the packet limit (1e9 / pps); 0: no packet limit.
    pub ns_per_packet: u64,
    /// Picoseconds per byte at the bit limit (8e12 / bps); 0: no bit limit.
    pub ps_per_byte: u64,
    /// Burst tolerance in nanoseconds: how far ahead of now a source's TAT may run.
    pub burst_ns: u64,
    /// A source over its limit this long is banned; 0: never ban.
    pub ban_after_ns: u64,
    /// How long a ban lasts.
    pub ban_ttl_ns: u64,
    /// Prefix lengths that key a source.
    pub v4_prefix: u32,
    pub v6_prefix: u32,
    /// 1: only a source the SYN proxy verified (see `maps::VERIFIED`) is banned; the excess of
    /// any other is dropped, but it is never banned (its address may be forged).
    pub ban_verified_only: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// [`MODE_ENFORCE`] or [`MODE_MONITOR`].
    pub mode: u32,
    /// Send one in this many dropped packets to user space as a sample; 0: none.
    pub sample_every: u32,
    /// Number of rules in the rule tables.
    pub rule_count: u32,
    /// 1 when the ban map may hold entries; 0 lets the program skip the lookup (and the clock).
    pub check_bans: u32,
    pub allow: ListShape,
    pub block: ListShape,
    pub rate: RateSettings,
    /// Number of `[[protect]]` entries in the protect tables; 0 lets the program skip them.
    pub protect_count: u32,
    /// `rules::RULE_FIELD_*`: the optional fields some rule names.
    pub rule_fields: u32,
    /// 1 when `[syn_proxy]` is on: its settings are the generation's `SYN_PROXY` slot.
    pub syn_proxy: u32,
    pub _pad: u32,
}

pod!(RateSettings, Settings);
