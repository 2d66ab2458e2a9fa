//! Stateless rules: four table lookups intersect to the set of matching rules; the first wins.

use agent_common::rules::{NO_PORT, NOT_TCP, RuleMask};
use aya_ebpf::maps::Array;

use crate::packet::Packet;

/// The rule tables of one generation (reached through functions, as `lists::CidrMaps`).
pub trait RuleMaps {
    fn by_protocol() -> &'static Array<RuleMask>;
    fn by_src_port() -> &'static Array<RuleMask>;
    fn by_dst_port() -> &'static Array<RuleMask>;
    fn by_tcp_flags() -> &'static Array<RuleMask>;
    fn actions() -> &'static Array<u32>;
}

/// The first matching rule and its action (`agent_common::rules::RULE_*`).
#[inline(always)]
pub fn first_match<M: RuleMaps>(packet: &Packet) -> Option<(u32, u32)> {
    let (src_port, dst_port) = packet.ports.map_or((NO_PORT, NO_PORT), |(src, dst)| {
        (u32::from(src), u32::from(dst))
    });
    let flags = packet.tcp_flags.map_or(NOT_TCP, u32::from);
    let matching = M::by_protocol()
        .get(u32::from(packet.protocol))?
        .and(*M::by_src_port().get(src_port)?)
        .and(*M::by_dst_port().get(dst_port)?)
        .and(*M::by_tcp_flags().get(flags)?);
    let rule = matching.first()?;
    Some((rule, *M::actions().get(rule)?))
}
