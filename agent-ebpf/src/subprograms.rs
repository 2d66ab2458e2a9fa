//! The stages after the lists and bans — rules, the SYN proxy and protected destinations — and
//! the lists' probe of long IPv4 prefixes, as global BPF functions. The verifier checks a
//! global function once, on its own, and each call to it as one instruction; inlined, a stage
//! is walked again for every path that reaches it (each generation, with and without bans),
//! and the paths of the stages before it multiply its own. That walk, not the instruction
//! count, is what bounds the program (a million instructions).
//!
//! A global function takes only the context and scalars, so the parsed packet reaches it
//! through a per-CPU slot ([`PACKET`]): the program run that writes it is the one that reads it
//! (XDP runs without preemption), and nothing else touches it. (Passing it in registers, packed
//! into two words, was tried: 6.18 took it, but Linux 6.1's verifier then walked the list stage
//! past its limit.)

use agent_common::stats::Reason;
use aya_ebpf::{bindings::xdp_md, programs::XdpContext};

use crate::{
    generation::{Protect0, Protect1, Rules0, Rules1},
    lists,
    maps::{PACKET, SETTINGS, SYN_PROXY},
    packet::Packet,
    protect, rules,
    syn_proxy::{self, Outcome},
};

/// A stage found nothing to say.
const NONE: u64 = u64::MAX;

/// Hands `packet` to the stage functions. (Slot 0 of a one-slot array is always there; were it
/// not, the stage functions could not read it either, and would find nothing.)
#[inline(always)]
pub fn hand_over(packet: &Packet) {
    if let Some(slot) = PACKET.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, used only within this program run.
        unsafe { *slot = *packet };
    }
}

/// The first matching rule and its action, of generation `generation`'s rules (see
/// [`rules::first_match`]).
#[inline(always)]
pub fn first_rule(ctx: &XdpContext, generation: u32, fields: u32) -> Option<(u32, u32)> {
    unpack(moat_rules(ctx.ctx, generation, fields))
}

/// The protected entry that drops the packet and why (see [`protect::judge`]).
#[inline(always)]
pub fn protected(ctx: &XdpContext, generation: u32, now: u64) -> Option<(u32, Reason)> {
    let (entry, reason) = unpack(moat_protect(ctx.ctx, generation, now))?;
    Some((
        entry,
        if reason == Reason::Fingerprint as u32 {
            Reason::Fingerprint
        } else {
            Reason::DstLimit
        },
    ))
}

/// The SYN proxy's outcome for the packet (see [`syn_proxy::classify`] and
/// [`syn_proxy::answer`]); `ethernet`: the frame has MAC addresses to swap.
#[inline(always)]
pub fn syn_proxy(
    ctx: &XdpContext,
    generation: u32,
    enforce: bool,
    ethernet: bool,
    now: u64,
) -> Outcome {
    match Outcome::from_u64(moat_syn_classify(ctx.ctx, generation, now)) {
        Outcome::Syn if ethernet => {
            Outcome::from_u64(moat_syn_answer(ctx.ctx, generation, u32::from(enforce)))
        }
        // Without Ethernet, the stack's synproxy answers.
        _ => Outcome::Continue,
    }
}

/// See [`lists::v4_long_held`].
#[inline(always)]
pub fn v4_long(host: u32, lengths: u32, prefix_slot: usize) -> u32 {
    moat_v4_long(host, lengths, prefix_slot as u32)
}

/// See [`lists::v4_long_probe`].
#[inline(always)]
pub fn v4_long_probe(addr: u32, prefix_len: u32) -> u64 {
    moat_v4_long_probe(addr, prefix_len)
}

#[inline(always)]
fn pack(value: Option<(u32, u32)>) -> u64 {
    value.map_or(NONE, |(low, high)| (u64::from(high) << 32) | u64::from(low))
}

#[inline(always)]
fn unpack(packed: u64) -> Option<(u32, u32)> {
    (packed != NONE).then_some((packed as u32, (packed >> 32) as u32))
}

/// The handed-over packet.
#[inline(always)]
fn packet<'a>() -> Option<&'a Packet> {
    PACKET.get(0)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_rules(ctx: *mut xdp_md, generation: u32, fields: u32) -> u64 {
    let ctx = XdpContext::new(ctx);
    let Some(packet) = packet() else {
        return NONE;
    };
    pack(if generation == 0 {
        rules::first_match::<Rules0>(&ctx, packet, fields)
    } else {
        rules::first_match::<Rules1>(&ctx, packet, fields)
    })
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_protect(ctx: *mut xdp_md, generation: u32, now: u64) -> u64 {
    let ctx = XdpContext::new(ctx);
    let Some(packet) = packet() else {
        return NONE;
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let judged = if generation == 0 {
        protect::judge::<Protect0>(&ctx, packet, frame_len, now)
    } else {
        protect::judge::<Protect1>(&ctx, packet, frame_len, now)
    };
    pack(judged.map(|(entry, reason)| (entry, reason as u32)))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_syn_classify(ctx: *mut xdp_md, generation: u32, now: u64) -> u64 {
    let ctx = XdpContext::new(ctx);
    let (Some(packet), Some(settings), Some(policy)) = (
        packet(),
        SYN_PROXY.get(generation),
        SETTINGS.get(generation),
    ) else {
        return Outcome::Continue as u64;
    };
    syn_proxy::classify(&ctx, packet, settings, &policy.rate, now) as u64
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_syn_answer(ctx: *mut xdp_md, generation: u32, enforce: u32) -> u64 {
    let ctx = XdpContext::new(ctx);
    let (Some(packet), Some(settings)) = (packet(), SYN_PROXY.get(generation)) else {
        return Outcome::Continue as u64;
    };
    syn_proxy::answer(&ctx, packet, settings, enforce != 0) as u64
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_v4_long(host: u32, lengths: u32, prefix_slot: u32) -> u32 {
    lists::v4_long_held(host, lengths, prefix_slot)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn moat_v4_long_probe(addr: u32, prefix_len: u32) -> u64 {
    lists::v4_long_probe(addr, prefix_len)
}
