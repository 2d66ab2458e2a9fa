//! Lists keyed by CIDR, held packed: a list of a million entries is the daemon's largest
//! allocation, and it holds two (the policy's list and the record of run-time entries).
//!
//! IPv4 entries are kept in buckets by the top 16 bits of their address: a sorted slice
//! each, of the rest of the address and the prefix length packed in a `u32` beside the value.
//! With a 4-byte value (a list's source, a run-time entry's terms) an entry costs 8 bytes and a
//! share of its bucket's header, where a B-tree of `Cidr`s (18 bytes each) costs about 25; a
//! change moves at most one bucket's entries. IPv6 entries, fewer in any list, keep a B-tree of
//! `Cidr`s.

use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    ops::{Bound, RangeInclusive},
};

use ipnet::{IpNet, Ipv4Net};

use super::Cidr;

/// Below this many upserts per IPv6 entry held, they are inserted one by one (a merge walks
/// every entry held); above it, merged in one pass and the tree built again: an import of a
/// million entries inserted one by one costs a search from the root each.
const MERGE_FROM: usize = 8;

/// New entries a bucket takes by insertion, each moving the entries after it; more are merged
/// in, which moves each entry once.
const INSERTED_IN_PLACE: usize = 2;

/// An IPv4 entry's place: its bucket (the address's top 16 bits) and its key in the bucket
/// (the low 16 bits, then the prefix length: `Cidr`'s own order).
type V4Place = (u16, u32);

/// A map from CIDRs to `V`, iterated in `Cidr` order (IPv4 first, then by address, then by
/// prefix length).
#[derive(Clone, PartialEq, Eq)]
pub struct CidrMap<V> {
    /// Never an empty bucket.
    v4: BTreeMap<u16, Bucket<V>>,
    v4_len: usize,
    v6: BTreeMap<Cidr, V>,
}

impl<V> Default for CidrMap<V> {
    fn default() -> Self {
        Self {
            v4: BTreeMap::new(),
            v4_len: 0,
            v6: BTreeMap::new(),
        }
    }
}

impl<V: fmt::Debug> fmt::Debug for CidrMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

fn v4_place_of(cidr: &Cidr) -> Option<V4Place> {
    match cidr.net() {
        IpNet::V4(net) => Some(v4_place(&net)),
        IpNet::V6(_) => None,
    }
}

fn v4_place(net: &Ipv4Net) -> V4Place {
    let addr = u32::from(net.addr());
    (
        (addr >> 16) as u16,
        (addr & 0xffff) << 8 | u32::from(net.prefix_len()),
    )
}

/// The CIDR at a place (places are only made from valid CIDRs: a length of at most 32).
fn v4_cidr((bucket, key): V4Place) -> Cidr {
    let addr = u32::from(bucket) << 16 | key >> 8;
    Cidr::from(IpNet::V4(Ipv4Net::new_assert(
        Ipv4Addr::from(addr),
        key as u8,
    )))
}

/// A bucket's entries, sorted by key. A slice, not a vector: no spare room (a vector's would
/// add megabytes over a million entries), and 8 bytes less per bucket; a change reallocates.
type Bucket<V> = Box<[(u32, V)]>;

/// Changes a bucket as a vector.
fn reshape<V, R>(bucket: &mut Bucket<V>, change: impl FnOnce(&mut Vec<(u32, V)>) -> R) -> R {
    let mut entries = std::mem::take(bucket).into_vec();
    let result = change(&mut entries);
    *bucket = entries.into_boxed_slice();
    result
}

/// Where `key` is, or would be inserted, in a bucket.
fn search<V>(bucket: &[(u32, V)], key: u32) -> Result<usize, usize> {
    bucket.binary_search_by_key(&key, |(at, _)| *at)
}

