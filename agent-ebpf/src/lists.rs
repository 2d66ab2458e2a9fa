//! CIDR list lookups (allowlist, blocklist); the layout is described in `agent_common::lists`.

use agent_common::lists::{
    ListEntry, ListShape, MAX_V6_LENGTHS, TABLE_HAS_LONGER, TABLE_SOURCE_MASK, V4_LONG_MIN_PREFIX,
    V4PrefixKey, V6PrefixKey, table_position,
};
use aya_ebpf::maps::{Array, HashMap};

use crate::{
    maps::{ALLOW_V4_LONG, ALLOW_V4_TABLE, ALLOW_V6, BLOCK_V4_LONG, BLOCK_V4_TABLE, BLOCK_V6},
    packet::Source,
};

/// The maps of one list.
pub struct CidrList {
    v4_table: &'static Array<u64>,
    v4_long: &'static HashMap<V4PrefixKey, ListEntry>,
    v6: &'static HashMap<V6PrefixKey, ListEntry>,
}

pub static ALLOWLIST: CidrList = CidrList {
    v4_table: &ALLOW_V4_TABLE,
    v4_long: &ALLOW_V4_LONG,
    v6: &ALLOW_V6,
};

pub static BLOCKLIST: CidrList = CidrList {
    v4_table: &BLOCK_V4_TABLE,
    v4_long: &BLOCK_V4_LONG,
    v6: &BLOCK_V6,
};

impl CidrList {
    /// The source of the entry that covers `source`, if any.
    #[inline(always)]
    pub fn lookup(&self, shape: &ListShape, source: &Source) -> Option<u32> {
        match source {
            Source::V4(addr) => self.lookup_v4(shape, *addr),
            Source::V6(addr) => self.lookup_v6(shape, addr),
        }
    }

    #[inline(always)]
    fn lookup_v4(&self, shape: &ListShape, addr: [u8; 4]) -> Option<u32> {
        let (index, byte) = table_position(addr);
        let word = *self.v4_table.get(index)?;
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
            if let Some(entry) = unsafe { self.v4_long.get(key) } {
                return Some(entry.source);
            }
        }
        None
    }

    #[inline(always)]
    fn lookup_v6(&self, shape: &ListShape, addr: &[u8; 16]) -> Option<u32> {
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
            if let Some(entry) = unsafe { self.v6.get(key) } {
                return Some(entry.source);
            }
        }
        None
    }
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
