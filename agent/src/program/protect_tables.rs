//! `[[protect]]` entries → the protect tables of `agent_common::protect` (per destination
//! prefix, protocol and destination port: the entries it satisfies; each entry's limits), and
//! the buckets every generation shares.

use std::net::IpAddr;

use agent_common::{
    maps,
    protect::{
        MAX_PROTECTED, PROTECT_FRAGMENT, PROTECT_PORT_TABLE_LEN, ProtectBucket, ProtectLimit,
        ProtectMask,
    },
    rules::{NO_PORT, PROTOCOL_TABLE_LEN},
};
use aya::maps::{
    Array, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};

use super::{
    map_source::{MapAccessError, MapSource, Named, ResolveError, named},
    mapped_array::MmapArray,
    rule_tables::{mark_values, write_masks},
    settings::{self, NS_PER_SECOND},
};
use crate::config::{Cidr, PortRange, Protected};

type Trie<const N: usize> = Named<LpmTrie<MapData, [u8; N], ProtectMask>>;

/// One generation's protect tables; only this module reads or writes them.
pub struct ProtectMaps {
    by_v4: Trie<4>,
    by_v6: Trie<16>,
    by_protocol: Named<Array<MapData, ProtectMask>>,
    by_dst_port: MmapArray,
    limits: Named<Array<MapData, ProtectLimit>>,
}

impl ProtectMaps {
    pub fn resolve(source: &mut MapSource, generation: usize) -> Result<Self, ResolveError> {
        Ok(Self {
            by_v4: Named::resolve(source, maps::PROTECT_BY_V4[generation])?,
            by_v6: Named::resolve(source, maps::PROTECT_BY_V6[generation])?,
            by_protocol: Named::resolve(source, maps::PROTECT_BY_PROTOCOL[generation])?,
            by_dst_port: MmapArray::resolve(source, maps::PROTECT_BY_DST_PORT[generation])?,
            limits: Named::resolve(source, maps::PROTECT_LIMITS[generation])?,
        })
    }
}

/// The protect tables of a configuration, compiled.
pub struct ProtectTables {
    v4: Vec<(u8, [u8; 4], ProtectMask)>,
    v6: Vec<(u8, [u8; 16], ProtectMask)>,
    by_protocol: Vec<ProtectMask>,
    by_dst_port: Vec<ProtectMask>,
    limits: Vec<ProtectLimit>,
}

impl ProtectTables {
    pub fn compile(entries: &[Protected]) -> Self {
        debug_assert!(entries.len() <= MAX_PROTECTED as usize);
        let mut tables = Self {
            v4: Vec::new(),
            v6: Vec::new(),
            by_protocol: vec![ProtectMask::EMPTY; PROTOCOL_TABLE_LEN as usize],
            by_dst_port: vec![ProtectMask::EMPTY; PROTECT_PORT_TABLE_LEN as usize],
            limits: Vec::with_capacity(entries.len()),
        };
        // The trie answers with the longest prefix only: each prefix carries every entry whose
        // destination holds it, so a shorter destination is not hidden by a longer one.
        let mut destinations: Vec<Cidr> = entries.iter().map(|e| e.destination).collect();
        destinations.sort();
        destinations.dedup();
        for cidr in destinations {
            let mut mask = ProtectMask::EMPTY;
            for (index, entry) in (0u32..).zip(entries) {
                if entry.destination.net().contains(&cidr.net()) {
                    mask.insert(index);
                }
            }
            let prefix = cidr.net().prefix_len();
            match cidr.net().network() {
                IpAddr::V4(addr) => tables.v4.push((prefix, addr.octets(), mask)),
                IpAddr::V6(addr) => tables.v6.push((prefix, addr.octets(), mask)),
            }
        }
        for (index, entry) in (0u32..).zip(entries) {
            match entry.protocol.number() {
                Some(number) => tables.by_protocol[usize::from(number)].insert(index),
                None => tables.by_protocol.iter_mut().for_each(|m| m.insert(index)),
            }
            mark_ports(&mut tables.by_dst_port, &entry.dst_ports, index);
            tables.limits.push(limit(entry));
        }
        tables
    }

