//! The IPv4 long-prefix table (`agent_common::lists`): buckets of one-word slots that the agent
//! fills through a mapping of the array, and the stash, a small kernel hash for the prefixes
//! whose two buckets were both full. A million prefixes are a million word stores, not a
//! million kernel inserts, and cost 8 bytes each in the kernel, not a hash element and a bucket.
//!
//! What the program relies on, kept here:
//! - a slot changes with one atomic store, from free to a prefix, between two values of the same
//!   prefix, or from a prefix no list holds to free or to another prefix;
//! - a prefix is in the stash only while both its buckets are full. A slot of a bucket that a
//!   stashed prefix has as a candidate is never freed: when its prefix goes, a stashed prefix
//!   takes the slot in the same store, and leaves the stash a grace period later (a packet that
//!   read the bucket before the store, and the stash after, still finds it).

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::{AtomicU64, Ordering},
};

use agent_common::{
    lists::{
        PrefixEntry, V4_LONG_BUCKET_SLOTS, V4_LONG_KEY_MASK, V4LongBucket, V4PrefixKey,
        v4_long_buckets, v4_long_slot_key,
    },
    maps,
};
use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData, MapError};

use super::{
    lists::ListError,
    live::GRACE_PERIOD,
    map_source::{MapSource, Named, ResolveError, named},
    mapped_array::MmapArray,
};

/// The table and its stash. Only this module reads or writes them.
pub struct V4LongTable {
    table: MmapArray,
    buckets: u32,
    stash: Named<BpfHashMap<MapData, V4PrefixKey, PrefixEntry>>,
    stashed: Stashed,
}

impl V4LongTable {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        let table = MmapArray::resolve(source, maps::V4_LONG)?;
        let buckets = table.elements().map_err(|source| ResolveError::Handle {
            map: maps::V4_LONG,
            source,
        })?;
        Ok(Self {
            table,
            buckets,
            stash: Named::resolve(source, maps::V4_LONG_STASH)?,
            stashed: Stashed::default(),
        })
    }

    /// Writes each entry: in place where the prefix is, in a free slot of the emptier of its
    /// buckets, or in the stash; entries no list of any generation holds are removed (first, so
    /// that their room serves the new ones). Keys must be distinct.
    pub fn write(&mut self, entries: &[(V4PrefixKey, PrefixEntry)]) -> Result<(), ListError> {
        let bytes = self.buckets as usize * size_of::<V4LongBucket>();
        let Self {
            table,
            buckets,
            stash,
            stashed,
        } = self;
        let mut kernel = KernelStash(stash);
        let mut moved = Vec::new();
        let written = table.with_words(bytes, |words| {
            let mut placing = Placing {
                words,
                buckets: *buckets,
                stashed,
                kernel: &mut kernel,
                moved: &mut moved,
            };
            let (unused, used): (Vec<_>, Vec<_>) =
                entries.iter().partition(|(_, entry)| entry.is_unused());
            for &(key, _) in unused {
                placing.remove(&key)?;
            }
            for &(key, entry) in used {
                placing.upsert(&key, &entry)?;
            }
            Ok(())
        });
        // Prefixes moved into the table leave the stash once no packet can be between the two
        // (also after a failed write: the table's copy is the one the program reads).
        if !moved.is_empty() {
            std::thread::sleep(GRACE_PERIOD);
            for key in &moved {
                kernel.remove(key)?;
            }
        }
        written?
    }

    /// Every prefix of the table and the stash, as they are now. A prefix found in both (a
    /// move interrupted by a failed system call) keeps the table's entry, which the program
    /// reads first, and leaves the stash; what the agent knows of the stash is read again.
    pub fn read_all(&mut self) -> Result<BTreeMap<V4PrefixKey, PrefixEntry>, ListError> {
        let bytes = self.buckets as usize * size_of::<V4LongBucket>();
        let mut all: BTreeMap<V4PrefixKey, PrefixEntry> =
            self.table.with_words(bytes, |words| {
                words
                    .iter()
                    .map(|word| word.load(Ordering::Relaxed))
                    .filter(|slot| *slot != 0)
                    .map(|slot| (slot_prefix(slot), PrefixEntry::unpacked(slot)))
                    .collect()
            })?;
        let in_stash: Vec<(V4PrefixKey, PrefixEntry)> = self
            .stash
            .map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(named(self.stash.name))?;
        let mut stashed = Stashed::default();
        for (key, entry) in in_stash {
            if all.contains_key(&key) {
                self.stash.remove_if_present(&key)?;
                continue;
            }
            let (first, second) = buckets_of(&key, self.buckets);
            stashed.add(key, entry, first, second);
            all.insert(key, entry);
        }
        self.stashed = stashed;
        Ok(all)
    }
}

