//! CIDR lists → the kernel's list maps, in the layout `agent_common::lists` describes: a byte per
//! IPv4 /24 (per generation, a nibble per list), and a table of longer IPv4 prefixes
//! ([`super::v4_long_table`]) and a hash of IPv6 prefixes that both lists and both generations
//! share.

use std::collections::{BTreeMap, BTreeSet};

use agent_common::{
    lists::{
        LIST_ALLOW, LIST_BLOCK, ListShape, MAX_V6_LENGTHS, PrefixEntry, TABLE_HAS_LONGER,
        TABLE_SOURCE_MASK, V4_LONG_MIN_PREFIX, V4_TABLE_LEN, V4PrefixKey, V6_GATE_PREFIX,
        V6PrefixKey, prefix_slot, table_shift,
    },
    maps::{self, GENERATIONS},
};
use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData, MapError},
    sys::SyscallError,
};
use ipnet::{IpNet, Ipv4Net};

use super::{
    map_batch,
    map_source::{MapAccessError, MapSource, Named, ResolveError, named},
    mapped_array::MmapArray,
    v4_long_table::V4LongTable,
};
use crate::config::{Cidr, ListEntries, ListKind};

/// Bytes of the IPv4 /24 table: one per /24.
const V4_TABLE_BYTES: usize = V4_TABLE_LEN as usize * 8;

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(
        "the {list} holds {count} distinct IPv6 prefix lengths ({lengths}); at most {MAX_V6_LENGTHS} are supported"
    )]
    TooManyV6Lengths {
        list: &'static str,
        count: usize,
        lengths: String,
    },
    #[error(
        "the stash of the IPv4 long-prefix table is full ({capacity} prefixes whose two buckets \
         are both full); raise runtime_entries and restart moat to make the table larger"
    )]
    V4StashFull { capacity: u32 },
    #[error(transparent)]
    Access(#[from] MapAccessError),
}

/// One generation's /24 table, both lists' (a nibble each). Only this module writes it.
pub struct V4Table {
    table: MmapArray,
}

/// A list's entries and the change just applied to them.
pub type Changed<'a> = (&'a ListEntries, &'a ListChange);

impl V4Table {
    pub fn resolve(source: &mut MapSource, generation: usize) -> Result<Self, ResolveError> {
        Ok(Self {
            table: MmapArray::resolve(source, maps::V4_TABLE[generation])?,
        })
    }

    /// Writes both lists' compiled tables whole.
    pub fn install(&mut self, allow: &CompiledList, block: &CompiledList) -> Result<(), ListError> {
        debug_assert!(allow.kind == ListKind::Allow && block.kind == ListKind::Block);
        Ok(self.table.write(V4_TABLE_BYTES, |table| {
            merge_tables(table, &allow.table, &block.table)
        })?)
    }

    /// Writes the lists' changes into a table that held the lists before them; the entries
    /// are each list with its change applied. Each byte is written whole, from both lists.
    pub fn write_change(
        &mut self,
        allow: Changed<'_>,
        block: Changed<'_>,
    ) -> Result<(), ListError> {
        let mut slash24s: Vec<std::ops::Range<u32>> = [allow.1, block.1]
            .into_iter()
            .flat_map(ListChange::cidrs)
            .map(slash24s_of)
            .filter(|r| !r.is_empty())
            .collect();
        if slash24s.is_empty() {
            return Ok(());
        }
        slash24s.sort_by_key(|r| r.start);
        let both = (allow.0, block.0);
        let touched: usize = slash24s.iter().map(ExactSizeIterator::len).sum();
        if touched <= TABLE_WORDS_THRESHOLD {
            // A few words, set by index: mapping the 16 MiB table for them costs more than the
            // change.
            self.table.set(&table_words(both, &slash24s))?;
            return Ok(());
        }
        if touched > TABLE_REBUILD_THRESHOLD {
            let (allow, block) = (compile_table(both.0), compile_table(both.1));
            self.table.write(V4_TABLE_BYTES, |mapped| {
                merge_tables(mapped, &allow, &block)
            })?;
            return Ok(());
        }
        self.table.write(V4_TABLE_BYTES, |table| {
            let mut done = 0u32;
            for range in slash24s {
                for slash24 in range.start.max(done)..range.end {
                    table[slash24 as usize] = table_byte(both, slash24);
                }
                done = done.max(range.end);
            }
        })?;
        Ok(())
    }
}

/// `table` made of the allowlist's and the blocklist's compiled tables, each in its nibble.
fn merge_tables(table: &mut [u8], allow: &[u8], block: &[u8]) {
    let (allow_shift, block_shift) = (table_shift(LIST_ALLOW), table_shift(LIST_BLOCK));
    for ((byte, allow), block) in table.iter_mut().zip(allow).zip(block) {
        *byte = allow << allow_shift | block << block_shift;
    }
}

/// What each generation's lists hold, as the long-prefix stores are written: (allowlist, blocklist)
/// per generation.
pub type Holdings<'a> = [(&'a ListEntries, &'a ListEntries); GENERATIONS];