    /// Writes every table of one generation whole; trie prefixes no entry has any more are
    /// removed (the generation is not in force while it is written).
    pub fn install(&self, maps: &mut ProtectMaps) -> Result<(), MapAccessError> {
        write_trie(&mut maps.by_v4, &self.v4)?;
        write_trie(&mut maps.by_v6, &self.v6)?;
        maps.by_protocol.set_all(&self.by_protocol)?;
        maps.limits.set_all(&self.limits)?;
        write_masks(&mut maps.by_dst_port, &self.by_dst_port)
    }
}

fn write_trie<const N: usize>(
    trie: &mut Trie<N>,
    prefixes: &[(u8, [u8; N], ProtectMask)],
) -> Result<(), MapAccessError> {
    let wanted = |key: &Key<[u8; N]>| {
        prefixes
            .iter()
            .any(|(len, data, _)| u32::from(*len) == key.prefix_len() && *data == key.data())
    };
    let stale: Vec<Key<[u8; N]>> = trie
        .map
        .keys()
        .collect::<Result<Vec<_>, MapError>>()
        .map_err(named(trie.name))?
        .into_iter()
        .filter(|key| !wanted(key))
        .collect();
    for key in &stale {
        trie.map.remove(key).map_err(named(trie.name))?;
    }
    for (len, data, mask) in prefixes {
        trie.map
            .insert(&Key::new(u32::from(*len), *data), mask, 0)
            .map_err(named(trie.name))?;
    }
    Ok(())
}

/// No ports listed: every port, packets without one and later fragments. Otherwise the listed
/// ports and later fragments (which carry no ports, but are the same traffic); never packets of
/// a protocol without ports.
fn mark_ports(table: &mut [ProtectMask], ports: &[PortRange], index: u32) {
    mark_values(table, ports, index);
    if !ports.is_empty() {
        table[PROTECT_FRAGMENT as usize].insert(index);
        debug_assert!(!table[NO_PORT as usize].contains(index));
    }
}

/// An entry's limits as the program applies them: `burst_packets` back to back conform (the
/// TAT may run `burst - 1` intervals ahead); the bit bucket holds one second's worth.
fn limit(entry: &Protected) -> ProtectLimit {
    let ns_per_packet = settings::ns_per_packet(entry.pps);
    ProtectLimit {
        ns_per_packet,
        ps_per_byte: settings::ps_per_byte(entry.bps),
        packets_burst_ns: ns_per_packet * entry.burst_packets.saturating_sub(1),
        bits_burst_ns: NS_PER_SECOND,
    }
}

/// The buckets of the protected entries, shared by both generations.
pub struct ProtectBuckets {
    buckets: Named<Array<MapData, ProtectBucket>>,
}

