//! The SYN proxy stage: a SYN to a protected port is answered here with a SYN cookie, turned
//! into a SYN-ACK in place and sent back out of the interface; the handshake's final ACK goes
//! on to the stack, where netfilter's `synproxy` checks the same cookie and opens the
//! connection to the listener. The listener never sees a SYN whose source did not answer.
//! An ACK whose cookie checks out here marks its source verified (`VERIFIED`): the address is
//! real, it answered a SYN-ACK sent to it.
//!
//! SYNs this stage cannot answer in place — IPv4 options, IPv6 extension headers, an interface
//! without Ethernet — go on to the stack untouched, where the same nftables rule answers them.

use agent_common::{
    rate_limit::SourceKey,
    settings::RateSettings,
    syn_proxy::{
        Advertised, SynProxySettings, SynScratch, TCP_HEADER_MIN, parse_options, write_syn_ack,
    },
    tcp::{ACK, FIN, RST, SYN},
};
use aya_ebpf::{
    bindings::{iphdr, ipv6hdr, tcphdr},
    helpers::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_tcp_raw_check_syncookie_ipv4,
        bpf_tcp_raw_check_syncookie_ipv6, bpf_tcp_raw_gen_syncookie_ipv4,
        bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
        bpf_xdp_store_bytes,
    },
    programs::XdpContext,
};

use crate::{
    maps::{SYN_SCRATCH, VERIFIED},
    packet::{self, Address, IPPROTO_TCP, Packet},
    rate_limit,
};

const IPV4_HEADER_LEN: u32 = 20;
const IPV6_HEADER_LEN: u32 = 40;
/// Version 4, five words: no options.
const IPV4_NO_OPTIONS: u8 = 0x45;
const IPV4_DONT_FRAGMENT: u8 = 0x40;
const ETH_ADDRS_LEN: u32 = 12;
const ETH_ADDR_LEN: u32 = 6;
const NS_PER_MS: u64 = 1_000_000;

/// What the stage makes of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Outcome {
    /// Not the stage's: the chain goes on.
    Continue = 0,
    /// A SYN to a protected port and destination: to be answered ([`answer`]).
    Syn = 1,
    /// A SYN-ACK replaced the SYN: send it back out.
    Answered = 2,
    /// Monitor mode: would have answered; the SYN is untouched.
    WouldAnswer = 3,
    /// A SYN to a protected port whose options run past its header.
    Malformed = 4,
}

impl Outcome {
    pub fn from_u64(value: u64) -> Self {
        match value {
            1 => Self::Syn,
            2 => Self::Answered,
            3 => Self::WouldAnswer,
            4 => Self::Malformed,
            _ => Self::Continue,
        }
    }
}

/// The stage's first half, for an IP packet the lists, bans and rules let through: a SYN to a
/// protected port and destination is [`Outcome::Syn`] (answered by [`answer`], a function of
/// its own: the two together need more stack than a call may take); the handshake's final ACK
/// marks its source verified.
#[inline(always)]
pub fn classify(
    ctx: &XdpContext,
    packet: &Packet,
    settings: &SynProxySettings,
    rate: &RateSettings,
    now: u64,
) -> Outcome {
    let (Some(flags), Some((_, port))) = (packet.tcp_flags, packet.ports) else {
        return Outcome::Continue;
    };
    if packet.protocol != IPPROTO_TCP || !settings.covers_port(port) {
        return Outcome::Continue;
    }
    let covered = match packet::destination(ctx, packet) {
        Ok(Address::V4(addr)) => settings.covers_v4(&addr),
        Ok(Address::V6(addr)) => settings.covers_v6(&addr),
        Err(_) => false,
    };
    if !covered {
        return Outcome::Continue;
    }
    match flags & (SYN | ACK | RST | FIN) {
        SYN => Outcome::Syn,
        ACK => {
            // Verified sources are keyed as the rate limiter keys them: a ban falls on that key.
            let key = rate_limit::source_key(rate, &packet.source);
            verify(ctx, packet, settings, &key, now);
            Outcome::Continue
        }
        _ => Outcome::Continue,
    }
}

/// The scratch slot and where the TCP header starts, with the IP header copied into the slot;
/// `None` for IPv4 with options and IPv6 with extension headers.
#[inline(always)]
fn load_ip(ctx: &XdpContext, packet: &Packet) -> Option<(*mut SynScratch, u32, bool)> {
    let scratch = SYN_SCRATCH.get_ptr_mut(0)?;
    let ip_offset = packet.ip_offset as u32;
    // SAFETY: this CPU's slot, used only within this program run; the helper writes at most
    // the header's length into the 40-byte array.
    unsafe {
        let ip = (*scratch).ip.as_mut_ptr().cast();
        match packet.source {
            Address::V4(_) => {
                if bpf_xdp_load_bytes(ctx.ctx, ip_offset, ip, IPV4_HEADER_LEN) != 0
                    || (*scratch).ip[0] != IPV4_NO_OPTIONS
                {
                    return None;
                }
                Some((scratch, ip_offset + IPV4_HEADER_LEN, true))
            }
            Address::V6(_) => {
                if bpf_xdp_load_bytes(ctx.ctx, ip_offset, ip, IPV6_HEADER_LEN) != 0
                    || (*scratch).ip[6] != IPPROTO_TCP
                {
                    return None;
                }
                Some((scratch, ip_offset + IPV6_HEADER_LEN, false))
            }
        }
    }
}

