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
    /// [`RateTable::hash`] of the source the ban's copy is for: the copy holds only for it. A
    /// copy written as another source took the slot (CPUs race) bans no one.
    pub banned_key: u64,
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

impl SourceKey {
    /// The key as five words, for hashing and comparing without a byte loop.
    #[inline(always)]
    pub const fn words(&self) -> [u32; 5] {
        // SAFETY: #[repr(C)], 4-aligned, 20 bytes of integers: five u32s exactly.
        unsafe { core::ptr::read(core::ptr::from_ref(self).cast::<[u32; 5]>()) }
    }
}

const _: () = assert!(size_of::<SourceKey>() == size_of::<[u32; 5]>());

impl RateState {
    /// The last moment the source was seen to matter: its TATs (at or after its last charged
    /// packet) or its ban's expiry.
    #[inline(always)]
    pub const fn activity(&self) -> u64 {
        let tat = if self.packets_tat > self.bits_tat {
            self.packets_tat
        } else {
            self.bits_tat
        };
        if tat > self.banned_until {
            tat
        } else {
            self.banned_until
        }
    }
}

/// One slot of the per-source table (`RATE_LIMITS`, an array): a source and its limiter state.
/// A slot whose key's family is 0 is empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateSlot {
    /// First: the program's pointer to a slot is then its state's (the verifier refuses an
    /// offset added to a lookup's result before its null check, which LLVM may hoist).
    pub state: RateState,
    pub key: SourceKey,
    pub _pad: u32,
}

impl RateSlot {
    /// Its occupant's [`RateState::activity`]; 0 when empty. A new source takes the less
    /// active of its two slots.
    #[inline(always)]
    pub const fn activity(&self) -> u64 {
        if self.key.family == 0 {
            0
        } else {
            self.state.activity()
        }
    }
}

/// The shape of the per-source table (`RATE_TABLE`), written by the agent at load: a source
/// may sit in either of two slots, from a hash of its key keyed by `seed` (random per load, so
/// that no one outside can aim sources at another's slots).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateTable {
    pub seed: u64,
    /// Slots − 1 (the table has a power of two of them).
    pub mask: u32,
    pub _pad: u32,
}

impl RateTable {
    /// The key's hash under this table's seed.
    #[inline(always)]
    pub const fn hash(&self, key: &SourceKey) -> u64 {
        let w = key.words();
        let mut h = crate::hash::splitmix64(self.seed ^ (w[0] as u64) ^ ((w[1] as u64) << 32));
        h = crate::hash::splitmix64(h ^ (w[2] as u64) ^ ((w[3] as u64) << 32));
        crate::hash::splitmix64(h ^ (w[4] as u64))
    }

    /// The two slots `key` may sit in (equal only in a one-slot table).
    #[inline(always)]
    pub const fn slots(&self, key: &SourceKey) -> [u32; 2] {
        self.slots_of(self.hash(key))
    }

    /// The two slots of a key whose [`Self::hash`] is `h`.
    #[inline(always)]
    pub const fn slots_of(&self, h: u64) -> [u32; 2] {
        let first = h as u32 & self.mask;
        let mut second = (h >> 32) as u32 & self.mask;
        if second == first {
            second = (first ^ 1) & self.mask;
        }
        [first, second]
    }
}

pod!(SourceKey, RateState, Ban, RateSlot, RateTable);

impl crate::settings::RateSettings {
    /// Whether any limit is configured.
    #[inline(always)]
    pub const fn is_on(&self) -> bool {
        self.ns_per_packet != 0 || self.ps_per_byte != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(family: u32, last: u8) -> SourceKey {
        let mut key = SourceKey {
            family,
            addr: [0; 16],
        };
        key.addr[3] = last;
        key
    }

    #[test]
    fn a_source_has_two_distinct_slots_in_the_table_that_the_seed_chooses() {
        let table = RateTable {
            seed: 0x1234_5678,
            mask: 1023,
            _pad: 0,
        };
        let reseeded = RateTable { seed: 99, ..table };
        let mut moved = 0;
        for last in 0..=255 {
            let [first, second] = table.slots(&key(FAMILY_V4, last));
            assert!(first <= table.mask && second <= table.mask);
            assert_ne!(first, second);
            assert_eq!(table.slots(&key(FAMILY_V4, last)), [first, second]);
            moved += usize::from(reseeded.slots(&key(FAMILY_V4, last)) != [first, second]);
        }
        assert!(moved > 250, "the seed moves sources: {moved} of 256");
        assert_ne!(
            table.slots(&key(FAMILY_V4, 1)),
            table.slots(&key(FAMILY_V6, 1)),
            "the family is part of the key"
        );
        let one = RateTable { mask: 0, ..table };
        assert_eq!(one.slots(&key(FAMILY_V4, 1)), [0, 0]);
    }

    #[test]
    fn an_empty_slot_is_the_least_active_and_a_ban_counts_as_activity() {
        let state = RateState {
            packets_tat: 5,
            bits_tat: 7,
            ..RateState::default()
        };
        let slot = RateSlot {
            key: key(FAMILY_V4, 1),
            _pad: 0,
            state,
        };
        assert_eq!(slot.activity(), 7);
        let banned = RateSlot {
            state: RateState {
                banned_until: 100,
                ..state
            },
            ..slot
        };
        assert_eq!(banned.activity(), 100);
        let empty = RateSlot {
            key: SourceKey::default(),
            ..banned
        };
        assert_eq!(empty.activity(), 0);
    }
}
