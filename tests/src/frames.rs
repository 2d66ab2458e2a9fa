//! Ethernet frames for program tests, built the way they read:
//! `Frame::udp("198.51.100.7", 11211, 80).vlan(42).bytes()`.
//!
//! Checksums are left zero: XDP sees frames before any checksum is verified, and moat does not
//! look at them.

use std::net::IpAddr;

/// Where frames are addressed to.
pub const DST_V4: &str = "203.0.113.1";
pub const DST_V6: &str = "2001:db8:1::1";

pub use agent_common::tcp::{
    ACK as TCP_ACK, FIN as TCP_FIN, PSH as TCP_PSH, RST as TCP_RST, SYN as TCP_SYN, URG as TCP_URG,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

/// An IPv6 extension header to put between the fixed header and the transport header.
#[derive(Clone, Copy, Debug)]
pub enum Extension {
    HopByHop,
    Routing,
    DestinationOptions,
    /// Authentication header.
    Ah,
    /// Fragment header: offset in 8-octet units, more-fragments flag.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Extension {
    fn number(self) -> u8 {
        match self {
            Self::HopByHop => 0,
            Self::Routing => 43,
            Self::Fragment { .. } => 44,
            Self::Ah => 51,
            Self::DestinationOptions => 60,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            // Eight octets: next header, length 0 (= 8 octets), padding options.
            Self::HopByHop | Self::DestinationOptions => vec![next, 0, 1, 4, 0, 0, 0, 0],
            // Type 4 (segment routing) with no segments left; 8 octets.
            Self::Routing => vec![next, 0, 4, 0, 0, 0, 0, 0],
            Self::Fragment { offset, more } => {
                let field = offset << 3 | u16::from(more);
                let [a, b] = field.to_be_bytes();
                vec![next, 0, a, b, 0, 0, 0, 1]
            }
            // Payload length 4 → (4 + 2) * 4 = 24 octets.
            Self::Ah => {
                let mut ah = vec![next, 4, 0, 0];
                ah.resize(24, 0);
                ah
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Transport {
    Tcp {
        src: u16,
        dst: u16,
        flags: u8,
    },
    Udp {
        src: u16,
        dst: u16,
    },
    /// ICMP or ICMPv6 echo request, by family.
    Echo,
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    vlans: Vec<(u16, u16)>,
    ether_type: Option<u16>,
    src: IpAddr,
    dst: IpAddr,
    ipv4_option_words: u8,
    ipv4_fragment: Option<(u16, bool)>,
    extensions: Vec<Extension>,
    transport: Transport,
    payload: usize,
    /// What the payload starts with (the rest is 0xab).
    payload_start: Vec<u8>,
    /// TCP options (a multiple of four bytes, or the data offset will not say where they end).
    tcp_options: Vec<u8>,
}

impl Frame {
    fn new(src: &str, transport: Transport) -> Self {
        let src: IpAddr = src.parse().expect("test source address");
        let dst = if src.is_ipv4() { DST_V4 } else { DST_V6 };
        Self {
            vlans: Vec::new(),
            ether_type: None,
            src,
            dst: dst.parse().expect("test destination"),
            ipv4_option_words: 0,
            ipv4_fragment: None,
            extensions: Vec::new(),
            transport,
            payload: 18,
            payload_start: Vec::new(),
            tcp_options: Vec::new(),
        }
    }

    /// TCP options after the header's 20 bytes; the data offset counts them (padded with
    /// end-of-options to a multiple of four).
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        self.tcp_options = options.to_vec();
        self.tcp_options.resize(options.len().div_ceil(4) * 4, 0);
        self
    }

    /// TCP options that claim more than the header holds: the data offset counts only
    /// `words` of them.
    pub fn tcp_options_truncated(mut self, options: &[u8], words: usize) -> Self {
        self.tcp_options = options[..words * 4].to_vec();
        self
    }

    pub fn udp(src: &str, src_port: u16, dst_port: u16) -> Self {
        Self::new(
            src,
            Transport::Udp {
                src: src_port,
                dst: dst_port,
            },
        )
    }

    pub fn tcp(src: &str, src_port: u16, dst_port: u16, flags: u8) -> Self {
        Self::new(
            src,
            Transport::Tcp {
                src: src_port,
                dst: dst_port,
                flags,
            },
        )
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) echo request.
    pub fn ping(src: &str) -> Self {
        Self::new(src, Transport::Echo)
    }

    /// The same frame to `dst` (of the source's family) instead of [`DST_V4`] / [`DST_V6`].
    pub fn to(mut self, dst: &str) -> Self {
        self.dst = dst.parse().expect("test destination address");
        assert_eq!(
            self.dst.is_ipv4(),
            self.src.is_ipv4(),
            "one family per frame"
        );
        self
    }

    /// An ARP request: not IP.
    pub fn arp() -> Vec<u8> {
        let mut frame = ethernet(&[], ETH_P_ARP);
        frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        frame.resize(frame.len() + 20, 0);
        frame
    }

    /// An 802.1Q tag (outermost first when called repeatedly).
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlans.push((ETH_P_8021Q, id));
        self
    }

    /// 802.1ad outer tag around an 802.1Q inner tag.
    pub fn qinq(mut self, outer: u16, inner: u16) -> Self {
        self.vlans.push((ETH_P_8021AD, outer));
        self.vlans.push((ETH_P_8021Q, inner));
        self
    }

    /// IPv4 options, in 4-octet words (IHL = 5 + words).
    pub fn ipv4_options(mut self, words: u8) -> Self {
        self.ipv4_option_words = words;
        self
    }

    /// An IPv4 fragment at `offset` (8-octet units).
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.ipv4_fragment = Some((offset, more));
        self
    }

    pub fn extension(mut self, extension: Extension) -> Self {
        self.extensions.push(extension);
        self
    }

    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    /// A payload of exactly `bytes`.
    pub fn payload_bytes(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.len();
        self.payload_start = bytes.to_vec();
        self
    }

    /// Overrides the EtherType after the VLAN tags.
    pub fn ether_type(mut self, ether_type: u16) -> Self {
        self.ether_type = Some(ether_type);
        self
    }

    fn protocol(&self) -> u8 {
        match (&self.transport, self.src) {
            (Transport::Tcp { .. }, _) => 6,
            (Transport::Udp { .. }, _) => 17,
            (Transport::Echo, IpAddr::V4(_)) => 1,
            (Transport::Echo, IpAddr::V6(_)) => 58,
        }
    }

    fn transport_bytes(&self) -> Vec<u8> {
        let mut bytes = match self.transport {
            Transport::Tcp { src, dst, flags } => {
                let mut tcp = Vec::with_capacity(20 + self.tcp_options.len());
                tcp.extend_from_slice(&src.to_be_bytes());
                tcp.extend_from_slice(&dst.to_be_bytes());
                tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
                let words = (5 + self.tcp_options.len() / 4) as u8;
                tcp.extend_from_slice(&[words << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
                tcp.extend_from_slice(&self.tcp_options);
                tcp
            }
            Transport::Udp { src, dst } => {
                let len = (8 + self.payload) as u16;
                let mut udp = Vec::with_capacity(8);
                udp.extend_from_slice(&src.to_be_bytes());
                udp.extend_from_slice(&dst.to_be_bytes());
                udp.extend_from_slice(&len.to_be_bytes());
                udp.extend_from_slice(&[0, 0]);
                udp
            }
            Transport::Echo => {
                let kind = if self.src.is_ipv4() { 8 } else { 128 };
                vec![kind, 0, 0, 0, 0, 1, 0, 1]
            }
        };
        let header = bytes.len();
        bytes.resize(header + self.payload, 0xab);
        let start = self.payload_start.len().min(self.payload);
        bytes[header..header + start].copy_from_slice(&self.payload_start[..start]);
        bytes
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.transport_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut frame = ethernet(&self.vlans, self.ether_type.unwrap_or(ETH_P_IP));
                let header_len = 20 + 4 * usize::from(self.ipv4_option_words);
                let total = (header_len + l4.len()) as u16;
                let frags = self
                    .ipv4_fragment
                    .map_or(0, |(offset, more)| offset | if more { 0x2000 } else { 0 });
                frame.push(0x40 | (5 + self.ipv4_option_words));
                frame.push(0);
                frame.extend_from_slice(&total.to_be_bytes());
                frame.extend_from_slice(&[0, 1]);
                frame.extend_from_slice(&frags.to_be_bytes());
                frame.extend_from_slice(&[64, self.protocol(), 0, 0]);
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
                // NOP options.
                frame.resize(frame.len() + 4 * usize::from(self.ipv4_option_words), 1);
                frame.extend_from_slice(&l4);
                frame
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut frame = ethernet(&self.vlans, self.ether_type.unwrap_or(ETH_P_IPV6));
                let mut chain = Vec::new();
                for (i, extension) in self.extensions.iter().enumerate() {
                    let next = self
                        .extensions
                        .get(i + 1)
                        .map_or(self.protocol(), |e| e.number());
                    chain.extend_from_slice(&extension.bytes(next));
                }
                let first = self
                    .extensions
                    .first()
                    .map_or(self.protocol(), |e| e.number());
                let payload_len = (chain.len() + l4.len()) as u16;
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&payload_len.to_be_bytes());
                frame.extend_from_slice(&[first, 64]);
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
                frame.extend_from_slice(&chain);
                frame.extend_from_slice(&l4);
                frame
            }
            _ => unreachable!("source and destination share a family"),
        }
    }
}

fn ethernet(vlans: &[(u16, u16)], ether_type: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for (tpid, id) in vlans {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// Byte offsets useful for corrupting frames: where the IP header starts in an untagged frame.
pub const L3_OFFSET: usize = 14;

#[cfg(test)]
mod tests {
    //! A wrong builder would make every fixture wrong: its frames are read back here by an
    //! independent parser (etherparse).
    use etherparse::{LinkHeader, NetHeaders, PacketHeaders, TransportHeader, VlanHeader};

    use super::*;

    fn parse(bytes: &[u8]) -> PacketHeaders<'_> {
        PacketHeaders::from_ethernet_slice(bytes)
            .unwrap_or_else(|e| panic!("etherparse refused the frame {bytes:02x?}: {e}"))
    }

    fn ether_type(headers: &PacketHeaders) -> u16 {
        match &headers.link {
            Some(LinkHeader::Ethernet2(ethernet)) => ethernet.ether_type.0,
            other => panic!("an Ethernet header, got {other:?}"),
        }
    }

    #[test]
    fn udp_over_ipv4_reads_back() {
        let bytes = Frame::udp("198.51.100.7", 11211, 80).payload(30).bytes();
        let headers = parse(&bytes);
        assert_eq!(ether_type(&headers), ETH_P_IP);
        let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
            panic!("IPv4, got {:?}", headers.net);
        };
        assert_eq!(ip.source, [198, 51, 100, 7]);
        assert_eq!(ip.destination, [203, 0, 113, 1]);
        assert_eq!(usize::from(ip.total_len), bytes.len() - L3_OFFSET);
        assert_eq!(ip.protocol.0, 17);
        assert!(!ip.more_fragments && ip.fragment_offset.value() == 0);
        let Some(TransportHeader::Udp(udp)) = &headers.transport else {
            panic!("UDP, got {:?}", headers.transport);
        };
        assert_eq!((udp.source_port, udp.destination_port), (11211, 80));
        assert_eq!(udp.length, 8 + 30);
        assert_eq!(headers.payload.slice().len(), 30);
    }

    #[test]
    fn tcp_over_ipv6_reads_back_with_its_flags() {
        let flags = TCP_FIN | TCP_PSH | TCP_URG;
        let bytes = Frame::tcp("2001:db8:bad::7", 40000, 23, flags).bytes();
        let headers = parse(&bytes);
        assert_eq!(ether_type(&headers), ETH_P_IPV6);
        let Some(NetHeaders::Ipv6(ip, _)) = &headers.net else {
            panic!("IPv6, got {:?}", headers.net);
        };
        assert_eq!(usize::from(ip.payload_length), bytes.len() - L3_OFFSET - 40);
        assert_eq!(ip.next_header.0, 6);
        assert_eq!(
            ip.source,
            "2001:db8:bad::7"
                .parse::<std::net::Ipv6Addr>()
                .expect("addr")
                .octets()
        );
        let Some(TransportHeader::Tcp(tcp)) = &headers.transport else {
            panic!("TCP, got {:?}", headers.transport);
        };
        assert_eq!((tcp.source_port, tcp.destination_port), (40000, 23));
        assert!(tcp.fin && tcp.psh && tcp.urg);
        assert!(!tcp.syn && !tcp.ack && !tcp.rst);
        assert_eq!(tcp.header_len(), 20);
    }

    #[test]
    fn vlan_tags_are_outermost_first_with_their_tpids() {
        let single = Frame::udp("192.0.2.1", 1, 2).vlan(42).bytes();
        match parse(&single).vlan() {
            Some(VlanHeader::Single(tag)) => {
                assert_eq!(tag.vlan_id.value(), 42);
                assert_eq!(tag.ether_type.0, ETH_P_IP);
            }
            other => panic!("one tag, got {other:?}"),
        }
        let double = Frame::udp("192.0.2.1", 1, 2).qinq(100, 42).bytes();
        assert_eq!(&double[12..14], &ETH_P_8021AD.to_be_bytes());
        assert_eq!(&double[16..18], &ETH_P_8021Q.to_be_bytes());
        match parse(&double).vlan() {
            Some(VlanHeader::Double(tags)) => {
                assert_eq!(tags.outer.vlan_id.value(), 100);
                assert_eq!(tags.inner.vlan_id.value(), 42);
                assert_eq!(tags.inner.ether_type.0, ETH_P_IP);
            }
            other => panic!("two tags, got {other:?}"),
        }
    }

    #[test]
    fn ipv4_options_and_fragments_are_encoded_as_asked() {
        let bytes = Frame::udp("192.0.2.1", 1, 2).ipv4_options(3).bytes();
        let Some(NetHeaders::Ipv4(ip, _)) = parse(&bytes).net else {
            panic!("IPv4");
        };
        assert_eq!(ip.ihl(), 8);
        assert_eq!(ip.options.len(), 12);
        for (offset, more) in [(185, false), (0, true), (10, true)] {
            let bytes = Frame::udp("192.0.2.1", 1, 2)
                .ipv4_fragment(offset, more)
                .bytes();
            let Some(NetHeaders::Ipv4(ip, _)) = parse(&bytes).net else {
                panic!("IPv4");
            };
            assert_eq!(
                (ip.fragment_offset.value(), ip.more_fragments),
                (offset, more)
            );
        }
    }

    #[test]
    fn ipv6_extension_headers_chain_to_the_transport() {
        let bytes = Frame::udp("2001:db8::1", 53, 40000)
            .extension(Extension::HopByHop)
            .extension(Extension::Routing)
            .extension(Extension::Ah)
            .extension(Extension::DestinationOptions)
            .bytes();
        let headers = parse(&bytes);
        let Some(NetHeaders::Ipv6(ip, extensions)) = &headers.net else {
            panic!("IPv6, got {:?}", headers.net);
        };
        assert_eq!(ip.next_header.0, 0, "hop-by-hop first");
        assert!(extensions.hop_by_hop_options.is_some());
        assert!(extensions.routing.is_some());
        assert!(extensions.auth.is_some());
        let Some(TransportHeader::Udp(udp)) = &headers.transport else {
            panic!("UDP behind the chain, got {:?}", headers.transport);
        };
        assert_eq!((udp.source_port, udp.destination_port), (53, 40000));

        for (offset, more) in [(100, false), (8191, true)] {
            let bytes = Frame::udp("2001:db8::1", 1, 2)
                .extension(Extension::Fragment { offset, more })
                .bytes();
            let Some(NetHeaders::Ipv6(ip, extensions)) = parse(&bytes).net else {
                panic!("IPv6");
            };
            assert_eq!(ip.next_header.0, 44);
            assert!(extensions.fragment.is_some(), "a fragment header");
            // RFC 8200 4.5 (and Linux's IP6_OFFSET / IP6_MF): 13 bits of offset, 2 reserved,
            // then M. Read from the bytes: etherparse (0.19) orders these bits
            // otherwise.
            let at = L3_OFFSET + 40 + 2;
            let field = u16::from_be_bytes([bytes[at], bytes[at + 1]]);
            assert_eq!((field >> 3, field & 1 == 1), (offset, more));
        }
    }

    #[test]
    fn echo_requests_and_other_ether_types() {
        let v4 = Frame::ping("192.0.2.1").bytes();
        assert!(matches!(
            parse(&v4).transport,
            Some(TransportHeader::Icmpv4(icmp)) if icmp.to_bytes()[0] == 8
        ));
        let v6 = Frame::ping("2001:db8::1").bytes();
        assert!(matches!(
            parse(&v6).transport,
            Some(TransportHeader::Icmpv6(icmp)) if icmp.to_bytes()[0] == 128
        ));
        let lldp = Frame::udp("192.0.2.1", 1, 2).ether_type(0x88cc).bytes();
        assert_eq!(ether_type(&parse(&lldp)), 0x88cc);
        assert_eq!(ether_type(&parse(&Frame::arp())), ETH_P_ARP);
    }
}
