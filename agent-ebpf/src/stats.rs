//! One place counts every verdict: per CPU, per (interface slot, action, reason), plus the hits
//! of the list entry source or rule that decided.

use agent_common::{
    lists::hit_index,
    stats::{Action, Counter, Reason, index},
};
use aya_ebpf::{maps::PerCpuArray, programs::XdpContext};

use crate::{
    Verdict,
    maps::{INTERFACE_SLOTS, LIST_HITS, RULE_HITS, STATS},
};

#[inline(always)]
/// Counts the packet; returns how many packets this CPU has now counted under the same
/// (interface, action, reason), which paces sampling without a random-number helper call.
pub fn count(ctx: &XdpContext, verdict: &Verdict, action: Action) -> u64 {
    let ifindex = ctx.ingress_ifindex() as u32;
    // Out of range (or unregistered, 0): slot 0.
    let slot = INTERFACE_SLOTS.get(ifindex).copied().unwrap_or(0);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let seen = add(&STATS, index(slot, action, verdict.reason), bytes);
    match verdict.reason {
        Reason::Allowlist | Reason::Blocklist | Reason::Ban => {
            let list = match verdict.reason {
                Reason::Allowlist => agent_common::lists::LIST_ALLOW,
                Reason::Blocklist => agent_common::lists::LIST_BLOCK,
                _ => agent_common::lists::LIST_BAN,
            };
            add(&LIST_HITS, hit_index(list, verdict.detail), bytes);
        }
        Reason::Rule => {
            add(&RULE_HITS, verdict.detail, bytes);
        }
        _ => {}
    }
    seen
}

#[inline(always)]
fn add(map: &PerCpuArray<Counter>, index: u32, bytes: u64) -> u64 {
    let Some(counter) = map.get_ptr_mut(index) else {
        return 0;
    };
    // SAFETY: per-CPU value, so no other program run touches it concurrently.
    unsafe {
        (*counter).packets += 1;
        (*counter).bytes += bytes;
        (*counter).packets
    }
}
