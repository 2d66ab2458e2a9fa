//! Packet parsing, in the order the headers appear: Ethernet, up to two VLAN tags, IPv4 (with
//! options) or IPv6 (through a bounded chain of extension headers), then the TCP, UDP, ICMP or
//! ICMPv6 header. Every read goes through one bounds-checked accessor.
//!
//! A packet that claims more than it carries is `Malformed`: moat never guesses past a header it
//! could not read. Every header past IP must lie inside the IP packet (IPv4 total length, IPv6
//! payload length) as well as the frame: bytes after the IP packet are padding the receiving
//! stack ignores, and a header read from them would be judged by junk (RFC 1858).

use core::mem::size_of;

use aya_ebpf::{helpers::bpf_xdp_load_bytes, programs::XdpContext};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

/// VLAN tags looked through: 802.1ad (QinQ) outside 802.1Q.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up on reaching the upper layer.
const MAX_IPV6_EXTENSION_HEADERS: usize = 8;
/// No header starts further into a frame than this (an XDP frame fits in a page); naming the
/// bound lets the verifier bound every offset.
const MAX_HEADER_OFFSET: usize = 4096;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
const IPV6_FRAGMENT_OFFSET_MASK: u16 = 0xfff8;
/// A fragment at offset 1 (8 bytes) can overwrite the TCP flags of the first fragment when the
/// stack reassembles it (RFC 1858's overlapping-fragment attack); no honest sender makes one.
const OVERLAPPING_FRAGMENT_OFFSET: u16 = 1;
const UDP_HEADER_LEN: usize = 8;
const TCP_MIN_HEADER_LEN: usize = 20;
const ICMP_HEADER_LEN: usize = 4;
/// The longest payload prefix [`payload_starts_with`] compares.
pub const PAYLOAD_PREFIX_MAX: usize = agent_common::rules::PAYLOAD_MAX;

/// The packet's headers cannot be trusted: truncated, or lengths that contradict the frame.
pub struct Malformed;

/// An IPv4 or IPv6 address (a source, or a destination). A 32-bit tag puts the bytes on a
/// 4-byte boundary, so that copying an address takes word stores, not sixteen byte stores.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Address {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// What the decision chain needs to know about an IP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub source: Address,
    /// The upper-layer protocol (after IPv6 extension headers).
    pub protocol: u8,
    /// TCP/UDP source and destination ports; `None` for other protocols and for non-first
    /// fragments, which carry no transport header.
    pub ports: Option<(u16, u16)>,
    /// TCP flags (FIN 0x01 … CWR 0x80); `None` unless the TCP header was read.
    pub tcp_flags: Option<u8>,
    /// The TCP window (0 unless the TCP header was read).
    pub tcp_window: u16,
    /// Where the IP header starts: the destination and the other header fields are read from
    /// it only by the stages that need them ([`destination`], [`ip_fields`]).
    pub ip_offset: usize,
    /// Where the transport payload starts (after the TCP or UDP header; the transport header
    /// itself for other protocols) and where the IP packet ends; both 0 when the transport
    /// header was not read (a later fragment). Only ever compared and handed to a helper, never added to a packet
    /// pointer: the verifier then need not tell apart the parser's paths by them.
    pub payload_offset: u32,
    pub ip_end: u32,
}

/// The first 16 bytes of a TCP header: ports, sequence numbers, data offset, flags, window.
#[repr(C)]
struct TcpStart {
    source: [u8; 2],
    dest: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    data_offset: u8,
    flags: u8,
    window: [u8; 2],
}

/// Hop-by-hop, routing and destination options headers share this start.
#[repr(C)]
struct Ipv6ExtensionStart {
    next_header: u8,
    /// Length in 8-octet units, not counting the first 8 octets.
    len: u8,
}

#[repr(C)]
struct Ipv6Fragment {
    next_header: u8,
    reserved: u8,
    offset_flags: [u8; 2],
    id: [u8; 4],
}

