//! The program's fixture table, in the manner of katran's: one case per line — name, frame,
//! expected action and reason — each run through the real program against [`POLICY`] by the
//! runner in `program.rs`, in enforce and in monitor mode.

use agent_common::stats::{Action, Reason};
use moat_tests::frames::{
    Extension, Frame, L3_OFFSET, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN, TCP_URG,
};

/// The policy every fixture runs against.
pub const POLICY: &str = r#"
interfaces = ["lo"]
[allowlist]
cidrs = ["192.0.2.0/24", "198.51.100.200", "2001:db8:a11::/48"]
[blocklist]
cidrs = [
  "198.51.100.0/24", "10.0.0.0/8", "203.0.113.128/25", "203.0.113.77",
  "2001:db8:bad::/48", "2001:db8:beef::5",
]
[[rules]]
name = "memcached-reflection"
protocol = "udp"
src_ports = ["11211"]
action = "drop"
[[rules]]
name = "dns-replies-to-clients"
protocol = "udp"
src_ports = [53]
dst_ports = ["1024-65535"]
action = "pass"
[[rules]]
name = "amplification"
protocol = "udp"
src_ports = [19, 53, 123, 389, 1900, 11211]
action = "drop"
[[rules]]
name = "null-scan"
protocol = "tcp"
tcp_flags = "ALL/NONE"
action = "drop"
[[rules]]
name = "xmas-scan"
protocol = "tcp"
tcp_flags = "FIN,SYN,RST,PSH,ACK,URG/FIN,PSH,URG"
action = "drop"
[[rules]]
name = "telnet"
protocol = "tcp"
dst_ports = [23]
action = "drop"
[[rules]]
name = "ttl-expiring"
protocol = "udp"
dst_ports = [7001]
ttl = ["0-1"]
action = "drop"
[[rules]]
name = "mid-size"
protocol = "udp"
dst_ports = [7002]
length = ["100-200"]
action = "drop"
[[rules]]
name = "stats-probe"
protocol = "udp"
dst_ports = [7003]
payload = "0x7374617473"
payload_offset = 8
action = "drop"
[[rules]]
name = "marked"
protocol = "any"
dst_ports = [7003]
payload = "ff"
action = "drop"
[[rules]]
name = "get-request"
protocol = "tcp"
dst_ports = [7004]
payload = "474554"
action = "drop"
[[rules]]
name = "marked-echo"
protocol = "icmp"
payload = "cafe"
payload_offset = 8
action = "drop"
"#;

/// memcached's UDP frame header (8 bytes) and a "stats" command: what the `stats-probe` rule
/// matches (at payload offset 8).
const STATS_PROBE: &[u8] = b"\0\0\0\0\0\x01\0\0stats\r\n";

pub const LEGIT_V4: &str = "203.0.113.9";
pub const LEGIT_V6: &str = "2001:db8:1::2";
pub const BLOCKED_V4: &str = "198.51.100.7";
pub const BLOCKED_V6: &str = "2001:db8:bad::7";

pub struct Case {
    pub name: &'static str,
    pub frame: Vec<u8>,
    pub action: Action,
    pub reason: Reason,
}

fn case(name: &'static str, frame: Vec<u8>, action: Action, reason: Reason) -> Case {
    Case {
        name,
        frame,
        action,
        reason,
    }
}

/// `frame` with the bytes at these offsets replaced: the shapes no builder makes.
fn patched(mut frame: Vec<u8>, bytes: &[(usize, u8)]) -> Vec<u8> {
    for &(offset, value) in bytes {
        frame[offset] = value;
    }
    frame
}

/// `frame` with `bytes` zero bytes after it, as a NIC pads a short frame.
fn padded(mut frame: Vec<u8>, bytes: usize) -> Vec<u8> {
    frame.resize(frame.len() + bytes, 0);
    frame
}

/// A frame behind a hop-by-hop and a destination options header.
fn v6_exts(frame: Frame) -> Frame {
    frame
        .extension(Extension::HopByHop)
        .extension(Extension::DestinationOptions)
}

