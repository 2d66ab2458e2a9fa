//! CIDR list lookups (allowlist, blocklist); the layout is described in `agent_common::lists`.

use agent_common::lists::{
    ListShape, MAX_V6_LENGTHS, PREFIX_SLOTS, PrefixEntry, TABLE_HAS_LONGER, TABLE_SOURCE_MASK,
    V4_LONG_KEY_MASK, V4_LONG_MIN_PREFIX, V4PrefixKey, V6_GATE_PREFIX, V6PrefixKey, table_position,
    v4_long_buckets, v4_long_slot_key, v4_long_source, v6_gate_position,
};
use aya_ebpf::maps::Array;

use crate::{
    maps::{V4_LONG, V4_LONG_BUCKETS, V4_LONG_STASH, V6_GATE, V6_PREFIXES},
    packet::Address,
    subprograms,
};

/// One list in one generation: its generation's /24 table and its nibble there, and its slot in
/// the shared prefix stores. Maps
/// are reached through functions of a type, not through references stored in data: the
/// verifier only accepts a map pointer that the code itself loads, and a table of references
/// would be read from .rodata as a plain number.
pub trait CidrMaps {
    /// This list's slot in a `PrefixEntry` (`agent_common::lists::prefix_slot`).
    const SLOT: usize;
    /// This list's nibble in a /24 table byte (`agent_common::lists::table_shift`).
    const TABLE_SHIFT: u32;
    fn v4_table() -> &'static Array<u64>;
}

/// The source of the list's entry in a shared IPv6 hash entry, if the list holds it.
#[inline(always)]
fn held<M: CidrMaps>(entry: &PrefixEntry) -> Option<u32> {
    let source = entry.sources[M::SLOT];
    (source != 0).then(|| u32::from(source) - 1)
}

/// The source of the entry of list `M` that covers `source`, if any.
#[inline(always)]
pub fn lookup<M: CidrMaps>(shape: &ListShape, source: &Address) -> Option<u32> {
    match source {
        Address::V4(addr) => lookup_v4::<M>(shape, *addr),
        Address::V6(addr) => lookup_v6::<M>(shape, addr),
    }
}

#[inline(always)]
fn lookup_v4<M: CidrMaps>(shape: &ListShape, addr: [u8; 4]) -> Option<u32> {
    if shape.v4_present == 0 {
        return None;
    }
    let (index, byte) = table_position(addr);
    let word = *M::v4_table().get(index)?;
    let entry = (word >> (byte * 8 + M::TABLE_SHIFT)) as u8;
    let covering = entry & TABLE_SOURCE_MASK;
    if covering != 0 {
        return Some(u32::from(covering) - 1);
    }
    if entry & TABLE_HAS_LONGER == 0 || shape.v4_long_lengths == 0 {
        return None;
    }
    let found = subprograms::v4_long(u32::from_be_bytes(addr), shape.v4_long_lengths, M::SLOT);
    found.checked_sub(1)
}

/// The source + 1 of the longest prefix that covers `host`, among the lengths /25–/32 of
/// `lengths` (bit `n`: /25 + n), held by the list and generation of `prefix_slot`; 0 if none.
/// Run as a global function (see `subprograms`): verified once, not per list and generation;
/// each length's probe of the table is one more (verified once, not once per length).
#[inline(always)]
pub fn v4_long_held(host: u32, lengths: u32, prefix_slot: u32) -> u32 {
    let prefix_slot = prefix_slot as usize & (PREFIX_SLOTS - 1);
    for prefix_len in (V4_LONG_MIN_PREFIX..=32).rev() {
        if lengths & (1 << (prefix_len - V4_LONG_MIN_PREFIX)) == 0 {
            continue;
        }
        let addr = host & (u32::MAX << (32 - prefix_len));
        let held = match subprograms::v4_long_probe(addr, prefix_len) {
            PROBE_ABSENT => 0,
            PROBE_BOTH_FULL => {
                let key = V4PrefixKey {
                    prefix_len,
                    addr: addr.to_be_bytes(),
                };
                // SAFETY: entries are replaced whole by the agent; a byte read cannot tear.
                unsafe { V4_LONG_STASH.get(key) }
                    .and_then(|entry| entry.sources.get(prefix_slot).copied())
                    .unwrap_or(0)
            }
            slot => v4_long_source(slot, prefix_slot),
        };
        if held != 0 {
            return u32::from(held);
        }
    }
    0
}

