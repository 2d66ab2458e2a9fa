//! Bans and the per-source rate limiter (GCRA, see `agent_common::rate_limit`).

use core::{intrinsics::AtomicOrdering, sync::atomic::AtomicU64};

use agent_common::{
    lists::SOURCE_RATE_LIMIT,
    rate_limit::{Ban, FAMILY_V4, FAMILY_V6, RateState, SourceKey},
    settings::RateSettings,
};
use aya_ebpf::bindings::BPF_NOEXIST;

use crate::{
    lists::mask_v6,
    maps::{BANS, RATE_LIMITS, VERIFIED},
    packet::Address,
};

/// Attempts at a compare-and-swap before treating a source's packet as over its limit: only a
/// source hammering one entry from every CPU at once exhausts them.
const CAS_ATTEMPTS: usize = 4;
/// A source whose excess pauses this long starts a new "over the limit" streak.
const OVER_LIMIT_GAP_NS: u64 = 1_000_000_000;

/// The key of a source for bans and rate limits: its address cut to the configured prefix.
#[inline(always)]
pub fn source_key(settings: &RateSettings, source: &Address) -> SourceKey {
    match source {
        Address::V4(addr) => {
            let prefix = settings.v4_prefix.min(32);
            let host = u32::from_be_bytes(*addr);
            let masked = if prefix == 0 {
                0
            } else {
                host & (u32::MAX << (32 - prefix))
            };
            // Four word stores: zeroing the byte array would be a call to a byte-wise memset
            // on every packet.
            let words = [masked.to_be(), 0, 0, 0];
            SourceKey {
                family: FAMILY_V4,
                // SAFETY: [u32; 4] and [u8; 16] have the same size, and any bytes are valid.
                addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) },
            }
        }
        Address::V6(addr) => SourceKey {
            family: FAMILY_V6,
            addr: mask_v6(addr, settings.v6_prefix.min(128)),
        },
    }
}

/// The source's limiter state (null when it has none yet): looked up once per packet, for the
/// ban check and then for the charge.
#[inline(always)]
pub fn state(key: &SourceKey) -> *mut RateState {
    RATE_LIMITS.get_ptr_mut(key).unwrap_or_default()
}

/// Whether the source whose limiter state is `state` (null: none) is banned, by the copy of its
/// ban the state holds.
#[inline(always)]
pub fn banned_by_state(state: *mut RateState, now: u64) -> bool {
    if state.is_null() {
        return false;
    }
    // SAFETY: a non-null value pointer from the lookup, valid for the program run; the field is
    // written whole (a torn read could only misjudge one packet's expiry).
    let until = unsafe { core::ptr::read_volatile(&raw const (*state).banned_until) };
    now < until
}

/// The source of an unexpired ban on `key` in the ban map: read only for a source the limiter
/// does not track (its ban restored at start, or its state evicted under a flood).
#[inline(always)]
pub fn banned_by_map(key: &SourceKey, now: u64) -> Option<u32> {
    // SAFETY: a ban is replaced whole; a torn read could only misjudge one packet's expiry.
    let ban = unsafe { BANS.get(key) }?;
    (now < ban.expires_at).then_some(ban.source)
}

pub enum Limit {
    Conforming,
    Over,
    /// Over the limit for longer than `ban_after`: banned until the given time.
    Banned(u64),
}