/// Marks the source of a handshake's final ACK verified, if its cookie checks out (a source
/// still verified is not checked again).
#[inline(always)]
fn verify(
    ctx: &XdpContext,
    packet: &Packet,
    settings: &SynProxySettings,
    key: &SourceKey,
    now: u64,
) {
    if rate_limit::verified(key, now) {
        return;
    }
    let Some((scratch, tcp_offset, v4)) = load_ip(ctx, packet) else {
        return;
    };
    // SAFETY: as in `load_ip`; the helpers read the fixed-size headers from the slot.
    let valid = unsafe {
        let tcp = (*scratch).tcp.as_mut_ptr();
        if bpf_xdp_load_bytes(ctx.ctx, tcp_offset, tcp.cast(), TCP_HEADER_MIN as u32) != 0 {
            return;
        }
        let ip = (*scratch).ip.as_mut_ptr();
        if v4 {
            bpf_tcp_raw_check_syncookie_ipv4(ip.cast::<iphdr>(), tcp.cast::<tcphdr>())
        } else {
            bpf_tcp_raw_check_syncookie_ipv6(ip.cast::<ipv6hdr>(), tcp.cast::<tcphdr>())
        }
    } == 0;
    if valid {
        let _ = VERIFIED.insert(key, now + settings.verified_ttl_ns, 0);
    }
}

/// Turns the SYN into its SYN-ACK, in place (enforce mode), or says it would.
#[inline(always)]
pub fn answer(
    ctx: &XdpContext,
    packet: &Packet,
    settings: &SynProxySettings,
    enforce: bool,
) -> Outcome {
    let Some((scratch, tcp_offset, v4)) = load_ip(ctx, packet) else {
        return Outcome::Continue;
    };
    // SAFETY: this CPU's slot (see `load_ip`); every helper reads or writes within the slot's
    // arrays, at most `tcp_len` (≤ 60) bytes of the TCP header.
    unsafe {
        let slot = &mut *scratch;
        let tcp = slot.tcp.as_mut_ptr();
        if bpf_xdp_load_bytes(ctx.ctx, tcp_offset, tcp.cast(), TCP_HEADER_MIN as u32) != 0 {
            return Outcome::Continue;
        }
        // The length from the data offset (the parser checked it against the IP packet): a
        // 4-bit field times four, 20 to 60 once checked. Rewritten after the check as a value
        // the verifier bounds by arithmetic alone (20 to 83; the same value for every length
        // that passed): Linux 6.1's verifier does not carry a check to a copy the compiler
        // spilled before it, and the helpers need a length it knows is not 0. (black_box keeps
        // the compiler from folding the rewrite away.)
        let tcp_len = core::hint::black_box(u64::from(slot.tcp[12] >> 4) * 4);
        if tcp_len < TCP_HEADER_MIN as u64 {
            return Outcome::Continue;
        }
        let tcp_len = (((tcp_len - TCP_HEADER_MIN as u64) & 63) + TCP_HEADER_MIN as u64) as u32;
        if tcp_len > TCP_HEADER_MIN as u32
            && bpf_xdp_load_bytes(ctx.ctx, tcp_offset, tcp.cast(), tcp_len) != 0
        {
            return Outcome::Continue;
        }
        if parse_options(&slot.tcp, tcp_len as usize, &mut slot.options).is_err() {
            return Outcome::Malformed;
        }
        let ip = slot.ip.as_mut_ptr();
        let cookie = if v4 {
            bpf_tcp_raw_gen_syncookie_ipv4(ip.cast::<iphdr>(), tcp.cast::<tcphdr>(), tcp_len)
        } else {
            bpf_tcp_raw_gen_syncookie_ipv6(ip.cast::<ipv6hdr>(), tcp.cast::<tcphdr>(), tcp_len)
        };
        if cookie < 0 {
            return Outcome::Continue;
        }
        if !enforce {
            return Outcome::WouldAnswer;
        }
        let advertised = Advertised {
            mss: if v4 { settings.mss_v4 } else { settings.mss_v6 },
            wscale: settings.wscale,
            sack: settings.sack != 0,
            timestamps: settings.timestamps != 0,
        };
        let now_ms = (bpf_ktime_get_ns() / NS_PER_MS) as u32;
        let reply_len = write_syn_ack(
            &slot.tcp,
            &slot.options,
            &advertised,
            cookie as u32,
            now_ms,
            &mut slot.reply,
        );
        // The pseudo header: protocol and length (as seed: the helper adds it with its carry),
        // then the addresses as the SYN-ACK carries them.
        let seed =
            u32::from(u16::from(IPPROTO_TCP).to_be()) + u32::from((reply_len as u16).to_be());
        let pseudo = if v4 {
            reply_ipv4(&mut slot.ip, reply_len as u16, settings.ttl);
            checksum_add(slot.ip.as_mut_ptr().add(12), 8, seed)
        } else {
            reply_ipv6(&mut slot.ip, reply_len as u16, settings.ttl);
            checksum_add(slot.ip.as_mut_ptr().add(8), 32, seed)
        };
        let sum = checksum_add(slot.reply.as_mut_ptr(), reply_len as u32, pseudo);
        slot.reply[16..18].copy_from_slice(&fold(sum));
        // The MACs swapped, read before the frame changes length.
        if bpf_xdp_load_bytes(ctx.ctx, 0, slot.macs.as_mut_ptr().cast(), ETH_ADDRS_LEN) != 0 {
            return Outcome::Continue;
        }
        let frame_len = (ctx.data_end() - ctx.data()) as i64;
        let delta = i64::from(tcp_offset) + reply_len as i64 - frame_len;
        if delta != 0 && bpf_xdp_adjust_tail(ctx.ctx, delta as i32) != 0 {
            return Outcome::Continue;
        }
        // After this point the frame is the SYN-ACK's, written whole by the stores below (each
        // lies inside the frame adjust_tail just sized).
        let macs = slot.macs.as_mut_ptr();
        let ip_len = if v4 { IPV4_HEADER_LEN } else { IPV6_HEADER_LEN };
        let stored = bpf_xdp_store_bytes(ctx.ctx, 0, macs.add(6).cast(), ETH_ADDR_LEN) == 0
            && bpf_xdp_store_bytes(ctx.ctx, ETH_ADDR_LEN, macs.cast(), ETH_ADDR_LEN) == 0
            && bpf_xdp_store_bytes(ctx.ctx, packet.ip_offset as u32, ip.cast(), ip_len) == 0
            && bpf_xdp_store_bytes(
                ctx.ctx,
                tcp_offset,
                slot.reply.as_mut_ptr().cast(),
                reply_len as u32,
            ) == 0;
        if stored {
            Outcome::Answered
        } else {
            // A frame half rewritten must not reach the stack.
            Outcome::Malformed
        }
    }
}

