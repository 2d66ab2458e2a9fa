//! CIDR sets → the kernel's list maps.

use std::collections::BTreeSet;

use agent_common::{
    lists::{Ipv4Key, Ipv6Key, ListEntry, SOURCE_CONFIG},
    maps::{BLOCKLIST_V4, BLOCKLIST_V6},
};
use aya::{
    Ebpf,
    maps::{
        MapError,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::IpNet;

use crate::config::Cidr;

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    #[error("map {map} has an unexpected type")]
    MapType {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("inserting {cidr} into {map} failed")]
    Insert {
        map: &'static str,
        cidr: Cidr,
        #[source]
        source: MapError,
    },
}

/// How many entries of each family a list holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyCounts {
    pub v4: usize,
    pub v6: usize,
}

pub fn count_families(cidrs: &BTreeSet<Cidr>) -> FamilyCounts {
    let v4 = cidrs
        .iter()
        .filter(|c| matches!(c.net(), IpNet::V4(_)))
        .count();
    FamilyCounts {
        v4,
        v6: cidrs.len() - v4,
    }
}

/// Writes every CIDR into the blocklist tries.
pub fn fill_blocklist(ebpf: &mut Ebpf, cidrs: &BTreeSet<Cidr>) -> Result<FamilyCounts, ListError> {
    let entry = ListEntry {
        source: SOURCE_CONFIG,
    };
    let v4 = cidrs.iter().filter_map(|cidr| match cidr.net() {
        IpNet::V4(net) => Some((
            *cidr,
            Key::new(u32::from(net.prefix_len()), net.addr().octets()),
        )),
        IpNet::V6(_) => None,
    });
    insert_all::<Ipv4Key>(ebpf, BLOCKLIST_V4, v4, entry)?;
    let v6 = cidrs.iter().filter_map(|cidr| match cidr.net() {
        IpNet::V6(net) => Some((
            *cidr,
            Key::new(u32::from(net.prefix_len()), net.addr().octets()),
        )),
        IpNet::V4(_) => None,
    });
    insert_all::<Ipv6Key>(ebpf, BLOCKLIST_V6, v6, entry)?;
    Ok(count_families(cidrs))
}

fn insert_all<K: aya::Pod>(
    ebpf: &mut Ebpf,
    map: &'static str,
    keys: impl Iterator<Item = (Cidr, Key<K>)>,
    entry: ListEntry,
) -> Result<(), ListError> {
    let data = ebpf.map_mut(map).ok_or(ListError::MissingMap(map))?;
    let mut trie: LpmTrie<_, K, ListEntry> =
        LpmTrie::try_from(data).map_err(|source| ListError::MapType { map, source })?;
    for (cidr, key) in keys {
        trie.insert(&key, entry, 0)
            .map_err(|source| ListError::Insert { map, cidr, source })?;
    }
    Ok(())
}