/// The kernel's side of the stash (a trait, so that placement is tested without a kernel).
trait StashMap {
    fn insert(&mut self, key: &V4PrefixKey, entry: &PrefixEntry) -> Result<(), ListError>;
    fn remove(&mut self, key: &V4PrefixKey) -> Result<(), ListError>;
}

struct KernelStash<'a>(&'a mut Named<BpfHashMap<MapData, V4PrefixKey, PrefixEntry>>);

impl StashMap for KernelStash<'_> {
    fn insert(&mut self, key: &V4PrefixKey, entry: &PrefixEntry) -> Result<(), ListError> {
        let name = self.0.name;
        match self.0.map.insert(key, entry, 0) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                Err(ListError::V4StashFull {
                    capacity: self.0.map.map().info().map_or(0, |info| info.max_entries()),
                })
            }
            inserted => Ok(inserted.map_err(named(name))?),
        }
    }

    fn remove(&mut self, key: &V4PrefixKey) -> Result<(), ListError> {
        Ok(self.0.remove_if_present(key)?)
    }
}

/// What the stash holds, and which stashed prefixes have each bucket as a candidate.
#[derive(Default)]
struct Stashed {
    entries: BTreeMap<V4PrefixKey, PrefixEntry>,
    by_bucket: HashMap<u32, Vec<V4PrefixKey>>,
}

impl Stashed {
    fn add(&mut self, key: V4PrefixKey, entry: PrefixEntry, first: u32, second: u32) {
        self.entries.insert(key, entry);
        self.by_bucket.entry(first).or_default().push(key);
        if second != first {
            self.by_bucket.entry(second).or_default().push(key);
        }
    }

    fn forget(&mut self, key: &V4PrefixKey, buckets: u32) {
        self.entries.remove(key);
        let (first, second) = buckets_of(key, buckets);
        for bucket in [first, second] {
            if let Some(keys) = self.by_bucket.get_mut(&bucket) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_bucket.remove(&bucket);
                }
            }
        }
    }

    /// A stashed prefix with `bucket` as a candidate, if any.
    fn waiting_for(&self, bucket: u32) -> Option<(V4PrefixKey, PrefixEntry)> {
        let key = *self.by_bucket.get(&bucket)?.first()?;
        Some((key, *self.entries.get(&key)?))
    }
}

/// One write's view of the mapped table.
struct Placing<'a, S> {
    words: &'a [AtomicU64],
    buckets: u32,
    stashed: &'a mut Stashed,
    kernel: &'a mut S,
    /// Stashed prefixes moved into the table, to leave the kernel's stash after a grace period.
    moved: &'a mut Vec<V4PrefixKey>,
}