impl<V> CidrMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.v4_len + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, cidr: &Cidr) -> Option<&V> {
        match cidr.net() {
            IpNet::V4(net) => {
                let (bucket, key) = v4_place(&net);
                let bucket = self.v4.get(&bucket)?;
                Some(&bucket[search(bucket, key).ok()?].1)
            }
            IpNet::V6(_) => self.v6.get(cidr),
        }
    }

    pub fn contains_key(&self, cidr: &Cidr) -> bool {
        self.get(cidr).is_some()
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, cidr: Cidr, value: V) -> Option<V> {
        match cidr.net() {
            IpNet::V4(net) => {
                let (bucket, key) = v4_place(&net);
                let bucket = self.v4.entry(bucket).or_default();
                match search(bucket, key) {
                    Ok(at) => Some(std::mem::replace(&mut bucket[at].1, value)),
                    Err(at) => {
                        reshape(bucket, |entries| entries.insert(at, (key, value)));
                        self.v4_len += 1;
                        None
                    }
                }
            }
            IpNet::V6(_) => self.v6.insert(cidr, value),
        }
    }

    /// The value of `cidr`, inserted as `value` when it has none.
    pub fn get_or_insert(&mut self, cidr: Cidr, value: V) -> &mut V {
        match cidr.net() {
            IpNet::V4(net) => {
                let (bucket, key) = v4_place(&net);
                let bucket = self.v4.entry(bucket).or_default();
                let at = search(bucket, key).unwrap_or_else(|at| {
                    reshape(bucket, |entries| entries.insert(at, (key, value)));
                    self.v4_len += 1;
                    at
                });
                &mut bucket[at].1
            }
            IpNet::V6(_) => self.v6.entry(cidr).or_insert(value),
        }
    }

    pub fn remove(&mut self, cidr: &Cidr) -> Option<V> {
        match cidr.net() {
            IpNet::V4(net) => {
                let (place, key) = v4_place(&net);
                let bucket = self.v4.get_mut(&place)?;
                let at = search(bucket, key).ok()?;
                let (_, value) = reshape(bucket, |entries| entries.remove(at));
                if bucket.is_empty() {
                    self.v4.remove(&place);
                }
                self.v4_len -= 1;
                Some(value)
            }
            IpNet::V6(_) => self.v6.remove(cidr),
        }
    }

    /// The entries in `Cidr` order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (Cidr, &V)> {
        let v4 = self.v4.iter().flat_map(|(bucket, entries)| {
            (entries.iter()).map(|(key, value)| (v4_cidr((*bucket, *key)), value))
        });
        v4.chain(self.v6.iter().map(|(cidr, value)| (*cidr, value)))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = Cidr> {
        self.iter().map(|(cidr, _)| cidr)
    }

    /// The entries from `range`'s start to its end, both included, in order.
    pub fn range(&self, range: RangeInclusive<Cidr>) -> impl Iterator<Item = (Cidr, &V)> {
        let (start, end) = range.into_inner();
        debug_assert!(start <= end, "a range from {start} to {end}");
        // IPv4 from the start's place (none when it is IPv6) to the end's (all when IPv6).
        let v4 = v4_place_of(&start)
            .map(|from| (from, v4_place_of(&end).unwrap_or((u16::MAX, u32::MAX))));
        let v4 = v4.into_iter().flat_map(move |(from, to)| {
            (self.v4.range(from.0..=to.0)).flat_map(move |(bucket, entries)| {
                let first = if *bucket == from.0 {
                    entries.partition_point(|(key, _)| *key < from.1)
                } else {
                    0
                };
                let last = if *bucket == to.0 {
                    entries.partition_point(|(key, _)| *key <= to.1)
                } else {
                    entries.len()
                };
                let inside = entries.get(first..last).unwrap_or_default();
                (inside.iter()).map(|(key, value)| (v4_cidr((*bucket, *key)), value))
            })
        });
        let v6 = match (v4_place_of(&start), v4_place_of(&end)) {
            (_, Some(_)) => None,
            (None, None) => Some((Bound::Included(start), Bound::Included(end))),
            (Some(_), None) => Some((Bound::Unbounded, Bound::Included(end))),
        };
        let v6 = v6.into_iter().flat_map(|bounds| self.v6.range(bounds));
        v4.chain(v6.map(|(cidr, value)| (*cidr, value)))
    }

    /// Inserts `upserts`, which must be strictly in `Cidr` order, replacing the values of CIDRs
    /// already held; `replaced` hears of each replaced value, in order.
    pub fn upsert_sorted(
        &mut self,
        upserts: impl ExactSizeIterator<Item = (Cidr, V)>,
        mut replaced: impl FnMut(Cidr, V),
    ) {
        let mut upserts =
            (upserts.map(|(cidr, value)| (v4_place_of(&cidr), cidr, value))).peekable();
        // IPv4 a bucket at a time: the bucket's upserts merged into it.
        while let Some(&(Some((place, _)), ..)) = upserts.peek() {
            let mut group = Vec::new();
            while let Some((Some((_, key)), _, value)) =
                upserts.next_if(|(at, ..)| at.is_some_and(|(bucket, _)| bucket == place))
            {
                group.push((key, value));
            }
            debug_assert!(group.is_sorted_by(|a, b| a.0 < b.0), "upserts in order");
            let bucket = self.v4.entry(place).or_default();
            let before = bucket.len();
            // Replacements in place, in order; what is new goes in after.
            let mut added = Vec::new();
            for (key, value) in group {
                match search(bucket, key) {
                    Ok(at) => replaced(
                        v4_cidr((place, key)),
                        std::mem::replace(&mut bucket[at].1, value),
                    ),
                    Err(_) => added.push((key, value)),
                }
            }
            match added.len() {
                0 => {}
                n if n <= INSERTED_IN_PLACE => reshape(bucket, |entries| {
                    for (key, value) in added {
                        let at = search(entries, key).unwrap_or_else(|at| at);
                        entries.insert(at, (key, value));
                    }
                }),
                _ => {
                    let held = std::mem::take(bucket).into_vec();
                    // Nothing added is held: the merge replaces nothing.
                    let merged = merge(held.into_iter(), added.into_iter(), |_, _| {});
                    *bucket = merged.into_boxed_slice();
                }
            }
            self.v4_len += bucket.len() - before;
        }
        let upserts = upserts.map(|(_, cidr, value)| (cidr, value));
        if upserts.len().saturating_mul(MERGE_FROM) < self.v6.len() {
            for (cidr, value) in upserts {
                if let Some(old) = self.v6.insert(cidr, value) {
                    replaced(cidr, old);
                }
            }
        } else if upserts.len() > 0 {
            let held = std::mem::take(&mut self.v6);
            let merged = merge(held.into_iter(), upserts, &mut replaced);
            // Already in order: the tree is built bottom-up in one pass.
            self.v6 = merged.into_iter().collect();
        }
    }
}

