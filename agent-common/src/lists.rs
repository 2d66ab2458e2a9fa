//! Layout of a CIDR list (the allowlist and the blocklist each have one). Lookups cost the same
//! whatever the list's size:
//!
//! - **IPv4 prefixes up to /24**: a table with one byte per /24 (DIR-24-8 style), packed eight
//!   to a `u64` in an mmapable array, one table per generation for both lists: a nibble each
//!   ([`table_shift`]). A list's nibble holds the entry source + 1 (0: not covered) in its low
//!   bits, and [`TABLE_HAS_LONGER`] when a longer prefix of the list lies inside that /24.
//! - **IPv4 /25–/32**: a table the agent builds itself in an mmapable array of buckets of
//!   [`V4_LONG_BUCKET_SLOTS`] one-word slots ([`V4LongBucket`]); each prefix has two candidate
//!   buckets ([`v4_long_buckets`]) and sits in one of them, or, when both are full, in a small
//!   kernel hash beside it (the stash). Probed only for the prefix lengths present
//!   ([`ListShape::v4_long_lengths`]) and only under /24s flagged in the table.
//! - **IPv6**: a hash keyed by [`V6PrefixKey`], probed once per prefix length present
//!   ([`ListShape::v6_lengths`]); lengths past /32 only when the source's /32 passes the gate
//!   ([`v6_gate_position`]), so that an unlisted source costs one probe per length up to /32.
//!
//! The long-prefix stores are shared by both lists and both policy generations: a prefix is
//! stored once, and its [`PrefixEntry`] (packed into the slot for IPv4) says which list of which
//! generation holds it ([`prefix_slot`]). The
//! /24 tables are per generation (an array cannot be shared that way at one byte per /24).
//!
//! A list is a set: a source matches when any entry covers it.

use crate::pod;

/// Entries in the IPv4 table: 2^24 /24s, eight per `u64`.
pub const V4_TABLE_LEN: u32 = (1 << 24) / 8;
/// Low bits of a list's nibble of a table byte: 0, or the covering entry's source + 1.
pub const TABLE_SOURCE_MASK: u8 = 0x07;
/// In a list's nibble: a longer prefix (/25–/32) of that list lies inside this /24.
pub const TABLE_HAS_LONGER: u8 = 0x08;
const _: () = assert!(SOURCE_COUNT <= TABLE_SOURCE_MASK as u32);

/// Where the nibble of `list` ([`LIST_ALLOW`] or [`LIST_BLOCK`]) sits in a table byte.
#[inline(always)]
pub const fn table_shift(list: u32) -> u32 {
    list * 4
}
/// Shortest IPv4 prefix kept in the long-prefix table.
pub const V4_LONG_MIN_PREFIX: u32 = 25;
/// Distinct IPv6 prefix lengths one list may hold (each costs one hash probe per packet).
pub const MAX_V6_LENGTHS: usize = 16;

/// Words of the IPv6 gate: a bit array (2^22 bits, 512 KiB, shared by both lists and both
/// generations) with a bit set for the /32 of every IPv6 prefix longer than /32 in any list.
/// Several /32s share a bit, and the agent never clears one while the program runs, so a set
/// bit only means "probe the longer lengths"; a clear bit means no longer prefix lies there.
pub const V6_GATE_WORDS: u32 = 1 << 16;
/// The longest IPv6 prefix probed without asking the gate.
pub const V6_GATE_PREFIX: u32 = 32;

/// Where the gate keeps the bit of the /32 whose first four bytes are `first32`: (u64 index,
/// bit within it). A multiplicative hash spreads the /32s that allocations cluster.
#[inline(always)]
pub const fn v6_gate_position(first32: u32) -> (u32, u32) {
    let bit = first32.wrapping_mul(0x9E37_79B1) >> (32 - 22);
    (bit / 64, bit % 64)
}

/// Index of the /24 of `addr` in the table: (u64 index, byte within it).
#[inline(always)]
pub const fn table_position(addr: [u8; 4]) -> (u32, u32) {
    let slash24 = (addr[0] as u32) << 16 | (addr[1] as u32) << 8 | addr[2] as u32;
    (slash24 / 8, slash24 % 8)
}

/// Slots per bucket of the IPv4 long-prefix table: one 64-byte cache line.
pub const V4_LONG_BUCKET_SLOTS: usize = 8;

/// A bucket of the IPv4 long-prefix table. A slot is 0 when free, else
/// [`v4_long_slot_key`] of its prefix with the [`PrefixEntry`]'s sources in the low 16 bits, a
/// nibble per [`prefix_slot`] ([`v4_long_source`]). One word per slot: the agent writes a slot
/// with one atomic store, so the program never sees half of one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4LongBucket {
    pub slots: [u64; V4_LONG_BUCKET_SLOTS],
}

/// The bits of a slot that name its prefix.
pub const V4_LONG_KEY_MASK: u64 = !0xff_ffff;

/// A slot's key bits for the prefix `addr`/`prefix_len` (host bits zero, length /25–/32): the
/// address in the high word, the length above the sources (never 0, so a used slot never is).
#[inline(always)]
pub const fn v4_long_slot_key(addr: u32, prefix_len: u32) -> u64 {
    (addr as u64) << 32 | (prefix_len as u64 & 0xff) << 24
}

