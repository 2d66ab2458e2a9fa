//! moat's XDP program: parse the packet, decide, count, act.
#![no_std]
#![no_main]
#![expect(
    internal_features,
    reason = "core_intrinsics gives BPF_CMPXCHG for the rate limiter (see rate_limit.rs)"
)]
#![feature(core_intrinsics)]

mod clock;
mod events;
mod fingerprint;
mod generation;
mod lists;
mod maps;
mod packet;
mod protect;
mod rate_limit;
mod rules;
mod stats;
mod subprograms;
mod syn_proxy;

use agent_common::{
    lists::SOURCE_RATE_LIMIT,
    rate_limit::{FAMILY_V4, FAMILY_V6, RateState, SourceKey},
    rules::RULE_PASS,
    settings::{MODE_ENFORCE, MODE_MONITOR, Settings},
    stats::{Action, Reason},
};
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::{
    generation::{Generation, Generation0, Generation1},
    maps::{CAPTURE, SETTINGS},
    packet::{Address, Malformed, Packet},
    rate_limit::Limit,
    stats::Interface,
    syn_proxy::Outcome,
};

/// What the policy decided for a packet, and why.
pub struct Verdict {
    pub action: Action,
    pub reason: Reason,
    /// The list entry source (list reasons) or rule index (`Rule`) that decided.
    pub detail: u32,
    /// The packet's source for samples: family 0 when the packet was not IP. Always written, so
    /// no path hands the verifier an uninitialised register.
    pub family: u32,
    pub source: [u8; 16],
}

impl Verdict {
    const fn new(action: Action, reason: Reason, detail: u32) -> Self {
        Self {
            action,
            reason,
            detail,
            family: 0,
            source: [0; 16],
        }
    }

    const fn pass(reason: Reason, detail: u32) -> Self {
        Self::new(Action::Pass, reason, detail)
    }

    const fn drop(reason: Reason, detail: u32) -> Self {
        Self::new(Action::Drop, reason, detail)
    }

    /// The verdict, carrying the packet's source (for the event and the counters).
    fn with_source(mut self, source: &Address) -> Self {
        match source {
            Address::V4(addr) => {
                self.family = FAMILY_V4;
                self.source[..4].copy_from_slice(addr);
            }
            Address::V6(addr) => {
                self.family = FAMILY_V6;
                self.source = *addr;
            }
        }
        self
    }
}

