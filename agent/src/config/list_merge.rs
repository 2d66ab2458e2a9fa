//! Upserts into a list held as a B-tree, in one pass when they are many: an import of a million
//! entries inserted one by one costs a search from the root each, several times the cost of
//! merging two sorted sequences and building the tree again from the result.

use std::collections::BTreeMap;

use super::Cidr;

/// Below this many upserts per entry held, they are inserted one by one (a merge walks every
/// entry held).
const MERGE_FROM: usize = 8;

/// Inserts `upserts`, which must be strictly in `Cidr` order, replacing the values of CIDRs
/// already held; `replaced` hears of each replaced value.
pub fn upsert_sorted<V>(
    map: &mut BTreeMap<Cidr, V>,
    upserts: impl ExactSizeIterator<Item = (Cidr, V)>,
    mut replaced: impl FnMut(&Cidr, V),
) {
    if upserts.len().saturating_mul(MERGE_FROM) < map.len() {
        for (cidr, value) in upserts {
            if let Some(old) = map.insert(cidr, value) {
                replaced(&cidr, old);
            }
        }
        return;
    }
    let mut merged = Vec::with_capacity(map.len() + upserts.len());
    let mut held = std::mem::take(map).into_iter().peekable();
    for (cidr, value) in upserts {
        while let Some(entry) = held.next_if(|(at, _)| *at < cidr) {
            merged.push(entry);
        }
        if let Some((_, old)) = held.next_if(|(at, _)| *at == cidr) {
            replaced(&cidr, old);
        }
        merged.push((cidr, value));
    }
    merged.extend(held);
    // Already in order: the tree is built bottom-up in one pass.
    *map = merged.into_iter().collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("cidr")
    }

    /// What inserting one by one does: the map after, and the values replaced.
    fn one_by_one(
        map: &BTreeMap<Cidr, u32>,
        upserts: &[Cidr],
    ) -> (BTreeMap<Cidr, u32>, Vec<(Cidr, u32)>) {
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
            "192.0.2.5/32",
            "2001:db8::/32",
            "2001:db8::1/128",
        ]
        .map(cidr)
        .to_vec();
        let small: BTreeMap<Cidr, u32> = [
            "10.0.0.0/8",
            "192.0.2.1/32",
            "192.0.2.9/32",
            "2001:db8::/32",
        ]
        .map(|t| (cidr(t), 1))
        .into();
        // Eight times the upserts and more: inserted one by one.
        let mut large = small.clone();
        large.extend((0..64).map(|i| (cidr(&format!("172.16.{i}.0/24")), 1)));
        for (map, merged) in [(BTreeMap::new(), true), (small, true), (large, false)] {
            assert_eq!(upserts.len() * MERGE_FROM >= map.len(), merged);
            let (expected, expected_replaced) = one_by_one(&map, &upserts);
            let mut map = map;
            let mut replaced = Vec::new();
            upsert_sorted(&mut map, upserts.iter().map(|c| (*c, 2)), |c, old| {
                replaced.push((*c, old));
            });
            assert_eq!(map, expected);
            assert_eq!(replaced, expected_replaced);
        }
    }
}
