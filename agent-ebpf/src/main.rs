//! moat's XDP program: parse the packet, decide, count, act.
#![no_std]
#![no_main]

mod maps;
mod packet;
mod stats;

use agent_common::stats::{Action, Reason};
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::packet::{Malformed, Source};

/// What to do with a packet, and why.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: Action,
    pub reason: Reason,
}

impl Verdict {
    const fn pass(reason: Reason) -> Self {
        Self {
            action: Action::Pass,
            reason,
        }
    }

    const fn drop(reason: Reason) -> Self {
        Self {
            action: Action::Drop,
            reason,
        }
    }
}

#[xdp]
pub fn moat(ctx: XdpContext) -> u32 {
    let verdict = decide(&ctx);
    stats::count(&ctx, verdict);
    match verdict.action {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

/// The decision chain, in the order packets meet it.
#[inline(always)]
fn decide(ctx: &XdpContext) -> Verdict {
    let source = match packet::source(ctx) {
        Ok(Some(source)) => source,
        Ok(None) => return Verdict::pass(Reason::NotIp),
        Err(Malformed) => return Verdict::drop(Reason::Malformed),
    };
    if is_blocked(&source) {
        return Verdict::drop(Reason::Blocklist);
    }
    Verdict::pass(Reason::NoMatch)
}

#[inline(always)]
fn is_blocked(source: &Source) -> bool {
    match source {
        Source::V4(addr) => maps::blocklist_v4_contains(*addr),
        Source::V6(addr) => maps::blocklist_v6_contains(*addr),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