/// The long-prefix stores both lists and both generations share (see `agent_common::lists`):
/// the IPv4 table and the IPv6 hash. Only this module reads or writes them.
pub struct LongPrefixes {
    v4_long: V4LongTable,
    v6: PrefixHash<V6PrefixKey>,
}

/// A hash of prefixes.
type PrefixHash<K> = Named<HashMap<MapData, K, PrefixEntry>>;
/// Entries of a prefix hash, as the map holds them.
type HashEntries<K> = Vec<(K, PrefixEntry)>;

impl<K: Pod + Ord + Sync> PrefixHash<K> {
    fn insert_all(&mut self, entries: &[(K, PrefixEntry)]) -> Result<(), ListError> {
        map_batch::update(self.map.map(), entries).map_err(|io_error| {
            named(self.name)(MapError::SyscallError(SyscallError {
                call: "BPF_MAP_UPDATE_BATCH",
                io_error,
            }))
        })?;
        Ok(())
    }

    /// Writes each entry, removing those no list of any generation holds any more (first, so
    /// that their room serves the new ones).
    fn write(&mut self, entries: HashEntries<K>) -> Result<(), ListError> {
        let (unused, used): (Vec<_>, Vec<_>) = entries
            .into_iter()
            .partition(|(_, entry)| entry.is_unused());
        for (key, _) in unused {
            self.remove_if_present(&key)?;
        }
        self.insert_all(&used)
    }

    /// Every entry of the map, as it is now.
    fn read_all(&self) -> Result<BTreeMap<K, PrefixEntry>, ListError> {
        Ok(self
            .map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(named(self.name))?)
    }
}

impl LongPrefixes {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            v4_long: V4LongTable::resolve(source)?,
            v6: PrefixHash::resolve(source, maps::V6_PREFIXES)?,
        })
    }

    /// Fills stores that are empty (a fresh load) with what every generation holds.
    pub fn install(&mut self, holdings: Holdings<'_>) -> Result<(), ListError> {
        let (allow, block) = holdings[0];
        let cidrs = merged(in_hashes(allow.keys()), in_hashes(block.keys()));
        let (v4, v6) = prefix_entries(&cidrs, holdings);
        self.v4_long.write(&v4)?;
        self.v6.insert_all(&v6)
    }

    /// Writes the entries of `cidrs` as `holdings` say every generation holds them. Only the
    /// slots of a generation whose holdings differ from what the maps hold change, so packets
    /// deciding with another generation see nothing move.
    pub fn write(
        &mut self,
        cidrs: impl IntoIterator<Item = Cidr>,
        holdings: Holdings<'_>,
    ) -> Result<(), ListError> {
        let mut cidrs: Vec<Cidr> = in_hashes(cidrs.into_iter()).collect();
        cidrs.sort_unstable();
        cidrs.dedup();
        let (v4, v6) = prefix_entries(&cidrs, holdings);
        self.v4_long.write(&v4)?;
        self.v6.write(v6)
    }

    /// Makes `generation`'s slots of every entry what `allow` and `block` hold, whatever they
    /// held (after a failed write left them unknown), leaving the other generation's slots as
    /// they are: a walk of the whole stores, for that rare case only.
    pub fn rebuild(
        &mut self,
        generation: usize,
        allow: &ListEntries,
        block: &ListEntries,
    ) -> Result<(), ListError> {
        let set = |entry: &mut PrefixEntry, cidr: &Cidr| {
            for (list, entries) in [(LIST_ALLOW, allow), (LIST_BLOCK, block)] {
                entry.sources[prefix_slot(generation, list)] = slot_value(entries, cidr);
            }
        };
        let mut v4 = self.v4_long.read_all()?;
        let mut v6 = self.v6.read_all()?;
        for (key, entry) in &mut v4 {
            set(entry, &v4_cidr(key));
        }
        for (key, entry) in &mut v6 {
            set(entry, &v6_cidr(key));
        }
        for cidr in in_hashes(allow.keys().chain(block.keys())) {
            match cidr.net() {
                IpNet::V4(net) => set(v4.entry(v4_key(&net)).or_default(), &cidr),
                IpNet::V6(net) => set(v6.entry(v6_key(&net)).or_default(), &cidr),
            }
        }
        self.v4_long.write(&v4.into_iter().collect::<Vec<_>>())?;
        self.v6.write(v6.into_iter().collect())
    }
}

/// A slot's value for `cidr` in `entries`: its source + 1, or 0 when the list does not hold it.
fn slot_value(entries: &ListEntries, cidr: &Cidr) -> u8 {
    entries.get(cidr).map_or(0, |source| *source as u8 + 1)
}

/// The CIDRs that live in the long-prefix stores (IPv4 prefixes longer than /24 and IPv6 prefixes;
/// shorter IPv4 prefixes live in the /24 tables).
fn in_hashes(cidrs: impl Iterator<Item = Cidr>) -> impl Iterator<Item = Cidr> {
    cidrs.filter(|cidr| match cidr.net() {
        IpNet::V4(net) => u32::from(net.prefix_len()) >= V4_LONG_MIN_PREFIX,
        IpNet::V6(_) => true,
    })
}

