//! Rules → the lookup tables of `agent_common::rules`: for every protocol, port, TCP flags, TTL
//! and IP length value, the set of rules it satisfies.

use agent_common::{
    bitset::BitSet,
    maps,
    rules::{
        LENGTH_TABLE_LEN, NO_PORT, PORT_TABLE_LEN, PROTOCOL_TABLE_LEN, RULE_DROP,
        RULE_FIELD_LENGTH, RULE_FIELD_TTL, RULE_PASS, RuleMask, TCP_FLAGS_TABLE_LEN, TTL_TABLE_LEN,
    },
};
use aya::{
    Pod,
    maps::{Array, MapData},
};

use super::{
    map_source::{MapAccessError, MapSource, Named, ResolveError, named},
    mapped_array::MmapArray,
};
use crate::config::{PortRange, Rule, RuleAction};

/// One generation's rule tables; only this module reads or writes them.
pub struct RuleMaps {
    by_protocol: Named<Array<MapData, RuleMask>>,
    by_tcp_flags: Named<Array<MapData, RuleMask>>,
    actions: Named<Array<MapData, u32>>,
    by_src_port: MmapArray,
    by_dst_port: MmapArray,
    by_ttl: Named<Array<MapData, RuleMask>>,
    by_length: MmapArray,
}

impl<V: Pod> Named<Array<MapData, V>> {
    pub(super) fn set_all(&mut self, values: &[V]) -> Result<(), MapAccessError> {
        for (index, value) in (0u32..).zip(values) {
            self.map.set(index, value, 0).map_err(named(self.name))?;
        }
        Ok(())
    }
}

impl RuleMaps {
    pub fn resolve(source: &mut MapSource, generation: usize) -> Result<Self, ResolveError> {
        Ok(Self {
            by_protocol: Named::resolve(source, maps::RULES_BY_PROTOCOL[generation])?,
            by_tcp_flags: Named::resolve(source, maps::RULES_BY_TCP_FLAGS[generation])?,
            actions: Named::resolve(source, maps::RULE_ACTIONS[generation])?,
            by_src_port: MmapArray::resolve(source, maps::RULES_BY_SRC_PORT[generation])?,
            by_dst_port: MmapArray::resolve(source, maps::RULES_BY_DST_PORT[generation])?,
            by_ttl: Named::resolve(source, maps::RULES_BY_TTL[generation])?,
            by_length: MmapArray::resolve(source, maps::RULES_BY_LENGTH[generation])?,
        })
    }
}

pub struct RuleTables {
    pub by_protocol: Vec<RuleMask>,
    pub by_src_port: Vec<RuleMask>,
    pub by_dst_port: Vec<RuleMask>,
    pub by_tcp_flags: Vec<RuleMask>,
    pub by_ttl: Vec<RuleMask>,
    pub by_length: Vec<RuleMask>,
    pub actions: Vec<u32>,
}

/// `agent_common::rules::RULE_FIELD_*`: the optional fields some rule names (the program reads
/// and looks up only those).
pub fn optional_fields(rules: &[Rule]) -> u32 {
    rules.iter().fold(0, |fields, rule| {
        fields
            | if rule.ttl.is_empty() {
                0
            } else {
                RULE_FIELD_TTL
            }
            | if rule.length.is_empty() {
                0
            } else {
                RULE_FIELD_LENGTH
            }
    })
}

impl RuleTables {
    pub fn compile(rules: &[Rule]) -> Self {
        let mut tables = Self {
            by_protocol: vec![RuleMask::EMPTY; PROTOCOL_TABLE_LEN as usize],
            by_src_port: vec![RuleMask::EMPTY; PORT_TABLE_LEN as usize],
            by_dst_port: vec![RuleMask::EMPTY; PORT_TABLE_LEN as usize],
            by_tcp_flags: vec![RuleMask::EMPTY; TCP_FLAGS_TABLE_LEN as usize],
            by_ttl: vec![RuleMask::EMPTY; TTL_TABLE_LEN as usize],
            by_length: vec![RuleMask::EMPTY; LENGTH_TABLE_LEN as usize],
            actions: Vec::with_capacity(rules.len()),
        };
        for (index, rule) in (0u32..).zip(rules) {
            match rule.protocol.number() {
                Some(number) => tables.by_protocol[usize::from(number)].insert(index),
                None => tables.by_protocol.iter_mut().for_each(|m| m.insert(index)),
            }
            mark_ports(&mut tables.by_src_port, &rule.src_ports, index);
            mark_ports(&mut tables.by_dst_port, &rule.dst_ports, index);
            match rule.tcp_flags {
                // No constraint: every flags value, and packets that are not TCP.
                None => tables.by_tcp_flags.iter_mut().for_each(|m| m.insert(index)),
                Some(flags) => {
                    for value in 0..=u8::MAX {
                        if flags.matches(value) {
                            tables.by_tcp_flags[usize::from(value)].insert(index);
                        }
                    }
                }
            }
            mark_values(&mut tables.by_ttl, &rule.ttl, index);
            mark_values(&mut tables.by_length, &rule.length, index);
            tables.actions.push(match rule.action {
                RuleAction::Drop => RULE_DROP,
                RuleAction::Pass => RULE_PASS,
            });
        }
        tables
    }

