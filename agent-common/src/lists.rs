//! Layout of a CIDR list (the allowlist and the blocklist each have one). Lookups cost the same
//! whatever the list's size:
//!
//! - **IPv4 prefixes up to /24**: a table with one byte per /24 (DIR-24-8 style), packed eight
//!   to a `u64` in an mmapable array. The byte holds the entry source + 1 (0: not covered) in
//!   its low bits, and [`TABLE_HAS_LONGER`] when a longer prefix lies inside that /24.
//! - **IPv4 /25–/32**: a hash keyed by [`V4PrefixKey`], probed only for the prefix lengths
//!   present ([`ListShape::v4_long_lengths`]) and only under /24s flagged in the table.
//! - **IPv6**: a hash keyed by [`V6PrefixKey`], probed once per prefix length present
//!   ([`ListShape::v6_lengths`]).
//!
//! A list is a set: a source matches when any entry covers it.

use crate::pod;

/// Entries in the IPv4 table: 2^24 /24s, eight per `u64`.
pub const V4_TABLE_LEN: u32 = (1 << 24) / 8;
/// Low bits of a table byte: 0, or the covering entry's source + 1.
pub const TABLE_SOURCE_MASK: u8 = 0x7f;
/// A longer prefix (/25–/32) lies inside this /24.
pub const TABLE_HAS_LONGER: u8 = 0x80;
/// Shortest IPv4 prefix kept in the long-prefix hash.
pub const V4_LONG_MIN_PREFIX: u32 = 25;
/// Distinct IPv6 prefix lengths one list may hold (each costs one hash probe per packet).
pub const MAX_V6_LENGTHS: usize = 16;

/// Index of the /24 of `addr` in the table: (u64 index, byte within it).
#[inline(always)]
pub const fn table_position(addr: [u8; 4]) -> (u32, u32) {
    let slash24 = (addr[0] as u32) << 16 | (addr[1] as u32) << 8 | addr[2] as u32;
    (slash24 / 8, slash24 % 8)
}

/// An IPv4 prefix of length /25–/32, host bits zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4PrefixKey {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

/// An IPv6 prefix, host bits zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V6PrefixKey {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

/// The value of a hash entry: where it came from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListEntry {
    /// One of the `SOURCE_*` constants.
    pub source: u32,
}

/// Which prefix lengths a list holds, so that the program probes only those.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListShape {
    /// 1 when the list holds any IPv4 prefix; 0 lets the program skip the /24 table (a cold
    /// cache line per packet when sources are random), as for an empty allowlist.
    pub v4_present: u32,
    /// Bit `n` set: the list holds IPv4 prefixes of length 25 + n.
    pub v4_long_lengths: u32,
    /// How many of `v6_lengths` are in use.
    pub v6_length_count: u32,
    /// The IPv6 prefix lengths present, longest first.
    pub v6_lengths: [u8; MAX_V6_LENGTHS],
}

pod!(V4PrefixKey, V6PrefixKey, ListEntry, ListShape);

/// Where a list entry came from.
pub const SOURCE_CONFIG: u32 = 0;
/// A list file named in the configuration.
pub const SOURCE_FILE: u32 = 1;
/// The command line of a running agent (`moat block add`).
pub const SOURCE_CLI: u32 = 2;
/// The rate limiter (bans only).
pub const SOURCE_RATE_LIMIT: u32 = 3;
pub const SOURCE_COUNT: u32 = 4;
pub const SOURCE_NAMES: [&str; SOURCE_COUNT as usize] = ["config", "file", "cli", "rate_limit"];

/// The lists whose hits are counted per source.
pub const LIST_ALLOW: u32 = 0;
pub const LIST_BLOCK: u32 = 1;
pub const LIST_BAN: u32 = 2;
pub const LIST_COUNT: u32 = 3;
pub const LIST_NAMES: [&str; LIST_COUNT as usize] = ["allowlist", "blocklist", "ban"];

/// Size of the `LIST_HITS` array.
pub const LIST_HITS_LEN: u32 = LIST_COUNT * SOURCE_COUNT;

/// Index in `LIST_HITS` of (list, source).
#[inline(always)]
pub const fn hit_index(list: u32, source: u32) -> u32 {
    list * SOURCE_COUNT + source
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_positions_cover_the_table() {
        assert_eq!(table_position([0, 0, 0, 0]), (0, 0));
        assert_eq!(table_position([0, 0, 7, 255]), (0, 7));
        assert_eq!(table_position([0, 0, 8, 0]), (1, 0));
        assert_eq!(table_position([255, 255, 255, 255]), (V4_TABLE_LEN - 1, 7));
    }
}
