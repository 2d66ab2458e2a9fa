//! Protected destinations: the traffic to a `[[protect]]` entry's destination, protocol and
//! ports is charged to that entry's buckets, whatever its source (see
//! `agent_common::protect`).

use agent_common::{
    protect::{
        PROTECT_FRAGMENT, PROTECT_SAMPLE_INTERVAL_NS, ProtectHit, ProtectLimit, ProtectMask,
    },
    rules::NO_PORT,
    stats::Reason,
};
use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    maps::{Array, LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};

/// Past its interval, a sample is taken with a chance of one in this many per packet.
const SAMPLE_CHANCE: u32 = 4;
use core::sync::atomic::AtomicU64;

use crate::{
    events, fingerprint,
    maps::{PROT_BUCKETS, PROT_PRINTS, PROT_SAMPLE_AT},
    packet::{self, Address, Packet},
    rate_limit::gcra,
    stats,
};

/// The protect tables of one generation (reached through functions, as `rules::RuleMaps`).
pub trait ProtectMaps {
    fn by_v4() -> &'static LpmTrie<[u8; 4], ProtectMask>;
    fn by_v6() -> &'static LpmTrie<[u8; 16], ProtectMask>;
    fn by_protocol() -> &'static Array<ProtectMask>;
    fn by_dst_port() -> &'static Array<ProtectMask>;
    fn limits() -> &'static Array<ProtectLimit>;
}

/// The protected entry the packet belongs to.
#[inline(always)]
fn entry<M: ProtectMaps>(ctx: &XdpContext, packet: &Packet) -> Option<u32> {
    let by_destination = match packet::destination(ctx, packet).ok()? {
        Address::V4(addr) => M::by_v4().get(Key::new(32, addr))?,
        Address::V6(addr) => M::by_v6().get(Key::new(128, addr))?,
    };
    // A later fragment (no transport header read) has no ports, but is its port-bound
    // entries' traffic all the same.
    let port = match packet.ports {
        Some((_, dst)) => u32::from(dst),
        None if packet.ip_end == 0 => PROTECT_FRAGMENT,
        None => NO_PORT,
    };
    by_destination
        .and(*M::by_protocol().get(u32::from(packet.protocol))?)
        .and(*M::by_dst_port().get(port)?)
        .first()
}

/// Judges the packet by its protected entry, if it has one: the entry's attack fingerprint
/// first (so that the attack stops costing legitimate traffic its share of the bucket), then the
/// entry's buckets. Returns the entry and the reason when the packet is to be dropped.
#[inline(always)]
pub fn judge<M: ProtectMaps>(
    ctx: &XdpContext,
    packet: &Packet,
    frame_len: u64,
    now: u64,
) -> Option<(u32, Reason)> {
    let entry = entry::<M>(ctx, packet)?;
    let hit = if PROT_PRINTS
        .get(entry)
        .is_some_and(|print| print.fields != 0 && fingerprint::matches(ctx, packet, print))
    {
        ProtectHit::Fingerprint
    } else if conforms::<M>(entry, frame_len, now) {
        ProtectHit::Conforming
    } else {
        ProtectHit::Over
    };
    stats::count_protected(entry, hit, frame_len);
    let reason = match hit {
        ProtectHit::Conforming => Reason::NoMatch,
        ProtectHit::Over => Reason::DstLimit,
        ProtectHit::Fingerprint => Reason::Fingerprint,
    };
    sample(ctx, packet, entry, reason, now);
    (hit != ProtectHit::Conforming).then_some((entry, reason))
}

/// Charges the packet to the entry's buckets; whether it conforms.
#[inline(always)]
fn conforms<M: ProtectMaps>(entry: u32, frame_len: u64, now: u64) -> bool {
    let Some(limit) = M::limits().get(entry) else {
        return true;
    };
    let Some(bucket) = PROT_BUCKETS.get_ptr_mut(entry) else {
        return true;
    };
    // SAFETY: a value of a shared array, valid for the program run; its TATs are only updated
    // by compare-and-swap.
    unsafe {
        (limit.ns_per_packet == 0
            || gcra(
                AtomicU64::from_ptr(&raw mut (*bucket).packets_tat),
                limit.ns_per_packet,
                limit.packets_burst_ns,
                now,
            ))
            && (limit.ps_per_byte == 0
                || gcra(
                    AtomicU64::from_ptr(&raw mut (*bucket).bits_tat),
                    // Rounded up: a small frame never costs nothing.
                    (frame_len * limit.ps_per_byte).div_ceil(1000),
                    limit.bits_burst_ns,
                    now,
                ))
    }
}

/// Sends the agent a sample of the entry's traffic, at most one per
/// [`PROTECT_SAMPLE_INTERVAL_NS`] on this CPU: what the agent learns baselines and attack
/// fingerprints from.
#[inline(always)]
fn sample(ctx: &XdpContext, packet: &Packet, entry: u32, reason: Reason, now: u64) {
    let Some(pacing) = PROT_SAMPLE_AT.get_ptr_mut(entry) else {
        return;
    };
    // SAFETY: a per-CPU value: no other program run touches it concurrently. Past the
    // interval, each packet is taken with a chance of 1 in 4 rather than the first one: the
    // first after a clock tick is often traffic that timers pace, and would stand for all.
    let weight = unsafe {
        if now < (*pacing).next_ns || bpf_get_prandom_u32() & (SAMPLE_CHANCE - 1) != 0 {
            (*pacing).unsampled += 1;
            return;
        }
        (*pacing).next_ns = now + PROTECT_SAMPLE_INTERVAL_NS;
        let weight = (*pacing).unsampled + 1;
        (*pacing).unsampled = 0;
        weight
    };
    events::protect_sample(
        ctx,
        &packet.source,
        entry,
        reason,
        weight.min(u64::from(u32::MAX)) as u32,
    );
}