#[repr(C)]
struct AuthenticationHeaderStart {
    next_header: u8,
    /// Length in 4-octet units, minus 2.
    len: u8,
}

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    if offset > MAX_HEADER_OFFSET {
        return Err(Malformed);
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Parses an IP packet; `Ok(None)` for anything that is not IP. `no_ethernet`: the interface's
/// frames start with the IP header (tun, WireGuard, IPIP, GRE, PPP), told by its version.
#[inline(always)]
pub fn parse(ctx: &XdpContext, no_ethernet: bool) -> Result<Option<Packet>, Malformed> {
    // One IP parser for both framings: where the IP header starts, and which.
    let (ether_type, offset) = if no_ethernet {
        ip_first(ctx)?
    } else {
        ethernet(ctx)?
    };
    match ether_type {
        ETH_P_IP => ipv4(ctx, offset).map(Some),
        ETH_P_IPV6 => ipv6(ctx, offset).map(Some),
        // A third tag is deeper than we look: it must not carry an IP packet past the lists.
        ETH_P_8021Q | ETH_P_8021AD => Err(Malformed),
        _ => Ok(None),
    }
}

/// The EtherType after the Ethernet header and up to two VLAN tags, and where it ends.
#[inline(always)]
fn ethernet(ctx: &XdpContext) -> Result<(u16, usize), Malformed> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the header lies inside the frame.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = size_of::<EthHdr>();
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(ctx, offset)?;
        // SAFETY: ptr_at checked that the header lies inside the frame.
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        offset += size_of::<VlanHdr>();
    }
    Ok((ether_type, offset))
}

/// A frame that starts with the IP header: the EtherType its version stands for, at offset 0.
#[inline(always)]
fn ip_first(ctx: &XdpContext) -> Result<(u16, usize), Malformed> {
    // The version is the first nibble of either header; an IP packet is never shorter than an
    // IPv4 header (and a check of one byte lets the compiler fold the bound away).
    let ip: *const Ipv4Hdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the header lies inside the frame.
    let ether_type = match unsafe { (*ip).vihl } >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => 0,
    };
    Ok((ether_type, 0))
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize) -> Result<Packet, Malformed> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: ptr_at checked that the header lies inside the frame.
    let (vihl, total_len, frags, protocol, src) = unsafe {
        (
            (*ip).vihl,
            (*ip).tot_len,
            (*ip).frags,
            (*ip).proto,
            (*ip).src_addr,
        )
    };
    let header_len = usize::from(vihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes(total_len));
    if vihl >> 4 != 4
        || header_len < size_of::<Ipv4Hdr>()
        || total_len < header_len
        || offset + total_len > frame_len(ctx)
    {
        return Err(Malformed);
    }
    let fragment_offset = u16::from_be_bytes(frags) & IPV4_FRAGMENT_OFFSET_MASK;
    if fragment_offset == OVERLAPPING_FRAGMENT_OFFSET {
        return Err(Malformed);
    }
    let mut packet = Packet {
        source: Address::V4(src),
        protocol,
        ports: None,
        tcp_flags: None,
        tcp_window: 0,
        ip_offset: offset,
        payload_offset: 0,
        ip_end: 0,
    };
    if fragment_offset == 0 {
        transport(ctx, offset + header_len, offset + total_len, &mut packet)?;
    }

    Ok(packet)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, ip_offset: usize) -> Result<Packet, Malformed> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ip_offset)?;
    // SAFETY: ptr_at checked that the header lies inside the frame.
    let (version, payload_len, next_header, src) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            (*ip).payload_len,
            (*ip).next_hdr,
            (*ip).src_addr,
        )
    };
    let payload_len = usize::from(u16::from_be_bytes(payload_len));
    let offset = ip_offset + size_of::<Ipv6Hdr>();
    let ip_end = offset + payload_len;
    if version != 6 || ip_end > frame_len(ctx) {
        return Err(Malformed);
    }

    let upper = upper_layer(ctx, offset, next_header, ip_end)?;
    let mut packet = Packet {
        source: Address::V6(src),
        protocol: upper.protocol,
        ports: None,
        tcp_flags: None,
        tcp_window: 0,
        ip_offset,
        payload_offset: 0,
        ip_end: 0,
    };
    if upper.first_fragment {
        transport(ctx, upper.offset, ip_end, &mut packet)?;
    }

    Ok(packet)
}

/// The upper layer of an IPv6 packet, past its extension headers.
struct UpperLayer {
    protocol: u8,
    /// Where its header starts.
    offset: usize,
    /// Not a fragment, or the first one (which holds the upper layer's header).
    first_fragment: bool,
}