/// Rewrites the SYN's IPv4 header in `ip` into the SYN-ACK's: addresses swapped, no options,
/// checksum computed.
#[inline(always)]
fn reply_ipv4(ip: &mut [u8; 40], tcp_len: u16, ttl: u8) {
    swap_addresses(ip, 12, 4);
    ip[1] = 0; // DSCP and ECN
    ip[2..4].copy_from_slice(&(IPV4_HEADER_LEN as u16 + tcp_len).to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]); // identification: DF is set
    ip[6..8].copy_from_slice(&[IPV4_DONT_FRAGMENT, 0]);
    ip[8] = ttl;
    ip[10..12].copy_from_slice(&[0, 0]);
    // SAFETY: the 20-byte header lies inside the 40-byte array.
    let sum = unsafe { checksum_add(ip.as_mut_ptr(), IPV4_HEADER_LEN, 0) };
    ip[10..12].copy_from_slice(&fold(sum));
}

/// Rewrites the SYN's IPv6 header in `ip` into the SYN-ACK's.
#[inline(always)]
fn reply_ipv6(ip: &mut [u8; 40], tcp_len: u16, hop_limit: u8) {
    swap_addresses(ip, 8, 16);
    // Version 6, no traffic class or flow label.
    ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    ip[4..6].copy_from_slice(&tcp_len.to_be_bytes());
    ip[7] = hop_limit;
}

/// Swaps the source and destination addresses (`len` bytes each, the source at `at`), byte by
/// byte: no copy on the stack, which the program's call chain shares.
#[inline(always)]
fn swap_addresses(ip: &mut [u8; 40], at: usize, len: usize) {
    for i in at..at + len {
        ip.swap(i, i + len);
    }
}

/// `seed` plus the one's-complement sum of the `len` bytes (a multiple of 4) at `data`, as the
/// kernel sums them (`bpf_csum_diff`: 32 bits, unfolded, in memory's byte order). A helper,
/// not a loop: unrolled, the sum holds every byte in a register at once, and spills them onto
/// the stack the program's call chain shares.
///
/// # Safety
/// `data` must point to `len` readable bytes of a map value or the stack.
#[inline(always)]
unsafe fn checksum_add(data: *mut u8, len: u32, seed: u32) -> u32 {
    // SAFETY: the caller's promise; the helper only reads.
    unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data.cast(), len, seed) as u32 }
}

/// The checksum field's bytes for a sum from [`checksum_add`]: folded to 16 bits and
/// complemented, in the same byte order.
#[inline(always)]
fn fold(sum: u32) -> [u8; 2] {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}
