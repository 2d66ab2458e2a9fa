//! Ethernet frames for program tests, built the way they read:
//! `Frame::udp("198.51.100.7", 11211, 80).vlan(42).bytes()`.
//!
//! Checksums are left zero: XDP sees frames before any checksum is verified, and moat does not
//! look at them.

use std::net::IpAddr;

/// Where frames are addressed to.
pub const DST_V4: &str = "203.0.113.1";
pub const DST_V6: &str = "2001:db8:1::1";

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

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
            Extension::HopByHop => 0,
            Extension::Routing => 43,
            Extension::Fragment { .. } => 44,
            Extension::Ah => 51,
            Extension::DestinationOptions => 60,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            // Eight octets: next header, length 0 (= 8 octets), padding options.
            Extension::HopByHop | Extension::DestinationOptions => vec![next, 0, 1, 4, 0, 0, 0, 0],
            // Type 4 (segment routing) with no segments left; 8 octets.
            Extension::Routing => vec![next, 0, 4, 0, 0, 0, 0, 0],
            Extension::Fragment { offset, more } => {
                let field = offset << 3 | u16::from(more);
                let [a, b] = field.to_be_bytes();
                vec![next, 0, a, b, 0, 0, 0, 1]
            }
            // Payload length 4 → (4 + 2) * 4 = 24 octets.
            Extension::Ah => {
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
        }
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
                let mut tcp = Vec::with_capacity(20);
                tcp.extend_from_slice(&src.to_be_bytes());
                tcp.extend_from_slice(&dst.to_be_bytes());
                tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
                tcp.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
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
        bytes.resize(bytes.len() + self.payload, 0xab);
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