/// Two sorted sequences of CIDRs merged into one, sorted, without repeats.
fn merged(a: impl Iterator<Item = Cidr>, b: impl Iterator<Item = Cidr>) -> Vec<Cidr> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    let mut out = Vec::new();
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x < y => a.next(),
            (Some(x), Some(y)) if y < x => b.next(),
            (Some(_), Some(_)) => {
                b.next();
                a.next()
            }
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(cidr) => out.push(cidr),
            None => return out,
        }
    }
}

/// The slot values (source + 1, or 0) of `cidrs` (sorted, no repeats) in `entries`: one
/// lookup each when they are few beside the list, else one walk of both (a lookup searches
/// a tree and a bucket; a walk's step is a copy).
fn slot_values(entries: &ListEntries, cidrs: &[Cidr]) -> Vec<u8> {
    if cidrs.len().saturating_mul(16) < entries.len() {
        return cidrs.iter().map(|cidr| slot_value(entries, cidr)).collect();
    }
    let mut walk = entries.iter().peekable();
    cidrs
        .iter()
        .map(|cidr| {
            while walk.next_if(|(held, _)| held < cidr).is_some() {}
            match walk.peek() {
                Some((held, source)) if held == cidr => **source as u8 + 1,
                _ => 0,
            }
        })
        .collect()
}

/// The hash entries of `cidrs` (sorted, no repeats, all of them hash-bound: see [`in_hashes`])
/// as `holdings` say each generation's lists hold them.
fn prefix_entries(
    cidrs: &[Cidr],
    holdings: Holdings<'_>,
) -> (HashEntries<V4PrefixKey>, HashEntries<V6PrefixKey>) {
    let mut entries = vec![PrefixEntry::default(); cidrs.len()];
    // Generations often hold the same list (the same map, by address: the policy's own list,
    // or the in-force subset taken for a change): its values are computed once.
    let mut computed: Vec<(*const ListEntries, Vec<u8>)> = Vec::new();
    for (generation, (allow, block)) in holdings.iter().enumerate() {
        for (list, held) in [(LIST_ALLOW, *allow), (LIST_BLOCK, *block)] {
            let key: *const ListEntries = held;
            let at = match computed.iter().position(|(k, _)| *k == key) {
                Some(at) => at,
                None => {
                    computed.push((key, slot_values(held, cidrs)));
                    computed.len() - 1
                }
            };
            let slot = prefix_slot(generation, list);
            for (entry, value) in entries.iter_mut().zip(&computed[at].1) {
                entry.sources[slot] = *value;
            }
        }
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for (cidr, entry) in cidrs.iter().zip(entries) {
        match cidr.net() {
            IpNet::V4(net) => v4.push((v4_key(&net), entry)),
            IpNet::V6(net) => v6.push((v6_key(&net), entry)),
        }
    }
    (v4, v6)
}

/// A list compiled to what its nibbles of a /24 table hold, and the shape the program probes.
pub struct CompiledList {
    kind: ListKind,
    /// One nibble per /24, a byte each (see `agent_common::lists`).
    pub table: Vec<u8>,
    pub shape: ListShape,
}

impl CompiledList {
    pub fn compile(kind: ListKind, entries: &ListEntries) -> Result<Self, ListError> {
        Ok(Self {
            kind,
            shape: ListCounts::of(entries).shape(kind)?,
            table: compile_table(entries),
        })
    }
}

/// The nibbles of `entries` in the IPv4 /24 table: a byte per /24 (see `agent_common::lists`).
fn compile_table(entries: &ListEntries) -> Vec<u8> {
    let mut table = vec![0u8; V4_TABLE_BYTES];
    // A /24 covered by several entries keeps the source of the shortest, as `table_byte` does:
    // in address order the shortest covering entry comes first, and marked bytes stay.
    for (cidr, &source) in entries.iter() {
        let IpNet::V4(net) = cidr.net() else { continue };
        let prefix_len = u32::from(net.prefix_len());
        let slash24 = (u32::from(net.network()) >> 8) as usize;
        if prefix_len < V4_LONG_MIN_PREFIX {
            let covered = 1usize << (24 - prefix_len);
            let marker = (source as u8 + 1) & TABLE_SOURCE_MASK;
            for byte in &mut table[slash24..slash24 + covered] {
                if *byte & TABLE_SOURCE_MASK == 0 {
                    *byte |= marker;
                }
            }
        } else {
            table[slash24] |= TABLE_HAS_LONGER;
        }
    }
    table
}

/// The table byte of /24 number `slash24` for (allowlist, blocklist): each list's nibble.
fn table_byte((allow, block): (&ListEntries, &ListEntries), slash24: u32) -> u8 {
    list_nibble(allow, slash24) << table_shift(LIST_ALLOW)
        | list_nibble(block, slash24) << table_shift(LIST_BLOCK)
}

/// A list's nibble of the byte of /24 number `slash24`: the source of an entry of /24 or
/// shorter that covers it, and whether a longer entry lies inside it.
fn list_nibble(entries: &ListEntries, slash24: u32) -> u8 {
    let base = slash24 << 8;
    let mut byte = 0;
    for prefix_len in 0..=24u8 {
        let network = if prefix_len == 0 {
            0
        } else {
            base & (u32::MAX << (32 - u32::from(prefix_len)))
        };
        if let Some(source) = Ipv4Net::new(network.into(), prefix_len)
            .ok()
            .and_then(|net| entries.get(&Cidr::from(IpNet::V4(net))))
        {
            byte = (*source as u8 + 1) & TABLE_SOURCE_MASK;
            break;
        }
    }
    let first = Cidr::from(IpNet::V4(Ipv4Net::new(base.into(), 25).unwrap_or_default()));
    let last = Cidr::from(IpNet::V4(
        Ipv4Net::new((base | 0xff).into(), 32).unwrap_or_default(),
    ));
    if entries.range(first..=last).next().is_some() {
        byte |= TABLE_HAS_LONGER;
    }
    byte
}

/// The words of the /24 table (index, value) that hold the /24s of `slash24s`, each recomputed
/// whole for both lists: word `n` holds /24s `8n` to `8n + 7`, the first in its lowest byte (what
/// the program reads with `table_position`).
fn table_words(
    lists: (&ListEntries, &ListEntries),
    slash24s: &[std::ops::Range<u32>],
) -> Vec<(u32, u64)> {
    let mut words: Vec<u32> = slash24s
        .iter()
        .filter(|range| !range.is_empty())
        .flat_map(|range| range.start / 8..=(range.end - 1) / 8)
        .collect();
    // Ranges may nest (a /16 and a /32 in it): sort before dropping repeats.
    words.sort_unstable();
    words.dedup();
    words
        .into_iter()
        .map(|word| {
            let value = (0..8).fold(0u64, |value, byte| {
                value | u64::from(table_byte(lists, word * 8 + byte)) << (8 * byte)
            });
            (word, value)
        })
        .collect()
}

/// The /24s whose table byte depends on `cidr`.
fn slash24s_of(cidr: &Cidr) -> std::ops::Range<u32> {
    match cidr.net() {
        IpNet::V4(net) => {
            let first = u32::from(net.network()) >> 8;
            let count = 1u32 << 24u32.saturating_sub(u32::from(net.prefix_len()));
            first..first + count
        }
        IpNet::V6(_) => 0..0,
    }
}

/// A change to one list: entries to insert or re-source, entries to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListChange {
    pub upserts: Vec<(Cidr, u32)>,
    pub removals: Vec<Cidr>,
}