impl<S: StashMap> Placing<'_, S> {
    fn upsert(&mut self, key: &V4PrefixKey, entry: &PrefixEntry) -> Result<(), ListError> {
        let wanted = key_bits(key);
        let slot = wanted | entry.packed();
        let (first, second) = buckets_of(key, self.buckets);
        if let Some(at) = self.find(wanted, first, second) {
            self.words[at].store(slot, Ordering::Release);
            return Ok(());
        }
        if self.stashed.entries.contains_key(key) {
            self.kernel.insert(key, entry)?;
            self.stashed.entries.insert(*key, *entry);
            return Ok(());
        }
        let at = match (self.free_in(first), self.free_in(second)) {
            (Some((a, used_a)), Some((b, used_b))) => {
                if used_b < used_a {
                    b
                } else {
                    a
                }
            }
            (Some((a, _)), None) => a,
            (None, Some((b, _))) => b,
            (None, None) => {
                self.kernel.insert(key, entry)?;
                self.stashed.add(*key, *entry, first, second);
                return Ok(());
            }
        };
        self.words[at].store(slot, Ordering::Release);
        Ok(())
    }

    fn remove(&mut self, key: &V4PrefixKey) -> Result<(), ListError> {
        let (first, second) = buckets_of(key, self.buckets);
        if let Some(at) = self.find(key_bits(key), first, second) {
            let bucket = (at / V4_LONG_BUCKET_SLOTS) as u32;
            match self.stashed.waiting_for(bucket) {
                // The slot never reads free while a stashed prefix counts on its bucket being
                // full: the stashed prefix takes it, then leaves the stash.
                Some((moved, entry)) => {
                    self.words[at].store(key_bits(&moved) | entry.packed(), Ordering::Release);
                    self.stashed.forget(&moved, self.buckets);
                    self.moved.push(moved);
                }
                None => self.words[at].store(0, Ordering::Release),
            }
            return Ok(());
        }
        if self.stashed.entries.contains_key(key) {
            self.stashed.forget(key, self.buckets);
            self.kernel.remove(key)?;
        }
        Ok(())
    }

    /// The word index of the prefix whose key bits are `wanted`, in either bucket.
    fn find(&self, wanted: u64, first: u32, second: u32) -> Option<usize> {
        [first, second]
            .into_iter()
            .flat_map(|bucket| self.slots_of(bucket))
            .find(|at| self.words[*at].load(Ordering::Relaxed) & V4_LONG_KEY_MASK == wanted)
    }

    /// A free slot of `bucket` and how many of its slots are used.
    fn free_in(&self, bucket: u32) -> Option<(usize, usize)> {
        let mut free = None;
        let mut used = 0;
        for at in self.slots_of(bucket) {
            if self.words[at].load(Ordering::Relaxed) == 0 {
                free.get_or_insert(at);
            } else {
                used += 1;
            }
        }
        free.map(|at| (at, used))
    }

    fn slots_of(&self, bucket: u32) -> std::ops::Range<usize> {
        let first = bucket as usize * V4_LONG_BUCKET_SLOTS;
        first..first + V4_LONG_BUCKET_SLOTS
    }
}

fn buckets_of(key: &V4PrefixKey, buckets: u32) -> (u32, u32) {
    v4_long_buckets(u32::from_be_bytes(key.addr), key.prefix_len, buckets)
}

fn key_bits(key: &V4PrefixKey) -> u64 {
    v4_long_slot_key(u32::from_be_bytes(key.addr), key.prefix_len)
}