/// Charges one packet of `frame_len` bytes to the source whose state `state` is (null: none
/// yet, so one is made).
#[inline(always)]
pub fn charge(
    settings: &RateSettings,
    key: &SourceKey,
    state: *mut RateState,
    frame_len: u64,
    now: u64,
) -> Limit {
    let state = if state.is_null() {
        // A new source; another CPU may insert it first, which is as good.
        let _ = RATE_LIMITS.insert(key, RateState::default(), u64::from(BPF_NOEXIST));
        match RATE_LIMITS.get_ptr_mut(key) {
            Some(state) => state,
            // Evicted at once under a flood of new sources: let this one packet through.
            None => return Limit::Conforming,
        }
    } else {
        state
    };
    // SAFETY: map values live as long as the program run; fields are only accessed atomically
    // (the TATs) or as plain u64 stores whose races are benign (the streak timestamps).
    unsafe {
        let packets_ok = settings.ns_per_packet == 0
            || gcra(
                AtomicU64::from_ptr(&raw mut (*state).packets_tat),
                settings.ns_per_packet,
                settings.burst_ns,
                now,
            );
        let bits_ok = !packets_ok
            || settings.ps_per_byte == 0
            || gcra(
                AtomicU64::from_ptr(&raw mut (*state).bits_tat),
                frame_len * settings.ps_per_byte / 1000,
                settings.burst_ns,
                now,
            );
        if packets_ok && bits_ok {
            count_passed(state, frame_len);
            return Limit::Conforming;
        }
        let over_since = (*state).over_since;
        let last_over = (*state).last_over;
        (*state).last_over = now;
        if over_since == 0 || now.saturating_sub(last_over) > OVER_LIMIT_GAP_NS {
            (*state).over_since = now;
            return Limit::Over;
        }
        if settings.ban_ttl_ns != 0
            && now - over_since >= settings.ban_after_ns
            && (settings.ban_verified_only == 0 || verified(key, now))
        {
            let expires_at = now + settings.ban_ttl_ns;
            let ban = Ban {
                expires_at,
                source: SOURCE_RATE_LIMIT,
                _pad: 0,
            };
            if BANS.insert(key, ban, 0).is_ok() {
                (*state).banned_until = expires_at;
                (*state).over_since = 0;
                // Under a flood of new sources this state may have been evicted and the
                // source's state made anew by another CPU: the live entry gets the copy too.
                if let Some(live) = RATE_LIMITS.get_ptr_mut(key) {
                    (*live).banned_until = expires_at;
                }
                return Limit::Banned(expires_at);
            }
        }
    }
    Limit::Over
}

/// Whether the SYN proxy verified the source (`ban = "verified"`): one whose address may be
/// forged is never banned, whatever it sends; its excess is dropped all the same.
#[inline(always)]
pub fn verified(key: &SourceKey, now: u64) -> bool {
    // SAFETY: the value is a u64 written whole.
    unsafe { VERIFIED.get(key) }.is_some_and(|until| now < *until)
}

/// Adds a conforming packet to the source's totals. Plain adds, not atomic ones (which cost
/// about as much as the rest of the limiter): the totals feed `moat top`'s per-source rates, and
/// only two CPUs passing the same source's packets at the same instant can lose one.
#[inline(always)]
unsafe fn count_passed(state: *mut RateState, frame_len: u64) {
    // SAFETY: `state` is a valid, aligned map value for the program run.
    unsafe {
        (*state).passed_packets += 1;
        (*state).passed_bytes += frame_len;
    }
}

/// Conforms (and advances the TAT by `cost`) when the TAT is at most `burst` ahead of `now`.
#[inline(always)]
pub fn gcra(tat: &AtomicU64, cost: u64, burst: u64, now: u64) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        // A plain read: the compare-and-swap below validates it.
        // SAFETY: `tat` is a valid, aligned u64 in a map value.
        let old = unsafe { core::ptr::read_volatile(tat.as_ptr()) };
        let start = if old > now { old } else { now };
        if start - now > burst {
            return false;
        }
        // core's AtomicU64 has no compare_exchange on this target; the intrinsic lowers to
        // BPF_CMPXCHG (kernel 5.12+).
        // SAFETY: `tat` is a valid, aligned u64 in a map value.
        let (_, swapped) = unsafe {
            core::intrinsics::atomic_cxchg::<
                u64,
                { AtomicOrdering::Relaxed },
                { AtomicOrdering::Relaxed },
            >(tat.as_ptr(), old, start + cost)
        };
        if swapped {
            return true;
        }
    }
    false
}
