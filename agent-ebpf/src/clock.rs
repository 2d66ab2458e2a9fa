//! The clock of bans, rate limits and protected destinations (see `agent_common::clock`), and
//! the program the agent runs at load to set it.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::xdp,
    programs::XdpContext,
};

use agent_common::clock::ClockSample;

use crate::maps::CLOCK;

/// CLOCK_MONOTONIC at tick resolution, in nanoseconds. The agent raises a burst shorter than a
/// tick (`config::CLOCK_TICK_MAX`), so no rate is misjudged for it. Jiffies are one load (the
/// verifier inlines the helper); a helper call for the coarse clock cost 20–25 ns per packet.
#[inline(always)]
pub fn now() -> u64 {
    match CLOCK.get(0) {
        // SAFETY: a helper without arguments.
        Some(clock) if clock.tick_ns != 0 => clock.now(unsafe { bpf_jiffies64() }),
        // Not measured yet (the agent sets it before it attaches): the helper's clock.
        // SAFETY: a helper without arguments.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Reads both clocks at once for the agent, into the first bytes of the frame it test-runs
/// (see `agent_common::clock::ClockSample`); never attached.
#[xdp]
pub fn moat_clock(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + size_of::<ClockSample>() <= end {
        // SAFETY: the bounds are checked above; the helpers take no arguments.
        unsafe {
            let sample = ClockSample {
                jiffies: bpf_jiffies64(),
                monotonic_ns: bpf_ktime_get_ns(),
            };
            core::ptr::write_unaligned(start as *mut ClockSample, sample);
        }
    }
    xdp_action::XDP_PASS
}