/// The prefix a used slot holds.
fn slot_prefix(slot: u64) -> V4PrefixKey {
    V4PrefixKey {
        prefix_len: ((slot >> 24) & 0xff) as u32,
        addr: ((slot >> 32) as u32).to_be_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use agent_common::{lists::v4_long_source, maps::V4_LONG_STASH_SHARE};

    use super::*;

    /// The stash as a plain map, for tests.
    #[derive(Default)]
    struct FakeStash(BTreeMap<V4PrefixKey, PrefixEntry>);

    impl StashMap for FakeStash {
        fn insert(&mut self, key: &V4PrefixKey, entry: &PrefixEntry) -> Result<(), ListError> {
            self.0.insert(*key, *entry);
            Ok(())
        }
        fn remove(&mut self, key: &V4PrefixKey) -> Result<(), ListError> {
            self.0.remove(key);
            Ok(())
        }
    }

    /// What the program answers for `key` and list-generation slot 1 (see `agent-ebpf`'s
    /// `lists::probe`): the table, then the stash only when both buckets are full.
    fn program_reads(
        words: &[AtomicU64],
        buckets: u32,
        stash: &FakeStash,
        key: &V4PrefixKey,
    ) -> u8 {
        let (first, second) = buckets_of(key, buckets);
        let mut free = false;
        for bucket in [first, second] {
            for at in 0..V4_LONG_BUCKET_SLOTS {
                let slot =
                    words[bucket as usize * V4_LONG_BUCKET_SLOTS + at].load(Ordering::Relaxed);
                if slot & V4_LONG_KEY_MASK == key_bits(key) {
                    return v4_long_source(slot, 1);
                }
                free |= slot == 0;
            }
        }
        if free {
            0
        } else {
            stash.0.get(key).map_or(0, |entry| entry.sources[1])
        }
    }

    fn host(i: u32) -> V4PrefixKey {
        V4PrefixKey {
            prefix_len: 32,
            addr: (0x0a00_0000 + i * 7).to_be_bytes(),
        }
    }

    fn held(source: u8) -> PrefixEntry {
        PrefixEntry {
            sources: [0, source, 0, 0],
        }
    }

    /// A table filled past full into its stash, emptied and refilled in a seeded order: after
    /// every step the program's reading of every prefix is what was written, and the stash
    /// holds only prefixes whose buckets are both full.
    #[test]
    fn every_prefix_reads_back_while_the_table_fills_and_empties() {
        const BUCKETS: u32 = 16;
        let words: Vec<AtomicU64> = (0..BUCKETS as usize * V4_LONG_BUCKET_SLOTS)
            .map(|_| AtomicU64::new(0))
            .collect();
        let mut stashed = Stashed::default();
        let mut kernel = FakeStash::default();
        let mut model: BTreeMap<V4PrefixKey, u8> = BTreeMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut stashed_at_most = 0;
        let mut stashed_after_emptying = usize::MAX;
        for round in 0..3000 {
            let key = host((next() % 160) as u32);
            let mut moved = Vec::new();
            let mut placing = Placing {
                words: &words,
                buckets: BUCKETS,
                stashed: &mut stashed,
                kernel: &mut kernel,
                moved: &mut moved,
            };
            // Fill for a while, then mostly empty, then fill again.
            let removing = (1000..2000).contains(&round) && next() % 4 != 0;
            if removing {
                placing.remove(&key).expect("removed");
                model.remove(&key);
            } else {
                let source = (next() % 3 + 1) as u8;
                placing.upsert(&key, &held(source)).expect("written");
                model.insert(key, source);
            }
            // Before and after the moved prefixes' grace period, every prefix reads right.
            for grace_over in [false, true] {
                if grace_over {
                    for key in &moved {
                        kernel.remove(key).expect("removed");
                    }
                }
                for i in 0..160 {
                    let key = host(i);
                    let expected = model.get(&key).copied().unwrap_or(0);
                    assert_eq!(
                        program_reads(&words, BUCKETS, &kernel, &key),
                        expected,
                        "round {round}, prefix {i}, grace over: {grace_over}"
                    );
                }
            }
            stashed_at_most = stashed_at_most.max(kernel.0.len());
            if round == 1999 {
                stashed_after_emptying = kernel.0.len();
            }
            assert_eq!(
                kernel.0.keys().collect::<BTreeSet<_>>(),
                stashed.entries.keys().collect::<BTreeSet<_>>()
            );
        }
        assert!(
            stashed_at_most > 10,
            "the stash was used: {stashed_at_most}"
        );
        assert!(
            stashed_after_emptying < stashed_at_most / 2,
            "and emptied as slots freed: {stashed_after_emptying} of {stashed_at_most}"
        );
    }

    /// A table filled to every slot of its room: the stash holds what did not fit, well within
    /// its share (`V4_LONG_STASH_SHARE`) of the room.
    #[test]
    fn a_full_table_stashes_less_than_the_stash_holds() {
        const BUCKETS: u32 = 8192;
        let room = BUCKETS as usize * V4_LONG_BUCKET_SLOTS;
        let words: Vec<AtomicU64> = (0..room).map(|_| AtomicU64::new(0)).collect();
        let (mut stashed, mut kernel, mut moved) =
            (Stashed::default(), FakeStash::default(), Vec::new());
        let mut placing = Placing {
            words: &words,
            buckets: BUCKETS,
            stashed: &mut stashed,
            kernel: &mut kernel,
            moved: &mut moved,
        };
        for i in 0..room as u32 {
            let key = V4PrefixKey {
                prefix_len: 32,
                addr: (0xc000_0000 + i).to_be_bytes(),
            };
            placing.upsert(&key, &held(1)).expect("written");
        }
        let share = room / V4_LONG_STASH_SHARE as usize;
        assert!(
            kernel.0.len() < share / 2,
            "{} stashed of {room}, the stash holds {share}",
            kernel.0.len()
        );
    }

    #[test]
    fn slots_read_back_as_their_prefix() {
        let key = V4PrefixKey {
            prefix_len: 27,
            addr: [203, 0, 113, 96],
        };
        let slot = key_bits(&key) | held(2).packed();
        assert_eq!(slot_prefix(slot), key);
        assert_eq!(PrefixEntry::unpacked(slot), held(2));
    }
}