/// `held` and `upserts`, both strictly in order, merged into one sequence in order; an upsert
/// replaces the value held for its key, and `replaced` hears of the value it replaced.
fn merge<K: Ord + Copy, V>(
    held: impl ExactSizeIterator<Item = (K, V)>,
    upserts: impl ExactSizeIterator<Item = (K, V)>,
    mut replaced: impl FnMut(K, V),
) -> Vec<(K, V)> {
    let mut merged = Vec::with_capacity(held.len() + upserts.len());
    let mut held = held.peekable();
    for (key, value) in upserts {
        while let Some(entry) = held.next_if(|(at, _)| *at < key) {
            merged.push(entry);
        }
        if let Some((_, old)) = held.next_if(|(at, _)| *at == key) {
            replaced(key, old);
        }
        merged.push((key, value));
    }
    merged.extend(held);
    merged
}

impl<V> FromIterator<(Cidr, V)> for CidrMap<V> {
    /// The last value of a CIDR given twice is kept, as `BTreeMap` does.
    fn from_iter<I: IntoIterator<Item = (Cidr, V)>>(entries: I) -> Self {
        let mut map = Self::new();
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (cidr, value) in entries {
            match cidr.net() {
                IpNet::V4(net) => v4.push((v4_place(&net), value)),
                IpNet::V6(_) => v6.push((cidr, value)),
            }
        }
        // Stable: of equal keys, the last given ends last, and is the one kept.
        v4.sort_by_key(|(place, _)| *place);
        let mut buckets: Vec<(u16, Vec<(u32, V)>)> = Vec::new();
        let mut v4 = v4.into_iter().peekable();
        while let Some(((place, key), value)) = v4.next() {
            if v4.peek().is_some_and(|(next, _)| *next == (place, key)) {
                continue;
            }
            match buckets.last_mut() {
                Some((bucket, entries)) if *bucket == place => entries.push((key, value)),
                _ => buckets.push((place, vec![(key, value)])),
            }
            map.v4_len += 1;
        }
        // In order: the tree is built bottom-up in one pass.
        map.v4 = (buckets.into_iter())
            .map(|(bucket, entries)| (bucket, entries.into_boxed_slice()))
            .collect();
        map.v6 = v6.into_iter().collect();
        map
    }
}