#[rustfmt::skip]
pub fn cases() -> Vec<Case> {
    use Action::{Drop, Pass};
    use Reason::*;
    vec![
        // Not IP.
        case("ARP", Frame::arp(), Pass, NotIp),
        case("unknown EtherType", Frame::udp(LEGIT_V4, 1, 2).ether_type(0x88cc).bytes(), Pass, NotIp),
        // No match.
        case("IPv4 UDP", Frame::udp(LEGIT_V4, 40000, 443).bytes(), Pass, NoMatch),
        case("IPv6 UDP", Frame::udp(LEGIT_V6, 40000, 443).bytes(), Pass, NoMatch),
        case("IPv4 TCP SYN", Frame::tcp(LEGIT_V4, 40000, 80, TCP_SYN).bytes(), Pass, NoMatch),
        case("ICMP echo", Frame::ping(LEGIT_V4).bytes(), Pass, NoMatch),
        case("ICMPv6 echo", Frame::ping(LEGIT_V6).bytes(), Pass, NoMatch),
        // Blocklist, behind every encapsulation.
        case("blocked IPv4", Frame::udp(BLOCKED_V4, 1, 2).bytes(), Drop, Blocklist),
        case("blocked IPv4 in VLAN", Frame::udp(BLOCKED_V4, 1, 2).vlan(42).bytes(), Drop, Blocklist),
        case("blocked IPv4 in QinQ", Frame::udp(BLOCKED_V4, 1, 2).qinq(100, 42).bytes(), Drop, Blocklist),
        case("blocked IPv4 with options", Frame::udp(BLOCKED_V4, 1, 2).ipv4_options(10).bytes(), Drop, Blocklist),
        case("blocked IPv4 first fragment", Frame::udp(BLOCKED_V4, 1, 2).ipv4_fragment(0, true).bytes(), Drop, Blocklist),
        case("blocked IPv4 later fragment", Frame::udp(BLOCKED_V4, 1, 2).ipv4_fragment(185, false).bytes(), Drop, Blocklist),
        case("blocked /8", Frame::udp("10.200.3.4", 1, 2).bytes(), Drop, Blocklist),
        case("blocked /25", Frame::udp("203.0.113.200", 1, 2).bytes(), Drop, Blocklist),
        case("blocked /32", Frame::udp("203.0.113.77", 1, 2).bytes(), Drop, Blocklist),
        case("beside a /32 in a flagged /24", Frame::udp("203.0.113.78", 1, 2).bytes(), Pass, NoMatch),
        case("blocked IPv6", Frame::udp(BLOCKED_V6, 1, 2).bytes(), Drop, Blocklist),
        case("blocked IPv6 in VLAN", Frame::udp(BLOCKED_V6, 1, 2).vlan(7).bytes(), Drop, Blocklist),
        case("blocked IPv6 behind two extension headers", v6_exts(Frame::udp(BLOCKED_V6, 1, 2)).bytes(), Drop, Blocklist),
        case("blocked IPv6 behind routing and AH", Frame::udp(BLOCKED_V6, 1, 2).extension(Extension::Routing).extension(Extension::Ah).bytes(), Drop, Blocklist),
        case("blocked IPv6 later fragment", Frame::udp(BLOCKED_V6, 1, 2).extension(Extension::Fragment { offset: 100, more: false }).bytes(), Drop, Blocklist),
        case("blocked IPv6 /128", Frame::udp("2001:db8:beef::5", 1, 2).bytes(), Drop, Blocklist),
        case("beside an IPv6 /128", Frame::udp("2001:db8:beef::6", 1, 2).bytes(), Pass, NoMatch),
        // Allowlist wins over blocklist and rules.
        case("allowlisted inside a blocked /24", Frame::udp("198.51.100.200", 11211, 2).bytes(), Pass, Allowlist),
        case("allowlisted IPv4", Frame::tcp("192.0.2.10", 1, 23, TCP_SYN).bytes(), Pass, Allowlist),
        case("allowlisted IPv6", Frame::udp("2001:db8:a11::1", 11211, 2).bytes(), Pass, Allowlist),
        // Rules on TTL and IP length.
        case("UDP with TTL 1", patched(Frame::udp(LEGIT_V4, 40000, 7001).bytes(), &[(22, 1)]), Drop, Rule),
        case("UDP with TTL 64 to the TTL rule's port", Frame::udp(LEGIT_V4, 40000, 7001).bytes(), Pass, NoMatch),
        case("IPv6 UDP with hop limit 0", patched(Frame::udp(LEGIT_V6, 40000, 7001).bytes(), &[(21, 0)]), Drop, Rule),
        case("UDP of IP length 128", Frame::udp(LEGIT_V4, 40000, 7002).payload(100).bytes(), Drop, Rule),
        case("UDP of IP length 46", Frame::udp(LEGIT_V4, 40000, 7002).bytes(), Pass, NoMatch),
        case("IPv6 UDP of length 108", Frame::udp(LEGIT_V6, 40000, 7002).payload(60).bytes(), Drop, Rule),
        case("IP length 128 in QinQ", Frame::udp(LEGIT_V4, 40000, 7002).payload(100).qinq(1, 2).bytes(), Drop, Rule),
        case("UDP with \"stats\" at payload offset 8", Frame::udp(LEGIT_V4, 40000, 7003).payload_bytes(STATS_PROBE).bytes(), Drop, Rule),
        case("IPv6 UDP with \"stats\" at payload offset 8", Frame::udp(LEGIT_V6, 40000, 7003).payload_bytes(STATS_PROBE).bytes(), Drop, Rule),
        case("UDP with \"statz\" at payload offset 8", Frame::udp(LEGIT_V4, 40000, 7003).payload_bytes(b"\0\0\0\0\0\x01\0\0statz\r\n").bytes(), Pass, NoMatch),
        case("UDP payload ending inside the matched bytes", Frame::udp(LEGIT_V4, 40000, 7003).payload_bytes(&STATS_PROBE[..12]).bytes(), Pass, NoMatch),
        case("UDP payload starting with 0xff (a second column)", Frame::udp(LEGIT_V4, 40000, 7003).payload_bytes(&[0xff, 1, 2]).bytes(), Drop, Rule),
        case("the matched bytes only in Ethernet padding", patched(padded(Frame::udp(LEGIT_V4, 40000, 7003).payload(0).bytes(), 18), &[(L3_OFFSET + 28, 0xff)]), Pass, NoMatch),
        case("TCP GET in QinQ", Frame::tcp(LEGIT_V4, 40000, 7004, TCP_ACK | TCP_PSH).payload_bytes(b"GET / HTTP/1.1").qinq(1, 2).bytes(), Drop, Rule),
        case("IPv6 TCP GET behind extension headers", v6_exts(Frame::tcp(LEGIT_V6, 40000, 7004, TCP_ACK | TCP_PSH).payload_bytes(b"GET /")).bytes(), Drop, Rule),
        case("TCP POST", Frame::tcp(LEGIT_V4, 40000, 7004, TCP_ACK | TCP_PSH).payload_bytes(b"POST /").bytes(), Pass, NoMatch),
        case("TCP SYN without payload to the payload rule's port", Frame::tcp(LEGIT_V4, 40000, 7004, TCP_SYN).payload(0).bytes(), Pass, NoMatch),
        case("the matched bytes ending where the IP packet ends", Frame::udp(LEGIT_V4, 40000, 7003).payload_bytes(&STATS_PROBE[..13]).bytes(), Drop, Rule),
        case("ICMP echo with 0xcafe after its 8-byte header", Frame::ping(LEGIT_V4).payload_bytes(&[0xca, 0xfe, 0]).bytes(), Drop, Rule),
        case("ICMP echo with 0xcafe one byte later", Frame::ping(LEGIT_V4).payload_bytes(&[0, 0xca, 0xfe]).bytes(), Pass, NoMatch),
        case("a later fragment of a marked echo (no port to exclude it)", Frame::ping(LEGIT_V4).payload_bytes(&[0xca, 0xfe, 0]).ipv4_fragment(185, false).bytes(), Pass, NoMatch),
        case("a later fragment of a stats probe", Frame::udp(LEGIT_V4, 40000, 7003).payload_bytes(STATS_PROBE).ipv4_fragment(185, false).bytes(), Pass, NoMatch),
        case("TTL 1 on a later fragment", patched(Frame::udp(LEGIT_V4, 40000, 7001).ipv4_fragment(185, false).bytes(), &[(22, 1)]), Pass, NoMatch),
        // Rules.
        case("memcached reflection", Frame::udp(LEGIT_V4, 11211, 80).bytes(), Drop, Rule),
        case("memcached reflection in QinQ", Frame::udp(LEGIT_V4, 11211, 80).qinq(1, 2).bytes(), Drop, Rule),
        case("memcached reflection over IPv6 with extensions", v6_exts(Frame::udp(LEGIT_V6, 11211, 80)).bytes(), Drop, Rule),
        case("memcached reflection behind IPv4 options", Frame::udp(LEGIT_V4, 11211, 80).ipv4_options(3).bytes(), Drop, Rule),
        case("a later fragment has no ports", Frame::udp(LEGIT_V4, 11211, 80).ipv4_fragment(10, true).bytes(), Pass, NoMatch),
        case("an IPv6 later fragment has no ports", Frame::udp(LEGIT_V6, 11211, 80).extension(Extension::Fragment { offset: 10, more: true }).bytes(), Pass, NoMatch),
        case("an IPv4 first fragment has ports", Frame::udp(LEGIT_V4, 11211, 80).ipv4_fragment(0, true).bytes(), Drop, Rule),
        case("DNS reply to a client port passes", Frame::udp(LEGIT_V4, 53, 40000).bytes(), Pass, Rule),
        case("DNS reflection to a low port drops", Frame::udp(LEGIT_V4, 53, 80).bytes(), Drop, Rule),
        case("NTP reflection", Frame::udp(LEGIT_V6, 123, 5000).bytes(), Drop, Rule),
        case("SSDP reflection", Frame::udp(LEGIT_V4, 1900, 5000).bytes(), Drop, Rule),
        case("TCP from port 53 is not a UDP rule", Frame::tcp(LEGIT_V4, 53, 80, TCP_ACK).bytes(), Pass, NoMatch),
        case("NULL scan", Frame::tcp(LEGIT_V4, 1, 80, 0).bytes(), Drop, Rule),
        case("XMAS scan", Frame::tcp(LEGIT_V6, 1, 80, TCP_FIN | TCP_PSH | TCP_URG).bytes(), Drop, Rule),
        case("telnet", Frame::tcp(LEGIT_V4, 40000, 23, TCP_SYN).bytes(), Drop, Rule),
        // Malformed.
        // (The kernel refuses test frames shorter than an Ethernet header, as NICs do.)
        case("IPv4 EtherType and nothing else", Frame::udp(LEGIT_V4, 1, 2).bytes()[..L3_OFFSET].to_vec(), Drop, Malformed),
        case("IPv6 EtherType and nothing else", Frame::udp(LEGIT_V6, 1, 2).bytes()[..L3_OFFSET].to_vec(), Drop, Malformed),
        case("VLAN tag cut short", Frame::udp(LEGIT_V4, 1, 2).vlan(5).bytes()[..L3_OFFSET + 2].to_vec(), Drop, Malformed),
        case("truncated IPv4 header", Frame::udp(LEGIT_V4, 1, 2).bytes()[..L3_OFFSET + 12].to_vec(), Drop, Malformed),
        case("IHL below 5", patched(Frame::udp(LEGIT_V4, 1, 2).bytes(), &[(L3_OFFSET, 0x44)]), Drop, Malformed),
        case("IPv4 version 5", patched(Frame::udp(LEGIT_V4, 1, 2).bytes(), &[(L3_OFFSET, 0x55)]), Drop, Malformed),
        case("total length beyond the frame", patched(Frame::udp(LEGIT_V4, 1, 2).bytes(), &[(L3_OFFSET + 2, 0x10)]), Drop, Malformed),
        case("total length below the header", patched(Frame::udp(LEGIT_V4, 1, 2).bytes(), &[(L3_OFFSET + 2, 0), (L3_OFFSET + 3, 8)]), Drop, Malformed),
        case("options beyond the frame", patched(Frame::udp(LEGIT_V4, 1, 2).payload(0).bytes(), &[(L3_OFFSET, 0x4f), (L3_OFFSET + 3, 68)]), Drop, Malformed),
        case("truncated UDP header", Frame::udp(LEGIT_V4, 1, 2).payload(0).bytes()[..L3_OFFSET + 24].to_vec(), Drop, Malformed),
        case("truncated TCP header", Frame::tcp(LEGIT_V4, 1, 2, TCP_SYN).payload(0).bytes()[..L3_OFFSET + 30].to_vec(), Drop, Malformed),
        case("TCP data offset below 5", patched(Frame::tcp(LEGIT_V4, 1, 2, TCP_SYN).bytes(), &[(L3_OFFSET + 20 + 12, 0x40)]), Drop, Malformed),
        case("tiny first fragment (RFC 1858)", Frame::tcp(LEGIT_V4, 1, 2, TCP_SYN).payload(0).ipv4_fragment(0, true).bytes()[..L3_OFFSET + 28].to_vec(), Drop, Malformed),
        // Every transport header inside the IP packet, not just the frame (RFC 1858): the junk
        // after a short IP packet here looks like a harmless TCP header to port 80.
        case("tiny first fragment padded with a harmless-looking header", patched(Frame::tcp(LEGIT_V4, 40000, 80, TCP_SYN).payload(0).bytes(), &[(L3_OFFSET + 2, 0), (L3_OFFSET + 3, 28), (L3_OFFSET + 6, 0x20)]), Drop, Malformed),
        case("TCP header past the IPv4 total length", patched(Frame::tcp(LEGIT_V4, 40000, 80, TCP_SYN).payload(0).bytes(), &[(L3_OFFSET + 2, 0), (L3_OFFSET + 3, 36)]), Drop, Malformed),
        case("UDP header past the IPv4 total length", patched(Frame::udp(LEGIT_V4, 40000, 443).payload(0).bytes(), &[(L3_OFFSET + 2, 0), (L3_OFFSET + 3, 24)]), Drop, Malformed),
        case("ICMP header past the IPv4 total length", patched(Frame::ping(LEGIT_V4).payload(0).bytes(), &[(L3_OFFSET + 2, 0), (L3_OFFSET + 3, 22)]), Drop, Malformed),
        case("IPv4 fragment at offset 1 (RFC 1858)", Frame::tcp(LEGIT_V4, 1, 2, TCP_SYN).ipv4_fragment(1, true).bytes(), Drop, Malformed),
        case("IPv6 TCP header past the payload length", patched(Frame::tcp(LEGIT_V6, 40000, 80, TCP_SYN).payload(0).bytes(), &[(L3_OFFSET + 4, 0), (L3_OFFSET + 5, 8)]), Drop, Malformed),
        case("IPv6 tiny first fragment padded", patched(Frame::tcp(LEGIT_V6, 40000, 80, TCP_SYN).payload(0).extension(Extension::Fragment { offset: 0, more: true }).bytes(), &[(L3_OFFSET + 4, 0), (L3_OFFSET + 5, 16)]), Drop, Malformed),
        case("IPv6 fragment at offset 1", Frame::udp(LEGIT_V6, 1, 2).extension(Extension::Fragment { offset: 1, more: true }).bytes(), Drop, Malformed),
        case("IPv6 extension header past the payload length", patched(v6_exts(Frame::udp(LEGIT_V6, 1, 2)).payload(0).bytes(), &[(L3_OFFSET + 4, 0), (L3_OFFSET + 5, 4)]), Drop, Malformed),
        // What honest senders send still passes: a first fragment holding the whole header,
        // and Ethernet padding after a short IP packet.
        case("first fragment holding the whole TCP header", Frame::tcp(LEGIT_V4, 40000, 80, TCP_SYN).ipv4_fragment(0, true).bytes(), Pass, NoMatch),
        case("IPv6 first fragment holding the whole UDP header", Frame::udp(LEGIT_V6, 40000, 443).extension(Extension::Fragment { offset: 0, more: true }).bytes(), Pass, NoMatch),
        case("Ethernet padding after a short IP packet", padded(Frame::udp(LEGIT_V4, 40000, 443).payload(0).bytes(), 18), Pass, NoMatch),
        case("truncated IPv6 header", Frame::udp(LEGIT_V6, 1, 2).bytes()[..L3_OFFSET + 30].to_vec(), Drop, Malformed),
        case("IPv6 version 4", patched(Frame::udp(LEGIT_V6, 1, 2).bytes(), &[(L3_OFFSET, 0x40)]), Drop, Malformed),
        case("IPv6 payload beyond the frame", patched(Frame::udp(LEGIT_V6, 1, 2).bytes(), &[(L3_OFFSET + 4, 0x40)]), Drop, Malformed),
        case("three VLAN tags", Frame::udp(LEGIT_V4, 1, 2).vlan(1).vlan(2).vlan(3).bytes(), Drop, Malformed),
        case("eight extension headers pass", (0..8).fold(Frame::udp(LEGIT_V6, 1, 2), |f, _| { f.extension(Extension::DestinationOptions) }).bytes(), Pass, NoMatch),
        case("nine extension headers are too many", (0..9).fold(Frame::udp(LEGIT_V6, 1, 2), |f, _| { f.extension(Extension::DestinationOptions) }).bytes(), Drop, Malformed),
        case("truncated extension header", Frame::udp(LEGIT_V6, 1, 2).payload(0).extension(Extension::HopByHop).bytes()[..L3_OFFSET + 41].to_vec(), Drop, Malformed),
        // A blocked source stays dropped even when its packet is malformed.
        case("malformed from a blocked source", patched(Frame::udp(BLOCKED_V4, 1, 2).bytes(), &[(L3_OFFSET, 0x43)]), Drop, Malformed),
    ]
}
