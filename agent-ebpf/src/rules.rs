//! Stateless rules: four table lookups intersect to the set of matching rules; the first wins.

use agent_common::rules::{NO_PORT, NOT_TCP};

use crate::{
    maps::{
        RULE_ACTIONS, RULES_BY_DST_PORT, RULES_BY_PROTOCOL, RULES_BY_SRC_PORT, RULES_BY_TCP_FLAGS,
    },
    packet::Packet,
};

/// The first matching rule and its action (`agent_common::rules::RULE_*`).
#[inline(always)]
pub fn first_match(packet: &Packet) -> Option<(u32, u32)> {
    let (src_port, dst_port) = packet.ports.map_or((NO_PORT, NO_PORT), |(src, dst)| {
        (u32::from(src), u32::from(dst))
    });
    let flags = packet.tcp_flags.map_or(NOT_TCP, u32::from);
    let matching = RULES_BY_PROTOCOL
        .get(u32::from(packet.protocol))?
        .and(*RULES_BY_SRC_PORT.get(src_port)?)
        .and(*RULES_BY_DST_PORT.get(dst_port)?)
        .and(*RULES_BY_TCP_FLAGS.get(flags)?);
    let rule = matching.first()?;
    Some((rule, *RULE_ACTIONS.get(rule)?))
}
