//! Events for the agent: bans, samples of dropped packets with the start of their frame, and
//! samples of the traffic of protected destinations.

use agent_common::{
    events::{EVENT_BAN, EVENT_PROTECT_SAMPLE, EVENT_SAMPLE, Event, SAMPLE_BYTES},
    rate_limit::SourceKey,
    stats::{Action, Reason},
};
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_xdp_load_bytes},
    programs::XdpContext,
};

use crate::{
    Verdict,
    maps::{EVENTS, EVENTS_LOST},
    packet::Address,
};

/// Reports a new ban of `key` until `expires_at`.
#[inline(always)]
pub fn ban(ctx: &XdpContext, key: &SourceKey, now: u64, expires_at: u64) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost();
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, writable ring buffer slot of the right size; every
    // field the agent reads is written before submit.
    unsafe {
        (*event).kind = EVENT_BAN;
        (*event).reason = 0;
        (*event).if_index = ctx.ingress_ifindex() as u32;
        (*event).family = key.family;
        (*event).source = key.addr;
        (*event).timestamp = now;
        (*event).expires_at = expires_at;
        (*event).frame_len = 0;
        (*event).captured_len = 0;
        (*event).action = 0;
        (*event).weight = 0;
        (*event).detail = 0;
        (*event)._pad = 0;
    }
    entry.submit(0);
}

/// A sample of a packet: the verdict, the source and the frame's start; it stands for `weight`
/// packets.
#[inline(always)]
pub fn sample(ctx: &XdpContext, verdict: &Verdict, action: Action, weight: u32) {
    write_sample(ctx, EVENT_SAMPLE, verdict, action, weight);
}

/// A sample of the traffic of protected entry `entry`, standing for `weight` packets; `reason`
/// says what the entry made of the packet (`no_match`: it conformed).
#[inline(always)]
pub fn protect_sample(ctx: &XdpContext, source: &Address, entry: u32, reason: Reason, weight: u32) {
    let action = if reason == Reason::NoMatch {
        Action::Pass
    } else {
        Action::Drop
    };
    let verdict = Verdict::new(action, reason, entry).with_source(source);
    write_sample(ctx, EVENT_PROTECT_SAMPLE, &verdict, action, weight);
}

#[inline(always)]
fn write_sample(ctx: &XdpContext, kind: u32, verdict: &Verdict, action: Action, weight: u32) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost();
        return;
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u32;
    // The mask and +1 put the length in 1..=SAMPLE_BYTES in a way the verifier can follow
    // (SAMPLE_BYTES is a power of two); an empty frame becomes SAMPLE_BYTES and fails the copy.
    const _: () = assert!(SAMPLE_BYTES.is_power_of_two());
    let captured =
        (frame_len.min(SAMPLE_BYTES as u32).wrapping_sub(1) & (SAMPLE_BYTES as u32 - 1)) + 1;
    let event = entry.as_mut_ptr();
    // SAFETY: as in `ban`; bpf_xdp_load_bytes copies at most SAMPLE_BYTES into `data`.
    unsafe {
        (*event).kind = kind;
        (*event).reason = verdict.reason as u32;
        (*event).if_index = ctx.ingress_ifindex() as u32;
        (*event).family = verdict.family;
        (*event).source = verdict.source;
        (*event).timestamp = bpf_ktime_get_ns();
        (*event).expires_at = 0;
        (*event).frame_len = frame_len;
        (*event).action = action as u32;
        (*event).weight = weight;
        (*event).detail = verdict.detail;
        (*event)._pad = 0;
        let copied = bpf_xdp_load_bytes(ctx.ctx, 0, (&raw mut (*event).data).cast(), captured) == 0;
        (*event).captured_len = if copied { captured } else { 0 };
    }
    entry.submit(0);
}

#[inline(always)]
fn count_lost() {
    if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU value.
        unsafe { *lost += 1 };
    }
}