impl ListChange {
    /// What turns `old` into `new`.
    pub fn between(old: &ListEntries, new: &ListEntries) -> Self {
        Self {
            upserts: new
                .iter()
                .filter(|(c, s)| old.get(c) != Some(s))
                .map(|(c, s)| (c, *s))
                .collect(),
            removals: old.keys().filter(|c| !new.contains_key(c)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }

    /// How many CIDRs the change names (as `cidrs` counts them).
    pub fn len(&self) -> usize {
        self.upserts.len() + self.removals.len()
    }

    /// Every CIDR the change names, upserted or removed.
    pub fn cidrs(&self) -> impl Iterator<Item = &Cidr> {
        (self.upserts.iter().map(|(cidr, _)| cidr)).chain(&self.removals)
    }

    /// What `entries` holds of `cidrs`.
    pub fn subset_of<'a>(
        entries: &ListEntries,
        cidrs: impl Iterator<Item = &'a Cidr>,
    ) -> ListEntries {
        cidrs
            .filter_map(|cidr| Some((*cidr, *entries.get(cidr)?)))
            .collect()
    }

    /// Applies the change to `entries` and returns the change that undoes it.
    pub fn apply_to(&self, entries: &mut ListEntries) -> Self {
        let mut undo = Self::default();
        for cidr in &self.removals {
            if let Some(source) = entries.remove(cidr) {
                undo.upserts.push((*cidr, source));
            }
        }
        // A CIDR upserted twice is recorded once, as it was before the first.
        let ordered = strictly_ordered(self.upserts.iter().map(|(cidr, _)| cidr));
        if ordered {
            let mut replaced = Vec::new();
            entries.upsert_sorted(self.upserts.iter().copied(), |cidr, old| {
                replaced.push((cidr, old));
            });
            // Every upsert not replacing an entry added one.
            let mut replaced = replaced.into_iter().peekable();
            for (cidr, _) in &self.upserts {
                match replaced.next_if(|(at, _)| at == cidr) {
                    Some(old) => undo.upserts.push(old),
                    None => undo.removals.push(*cidr),
                }
            }
            return undo;
        }
        let mut upserted = BTreeSet::new();
        for (cidr, source) in &self.upserts {
            let old = entries.insert(*cidr, *source);
            if !ordered && !upserted.insert(*cidr) {
                continue;
            }
            match old {
                Some(old) => undo.upserts.push((*cidr, old)),
                None => undo.removals.push(*cidr),
            }
        }
        undo
    }
}

/// How many entries of each kind a list holds, kept up to date change by change so that a
/// small change to a large list is validated without walking the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListCounts {
    /// Entries per IPv4 prefix length /25–/32.
    v4_long: [u32; 8],
    /// Entries per IPv6 prefix length /0–/128 (an array: counting a million entries at start-up
    /// is one pass).
    v6: [u32; 129],
    /// Entries of /24 or shorter.
    v4_short: u32,
}