/// Walks the extension headers from `offset`, where a header of type `next_header` starts, to
/// the upper layer; the IPv6 packet ends at `ip_end`.
#[inline(always)]
fn upper_layer(
    ctx: &XdpContext,
    mut offset: usize,
    mut next_header: u8,
    ip_end: usize,
) -> Result<UpperLayer, Malformed> {
    let mut first_fragment = true;
    // One pass per extension header, and one more to reach the upper layer.
    for _ in 0..=MAX_IPV6_EXTENSION_HEADERS {
        match next_header {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: *const Ipv6ExtensionStart = ptr_at(ctx, offset)?;
                // SAFETY: ptr_at checked that the header lies inside the frame.
                let (next, len) = unsafe { ((*ext).next_header, (*ext).len) };
                next_header = next;
                offset += (usize::from(len) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let fragment: *const Ipv6Fragment = ptr_at(ctx, offset)?;
                // SAFETY: ptr_at checked that the header lies inside the frame.
                let (next, offset_flags) =
                    unsafe { ((*fragment).next_header, (*fragment).offset_flags) };
                next_header = next;
                // In 8-octet units, as IPv4's.
                let fragment_offset =
                    (u16::from_be_bytes(offset_flags) & IPV6_FRAGMENT_OFFSET_MASK) >> 3;
                if fragment_offset == OVERLAPPING_FRAGMENT_OFFSET {
                    return Err(Malformed);
                }
                first_fragment &= fragment_offset == 0;
                offset += size_of::<Ipv6Fragment>();
            }
            IPPROTO_AH => {
                let ah: *const AuthenticationHeaderStart = ptr_at(ctx, offset)?;
                // SAFETY: ptr_at checked that the header lies inside the frame.
                let (next, len) = unsafe { ((*ah).next_header, (*ah).len) };
                next_header = next;
                offset += (usize::from(len) + 2) * 4;
            }
            protocol => {
                return Ok(UpperLayer {
                    protocol,
                    offset,
                    first_fragment,
                });
            }
        }
        // Each extension header ends inside the IPv6 packet.
        if offset > ip_end {
            return Err(Malformed);
        }
    }
    // A chain longer than we walk hides its upper layer: refuse it rather than pass it blind.
    Err(Malformed)
}

/// The packet's destination address, from the IP header `parse` read.
#[inline(always)]
pub fn destination(ctx: &XdpContext, packet: &Packet) -> Result<Address, Malformed> {
    match packet.source {
        Address::V4(_) => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, packet.ip_offset)?;
            // SAFETY: ptr_at checked that the header lies inside the frame.
            Ok(Address::V4(unsafe { (*ip).dst_addr }))
        }
        Address::V6(_) => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, packet.ip_offset)?;
            // SAFETY: ptr_at checked that the header lies inside the frame.
            Ok(Address::V6(unsafe { (*ip).dst_addr }))
        }
    }
}

