//! Rules → the lookup tables of `agent_common::rules`: for every protocol, port, TCP flags, TTL
//! and IP length value, and every payload matched, the set of rules it satisfies.

use agent_common::{
    bitset::BitSet,
    maps,
    rules::{
        LENGTH_TABLE_LEN, NO_PORT, PAYLOAD_COLUMNS, PAYLOAD_MAX, PORT_TABLE_LEN,
        PROTOCOL_TABLE_LEN, PayloadColumn, PayloadKey, RULE_DROP, RULE_FIELD_LENGTH,
        RULE_FIELD_PAYLOAD, RULE_FIELD_TTL, RULE_PASS, RuleMask, TCP_FLAGS_TABLE_LEN,
        TTL_TABLE_LEN,
    },
};
use aya::{
    Pod,
    maps::{Array, HashMap, MapData},
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
    payload_columns: Named<Array<MapData, PayloadColumn>>,
    by_payload: Named<HashMap<MapData, PayloadKey, RuleMask>>,
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
            payload_columns: Named::resolve(source, maps::RULES_PAYLOAD_COLUMNS[generation])?,
            by_payload: Named::resolve(source, maps::RULES_BY_PAYLOAD[generation])?,
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
    /// Every slot of the columns, the unused ones of length 0.
    pub payload_columns: Vec<PayloadColumn>,
    pub by_payload: std::collections::BTreeMap<PayloadKey, RuleMask>,
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
            | if rule.payload.is_none() {
                0
            } else {
                RULE_FIELD_PAYLOAD
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
            payload_columns: vec![PayloadColumn::default(); PAYLOAD_COLUMNS as usize],
            by_payload: std::collections::BTreeMap::new(),
            actions: Vec::with_capacity(rules.len()),
        };
        // The columns in first-use order (the config allows at most PAYLOAD_COLUMNS).
        let mut columns: Vec<(u16, usize)> = Vec::new();
        for payload in rules.iter().filter_map(|r| r.payload.as_ref()) {
            let column = (payload.offset, payload.bytes.len());
            if !columns.contains(&column) && columns.len() < PAYLOAD_COLUMNS as usize {
                columns.push(column);
            }
        }
        for (slot, &(offset, len)) in tables.payload_columns.iter_mut().zip(&columns) {
            slot.offset = offset;
            slot.len = len as u16;
        }
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
            let own_column = rule.payload.as_ref().and_then(|payload| {
                let at = (payload.offset, payload.bytes.len());
                let column = columns.iter().position(|c| *c == at)?;
                let mut bytes = [0; PAYLOAD_MAX];
                bytes[..payload.bytes.len()].copy_from_slice(&payload.bytes);
                Some(PayloadKey {
                    column: column as u32,
                    bytes,
                })
            });
            for (column, slot) in (0u32..).zip(&mut tables.payload_columns) {
                match (&rule.payload, own_column) {
                    (Some(_), Some(key)) if key.column == column => {
                        tables.by_payload.entry(key).or_default().insert(index);
                    }
                    // A payload with no column (the config refuses a fifth): in no column's
                    // others, so the rule matches nothing rather than any payload.
                    (Some(_), None) => {}
                    _ => slot.others.insert(index),
                }
            }
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
        write_masks(&mut maps.by_length, &self.by_length)?;
        maps.payload_columns.set_all(&self.payload_columns)?;
        // The hash is not in force (its generation is not): old keys go, new ones come.
        let mut stale = Vec::new();
        for key in maps.by_payload.map.keys() {
            let key = key.map_err(named(maps.by_payload.name))?;
            if !self.by_payload.contains_key(&key) {
                stale.push(key);
            }
        }
        for key in &stale {
            maps.by_payload.remove_if_present(key)?;
        }
        for (key, rules) in &self.by_payload {
            maps.by_payload
                .map
                .insert(key, rules, 0)
                .map_err(named(maps.by_payload.name))?;
        }
        Ok(())
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
            payload: None,
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
    fn payloads_are_looked_up_by_column_and_other_rules_match_any_bytes() {
        let with_payload = |offset: u16, bytes: &[u8]| Rule {
            payload: Some(crate::config::rules::PayloadMatch {
                offset,
                bytes: bytes.to_vec(),
            }),
            ..rule(Protocol::Udp, &[], &[], None)
        };
        let t = RuleTables::compile(&[
            with_payload(8, b"stats"),
            rule(Protocol::Udp, &[(53, 53)], &[], None),
            with_payload(0, b"\xff"),
            with_payload(8, b"gets "),
        ]);
        assert_eq!(
            optional_fields(&[with_payload(0, b"x")]),
            RULE_FIELD_PAYLOAD
        );
        let layout: Vec<(u16, u16)> = t
            .payload_columns
            .iter()
            .map(|c| (c.offset, c.len))
            .collect();
        assert_eq!(layout, [(8, 5), (0, 1), (0, 0), (0, 0)]);
        // Column 0 (5 bytes at 8) binds rules 0 and 3; the others match whatever it holds.
        assert_eq!(
            (0..4)
                .filter(|&i| t.payload_columns[0].others.contains(i))
                .collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(
            (0..4)
                .filter(|&i| t.payload_columns[1].others.contains(i))
                .collect::<Vec<_>>(),
            [0, 1, 3]
        );
        let key = |column, bytes: &[u8]| {
            let mut padded = [0; PAYLOAD_MAX];
            padded[..bytes.len()].copy_from_slice(bytes);
            PayloadKey {
                column,
                bytes: padded,
            }
        };
        assert!(t.by_payload[&key(0, b"stats")].contains(0));
        assert!(t.by_payload[&key(0, b"gets ")].contains(3));
        assert!(t.by_payload[&key(1, b"\xff")].contains(2));
        assert_eq!(t.by_payload.len(), 3);
    }

    #[test]
    fn rules_without_constraints_match_portless_packets() {
        let t = RuleTables::compile(&[rule(Protocol::Icmp, &[], &[], None)]);
        assert_eq!(first(&t, 1, None, None), Some(0));
        assert_eq!(first(&t, 58, None, None), None);
    }
}