/// The source + 1 that a slot holds for `prefix_slot` (0: that list of that generation does not
/// hold the prefix).
#[inline(always)]
pub const fn v4_long_source(slot: u64, prefix_slot: usize) -> u8 {
    ((slot >> (4 * prefix_slot)) & 0xf) as u8
}

/// The two candidate buckets of a prefix in a table of `buckets` buckets (they may coincide).
/// One 64-bit mix of the key, its halves scaled into the table by a multiply, not a modulo.
#[inline(always)]
pub const fn v4_long_buckets(addr: u32, prefix_len: u32, buckets: u32) -> (u32, u32) {
    let z = crate::hash::splitmix64((addr as u64) << 8 | prefix_len as u64);
    let buckets = buckets as u64;
    (
        (((z & 0xffff_ffff) * buckets) >> 32) as u32,
        (((z >> 32) * buckets) >> 32) as u32,
    )
}

/// An IPv4 prefix of length /25–/32, host bits zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct V4PrefixKey {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

/// An IPv6 prefix, host bits zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct V6PrefixKey {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

/// Lists × generations an entry of the shared long-prefix stores can belong to.
pub const PREFIX_SLOTS: usize = 4;

/// The slot of (generation, list: [`LIST_ALLOW`] or [`LIST_BLOCK`]) in a [`PrefixEntry`].
#[inline(always)]
pub const fn prefix_slot(generation: usize, list: u32) -> usize {
    generation * 2 + list as usize
}

/// The value of an entry of the shared long-prefix stores (packed into a slot in the IPv4
/// table, see [`PrefixEntry::packed`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixEntry {
    /// Per [`prefix_slot`]: the source (one of the `SOURCE_*` constants) + 1 of the entry that
    /// list holds in that generation, or 0 when it does not hold the prefix.
    pub sources: [u8; PREFIX_SLOTS],
}

impl PrefixEntry {
    /// Whether no list of any generation holds the prefix (the entry can go).
    pub fn is_unused(&self) -> bool {
        self.sources == [0; PREFIX_SLOTS]
    }
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
    /// The index in `v6_lengths` of the first length of /32 or shorter (`v6_length_count` when
    /// none is): where the probes start when the gate says no longer prefix covers the source.
    pub v6_short_from: u32,
    /// The IPv6 prefix lengths present, longest first.
    pub v6_lengths: [u8; MAX_V6_LENGTHS],
}

impl PrefixEntry {
    /// The entry as the low 16 bits of a long-prefix table slot (sources are below 16).
    #[inline(always)]
    pub const fn packed(&self) -> u64 {
        let mut packed = 0;
        let mut slot = 0;
        while slot < PREFIX_SLOTS {
            packed |= ((self.sources[slot] & 0xf) as u64) << (4 * slot);
            slot += 1;
        }
        packed
    }

    /// The entry a long-prefix table slot holds.
    pub const fn unpacked(slot: u64) -> Self {
        let mut sources = [0; PREFIX_SLOTS];
        let mut at = 0;
        while at < PREFIX_SLOTS {
            sources[at] = v4_long_source(slot, at);
            at += 1;
        }
        Self { sources }
    }
}

pod!(
    V4PrefixKey,
    V6PrefixKey,
    PrefixEntry,
    ListShape,
    V4LongBucket
);

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

    #[test]
    fn long_prefix_slots_keep_key_and_sources_apart() {
        let entry = PrefixEntry {
            sources: [1, 0, 3, 4],
        };
        let slot = v4_long_slot_key(0xcb00_7109, 32) | entry.packed();
        assert_eq!(slot & V4_LONG_KEY_MASK, v4_long_slot_key(0xcb00_7109, 32));
        assert_ne!(
            v4_long_slot_key(0xcb00_7100, 25),
            v4_long_slot_key(0xcb00_7100, 26)
        );
        assert_ne!(v4_long_slot_key(0, 25), 0, "a used slot is never free");
        assert_eq!(PrefixEntry::unpacked(slot), entry);
        assert_eq!(v4_long_source(slot, 2), 3);
    }

    #[test]
    fn long_prefix_buckets_stay_in_the_table_and_spread() {
        let buckets = 1000;
        let mut load = [0u32; 1000];
        for i in 0..8000u32 {
            let (a, b) = v4_long_buckets(0x0a00_0000 + i, 32, buckets);
            assert!(a < buckets && b < buckets);
            load[a as usize] += 1;
            load[b as usize] += 1;
        }
        // 16 per bucket on average: neighbouring addresses must not pile up.
        assert!(load.iter().all(|n| *n < 40), "{:?}", load.iter().max());
        assert_eq!(v4_long_buckets(u32::MAX, 32, 1), (0, 0));
    }

    #[test]
    fn gate_positions_stay_in_the_gate_and_spread_neighbours() {
        let mut bits = [0u32; 4096];
        for (i, bit) in bits.iter_mut().enumerate() {
            let (word, within) = v6_gate_position(0x2001_0db8 + i as u32);
            assert!(word < V6_GATE_WORDS && within < 64);
            *bit = word * 64 + within;
        }
        bits.sort_unstable();
        let distinct = 1 + bits.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(
            distinct > 4000,
            "{distinct} distinct bits for 4096 neighbouring /32s"
        );
        assert!(v6_gate_position(u32::MAX).0 < V6_GATE_WORDS);
    }
}
