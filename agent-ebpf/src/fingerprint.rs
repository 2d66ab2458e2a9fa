//! Attack fingerprints: whether a packet has every attribute of its protected entry's
//! fingerprint (`agent_common::protect::Fingerprint`). Each attribute is read only when the
//! fingerprint names it.

use agent_common::protect::{
    FP_IP_ID, FP_LENGTH, FP_PAYLOAD, FP_PAYLOAD_MAX, FP_SRC_PORT, FP_TCP_FLAGS, FP_TCP_WINDOW,
    FP_TTL, Fingerprint,
};
use aya_ebpf::programs::XdpContext;

use crate::packet::{self, Packet};

#[inline(always)]
pub fn matches(ctx: &XdpContext, packet: &Packet, print: &Fingerprint) -> bool {
    let fields = print.fields;
    if fields & FP_SRC_PORT != 0 && packet.ports.map(|(src, _)| src) != Some(print.src_port) {
        return false;
    }
    if fields & FP_TCP_FLAGS != 0 && packet.tcp_flags != Some(print.tcp_flags) {
        return false;
    }
    if fields & (FP_TTL | FP_LENGTH | FP_IP_ID) != 0 {
        let Ok(ip) = packet::ip_fields(ctx, packet) else {
            return false;
        };
        if (fields & FP_TTL != 0 && ip.ttl != print.ttl)
            || (fields & FP_LENGTH != 0 && ip.length != print.length)
            || (fields & FP_IP_ID != 0 && ip.id != Some(print.ip_id))
        {
            return false;
        }
    }
    if fields & FP_TCP_WINDOW != 0
        && (packet.tcp_flags.is_none() || packet.tcp_window != print.tcp_window)
    {
        return false;
    }
    if fields & FP_PAYLOAD != 0 {
        let len = (print.payload_len as usize).min(FP_PAYLOAD_MAX);
        return packet::payload_starts_with(ctx, packet, &print.payload, len);
    }
    true
}