impl ProtectBuckets {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            buckets: Named::resolve(source, maps::PROTECT_BUCKETS)?,
        })
    }

    /// Empties the buckets of the entries whose definition changed from `old` to `new`, so
    /// that no entry starts with the debt of the one that had its index before.
    pub fn reset_changed(
        &mut self,
        old: &[Protected],
        new: &[Protected],
    ) -> Result<(), MapAccessError> {
        for (index, entry) in (0u32..).zip(new) {
            if old.get(index as usize) != Some(entry) {
                self.buckets
                    .map
                    .set(index, ProtectBucket::default(), 0)
                    .map_err(named(self.buckets.name))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Protocol;

    fn entry(destination: &str, protocol: Protocol, ports: &[(u16, u16)]) -> Protected {
        Protected {
            name: destination.into(),
            destination: destination.parse().expect("a CIDR"),
            protocol,
            dst_ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            pps: 1000,
            bps: 0,
            burst_packets: 1000,
            attack_after: Duration::from_secs(1),
            attack_end_after: Duration::from_secs(10),
            fingerprints: crate::config::protect::Fingerprints::Auto,
        }
    }

    /// Where a packet's port column is: its port, none, or (a later fragment) the fragments'.
    #[derive(Clone, Copy)]
    enum Port {
        Is(u16),
        None,
        Fragment,
    }

    /// The entry of a packet, as the program finds it: the longest prefix holding the
    /// destination, intersected with the protocol's and the port's sets.
    fn entry_of(t: &ProtectTables, dst: IpAddr, protocol: u8, port: Port) -> Option<u32> {
        let by_destination = match dst {
            IpAddr::V4(addr) => {
                t.v4.iter()
                    .filter(|(len, net, _)| {
                        let bits = u32::from_be_bytes(*net) ^ u32::from(addr);
                        *len == 0 || bits >> (32 - u32::from(*len)) == 0
                    })
                    .max_by_key(|(len, ..)| *len)
                    .map(|(.., mask)| *mask)
            }
            IpAddr::V6(addr) => {
                t.v6.iter()
                    .filter(|(len, net, _)| {
                        let bits = u128::from_be_bytes(*net) ^ u128::from(addr);
                        *len == 0 || bits >> (128 - u32::from(*len)) == 0
                    })
                    .max_by_key(|(len, ..)| *len)
                    .map(|(.., mask)| *mask)
            }
        }?;
        let port = match port {
            Port::Is(port) => usize::from(port),
            Port::None => NO_PORT as usize,
            Port::Fragment => PROTECT_FRAGMENT as usize,
        };
        by_destination
            .and(t.by_protocol[usize::from(protocol)])
            .and(t.by_dst_port[port])
            .first()
    }

    #[test]
    fn a_packet_finds_its_entry_by_destination_protocol_and_port() {
        let t = ProtectTables::compile(&[
            entry("203.0.113.0/24", Protocol::Tcp, &[(443, 443)]),
            entry("203.0.113.53/32", Protocol::Udp, &[(53, 53)]),
            entry("2001:db8::/64", Protocol::Any, &[]),
        ]);
        let dns: IpAddr = "203.0.113.53".parse().expect("an address");
        assert_eq!(entry_of(&t, dns, 17, Port::Is(53)), Some(1));
        assert_eq!(
            entry_of(&t, dns, 6, Port::Is(443)),
            Some(0),
            "the /24 is not hidden by the /32 inside it"
        );
        assert_eq!(entry_of(&t, dns, 17, Port::Is(54)), None);
        assert_eq!(
            entry_of(&t, dns, 17, Port::Fragment),
            Some(1),
            "a later fragment of UDP to the host is the port-bound entry's"
        );
        assert_eq!(
            entry_of(&t, dns, 1, Port::None),
            None,
            "ICMP is no port-bound entry's"
        );
        let other: IpAddr = "203.0.113.9".parse().expect("an address");
        assert_eq!(entry_of(&t, other, 17, Port::Is(53)), None);
        assert_eq!(entry_of(&t, other, 6, Port::Is(443)), Some(0));
        let v6: IpAddr = "2001:db8::1".parse().expect("an address");
        assert_eq!(
            entry_of(&t, v6, 58, Port::None),
            Some(2),
            "any port: portless too"
        );
        assert_eq!(entry_of(&t, v6, 17, Port::Is(1)), Some(2));
        assert_eq!(entry_of(&t, v6, 17, Port::Fragment), Some(2));
        let outside: IpAddr = "2001:db8:1::1".parse().expect("an address");
        assert_eq!(entry_of(&t, outside, 17, Port::Is(1)), None);
        assert_eq!(t.limits[1].ns_per_packet, 1_000_000);
        assert_eq!(t.limits[1].packets_burst_ns, 999_000_000);
    }
}