/// Reads the transport header at `offset` into `packet`; the IP packet ends at `ip_end`. Called
/// only where the header must be present (unfragmented packets and first fragments); a header
/// that does not fit in the IP packet — a first fragment too short to hold it is RFC 1858's
/// tiny-fragment attack — is malformed, whatever bytes follow in the frame.
#[inline(always)]
fn transport(
    ctx: &XdpContext,
    offset: usize,
    ip_end: usize,
    packet: &mut Packet,
) -> Result<(), Malformed> {
    packet.payload_offset = offset as u32;
    packet.ip_end = ip_end as u32;
    match packet.protocol {
        IPPROTO_TCP => {
            let tcp: *const TcpStart = ptr_at(ctx, offset)?;
            // SAFETY: ptr_at checked that the header lies inside the frame.
            let (source, dest, data_offset, flags, window) = unsafe {
                (
                    (*tcp).source,
                    (*tcp).dest,
                    (*tcp).data_offset,
                    (*tcp).flags,
                    (*tcp).window,
                )
            };
            let header_len = usize::from(data_offset >> 4) * 4;
            if header_len < TCP_MIN_HEADER_LEN || offset + header_len > ip_end {
                return Err(Malformed);
            }
            packet.ports = Some((u16::from_be_bytes(source), u16::from_be_bytes(dest)));
            packet.tcp_flags = Some(flags);
            packet.tcp_window = u16::from_be_bytes(window);
            packet.payload_offset = (offset + header_len) as u32;
        }
        IPPROTO_UDP => {
            // The frame first, then the IP packet: checked the other way round, the compiler
            // drops the frame check as implied, and the verifier needs to see it.
            let udp: *const UdpHdr = ptr_at(ctx, offset)?;
            if offset + UDP_HEADER_LEN > ip_end {
                return Err(Malformed);
            }
            // SAFETY: ptr_at checked that the header lies inside the frame.
            let (source, dest) = unsafe { ((*udp).src, (*udp).dst) };
            packet.ports = Some((u16::from_be_bytes(source), u16::from_be_bytes(dest)));
            packet.payload_offset = (offset + UDP_HEADER_LEN) as u32;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if offset + ICMP_HEADER_LEN > ip_end => {
            return Err(Malformed);
        }
        _ => {}
    }
    Ok(())
}

/// IP header fields only some stages read.
pub struct IpFields {
    /// TTL or hop limit.
    pub ttl: u8,
    /// IPv4 total length; IPv6 payload length + 40.
    pub length: u16,
    /// IPv4 identification; `None` for IPv6.
    pub id: Option<u16>,
}

/// The packet's TTL, length and identification, from the IP header `parse` read.
#[inline(always)]
pub fn ip_fields(ctx: &XdpContext, packet: &Packet) -> Result<IpFields, Malformed> {
    match packet.source {
        Address::V4(_) => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, packet.ip_offset)?;
            // SAFETY: ptr_at checked that the header lies inside the frame.
            let (ttl, length, id) = unsafe { ((*ip).ttl, (*ip).tot_len, (*ip).id) };
            Ok(IpFields {
                ttl,
                length: u16::from_be_bytes(length),
                id: Some(u16::from_be_bytes(id)),
            })
        }
        Address::V6(_) => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, packet.ip_offset)?;
            // SAFETY: ptr_at checked that the header lies inside the frame.
            let (ttl, payload_len) = unsafe { ((*ip).hop_limit, (*ip).payload_len) };
            Ok(IpFields {
                ttl,
                length: u16::from_be_bytes(payload_len).saturating_add(size_of::<Ipv6Hdr>() as u16),
                id: None,
            })
        }
    }
}

/// The `len` bytes (1..=8) at `offset` into the packet's transport payload, zero-padded to
/// eight; `None` when the payload is shorter than that, or was not read (a later fragment).
#[inline(always)]
pub fn payload_at(
    ctx: &XdpContext,
    packet: &Packet,
    offset: u16,
    len: u16,
) -> Option<[u8; PAYLOAD_PREFIX_MAX]> {
    let start = packet.payload_offset + u32::from(offset);
    if packet.ip_end == 0 || len == 0 || start + u32::from(len) > packet.ip_end {
        return None;
    }
    // The helper checks the bounds; the mask and +1 keep the length in 1..=8 in a way the
    // verifier can follow.
    const _: () = assert!(PAYLOAD_PREFIX_MAX.is_power_of_two());
    let len = ((u32::from(len) - 1) & (PAYLOAD_PREFIX_MAX as u32 - 1)) + 1;
    let mut bytes = [0u8; PAYLOAD_PREFIX_MAX];
    // SAFETY: the helper writes at most `len` (≤ 8) bytes into the 8-byte buffer.
    let loaded = unsafe { bpf_xdp_load_bytes(ctx.ctx, start, bytes.as_mut_ptr().cast(), len) };
    (loaded == 0).then_some(bytes)
}

/// Whether the packet's transport payload starts with the first `len` bytes of `expected`
/// (1..=8); a payload shorter than that, or one not read, does not.
#[inline(always)]
pub fn payload_starts_with(
    ctx: &XdpContext,
    packet: &Packet,
    expected: &[u8; PAYLOAD_PREFIX_MAX],
    len: usize,
) -> bool {
    let len = len.min(PAYLOAD_PREFIX_MAX);
    // The first `len` bytes are the low ones of a little-endian word: compared under a mask,
    // without a loop (the bytes past `len` are zero in what was read, not in `expected`).
    let mask = u64::MAX.checked_shr(64 - 8 * len as u32).unwrap_or(0);
    payload_at(ctx, packet, 0, len as u16).is_some_and(|bytes| {
        (u64::from_le_bytes(bytes) ^ u64::from_le_bytes(*expected)) & mask == 0
    })
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
