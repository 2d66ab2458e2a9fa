//! Stateless rules: the lookup tables of the packet's fields intersect to the set of matching
//! rules; the first wins. The TTL, length and payload tables are read only when some rule names
//! those fields.

use agent_common::rules::{
    NO_PORT, NOT_TCP, PAYLOAD_COLUMNS, PayloadColumn, PayloadKey, RULE_FIELD_LENGTH,
    RULE_FIELD_PAYLOAD, RULE_FIELD_TTL, RuleMask,
};
use aya_ebpf::{
    maps::{Array, HashMap},
    programs::XdpContext,
};

use crate::packet::{self, Packet};

/// The rule tables of one generation (reached through functions, as `lists::CidrMaps`).
pub trait RuleMaps {
    fn by_protocol() -> &'static Array<RuleMask>;
    fn by_src_port() -> &'static Array<RuleMask>;
    fn by_dst_port() -> &'static Array<RuleMask>;
    fn by_tcp_flags() -> &'static Array<RuleMask>;
    fn by_ttl() -> &'static Array<RuleMask>;
    fn by_length() -> &'static Array<RuleMask>;
    fn payload_columns() -> &'static Array<PayloadColumn>;
    fn by_payload() -> &'static HashMap<PayloadKey, RuleMask>;
    fn actions() -> &'static Array<u32>;
}

/// The first matching rule and its action (`agent_common::rules::RULE_*`); `fields` are the
/// optional fields some rule names (`Settings::rule_fields`).
#[inline(always)]
pub fn first_match<M: RuleMaps>(
    ctx: &XdpContext,
    packet: &Packet,
    fields: u32,
) -> Option<(u32, u32)> {
    let (src_port, dst_port) = packet.ports.map_or((NO_PORT, NO_PORT), |(src, dst)| {
        (u32::from(src), u32::from(dst))
    });
    let flags = packet.tcp_flags.map_or(NOT_TCP, u32::from);
    let mut matching = M::by_protocol()
        .get(u32::from(packet.protocol))?
        .and(*M::by_src_port().get(src_port)?)
        .and(*M::by_dst_port().get(dst_port)?)
        .and(*M::by_tcp_flags().get(flags)?);
    if fields != 0 && !matching.is_empty() {
        matching = matching.and(optional_fields::<M>(ctx, packet, fields)?);
    }
    let rule = matching.first()?;
    Some((rule, *M::actions().get(rule)?))
}

/// The rules the packet's TTL, length and payload satisfy (those some rule names).
#[inline(always)]
fn optional_fields<M: RuleMaps>(
    ctx: &XdpContext,
    packet: &Packet,
    fields: u32,
) -> Option<RuleMask> {
    let mut matching = RuleMask::FULL;
    if fields & (RULE_FIELD_TTL | RULE_FIELD_LENGTH) != 0 {
        let ip = packet::ip_fields(ctx, packet).ok()?;
        if fields & RULE_FIELD_TTL != 0 {
            matching = matching.and(*M::by_ttl().get(u32::from(ip.ttl))?);
        }
        if fields & RULE_FIELD_LENGTH != 0 {
            matching = matching.and(*M::by_length().get(u32::from(ip.length))?);
        }
    }
    if fields & RULE_FIELD_PAYLOAD != 0 {
        // A loop over the columns (at most four), not over the rules.
        for column in 0..PAYLOAD_COLUMNS {
            let Some(at) = M::payload_columns().get(column) else {
                break;
            };
            if at.len == 0 {
                break;
            }
            // SAFETY: a hash lookup by value; the value is copied out at once.
            let hit = packet::payload_at(ctx, packet, at.offset, at.len)
                .and_then(|bytes| unsafe { M::by_payload().get(PayloadKey { column, bytes }) })
                .copied()
                .unwrap_or(RuleMask::EMPTY);
            let mut column_matches = at.others;
            column_matches.union(&hit);
            matching = matching.and(column_matches);
        }
    }
    Some(matching)
}
