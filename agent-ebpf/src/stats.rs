//! One place counts every verdict: per CPU, per (interface slot, action, reason).

use agent_common::stats::index;
use aya_ebpf::programs::XdpContext;

use crate::{
    Verdict,
    maps::{INTERFACE_SLOTS, STATS},
};

#[inline(always)]
pub fn count(ctx: &XdpContext, verdict: Verdict) {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the slot map is only written by the agent while attaching, and a u32 read is atomic.
    let slot = unsafe { INTERFACE_SLOTS.get(ifindex) }
        .copied()
        .unwrap_or(0);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if let Some(counter) = STATS.get_ptr_mut(index(slot, verdict.action, verdict.reason)) {
        // SAFETY: per-CPU value, so no other program run touches it concurrently.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}
