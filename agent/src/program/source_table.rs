//! The rate limiter's per-source table as the agent sees it: `RATE_LIMITS`, an array of
//! [`RateSlot`]s in which a source may sit in either of two slots, and `RATE_TABLE`, the seed
//! and size that say which two (see `agent_common::rate_limit::RateTable`). The program claims
//! slots as sources arrive; the agent reads them for `moat top` and counts, and writes a ban's
//! copy or clears a source, choosing slots exactly as the program does.

use std::sync::atomic::Ordering;

use agent_common::{
    maps,
    rate_limit::{RateSlot, RateState, RateTable, SourceKey},
};
use aya::maps::{Array, IterableMap as _, Map, MapData};

use super::{
    map_source::{self, MapAccessError, MapSource, Named, ResolveError, named},
    mapped_array,
};

const SLOT_WORDS: usize = size_of::<RateSlot>() / size_of::<u64>();
const _: () = assert!(size_of::<RateSlot>() == SLOT_WORDS * size_of::<u64>());

pub struct SourceTable {
    slots: Named<Array<MapData, RateSlot>>,
    table: Named<Array<MapData, RateTable>>,
    /// `RATE_TABLE`'s value, read when the maps were resolved (set once, at load).
    shape: RateTable,
}

impl SourceTable {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        let table: Named<Array<MapData, RateTable>> = Named::resolve(source, maps::RATE_TABLE)?;
        let shape = table
            .map
            .get(&0, 0)
            .map_err(|source| ResolveError::Handle {
                map: maps::RATE_TABLE,
                source,
            })?;
        Ok(Self {
            slots: Named::resolve(source, maps::RATE_LIMITS)?,
            table,
            shape,
        })
    }

    /// Gives a freshly loaded table its shape: the size of the array (a power of two, as the
    /// loader sizes it), and a seed from the kernel's random pool.
    pub fn init(&mut self) -> Result<(), MapAccessError> {
        let slots = self.slots.map.len();
        if !slots.is_power_of_two() {
            return Err(MapAccessError::NotPowerOfTwo {
                map: self.slots.name,
                slots,
            });
        }
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most the 8 bytes of a valid buffer.
        let filled = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        if filled != seed.len() as isize {
            return Err(MapAccessError::Seed {
                map: self.table.name,
                source: std::io::Error::last_os_error(),
            });
        }
        let shape = RateTable {
            seed: u64::from_ne_bytes(seed),
            mask: slots - 1,
            _pad: 0,
        };
        self.table
            .map
            .set(0, shape, 0)
            .map_err(named(self.table.name))?;
        self.shape = shape;
        Ok(())
    }

    /// A second handle on the same maps, for walks on another thread.
    pub fn reopen(&self) -> Result<Self, MapAccessError> {
        fn reopen<V: aya::Pod>(
            name: &'static str,
            map: &MapData,
        ) -> Result<Array<MapData, V>, MapAccessError> {
            map_source::duplicate(map)
                .and_then(Map::from_map_data)
                .and_then(Array::try_from)
                .map_err(named(name))
        }
        Ok(Self {
            slots: Named {
                name: self.slots.name,
                map: reopen(self.slots.name, self.slots.map.map())?,
            },
            table: Named {
                name: self.table.name,
                map: reopen(self.table.name, self.table.map.map())?,
            },
            shape: self.shape,
        })
    }

    /// The slot that holds `key`, and its content.
    fn find(&self, key: &SourceKey) -> Option<(u32, RateSlot)> {
        self.shape.slots(key).into_iter().find_map(|index| {
            let slot = self.slots.map.get(&index, 0).ok()?;
            (slot.key == *key).then_some((index, slot))
        })
    }

    /// The state of `key`, when the table holds it.
    pub fn get(&self, key: &SourceKey) -> Option<RateState> {
        self.find(key).map(|(_, slot)| slot.state)
    }

    /// Whether `state`'s ban copy holds for `key` (the program writes the key's hash beside it).
    pub fn ban_copy_holds(&self, key: &SourceKey, state: &RateState, now_ns: u64) -> bool {
        state.banned_until > now_ns && state.banned_key == self.shape.hash(key)
    }

    /// Sets the state of `key`: in its slot, or in the one the program would claim for it. A
    /// ban's copy in it is tagged as the key's, as the program tags it. Not atomic with the
    /// program's claims: for maps not attached yet (restore), or for tests.
    pub fn set(&mut self, key: &SourceKey, mut state: RateState) -> Result<(), MapAccessError> {
        if state.banned_until != 0 {
            state.banned_key = self.shape.hash(key);
        }
        let index = match self.find(key) {
            Some((index, _)) => index,
            None => {
                let [first, second] = self.shape.slots(key);
                let activity = |index| {
                    self.slots
                        .map
                        .get(&index, 0)
                        .map(|slot: RateSlot| slot.activity())
                        .map_err(named(self.slots.name))
                };
                if activity(second)? < activity(first)? {
                    second
                } else {
                    first
                }
            }
        };
        let slot = RateSlot {
            key: *key,
            _pad: 0,
            state,
        };
        self.slots
            .map
            .set(index, slot, 0)
            .map_err(named(self.slots.name))
    }

    /// Empties the slot of `key`; a source the table does not hold is not an error.
    pub fn remove(&mut self, key: &SourceKey) -> Result<(), MapAccessError> {
        match self.find(key) {
            Some((index, _)) => self
                .slots
                .map
                .set(index, RateSlot::default(), 0)
                .map_err(named(self.slots.name)),
            None => Ok(()),
        }
    }

    /// Calls `f` on every occupied slot until it returns false, through a read-only mapping
    /// of the whole array (a million slots are 88 MB of memory reads, not a million system
    /// calls). Slots the program rewrites meanwhile may be read torn: a walk is a snapshot of
    /// counters, not a record.
    pub fn walk(&self, mut f: impl FnMut(&SourceKey, &RateState) -> bool) -> std::io::Result<()> {
        let slots = self.slots.map.len() as usize;
        mapped_array::read_words(
            self.slots.map.map(),
            slots * size_of::<RateSlot>(),
            |words| {
                for slot in words.chunks_exact(SLOT_WORDS) {
                    let mut copy = [0u64; SLOT_WORDS];
                    for (word, value) in copy.iter_mut().zip(slot) {
                        *word = value.load(Ordering::Relaxed);
                    }
                    // SAFETY: RateSlot is #[repr(C)] integers with explicit padding, the size of
                    // the copy (checked above): any bits are a valid value.
                    let slot = unsafe { std::mem::transmute::<[u64; SLOT_WORDS], RateSlot>(copy) };
                    if slot.key.family != 0 && !f(&slot.key, &slot.state) {
                        break;
                    }
                }
            },
        )
    }
}
