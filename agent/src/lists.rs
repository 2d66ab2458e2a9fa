//! CIDR lists → the kernel's list maps, in the layout `agent_common::lists` describes: a byte per
//! IPv4 /24, a hash of longer IPv4 prefixes, a hash of IPv6 prefixes.

use std::collections::BTreeSet;

use agent_common::{
    lists::{
        ListEntry, ListShape, MAX_V6_LENGTHS, TABLE_HAS_LONGER, TABLE_SOURCE_MASK,
        V4_LONG_MIN_PREFIX, V4_TABLE_LEN, V4PrefixKey, V6PrefixKey,
    },
    maps,
};
use aya::{
    Ebpf, Pod,
    maps::{HashMap, Map, MapError},
};
use ipnet::IpNet;

use crate::{config::ListEntries, mapped_array::MappedArray};

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
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("mapping {map} into memory failed")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The map names of one list.
#[derive(Clone, Copy, Debug)]
pub struct ListMaps {
    pub name: &'static str,
    pub v4_table: &'static str,
    pub v4_long: &'static str,
    pub v6: &'static str,
}

pub const ALLOWLIST: ListMaps = ListMaps {
    name: "allowlist",
    v4_table: maps::ALLOW_V4_TABLE,
    v4_long: maps::ALLOW_V4_LONG,
    v6: maps::ALLOW_V6,
};

pub const BLOCKLIST: ListMaps = ListMaps {
    name: "blocklist",
    v4_table: maps::BLOCK_V4_TABLE,
    v4_long: maps::BLOCK_V4_LONG,
    v6: maps::BLOCK_V6,
};

/// A list compiled to what the maps hold.
pub struct CompiledList {
    /// One byte per /24 (see `agent_common::lists`).
    pub table: Vec<u8>,
    pub v4_long: Vec<(V4PrefixKey, ListEntry)>,
    pub v6: Vec<(V6PrefixKey, ListEntry)>,
    pub shape: ListShape,
}

impl CompiledList {
    pub fn compile(maps: &ListMaps, entries: &ListEntries) -> Result<Self, ListError> {
        let mut table = vec![0u8; V4_TABLE_BYTES];
        let mut v4_long = Vec::new();
        let mut v6 = Vec::new();
        let mut shape = ListShape::default();
        let mut v6_lengths = BTreeSet::new();
        for (cidr, &source) in entries {
            let entry = ListEntry { source };
            match cidr.net() {
                IpNet::V4(net) => {
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
                        shape.v4_long_lengths |= 1 << (prefix_len - V4_LONG_MIN_PREFIX);
                        v4_long.push((
                            V4PrefixKey {
                                prefix_len,
                                addr: net.network().octets(),
                            },
                            entry,
                        ));
                    }
                }
                IpNet::V6(net) => {
                    v6_lengths.insert(net.prefix_len());
                    v6.push((
                        V6PrefixKey {
                            prefix_len: u32::from(net.prefix_len()),
                            addr: net.network().octets(),
                        },
                        entry,
                    ));
                }
            }
        }
        if v6_lengths.len() > MAX_V6_LENGTHS {
            return Err(ListError::TooManyV6Lengths {
                list: maps.name,
                count: v6_lengths.len(),
                lengths: v6_lengths
                    .iter()
                    .map(|l| format!("/{l}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            });
        }
        // Longest first: the most specific entry is found first.
        for (slot, len) in shape.v6_lengths.iter_mut().zip(v6_lengths.iter().rev()) {
            *slot = *len;
        }
        shape.v6_length_count = v6_lengths.len() as u32;
        Ok(Self {
            table,
            v4_long,
            v6,
            shape,
        })
    }

    /// Writes the list into its maps (which must be empty: this runs before attach).
    pub fn install(&self, ebpf: &mut Ebpf, maps: &ListMaps) -> Result<(), ListError> {
        let table = match ebpf.map_mut(maps.v4_table) {
            Some(Map::Array(data)) => data,
            Some(_) => {
                return Err(ListError::Map {
                    map: maps.v4_table,
                    source: MapError::InvalidName {
                        name: maps.v4_table.to_string(),
                    },
                });
            }
            None => return Err(ListError::MissingMap(maps.v4_table)),
        };
        let mut mapped =
            MappedArray::new(table, V4_TABLE_BYTES).map_err(|source| ListError::Mmap {
                map: maps.v4_table,
                source,
            })?;
        mapped.bytes_mut().copy_from_slice(&self.table);
        insert_all(ebpf, maps.v4_long, &self.v4_long)?;
        insert_all(ebpf, maps.v6, &self.v6)
    }
}

fn insert_all<K: Pod>(
    ebpf: &mut Ebpf,
    map: &'static str,
    entries: &[(K, ListEntry)],
) -> Result<(), ListError> {
    let data = ebpf.map_mut(map).ok_or(ListError::MissingMap(map))?;
    let mut hash: HashMap<_, K, ListEntry> =
        HashMap::try_from(data).map_err(|source| ListError::Map { map, source })?;
    for (key, entry) in entries {
        hash.insert(key, entry, 0)
            .map_err(|source| ListError::Map { map, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::lists::{SOURCE_CONFIG, SOURCE_FILE, table_position};

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
            &BLOCKLIST,
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
        assert!(list.v4_long.is_empty() && list.v6.is_empty());
        assert_eq!(
            list.table.iter().filter(|b| **b != 0).count(),
            (1 << 16) + 1
        );
    }

    #[test]
    fn long_prefixes_go_to_the_hash_and_flag_their_slash24() {
        let list = CompiledList::compile(
            &BLOCKLIST,
            &entries(&[
                ("203.0.113.9/32", SOURCE_CONFIG),
                ("203.0.113.128/25", SOURCE_CONFIG),
            ]),
        )
        .expect("compiles");
        assert_eq!(table_byte(&list, [203, 0, 113, 1]), TABLE_HAS_LONGER);
        assert_eq!(list.shape.v4_long_lengths, 1 << 7 | 1 << 0);
        assert_eq!(list.v4_long.len(), 2);
    }

    #[test]
    fn ipv6_lengths_are_listed_longest_first() {
        let list = CompiledList::compile(
            &BLOCKLIST,
            &entries(&[
                ("2001:db8::/32", SOURCE_CONFIG),
                ("2001:db8:bad::/48", SOURCE_CONFIG),
                ("2001:db8::1", SOURCE_CONFIG),
            ]),
        )
        .expect("compiles");
        assert_eq!(list.shape.v6_length_count, 3);
        assert_eq!(&list.shape.v6_lengths[..3], &[128, 48, 32]);
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
        let e = CompiledList::compile(&ALLOWLIST, &list)
            .err()
            .expect("too many lengths");
        assert!(
            e.to_string().contains("21 distinct IPv6 prefix lengths"),
            "{e}"
        );
    }
}