/// [`v4_long_probe`]: the prefix is nowhere (one of its buckets has a free slot, and the agent
/// stashes a prefix only while both are full).
pub const PROBE_ABSENT: u64 = 0;
/// [`v4_long_probe`]: the prefix is not in the table and both its buckets are full: it may be
/// in the stash. (No slot reads so: a slot's length byte is at most 32.)
pub const PROBE_BOTH_FULL: u64 = u64::MAX;

/// The slot of the prefix `addr`/`prefix_len` in the IPv4 table, or [`PROBE_ABSENT`], or
/// [`PROBE_BOTH_FULL`]. Run as a global function (see `subprograms`).
#[inline(always)]
pub fn v4_long_probe(addr: u32, prefix_len: u32) -> u64 {
    let wanted = v4_long_slot_key(addr, prefix_len);
    let (first, second) = v4_long_buckets(addr, prefix_len, V4_LONG_BUCKETS.load());
    let mut free = false;
    for index in [first, second] {
        // Always there (the index is below the table's size); a miss would mean no prefix.
        let Some(bucket) = V4_LONG.get(index) else {
            return PROBE_ABSENT;
        };
        for &slot in &bucket.slots {
            if slot & V4_LONG_KEY_MASK == wanted {
                return slot;
            }
            free |= slot == 0;
        }
    }
    if free { PROBE_ABSENT } else { PROBE_BOTH_FULL }
}

#[inline(always)]
fn lookup_v6<M: CidrMaps>(shape: &ListShape, addr: &[u8; 16]) -> Option<u32> {
    // Lengths are longest first: the gate is asked once, only when the list has lengths past
    // /32 (an empty list's first length is 0), and a closed gate skips straight to /32.
    let first = if u32::from(shape.v6_lengths[0]) <= V6_GATE_PREFIX || gate_open(addr) {
        0
    } else {
        shape.v6_short_from
    };
    if first >= shape.v6_length_count {
        return None;
    }
    // A no-op (the count is at most 16) that bounds the index for the verifier: LLVM adds it
    // to the array's address before the loop's own check.
    const _: () = assert!(MAX_V6_LENGTHS.is_power_of_two());
    let first = first & (MAX_V6_LENGTHS as u32 - 1);
    for i in 0..MAX_V6_LENGTHS as u32 {
        let at = first + i;
        if at >= shape.v6_length_count {
            break;
        }
        let Some(&prefix_len) = shape.v6_lengths.get(at as usize) else {
            break;
        };
        let prefix_len = u32::from(prefix_len);
        let key = V6PrefixKey {
            prefix_len,
            addr: mask_v6(addr, prefix_len),
        };
        // SAFETY: as above.
        if let Some(source) = unsafe { V6_PREFIXES.get(key) }.and_then(held::<M>) {
            return Some(source);
        }
    }
    None
}

/// Whether a prefix longer than /32 may cover `addr` (see `agent_common::lists::V6_GATE_WORDS`).
#[inline(always)]
fn gate_open(addr: &[u8; 16]) -> bool {
    let (index, bit) = v6_gate_position(u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]));
    // A missing word cannot happen (the index is in range); probing is the safe answer.
    V6_GATE
        .get(index)
        .is_none_or(|word| word & (1u64 << bit) != 0)
}

/// `addr` with every bit past `prefix_len` cleared. Two 64-bit halves and no per-byte
/// branches: each branch here multiplies the states the verifier walks.
#[inline(always)]
pub fn mask_v6(addr: &[u8; 16], prefix_len: u32) -> [u8; 16] {
    let (high, low) = addr.split_at(8);
    let high = u64::from_be_bytes(high.try_into().unwrap_or_default());
    let low = u64::from_be_bytes(low.try_into().unwrap_or_default());
    let len = prefix_len.min(128);
    let mut masked = [0u8; 16];
    masked[..8].copy_from_slice(&(high & leading_ones(len)).to_be_bytes());
    masked[8..].copy_from_slice(&(low & leading_ones(len.saturating_sub(64))).to_be_bytes());
    masked
}

/// A u64 whose top `n` bits are set (all of them for n >= 64).
#[inline(always)]
fn leading_ones(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { !(u64::MAX >> n) }
}