#[cfg(test)]
mod tests {
    use ipnet::Ipv6Net;

    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("cidr")
    }

    const MIXED: [&str; 9] = [
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.0.0.0/9",
        "192.0.2.5/32",
        "255.255.255.255/32",
        "::/0",
        "2001:db8::/32",
        "2001:db8::1/128",
        "ffff::/16",
    ];

    #[test]
    fn it_holds_what_a_b_tree_of_cidrs_holds_in_the_same_order() {
        let mut expected = BTreeMap::new();
        let mut map = CidrMap::new();
        // Inserted out of order, one replaced, one removed.
        for (n, text) in MIXED.iter().rev().enumerate() {
            assert_eq!(map.insert(cidr(text), n), expected.insert(cidr(text), n));
        }
        assert_eq!(map.insert(cidr("10.0.0.0/9"), 99), Some(6));
        expected.insert(cidr("10.0.0.0/9"), 99);
        assert_eq!(map.remove(&cidr("::/0")), expected.remove(&cidr("::/0")));
        assert_eq!(map.remove(&cidr("::/0")), None);
        let held: Vec<(Cidr, &usize)> = map.iter().collect();
        let wanted: Vec<(Cidr, &usize)> = expected.iter().map(|(c, v)| (*c, v)).collect();
        assert_eq!(held, wanted);
        assert_eq!(map.len(), expected.len());
        assert_eq!(map.get(&cidr("10.0.0.0/8")), Some(&7));
        assert!(!map.contains_key(&cidr("10.0.0.0/10")));
        assert_eq!(*map.get_or_insert(cidr("192.0.2.5/32"), 1), 5);
        assert_eq!(*map.get_or_insert(cidr("192.0.2.6/32"), 1), 1);
        let rebuilt: CidrMap<usize> = map.iter().map(|(c, v)| (c, *v)).collect();
        assert_eq!(rebuilt, map);
    }

    #[test]
    fn a_range_spans_the_families_as_cidr_order_does() {
        let map: CidrMap<()> = MIXED.iter().map(|t| (cidr(t), ())).collect();
        let expected: BTreeMap<Cidr, ()> = MIXED.iter().map(|t| (cidr(t), ())).collect();
        for (from, to) in [
            ("10.0.0.0/8", "192.0.2.5/32"),
            ("10.0.0.0/9", "2001:db8::/32"),
            ("::/0", "ffff::/16"),
            ("10.0.0.1/32", "10.0.0.2/32"),
        ] {
            let range = cidr(from)..=cidr(to);
            let held: Vec<Cidr> = map.range(range.clone()).map(|(c, _)| c).collect();
            let wanted: Vec<Cidr> = expected.range(range).map(|(c, _)| *c).collect();
            assert_eq!(held, wanted, "{from}..={to}");
        }
    }

    /// CIDRs drawn from a few /16s (so that buckets hold many entries) and a few IPv6
    /// networks, from a seeded generator (the same every run).
    fn drawn(seed: &mut u64, count: usize) -> Vec<Cidr> {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        (0..count)
            .map(|_| {
                let bits = next();
                let net = if bits % 5 == 0 {
                    let addr = u128::from(0x2001_0db8_u32 + (bits >> 8) as u32 % 3) << 96
                        | u128::from((bits >> 16) as u16);
                    IpNet::V6(Ipv6Net::new_assert(addr.into(), (bits >> 40) as u8 % 129).trunc())
                } else {
                    let addr = [10 << 24 | 1 << 16, 192 << 24 | 168 << 16, 0xffff_0000]
                        [(bits >> 8) as usize % 3]
                        | (bits >> 16) as u32 & 0x03ff;
                    IpNet::V4(Ipv4Net::new_assert(addr.into(), (bits >> 40) as u8 % 33).trunc())
                };
                Cidr::from(net)
            })
            .collect()
    }

    #[test]
    fn random_changes_leave_what_a_b_tree_of_cidrs_would_hold() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let mut map: CidrMap<usize> = drawn(&mut seed, 300).into_iter().zip(0..).collect();
        let mut model: BTreeMap<Cidr, usize> = map.iter().map(|(c, v)| (c, *v)).collect();
        for round in 0..200usize {
            let cidrs = drawn(&mut seed, 1 + round % 7 * round % 150);
            match round % 4 {
                0 => {
                    for (n, cidr) in cidrs.iter().enumerate() {
                        assert_eq!(map.insert(*cidr, n), model.insert(*cidr, n), "{cidr}");
                    }
                }
                1 => {
                    for cidr in &cidrs {
                        assert_eq!(map.remove(cidr), model.remove(cidr), "{cidr}");
                    }
                }
                2 => {
                    for cidr in &cidrs {
                        let value = *model.entry(*cidr).or_insert(round);
                        assert_eq!(*map.get_or_insert(*cidr, round), value, "{cidr}");
                    }
                }
                _ => {
                    let mut sorted = cidrs.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    let mut replaced = Vec::new();
                    map.upsert_sorted(sorted.iter().map(|c| (*c, round)), |c, old| {
                        replaced.push((c, old));
                    });
                    let expected: Vec<(Cidr, usize)> = sorted
                        .iter()
                        .filter_map(|c| Some((*c, model.insert(*c, round)?)))
                        .collect();
                    assert_eq!(replaced, expected, "round {round}");
                }
            }
            let held: Vec<(Cidr, usize)> = map.iter().map(|(c, v)| (c, *v)).collect();
            let wanted: Vec<(Cidr, usize)> = model.iter().map(|(c, v)| (*c, *v)).collect();
            assert_eq!(held, wanted, "round {round}");
            assert_eq!(map.len(), model.len());
            assert!(map.v4.values().all(|bucket| !bucket.is_empty()));
            let (from, to) = (
                cidrs[0].min(cidrs[cidrs.len() - 1]),
                cidrs[0].max(cidrs[cidrs.len() - 1]),
            );
            let held: Vec<Cidr> = map.range(from..=to).map(|(c, _)| c).collect();
            let wanted: Vec<Cidr> = model.range(from..=to).map(|(c, _)| *c).collect();
            assert_eq!(held, wanted, "{from}..={to}");
        }
        assert!(map.len() > 300, "the changes left {} entries", map.len());
    }

    /// What inserting one by one does: the map after, and the values replaced.
    fn one_by_one(map: &CidrMap<u32>, upserts: &[Cidr]) -> (CidrMap<u32>, Vec<(Cidr, u32)>) {
        let mut map = map.clone();
        let replaced = upserts
            .iter()
            .filter_map(|c| Some((*c, map.insert(*c, 2)?)))
            .collect();
        (map, replaced)
    }

    #[test]
    fn merging_does_what_inserting_one_by_one_does() {
        let upserts: Vec<Cidr> = [
            "10.0.0.0/8",
            "172.16.0.9/32",
            "172.16.3.0/24",
            "172.16.7.128/25",
            "172.16.9.1/32",
            "192.0.2.5/32",
            "2001:db8::/32",
            "2001:db8::1/128",
        ]
        .map(cidr)
        .to_vec();
        let small: CidrMap<u32> = [
            "10.0.0.0/8",
            "192.0.2.1/32",
            "192.0.2.9/32",
            "2001:db8::/32",
        ]
        .map(|t| (cidr(t), 1))
        .into_iter()
        .collect();
        // A full bucket (172.16/16) that takes three new entries (merged in) beside a
        // replaced one, another that takes one (192.0.2.5, inserted), and IPv6 entries enough
        // that the two IPv6 upserts go in one by one.
        let large: CidrMap<u32> = (small.iter().map(|(c, v)| (c, *v)))
            .chain((0..64).map(|i| (cidr(&format!("172.16.{i}.0/24")), 1)))
            .chain((0..64).map(|i| (cidr(&format!("2001:db8:{i:x}::/48")), 1)))
            .collect();
        let (v4_only, v6_only) = (upserts[..6].to_vec(), upserts[6..].to_vec());
        for (map, upserts) in [
            (CidrMap::new(), &upserts),
            (small.clone(), &upserts),
            (small, &v4_only),
            (large.clone(), &upserts),
            (large, &v6_only),
        ] {
            let (expected, expected_replaced) = one_by_one(&map, upserts);
            let mut map = map;
            let mut replaced = Vec::new();
            map.upsert_sorted(upserts.iter().map(|c| (*c, 2)), |c, old| {
                replaced.push((c, old));
            });
            assert_eq!(map, expected);
            assert_eq!(replaced, expected_replaced);
        }
    }
}