/// Forced inline into the entry point the macro wraps it in: left to itself, LLVM stops
/// inlining the body once it passes a size, and every packet then pays a call and the spills
/// around it (10 ns here).
#[xdp]
#[inline(always)]
pub fn moat(ctx: XdpContext) -> u32 {
    let generation = generation::active();
    let Some(settings) = SETTINGS.get(generation) else {
        return xdp_action::XDP_PASS;
    };
    let interface = stats::interface(&ctx);
    let verdict = match packet::parse(&ctx, interface.no_ethernet) {
        Ok(Some(packet)) => {
            let verdict = if generation == 0 {
                decide::<Generation0>(&ctx, settings, interface, &packet)
            } else {
                decide::<Generation1>(&ctx, settings, interface, &packet)
            };
            verdict.with_source(&packet.source)
        }
        Ok(None) => Verdict::pass(Reason::NotIp, 0),
        Err(Malformed) => Verdict::drop(Reason::Malformed, 0),
    };
    let action = match verdict.action {
        Action::Drop if settings.mode == MODE_MONITOR => Action::WouldDrop,
        action => action,
    };
    let seen = stats::count(&ctx, interface.slot, &verdict, action);
    if action == Action::Tx {
        // The frame is the SYN-ACK now: nothing of the SYN is left to sample.
        return xdp_action::XDP_TX;
    }
    let capture = CAPTURE.get(0);
    if matches!(action, Action::Pass | Action::WouldTx) {
        // Passed packets are sampled only while `moat capture --passed` runs.
        if let Some(capture) = capture
            && capture.passed_every != 0
            && paced(seen, capture.passed_every)
        {
            events::sample(&ctx, &verdict, action, capture.passed_every);
        }
        return xdp_action::XDP_PASS;
    }
    let every = match capture {
        Some(capture) if capture.dropped_every != 0 => capture.dropped_every,
        _ => settings.sample_every,
    };
    if every != 0 && paced(seen, every) {
        events::sample(&ctx, &verdict, action, every);
    }
    match action {
        Action::Drop => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// Whether the `seen`th packet is one of every `every` (not 0). In 32 bits: a 64-bit division
/// costs several times more per packet, and the cadence slips only once in 2^32 packets.
#[inline(always)]
fn paced(seen: u64, every: u32) -> bool {
    (seen as u32).is_multiple_of(every)
}

/// The decision chain for an IP packet, in the order packets meet it; the first stage that
/// decides wins.
#[inline(always)]
fn decide<G: Generation>(
    ctx: &XdpContext,
    settings: &Settings,
    interface: Interface,
    packet: &Packet,
) -> Verdict {
    if let Some(source) = lists::lookup::<G::Allow>(&settings.allow, &packet.source) {
        return Verdict::pass(Reason::Allowlist, source);
    }
    if let Some(source) = lists::lookup::<G::Block>(&settings.block, &packet.source) {
        return Verdict::drop(Reason::Blocklist, source);
    }
    // Bans and rate limits need the source's key and the clock: read them only for those. (No
    // Option holds them across the rules: kernels before 6.x reject the partial register spills
    // LLVM makes of such an Option.)
    if settings.check_bans != 0 {
        let now = clock::now();
        let key = rate_limit::source_key(&settings.rate, &packet.source);
        // One lookup serves the ban check and the charge.
        let rate_limit::Tracked { state, banned } = rate_limit::lookup(&key, now);
        if banned {
            return Verdict::drop(Reason::Ban, SOURCE_RATE_LIMIT);
        }
        hand_over(settings, packet);
        // An untracked source's ban is in the ban map, read after the rules: a packet a rule
        // drops is dropped either way (and counted under the rule), so a reflection flood
        // from sources the limiter never tracks pays one lookup, not two.
        return match rule_verdict::<G>(ctx, settings) {
            Some(verdict) if verdict.action == Action::Drop => verdict,
            rule => {
                if state.is_null()
                    && let Some(source) = rate_limit::banned_by_map(&key, now)
                {
                    return Verdict::drop(Reason::Ban, source);
                }
                match rule {
                    Some(verdict) => verdict,
                    None => syn_proxy::<G>(ctx, settings, interface, now)
                        .or_else(|| protected::<G>(ctx, settings, now))
                        .unwrap_or_else(|| limit(ctx, settings, &key, state, now)),
                }
            }
        };
    }
    hand_over(settings, packet);
    if let Some(verdict) = rule_verdict::<G>(ctx, settings) {
        return verdict;
    }
    if settings.protect_count == 0 && settings.syn_proxy == 0 && !settings.rate.is_on() {
        return Verdict::pass(Reason::NoMatch, 0);
    }
    let now = clock::now();
    if let Some(verdict) = syn_proxy::<G>(ctx, settings, interface, now) {
        return verdict;
    }
    if let Some(verdict) = protected::<G>(ctx, settings, now) {
        return verdict;
    }
    let key = rate_limit::source_key(&settings.rate, &packet.source);
    limit(
        ctx,
        settings,
        &key,
        rate_limit::lookup(&key, now).state,
        now,
    )
}

/// Hands the packet to the stages that run as global functions, when some will run: not before
/// a ban has had its say, so that a banned source's flood does not pay for it.
#[inline(always)]
fn hand_over(settings: &Settings, packet: &Packet) {
    if settings.rule_count != 0 || settings.protect_count != 0 || settings.syn_proxy != 0 {
        subprograms::hand_over(packet);
    }
}

#[inline(always)]
fn rule_verdict<G: Generation>(ctx: &XdpContext, settings: &Settings) -> Option<Verdict> {
    if settings.rule_count == 0 {
        return None;
    }
    let (rule, action) = subprograms::first_rule(ctx, G::ID, settings.rule_fields)?;
    Some(if action == RULE_PASS {
        Verdict::pass(Reason::Rule, rule)
    } else {
        Verdict::drop(Reason::Rule, rule)
    })
}

/// The SYN proxy's verdict (when `[syn_proxy]` is on): a SYN answered with a cookie, or one
/// that would be in monitor mode. Before the protected destinations and the limiter: a SYN
/// flood forging its sources makes no state anywhere.
#[inline(always)]
fn syn_proxy<G: Generation>(
    ctx: &XdpContext,
    settings: &Settings,
    interface: Interface,
    now: u64,
) -> Option<Verdict> {
    if settings.syn_proxy == 0 {
        return None;
    }
    let enforce = settings.mode == MODE_ENFORCE;
    match subprograms::syn_proxy(ctx, G::ID, enforce, !interface.no_ethernet, now) {
        Outcome::Continue | Outcome::Syn => None,
        Outcome::Answered => Some(Verdict::new(Action::Tx, Reason::SynCookie, 0)),
        Outcome::WouldAnswer => Some(Verdict::new(Action::WouldTx, Reason::SynCookie, 0)),
        Outcome::Malformed => Some(Verdict::drop(Reason::Malformed, 0)),
    }
}

/// The verdict of the protected destinations (when any is configured): a drop when the packet
/// matches its destination's attack fingerprint or is over its limit. Before the per-source
/// limiter, so that the excess of a flood forging a new source per packet makes no limiter
/// state (evicting real clients').
#[inline(always)]
fn protected<G: Generation>(ctx: &XdpContext, settings: &Settings, now: u64) -> Option<Verdict> {
    if settings.protect_count == 0 {
        return None;
    }
    let (entry, reason) = subprograms::protected(ctx, G::ID, now)?;
    Some(Verdict::drop(reason, entry))
}

/// The rate limiter's verdict (when it is on), reporting a new ban.
#[inline(always)]
fn limit(
    ctx: &XdpContext,
    settings: &Settings,
    key: &SourceKey,
    state: *mut RateState,
    now: u64,
) -> Verdict {
    if !settings.rate.is_on() {
        return Verdict::pass(Reason::NoMatch, 0);
    }
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    match rate_limit::charge(&settings.rate, key, state, frame_len, now) {
        Limit::Conforming => Verdict::pass(Reason::NoMatch, 0),
        Limit::Over => Verdict::drop(Reason::RateLimit, 0),
        Limit::Banned(expires_at) => {
            events::ban(ctx, key, now, expires_at);
            Verdict::drop(Reason::RateLimit, 0)
        }
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