impl Default for ListCounts {
    fn default() -> Self {
        Self {
            v4_long: [0; 8],
            v6: [0; 129],
            v4_short: 0,
        }
    }
}

impl ListCounts {
    pub fn of(entries: &ListEntries) -> Self {
        let mut counts = Self::default();
        for cidr in entries.keys() {
            counts.add(&cidr, 1);
        }
        counts
    }

    /// Counts after `change` is applied to `entries` (which it is not yet), and the counts of
    /// the entries it brings that `entries` does not hold (what the shared stores hold beside
    /// the old entries until both generations have the change).
    pub fn after(&self, entries: &ListEntries, change: &ListChange) -> (Self, Self) {
        let mut counts = self.clone();
        let mut new = Self::default();
        // Changes usually name each CIDR once, in order (an import of a million): then no set
        // is needed to count each once.
        // (`binary_search` below relies on the removals being in `Cidr`'s own order.)
        let removals_ordered = strictly_ordered(change.removals.iter());
        let upserts_ordered = strictly_ordered(change.upserts.iter().map(|(cidr, _)| cidr));
        let mut removed = BTreeSet::new();
        for cidr in &change.removals {
            if entries.contains_key(cidr) && (removals_ordered || removed.insert(*cidr)) {
                counts.add(cidr, -1);
            }
        }
        let was_removed = |cidr: &Cidr| {
            if removals_ordered {
                change.removals.binary_search(cidr).is_ok()
            } else {
                removed.contains(cidr)
            }
        };
        let mut added = BTreeSet::new();
        for (cidr, _) in &change.upserts {
            let held = entries.contains_key(cidr);
            if (!held || was_removed(cidr)) && (upserts_ordered || added.insert(*cidr)) {
                counts.add(cidr, 1);
                if !held {
                    new.add(cidr, 1);
                }
            }
        }
        (counts, new)
    }

    fn add(&mut self, cidr: &Cidr, delta: i64) {
        let bump = |n: &mut u32| *n = (i64::from(*n) + delta).max(0) as u32;
        match cidr.net() {
            IpNet::V4(net) if u32::from(net.prefix_len()) >= V4_LONG_MIN_PREFIX => {
                bump(&mut self.v4_long[(u32::from(net.prefix_len()) - V4_LONG_MIN_PREFIX) as usize])
            }
            IpNet::V4(_) => bump(&mut self.v4_short),
            IpNet::V6(net) => bump(&mut self.v6[usize::from(net.prefix_len().min(128))]),
        }
    }

    /// Entries of IPv4 prefixes longer than /24 (in the shared table).
    pub fn v4_long(&self) -> usize {
        self.v4_long.iter().map(|n| *n as usize).sum()
    }

    /// Entries of IPv6 prefixes (in the shared hash).
    pub fn v6(&self) -> usize {
        self.v6.iter().map(|n| *n as usize).sum()
    }

    pub fn total(&self) -> usize {
        self.v4_short as usize + self.v4_long() + self.v6()
    }

