//! One place counts every verdict: per CPU, per (interface slot, action, reason), plus the hits
//! of the list entry source or rule that decided.

use agent_common::{
    lists::hit_index,
    maps::{SLOT_INDEX_MASK, SLOT_NO_ETHERNET},
    protect::{ProtectHit, protect_hit_index},
    stats::{Action, Counter, Reason, index},
};
use aya_ebpf::{maps::PerCpuArray, programs::XdpContext};

use crate::{
    Verdict,
    maps::{INTERFACE_SLOTS, LIST_HITS, PROT_HITS, RULE_HITS, STATS},
};

/// The interface a packet arrived on, as the agent registered it.
#[derive(Clone, Copy)]
pub struct Interface {
    /// Its counter slot (0: not registered).
    pub slot: u32,
    /// Its frames start with the IP header.
    pub no_ethernet: bool,
}

/// The interface of `ctx`: read once per packet, for the parser and the counters.
#[inline(always)]
pub fn interface(ctx: &XdpContext) -> Interface {
    let ifindex = ctx.ingress_ifindex() as u32;
    // Out of range (or unregistered, 0): slot 0, Ethernet.
    let value = INTERFACE_SLOTS.get(ifindex).copied().unwrap_or(0);
    Interface {
        slot: value & SLOT_INDEX_MASK,
        no_ethernet: value & SLOT_NO_ETHERNET != 0,
    }
}

#[inline(always)]
/// Counts the packet; returns how many packets this CPU has now counted under the same
/// (interface, action, reason), which paces sampling without a random-number helper call.
pub fn count(ctx: &XdpContext, slot: u32, verdict: &Verdict, action: Action) -> u64 {
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

/// Counts a packet charged to a protected entry by what the entry made of it (whatever the
/// mode: in monitor mode the excess passes, and is counted here all the same).
#[inline(always)]
pub fn count_protected(entry: u32, hit: ProtectHit, bytes: u64) {
    add(&PROT_HITS, protect_hit_index(entry, hit), bytes);
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