    /// Writes every table of one generation whole (unused rule slots are left as they were;
    /// no table entry points at them).
    pub fn install(&self, maps: &mut RuleMaps) -> Result<(), MapAccessError> {
        maps.by_protocol.set_all(&self.by_protocol)?;
        maps.by_tcp_flags.set_all(&self.by_tcp_flags)?;
        maps.actions.set_all(&self.actions)?;
        write_masks(&mut maps.by_src_port, &self.by_src_port)?;
        write_masks(&mut maps.by_dst_port, &self.by_dst_port)?;
        maps.by_ttl.set_all(&self.by_ttl)?;
        write_masks(&mut maps.by_length, &self.by_length)
    }
}

/// No values listed: every value. Otherwise only the listed ones (ports, TTLs, lengths).
pub(super) fn mark_values<const WORDS: usize>(
    table: &mut [BitSet<WORDS>],
    ranges: &[PortRange],
    index: u32,
) {
    if ranges.is_empty() {
        table.iter_mut().for_each(|m| m.insert(index));
        return;
    }
    for range in ranges {
        for value in range.first..=range.last {
            if let Some(mask) = table.get_mut(usize::from(value)) {
                mask.insert(index);
            }
        }
    }
}

/// No ports listed: every port, and packets without one. Otherwise only the listed ports.
fn mark_ports(table: &mut [RuleMask], ports: &[PortRange], index: u32) {
    mark_values(table, ports, index);
    debug_assert!(ports.is_empty() || !table[NO_PORT as usize].contains(index));
}

/// Writes a whole table of sets (rules, protected entries) through its mapping.
pub(super) fn write_masks<const WORDS: usize>(
    array: &mut MmapArray,
    masks: &[BitSet<WORDS>],
) -> Result<(), MapAccessError> {
    let size = size_of::<BitSet<WORDS>>();
    array.write(size_of_val(masks), |bytes| {
        for (chunk, mask) in bytes.chunks_exact_mut(size).zip(masks) {
            for (bytes, word) in chunk.chunks_exact_mut(8).zip(mask.words) {
                bytes.copy_from_slice(&word.to_ne_bytes());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Protocol, TcpFlags};
    use agent_common::rules::NOT_TCP;

    fn rule(
        protocol: Protocol,
        src: &[(u16, u16)],
        dst: &[(u16, u16)],
        flags: Option<TcpFlags>,
    ) -> Rule {
        let ranges = |r: &[(u16, u16)]| {
            r.iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect()
        };
        Rule {
            name: "r".into(),
            protocol,
            src_ports: ranges(src),
            dst_ports: ranges(dst),
            tcp_flags: flags,
            ttl: Vec::new(),
            length: Vec::new(),
            action: RuleAction::Drop,
        }
    }

    /// The first rule a packet matches, as the program computes it.
    fn first(
        t: &RuleTables,
        protocol: u8,
        ports: Option<(u16, u16)>,
        flags: Option<u8>,
    ) -> Option<u32> {
        let (src, dst) = ports.map_or((NO_PORT as usize, NO_PORT as usize), |(s, d)| {
            (usize::from(s), usize::from(d))
        });
        t.by_protocol[usize::from(protocol)]
            .and(t.by_src_port[src])
            .and(t.by_dst_port[dst])
            .and(t.by_tcp_flags[flags.map_or(NOT_TCP as usize, usize::from)])
            .first()
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let t = RuleTables::compile(&[
            rule(Protocol::Udp, &[(11211, 11211)], &[], None),
            rule(
                Protocol::Udp,
                &[(53, 53), (123, 123)],
                &[(1024, 65535)],
                None,
            ),
            rule(
                Protocol::Tcp,
                &[],
                &[],
                Some(TcpFlags { mask: 0xff, set: 0 }),
            ),
            rule(Protocol::Any, &[], &[(9, 9)], None),
        ]);
        assert_eq!(first(&t, 17, Some((11211, 80)), None), Some(0));
        assert_eq!(first(&t, 17, Some((53, 40000)), None), Some(1));
        assert_eq!(first(&t, 17, Some((53, 53)), None), None);
        assert_eq!(first(&t, 17, Some((123, 1024)), None), Some(1));
        assert_eq!(first(&t, 6, Some((1, 2)), Some(0)), Some(2), "NULL scan");
        assert_eq!(first(&t, 6, Some((1, 2)), Some(0x02)), None, "SYN");
        assert_eq!(first(&t, 6, Some((1, 9)), Some(0x02)), Some(3));
        assert_eq!(first(&t, 17, None, None), None, "a fragment has no ports");
        assert_eq!(first(&t, 1, None, None), None);
    }

    #[test]
    fn rules_without_constraints_match_portless_packets() {
        let t = RuleTables::compile(&[rule(Protocol::Icmp, &[], &[], None)]);
        assert_eq!(first(&t, 1, None, None), Some(0));
        assert_eq!(first(&t, 58, None, None), None);
    }
}
