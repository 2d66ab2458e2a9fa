//! CIDR list lookups (allowlist, blocklist); the layout is described in `agent_common::lists`.

use agent_common::lists::{
    ListEntry, ListShape, MAX_V6_LENGTHS, TABLE_HAS_LONGER, TABLE_SOURCE_MASK, V4_LONG_MIN_PREFIX,
    V4PrefixKey, V6PrefixKey, table_position,
};
use aya_ebpf::maps::{Array, HashMap};

use crate::packet::Source;

/// The maps of one list in one generation. Maps are reached through functions of a type, not
/// through references stored in data: the verifier only accepts a map pointer that the code
/// itself loads, and a table of references would be read from .rodata as a plain number.
pub trait CidrMaps {
    fn v4_table() -> &'static Array<u64>;
    fn v4_long() -> &'static HashMap<V4PrefixKey, ListEntry>;
    fn v6() -> &'static HashMap<V6PrefixKey, ListEntry>;
}

/// The source of the entry of list `M` that covers `source`, if any.
#[inline(always)]
pub fn lookup<M: CidrMaps>(shape: &ListShape, source: &Source) -> Option<u32> {
    match source {
        Source::V4(addr) => lookup_v4::<M>(shape, *addr),
        Source::V6(addr) => lookup_v6::<M>(shape, addr),
    }
}

#[inline(always)]
fn lookup_v4<M: CidrMaps>(shape: &ListShape, addr: [u8; 4]) -> Option<u32> {
    if shape.v4_present == 0 {
        return None;
    }
    let (index, byte) = table_position(addr);
    let word = *M::v4_table().get(index)?;
    let entry = (word >> (byte * 8)) as u8;
    let covering = entry & TABLE_SOURCE_MASK;
    if covering != 0 {
        return Some(u32::from(covering) - 1);
    }
    if entry & TABLE_HAS_LONGER == 0 || shape.v4_long_lengths == 0 {
        return None;
    }
    let host = u32::from_be_bytes(addr);
    for prefix_len in (V4_LONG_MIN_PREFIX..=32).rev() {
        if shape.v4_long_lengths & (1 << (prefix_len - V4_LONG_MIN_PREFIX)) == 0 {
            continue;
        }
        let key = V4PrefixKey {
            prefix_len,
            addr: (host & (u32::MAX << (32 - prefix_len))).to_be_bytes(),
        };
        // SAFETY: entries are replaced whole by the agent; a u32 read cannot tear.
        if let Some(entry) = unsafe { M::v4_long().get(key) } {
            return Some(entry.source);
        }
    }
    None
}

#[inline(always)]
fn lookup_v6<M: CidrMaps>(shape: &ListShape, addr: &[u8; 16]) -> Option<u32> {
    for i in 0..MAX_V6_LENGTHS {
        if i as u32 >= shape.v6_length_count {
            break;
        }
        let prefix_len = u32::from(shape.v6_lengths[i]);
        let key = V6PrefixKey {
            prefix_len,
            addr: mask_v6(addr, prefix_len),
        };
        // SAFETY: as above.
        if let Some(entry) = unsafe { M::v6().get(key) } {
            return Some(entry.source);
        }
    }
    None
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