    /// The shape the program probes; an error when IPv6 needs more probes than allowed.
    pub fn shape(&self, list: ListKind) -> Result<ListShape, ListError> {
        let mut shape = ListShape {
            v4_present: u32::from(self.v4_short != 0 || self.v4_long() != 0),
            ..ListShape::default()
        };
        for (bit, count) in self.v4_long.iter().enumerate() {
            if *count != 0 {
                shape.v4_long_lengths |= 1 << bit;
            }
        }
        // Longest first: the most specific entry is found first.
        let lengths: Vec<u8> = (0..=128u8)
            .rev()
            .filter(|len| self.v6[usize::from(*len)] != 0)
            .collect();
        if lengths.len() > MAX_V6_LENGTHS {
            return Err(ListError::TooManyV6Lengths {
                list: list.name(),
                count: lengths.len(),
                lengths: (lengths.iter().rev())
                    .map(|l| format!("/{l}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            });
        }
        shape.v6_lengths[..lengths.len()].copy_from_slice(&lengths);
        shape.v6_length_count = lengths.len() as u32;
        shape.v6_short_from = lengths
            .iter()
            .filter(|len| u32::from(**len) > V6_GATE_PREFIX)
            .count() as u32;
        Ok(shape)
    }
}

/// Whether each CIDR is greater than the one before (so none repeats).
fn strictly_ordered<'a>(mut cidrs: impl Iterator<Item = &'a Cidr>) -> bool {
    let mut last = None;
    cidrs.all(|cidr| last.replace(cidr).is_none_or(|last| last < cidr))
}

/// Up to this many /24s touched, the IPv4 table's words that hold them are set one by one
/// rather than through a mapping of the whole table.
const TABLE_WORDS_THRESHOLD: usize = 64;

/// Above this many /24s touched, the IPv4 table is recomputed whole (one pass over the list)
/// rather than /24 by /24.
const TABLE_REBUILD_THRESHOLD: usize = 1 << 16;

fn v4_key(net: &Ipv4Net) -> V4PrefixKey {
    V4PrefixKey {
        prefix_len: u32::from(net.prefix_len()),
        addr: net.network().octets(),
    }
}

fn v6_key(net: &ipnet::Ipv6Net) -> V6PrefixKey {
    V6PrefixKey {
        prefix_len: u32::from(net.prefix_len()),
        addr: net.network().octets(),
    }
}

/// The CIDR of a key read back from the map (keys are written host bits zero, lengths in range;
/// anything else reads as a CIDR that no list holds, so its slots clear).
fn v4_cidr(key: &V4PrefixKey) -> Cidr {
    let net = Ipv4Net::new(key.addr.into(), key.prefix_len.min(32) as u8).unwrap_or_default();
    Cidr::from(IpNet::V4(net))
}

fn v6_cidr(key: &V6PrefixKey) -> Cidr {
    let net =
        ipnet::Ipv6Net::new(key.addr.into(), key.prefix_len.min(128) as u8).unwrap_or_default();
    Cidr::from(IpNet::V6(net))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::lists::{SOURCE_CLI, SOURCE_CONFIG, SOURCE_FILE, table_position};

    fn entries(list: &[(&str, u32)]) -> ListEntries {
        list.iter()
            .map(|(c, s)| (c.parse().expect("test CIDR"), *s))
            .collect()
    }

    fn table_byte(list: &CompiledList, addr: [u8; 4]) -> u8 {
        let (word, byte) = table_position(addr);
        list.table[word as usize * 8 + byte as usize]
    }

    #[test]
    fn short_prefixes_fill_the_table() {
        let list = CompiledList::compile(
            ListKind::Block,
            &entries(&[
                ("10.0.0.0/8", SOURCE_FILE),
                ("198.51.100.0/24", SOURCE_CONFIG),
            ]),
        )
        .expect("compiles");
        assert_eq!(table_byte(&list, [10, 0, 0, 1]), SOURCE_FILE as u8 + 1);
        assert_eq!(
            table_byte(&list, [10, 255, 255, 255]),
            SOURCE_FILE as u8 + 1
        );
        assert_eq!(table_byte(&list, [11, 0, 0, 0]), 0);
        assert_eq!(table_byte(&list, [9, 255, 255, 255]), 0);
        assert_eq!(
            table_byte(&list, [198, 51, 100, 7]),
            SOURCE_CONFIG as u8 + 1
        );
        assert_eq!(table_byte(&list, [198, 51, 101, 7]), 0);
        assert_eq!(list.shape.v4_long_lengths, 0);
        assert_eq!(list.shape.v6_length_count, 0);
        assert_eq!(
            list.table.iter().filter(|b| **b != 0).count(),
            (1 << 16) + 1
        );
    }

    #[test]
    fn long_prefixes_go_to_the_hash_and_flag_their_slash24() {
        let list = CompiledList::compile(
            ListKind::Block,
            &entries(&[
                ("203.0.113.9/32", SOURCE_CONFIG),
                ("203.0.113.128/25", SOURCE_CONFIG),
            ]),
        )
        .expect("compiles");
        assert_eq!(table_byte(&list, [203, 0, 113, 1]), TABLE_HAS_LONGER);
        assert_eq!(list.shape.v4_long_lengths, 1 << 7 | 1 << 0);
    }

    #[test]
    fn a_prefix_entry_says_which_list_of_which_generation_holds_it() {
        let none = ListEntries::new();
        let allow = entries(&[("203.0.113.9/32", SOURCE_CLI)]);
        let old_block = entries(&[
            ("203.0.113.9/32", SOURCE_CONFIG),
            ("2001:db8::1", SOURCE_FILE),
            ("10.0.0.0/8", SOURCE_FILE),
        ]);
        let new_block = entries(&[("2001:db8::1", SOURCE_FILE), ("10.0.0.0/8", SOURCE_FILE)]);
        let cidrs: Vec<Cidr> = ["203.0.113.9/32", "2001:db8::1", "10.0.0.0/8"]
            .iter()
            .map(|c| c.parse().expect("CIDR"))
            .collect();
        let mut hashed: Vec<Cidr> = in_hashes(cidrs.into_iter()).collect();
        hashed.sort_unstable();
        assert_eq!(hashed.len(), 2, "a /8 lives in the /24 tables only");
        // Generation 0 holds the old blocklist, generation 1 the new one and an allowlist.
        let (v4, v6) = prefix_entries(&hashed, [(&none, &old_block), (&allow, &new_block)]);
        let slot = |source: u32| source as u8 + 1;
        assert_eq!(
            v4,
            vec![(
                V4PrefixKey {
                    prefix_len: 32,
                    addr: [203, 0, 113, 9]
                },
                PrefixEntry {
                    sources: [0, slot(SOURCE_CONFIG), slot(SOURCE_CLI), 0]
                }
            )]
        );
        assert_eq!(v6.len(), 1);
        assert_eq!(
            v6[0].1.sources,
            [0, slot(SOURCE_FILE), 0, slot(SOURCE_FILE)]
        );
        let (gone, _) = prefix_entries(&hashed[..1], [(&none, &none), (&none, &none)]);
        assert!(gone[0].1.is_unused(), "held by no list: the entry goes");
    }

    #[test]
    fn undoing_a_change_restores_the_list_even_when_it_names_a_cidr_twice() {
        let original = entries(&[("192.0.2.1", SOURCE_CONFIG), ("192.0.2.2", SOURCE_FILE)]);
        let cidr = |c: &str| -> Cidr { c.parse().expect("CIDR") };
        let change = ListChange {
            upserts: vec![
                (cidr("192.0.2.9"), SOURCE_CLI),
                (cidr("192.0.2.1"), SOURCE_CLI),
                (cidr("192.0.2.9"), SOURCE_FILE),
                (cidr("192.0.2.1"), SOURCE_FILE),
                (cidr("192.0.2.2"), SOURCE_CLI),
            ],
            removals: vec![cidr("192.0.2.2"), cidr("192.0.2.2")],
        };
        let mut list = original.clone();
        let undo = change.apply_to(&mut list);
        assert_eq!(list.get(&cidr("192.0.2.9")), Some(&SOURCE_FILE));
        undo.apply_to(&mut list);
        assert_eq!(list, original);
    }

    #[test]
    fn slot_values_by_walk_and_by_lookup_agree() {
        let list: ListEntries = (0..200u32)
            .map(|i| {
                let cidr = format!("192.0.2.{i}/32").parse().expect("CIDR");
                (cidr, i % 3)
            })
            .collect();
        let wanted: Vec<Cidr> = (0..400u32)
            .step_by(7)
            .map(|i| {
                format!("192.0.{}.{}/32", 2 + i / 256, i % 256)
                    .parse()
                    .expect("CIDR")
            })
            .collect();
        let walked = slot_values(&list, &wanted);
        let looked_up: Vec<u8> = wanted.iter().map(|c| slot_value(&list, c)).collect();
        assert_eq!(walked, looked_up);
        assert!(walked.contains(&0) && walked.contains(&3), "{walked:?}");
        assert_eq!(slot_values(&list, &wanted[..1]), looked_up[..1]);
    }

    #[test]
    fn merging_keeps_order_and_drops_repeats() {
        let cidrs: Vec<Cidr> = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1"]
            .iter()
            .map(|c| c.parse().expect("CIDR"))
            .collect();
        let a = [cidrs[0], cidrs[2], cidrs[3]];
        let b = [cidrs[1], cidrs[2]];
        assert_eq!(merged(a.into_iter(), b.into_iter()), cidrs);
        assert_eq!(merged(b.into_iter(), [].into_iter()), b.to_vec());
    }

    #[test]
    fn a_change_counts_only_the_entries_it_adds() {
        let list = entries(&[("192.0.2.1", SOURCE_CONFIG), ("2001:db8::1", SOURCE_CONFIG)]);
        let change = ListChange {
            upserts: vec![
                ("192.0.2.1".parse().expect("CIDR"), SOURCE_CLI),
                ("192.0.2.2".parse().expect("CIDR"), SOURCE_CLI),
                ("192.0.2.2".parse().expect("CIDR"), SOURCE_CLI),
                ("2001:db8::2".parse().expect("CIDR"), SOURCE_CLI),
            ],
            removals: vec!["2001:db8::1".parse().expect("CIDR")],
        };
        let (after, added) = ListCounts::of(&list).after(&list, &change);
        assert_eq!((after.v4_long(), after.v6()), (2, 1));
        assert_eq!((added.v4_long(), added.v6()), (1, 1));
        // The same change in order and without the repeat (no sets needed) counts the same.
        let mut ordered = change.clone();
        ordered.upserts.sort();
        ordered.upserts.dedup();
        assert!(strictly_ordered(ordered.upserts.iter().map(|(c, _)| c)));
        assert!(!strictly_ordered(change.upserts.iter().map(|(c, _)| c)));
        assert_eq!(ListCounts::of(&list).after(&list, &ordered), (after, added));
        assert_eq!(
            ListChange::subset_of(&list, change.cidrs()).len(),
            2,
            "the re-sourced and the removed"
        );
    }

    #[test]
    fn ipv6_lengths_are_listed_longest_first() {
        let list = CompiledList::compile(
            ListKind::Block,
            &entries(&[
                ("2001:db8::/32", SOURCE_CONFIG),
                ("2001:db8:bad::/48", SOURCE_CONFIG),
                ("2001:db8::1", SOURCE_CONFIG),
            ]),
        )
        .expect("compiles");
        assert_eq!(list.shape.v6_length_count, 3);
        assert_eq!(&list.shape.v6_lengths[..3], &[128, 48, 32]);
        assert_eq!(list.shape.v6_short_from, 2, "the gate skips to /32");
        assert_eq!(
            list.shape.v4_present, 0,
            "no IPv4 entry: the /24 table is skipped"
        );
    }

    /// Both lists compiled and merged, as `V4Table::install` writes them.
    fn installed(allow: &ListEntries, block: &ListEntries) -> Vec<u8> {
        let allow = CompiledList::compile(ListKind::Allow, allow).expect("compiles");
        let block = CompiledList::compile(ListKind::Block, block).expect("compiles");
        let mut table = vec![0; V4_TABLE_BYTES];
        merge_tables(&mut table, &allow.table, &block.table);
        table
    }

    #[test]
    fn table_words_set_by_index_match_the_compiled_tables() {
        let allow = entries(&[("192.0.2.0/24", SOURCE_CLI), ("198.51.103.9", SOURCE_FILE)]);
        let block = entries(&[
            ("10.0.0.0/8", SOURCE_CONFIG),
            ("192.0.2.77", SOURCE_FILE),
            ("192.0.2.128/25", SOURCE_CONFIG),
            ("198.51.100.0/24", SOURCE_FILE),
            ("198.51.103.1", SOURCE_CONFIG),
        ]);
        let table = installed(&allow, &block);
        let ranges: Vec<_> = (allow.keys().chain(block.keys()))
            .filter(|c| c.net().prefix_len() >= 16)
            .map(|c| slash24s_of(&c))
            .collect();
        let words = table_words((&allow, &block), &ranges);
        assert!(!words.is_empty());
        assert!(
            words.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no repeats"
        );
        for (word, value) in words {
            let at = word as usize * 8;
            let bytes: [u8; 8] = table[at..at + 8].try_into().expect("8 bytes");
            assert_eq!(value, u64::from_le_bytes(bytes), "word {word}");
        }
        // Both lists' nibbles are in one byte.
        let (word, byte) = table_position([192, 0, 2, 77]);
        let both = table[word as usize * 8 + byte as usize];
        assert_eq!(both & 0x0f, SOURCE_CLI as u8 + 1, "the allowlist's /24");
        assert_eq!(both >> 4, TABLE_HAS_LONGER, "the blocklist's host in it");
    }

    #[test]
    fn any_ipv4_entry_makes_the_program_read_the_table() {
        for cidr in ["10.0.0.0/8", "192.0.2.1"] {
            let list = CompiledList::compile(ListKind::Allow, &entries(&[(cidr, SOURCE_CONFIG)]))
                .expect("compiles");
            assert_eq!(list.shape.v4_present, 1, "{cidr}");
        }
        let empty = CompiledList::compile(ListKind::Allow, &entries(&[])).expect("compiles");
        assert_eq!(empty.shape.v4_present, 0);
    }

    #[test]
    fn too_many_ipv6_lengths_is_an_error() {
        let many: Vec<(String, u32)> = (20..=40)
            .map(|len| (format!("::/{len}"), SOURCE_CONFIG))
            .collect();
        let list: ListEntries = many
            .iter()
            .map(|(c, s)| (c.parse().expect("CIDR"), *s))
            .collect();
        let e = CompiledList::compile(ListKind::Allow, &list)
            .err()
            .expect("too many lengths");
        assert!(
            e.to_string().contains("21 distinct IPv6 prefix lengths"),
            "{e}"
        );
    }

    #[test]
    fn table_bytes_recomputed_one_by_one_match_the_compiled_tables() {
        let allow = entries(&[("10.1.3.0/24", SOURCE_CLI), ("192.0.2.9", SOURCE_CONFIG)]);
        let block = entries(&[
            ("10.0.0.0/8", SOURCE_FILE),
            ("10.1.2.0/24", SOURCE_CONFIG),
            ("10.1.2.128/25", SOURCE_CONFIG),
            ("10.1.3.7/32", SOURCE_CONFIG),
            ("192.0.2.0/23", SOURCE_CONFIG),
            ("198.51.100.64/26", SOURCE_FILE),
            ("0.0.0.0/7", SOURCE_CONFIG),
        ]);
        let table = installed(&allow, &block);
        for addr in [
            [10, 1, 2, 9],
            [10, 1, 3, 0],
            [10, 200, 0, 0],
            [11, 0, 0, 0],
            [192, 0, 2, 0],
            [192, 0, 3, 0],
            [192, 0, 4, 0],
            [198, 51, 100, 0],
            [1, 2, 3, 4],
            [2, 0, 0, 0],
        ] {
            let slash24 = u32::from_be_bytes(addr) >> 8;
            assert_eq!(
                super::table_byte((&allow, &block), slash24),
                table[slash24 as usize],
                "/24 of {addr:?}"
            );
        }
    }
}
