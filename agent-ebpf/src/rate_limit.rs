//! Bans and the per-source rate limiter (GCRA, see `agent_common::rate_limit`).

use core::{intrinsics::AtomicOrdering, sync::atomic::AtomicU64};

use agent_common::{
    lists::SOURCE_RATE_LIMIT,
    rate_limit::{Ban, FAMILY_V4, FAMILY_V6, RateSlot, RateState, SourceKey},
    settings::RateSettings,
};

use crate::{
    lists::mask_v6,
    maps::{BANS, RATE_LIMITS, RATE_TABLE, VERIFIED},
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

/// A source's limiter state, as [`lookup`] found it.
pub struct Tracked {
    /// Null when the table does not hold the source.
    pub state: *mut RateState,
    /// Its state's copy of a ban is in force.
    pub banned: bool,
}

/// The source's limiter state: looked up once per packet, for the ban check and then for the
/// charge. Two array slots at most, both inlined by the verifier (an LRU hash's lookup cost
/// about 35 ns per packet here). Inlined here too: out of line, as a function of its own or a
/// global one, Linux 6.1's verifier walked the lists before it past its limit.
#[inline(always)]
pub fn lookup(key: &SourceKey, now: u64) -> Tracked {
    let found = find(key, now);
    Tracked {
        state: slot_state(found),
        banned: found != SLOT_NONE && found & SLOT_BANNED != 0,
    }
}

/// The state in the slot a slot function returned (null for none).
#[inline(always)]
fn slot_state(found: u64) -> *mut RateState {
    if found == SLOT_NONE {
        return core::ptr::null_mut();
    }
    match RATE_LIMITS.get_ptr_mut(found as u32) {
        // SAFETY: a valid map value for the program run.
        Some(slot) => unsafe { &raw mut (*slot).state },
        None => core::ptr::null_mut(),
    }
}

/// What the slot functions return for no slot.
pub const SLOT_NONE: u64 = u64::MAX;
/// Beside the slot [`find`] returns: the state's copy of a ban holds for the source now.
pub const SLOT_BANNED: u64 = 1 << 32;

/// The slot that holds `key`, with [`SLOT_BANNED`] when its ban's copy holds at `now` (the copy
/// carries the hash of the source it was written for); [`SLOT_NONE`] when none holds it.
#[inline(always)]
pub fn find(key: &SourceKey, now: u64) -> u64 {
    let Some(table) = RATE_TABLE.get(0) else {
        return SLOT_NONE;
    };
    let hash = table.hash(key);
    for index in table.slots_of(hash) {
        if let Some(slot) = RATE_LIMITS.get_ptr_mut(index)
            && holds(slot, key)
        {
            // SAFETY: a valid map value for the program run; each field is written whole (a
            // torn read misjudges one packet).
            let (until, banned_key) = unsafe {
                (
                    core::ptr::read_volatile(&raw const (*slot).state.banned_until),
                    core::ptr::read_volatile(&raw const (*slot).state.banned_key),
                )
            };
            let banned = now < until && banned_key == hash;
            return u64::from(index) | if banned { SLOT_BANNED } else { 0 };
        }
    }
    SLOT_NONE
}

/// Whether `slot` holds `key`, word by word. Another CPU may be replacing the slot: a torn
/// key matches no source, and a state read across a replacement misjudges one packet.
#[inline(always)]
fn holds(slot: *const RateSlot, key: &SourceKey) -> bool {
    // SAFETY: a valid, 4-aligned map value for the program run.
    let held = unsafe { (*slot).key.words() };
    let wanted = key.words();
    (held[0] ^ wanted[0])
        | (held[1] ^ wanted[1])
        | (held[2] ^ wanted[2])
        | (held[3] ^ wanted[3])
        | (held[4] ^ wanted[4])
        == 0
}

/// Makes a state for a new source in the less active of its two slots (an empty one first),
/// displacing its occupant (the ban map still holds a displaced source's ban); returns the
/// slot, or [`SLOT_NONE`].
#[inline(always)]
pub fn claim(key: &SourceKey) -> u64 {
    let Some(table) = RATE_TABLE.get(0) else {
        return SLOT_NONE;
    };
    let [first, second] = table.slots(key);
    let (Some(a), Some(b)) = (
        RATE_LIMITS.get_ptr_mut(first),
        RATE_LIMITS.get_ptr_mut(second),
    ) else {
        return SLOT_NONE;
    };
    // SAFETY: valid map values for the program run; plain reads and stores whose races with
    // other CPUs are benign (see `holds`).
    unsafe {
        let (slot, index) = if (*b).activity() < (*a).activity() {
            (b, second)
        } else {
            (a, first)
        };
        // The state first: a reader still matching the old key sees a fresh state, not the
        // newcomer's key on the old source's state.
        (*slot).state = RateState::default();
        (*slot).key = *key;
        u64::from(index)
    }
}

/// Writes a ban's copy, expiring at `expires_at`, into the slot that holds `key` now (under a
/// flood of new sources the slot its packet charged may have gone to another source since),
/// tagged with the key's hash: should the slot change hands meanwhile, the copy bans no one.
#[inline(always)]
pub fn copy_ban(key: &SourceKey, expires_at: u64) {
    let Some(table) = RATE_TABLE.get(0) else {
        return;
    };
    let hash = table.hash(key);
    for index in table.slots_of(hash) {
        if let Some(slot) = RATE_LIMITS.get_ptr_mut(index)
            && holds(slot, key)
        {
            // SAFETY: a valid map value for the program run; each field is written whole.
            unsafe {
                (*slot).state.banned_key = hash;
                (*slot).state.banned_until = expires_at;
            }
            return;
        }
    }
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
        // A new source. Another CPU may claim a slot for it too: each charges its own copy
        // until one is displaced, which only ever lets a packet more through.
        match slot_state(claim(key)) {
            state if state.is_null() => return Limit::Conforming,
            state => state,
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
                (*state).over_since = 0;
                copy_ban(key, expires_at);
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
