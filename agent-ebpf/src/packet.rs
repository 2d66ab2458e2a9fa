//! Packet parsing: Ethernet, up to two VLAN tags, then the IPv4 or IPv6 header, read through one
//! bounds-checked accessor.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

/// VLAN tags we look through: 802.1Q, and 802.1ad (QinQ) outside it.
const MAX_VLAN_TAGS: usize = 2;

const IPV4_MIN_HEADER_LEN: usize = size_of::<Ipv4Hdr>();

/// The packet is IP but its headers cannot be trusted.
pub struct Malformed;

/// The source address of an IP packet.
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

/// The source address of an IP packet, `None` for anything that is not IP.
#[inline(always)]
pub fn source(ctx: &XdpContext) -> Result<Option<Source>, Malformed> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the header lies inside the frame.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = size_of::<EthHdr>();

    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(ctx, offset)?;
        // SAFETY: bounds checked above.
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        offset += size_of::<VlanHdr>();
    }

    match ether_type {
        ETH_P_IP => ipv4_source(ctx, offset).map(Some),
        ETH_P_IPV6 => ipv6_source(ctx, offset).map(Some),
        // A third VLAN tag is deeper than we look: treat it as unparseable rather than let it
        // carry an IP packet past the lists.
        ETH_P_8021Q | ETH_P_8021AD => Err(Malformed),
        _ => Ok(None),
    }
}

#[inline(always)]
fn ipv4_source(ctx: &XdpContext, offset: usize) -> Result<Source, Malformed> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds checked above.
    let (vihl, total_len, src) = unsafe { ((*ip).vihl, (*ip).tot_len, (*ip).src_addr) };
    let header_len = usize::from(vihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes(total_len));
    let frame_len = ctx.data_end() - ctx.data();
    if vihl >> 4 != 4
        || header_len < IPV4_MIN_HEADER_LEN
        || total_len < header_len
        || offset + total_len > frame_len
    {
        return Err(Malformed);
    }
    Ok(Source::V4(src))
}

#[inline(always)]
fn ipv6_source(ctx: &XdpContext, offset: usize) -> Result<Source, Malformed> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds checked above.
    let (version, payload_len, src) =
        unsafe { ((*ip).vcf[0] >> 4, (*ip).payload_len, (*ip).src_addr) };
    let payload_len = usize::from(u16::from_be_bytes(payload_len));
    let frame_len = ctx.data_end() - ctx.data();
    if version != 6 || offset + size_of::<Ipv6Hdr>() + payload_len > frame_len {
        return Err(Malformed);
    }
    Ok(Source::V6(src))
}
