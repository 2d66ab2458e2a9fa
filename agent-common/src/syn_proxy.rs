//! SYN cookies answered by the XDP program, in front of netfilter's `synproxy`: the settings the
//! program reads, and the SYN-ACK it writes. The builder is plain code over byte arrays, so that
//! the program runs it and the host tests it; the verifier bounds every index by the arrays'
//! fixed sizes.
//!
//! The SYN-ACK is the one netfilter's synproxy would have sent (`synproxy_send_client_synack`),
//! so that synproxy accepts the handshake's final ACK: `seq` is the kernel's cookie (from
//! `bpf_tcp_raw_gen_syncookie_*`), the window is 0 (synproxy opens it once the server
//! answers), and the options are MSS, then, if the client sent a timestamp, SACK-permitted (or
//! two NOPs) and a timestamp whose value carries the client's window scale and SACK-permitted
//! (`synproxy_init_timestamp_cookie`), then NOP and window scale if the client sent one.
//! Without a client timestamp there is nowhere to keep the client's options: MSS alone.
//! Checksums are the program's (the kernel's checksum helper sums them).

use crate::{
    pod,
    tcp::{ACK, SYN},
};

/// Port ranges and destination prefixes one configuration may hold (per family).
pub const MAX_PORT_SPANS: usize = 16;
pub const MAX_DESTINATIONS: usize = 16;

/// TCP option kinds.
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_WSCALE: u8 = 3;
const OPT_SACK_PERM: u8 = 4;
const OPT_TIMESTAMP: u8 = 8;
const OPT_MSS_LEN: u8 = 4;
const OPT_WSCALE_LEN: u8 = 3;
const OPT_SACK_PERM_LEN: u8 = 2;
const OPT_TIMESTAMP_LEN: u8 = 10;

/// TCP header lengths: without options, and the longest (data offset 15 words).
pub const TCP_HEADER_MIN: usize = 20;
pub const TCP_HEADER_MAX: usize = 60;
/// The buffer a TCP header is read into: a power of two, so that an index masked by it is
/// one the verifier (and the compiler) can see is inside.
pub const TCP_BUFFER: usize = 64;
const TCP_BUFFER_MASK: usize = TCP_BUFFER - 1;
/// The longest SYN-ACK header: MSS (4), SACK-permitted/NOPs and timestamp (12), NOP and window
/// scale (4).
pub const SYN_ACK_MAX: usize = 40;

/// The window scale the kernel takes at most (RFC 7323); a client's larger value is read as it.
const MAX_WSCALE: u8 = 14;
/// The timestamp's low bits that carry the client's options: 4 bits of window scale (0xf: none),
/// SACK-permitted, ECN.
const TS_WSCALE_NONE: u32 = 0xf;
const TS_SACK_PERM: u32 = 1 << 4;
const TS_OPTION_BITS: u32 = 0x3f;

/// A range of TCP destination ports, inclusive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortSpan {
    pub first: u16,
    pub last: u16,
}

/// A destination prefix: the address and the mask, both in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Destination {
    pub addr: [u8; 4],
    pub mask: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Destination {
    pub addr: [u8; 16],
    pub mask: [u8; 16],
}

/// `[syn_proxy]` as the program reads it: one slot per generation of the `SYN_PROXY` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynProxySettings {
    /// Entries in use in `ports`, `v4` and `v6`.
    pub port_count: u32,
    pub v4_count: u32,
    pub v6_count: u32,
    /// 1: every destination (no `destinations` configured); the tables are then empty.
    pub all_destinations: u32,
    /// The MSS the SYN-ACK advertises, per family (IPv6's header is 20 bytes longer).
    pub mss_v4: u16,
    pub mss_v6: u16,
    /// The window scale the SYN-ACK advertises (to a client that sent one).
    pub wscale: u8,
    /// 1: advertise SACK-permitted (to a client that sent it).
    pub sack: u8,
    /// 1: echo the client's timestamp (and so keep its window scale and SACK-permitted).
    pub timestamps: u8,
    /// TTL / hop limit of the SYN-ACK.
    pub ttl: u8,
    /// How long a source whose cookie checked out stays verified.
    pub verified_ttl_ns: u64,
    pub ports: [PortSpan; MAX_PORT_SPANS],
    pub v4: [V4Destination; MAX_DESTINATIONS],
    pub v6: [V6Destination; MAX_DESTINATIONS],
}

pod!(PortSpan, V4Destination, V6Destination, SynProxySettings);

impl SynProxySettings {
    /// Whether TCP destination port `port` is protected.
    #[inline(always)]
    pub fn covers_port(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_PORT_SPANS && i < self.port_count as usize {
            let span = self.ports[i];
            if span.first <= port && port <= span.last {
                return true;
            }
            i += 1;
        }
        false
    }

    #[inline(always)]
    pub fn covers_v4(&self, addr: &[u8; 4]) -> bool {
        if self.all_destinations != 0 {
            return true;
        }
        let addr = u32::from_ne_bytes(*addr);
        let mut i = 0;
        while i < MAX_DESTINATIONS && i < self.v4_count as usize {
            let entry = self.v4[i];
            if addr & u32::from_ne_bytes(entry.mask) == u32::from_ne_bytes(entry.addr) {
                return true;
            }
            i += 1;
        }
        false
    }

    #[inline(always)]
    pub fn covers_v6(&self, addr: &[u8; 16]) -> bool {
        if self.all_destinations != 0 {
            return true;
        }
        let addr = u128::from_ne_bytes(*addr);
        let mut i = 0;
        while i < MAX_DESTINATIONS && i < self.v6_count as usize {
            let entry = self.v6[i];
            if addr & u128::from_ne_bytes(entry.mask) == u128::from_ne_bytes(entry.addr) {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// The per-CPU scratch space of the SYN-cookie stage (`SYN_SCRATCH`): copies of the SYN's
/// headers for the cookie helpers, and the SYN-ACK's, too large for the BPF stack together.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SynScratch {
    /// The IPv4 (20 bytes) or IPv6 (40 bytes) header.
    pub ip: [u8; 40],
    /// The TCP header, options included (up to 60 bytes). Fields follow it: the bound the
    /// verifier is shown for a header's length (83, see the program's `syn_proxy`) stays
    /// inside the slot.
    pub tcp: [u8; TCP_BUFFER],
    /// The Ethernet addresses (destination, source).
    pub macs: [u8; 12],
    /// The SYN-ACK's TCP header.
    pub reply: [u8; SYN_ACK_MAX],
    /// The SYN's options.
    pub options: SynOptions,
}

/// What a SYN's options ask for. Kept in memory (the scratch slot), not in registers, while
/// the options are read: the verifier then follows one value (the position), not every
/// combination of options seen so far.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynOptions {
    /// The client's window scale (at most 14); [`NO_WSCALE`]: none sent.
    pub wscale: u8,
    pub sack_permitted: u8,
    /// 1: the client sent a timestamp, `tsval`.
    pub timestamp: u8,
    pub _pad: u8,
    pub tsval: u32,
}

/// [`SynOptions::wscale`] when the client sent no window scale.
pub const NO_WSCALE: u8 = 0xff;

/// Options that run past the header, or an option too short to be one.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedOptions;

/// Reads the options of the TCP header in `tcp` (`len` bytes, the data offset times four)
/// into `options`.
#[inline(always)]
pub fn parse_options(
    tcp: &[u8; TCP_BUFFER],
    len: usize,
    options: &mut SynOptions,
) -> Result<(), MalformedOptions> {
    let byte = |at: usize| tcp[at & TCP_BUFFER_MASK];
    // Volatile: stores the compiler may not keep in registers instead (see `SynOptions`).
    let out = core::ptr::from_mut(options);
    // SAFETY: `out` is a valid, exclusive reference turned pointer.
    let store = |value: SynOptions| unsafe { core::ptr::write_volatile(out, value) };
    // SAFETY: as above.
    let load = || unsafe { core::ptr::read_volatile(out) };
    store(SynOptions {
        wscale: NO_WSCALE,
        ..SynOptions::default()
    });
    let end = if len > TCP_HEADER_MAX {
        TCP_HEADER_MAX
    } else {
        len
    };
    let mut at = TCP_HEADER_MIN;
    // Each round moves `at` by at least one byte: at most 40 rounds.
    while at < end {
        let kind = byte(at);
        if kind == OPT_EOL {
            break;
        }
        if kind == OPT_NOP {
            at += 1;
            continue;
        }
        if at + 1 >= end {
            return Err(MalformedOptions);
        }
        let size = byte(at + 1) as usize;
        if size < 2 || at + size > end {
            return Err(MalformedOptions);
        }
        match (kind, size as u8) {
            (OPT_WSCALE, OPT_WSCALE_LEN) => {
                let shift = byte(at + 2);
                store(SynOptions {
                    wscale: if shift > MAX_WSCALE {
                        MAX_WSCALE
                    } else {
                        shift
                    },
                    ..load()
                });
            }
            (OPT_SACK_PERM, OPT_SACK_PERM_LEN) => store(SynOptions {
                sack_permitted: 1,
                ..load()
            }),
            (OPT_TIMESTAMP, OPT_TIMESTAMP_LEN) => store(SynOptions {
                timestamp: 1,
                tsval: u32::from_be_bytes([byte(at + 2), byte(at + 3), byte(at + 4), byte(at + 5)]),
                ..load()
            }),
            // MSS is read by the cookie helper; other options are not echoed.
            _ => {}
        }
        at += size;
    }
    Ok(())
}

/// What the SYN-ACK advertises.
#[derive(Clone, Copy, Debug)]
pub struct Advertised {
    pub mss: u16,
    pub wscale: u8,
    pub sack: bool,
    pub timestamps: bool,
}

/// Writes the SYN-ACK's TCP header answering the SYN header `syn` (options `options`) into
/// `reply` and returns its length (24, 36 or 40). The checksum is left 0: it needs the
/// addresses.
#[inline(always)]
pub fn write_syn_ack(
    syn: &[u8; TCP_BUFFER],
    options: &SynOptions,
    advertised: &Advertised,
    cookie: u32,
    now_ms: u32,
    reply: &mut [u8; SYN_ACK_MAX],
) -> usize {
    *reply = [0; SYN_ACK_MAX];
    // Ports swapped.
    reply[0] = syn[2];
    reply[1] = syn[3];
    reply[2] = syn[0];
    reply[3] = syn[1];
    reply[4..8].copy_from_slice(&cookie.to_be_bytes());
    let ack = u32::from_be_bytes([syn[4], syn[5], syn[6], syn[7]]).wrapping_add(1);
    reply[8..12].copy_from_slice(&ack.to_be_bytes());
    reply[13] = SYN | ACK;
    // Window 0 (bytes 14-15), checksum (16-17) and urgent pointer (18-19) stay 0.
    reply[20] = OPT_MSS;
    reply[21] = OPT_MSS_LEN;
    reply[22..24].copy_from_slice(&advertised.mss.to_be_bytes());
    let mut len = 24;
    if options.timestamp != 0 && advertised.timestamps {
        let tsecr = options.tsval;
        let sack = options.sack_permitted != 0 && advertised.sack;
        let mut tsval = (now_ms & !TS_OPTION_BITS) | TS_WSCALE_NONE;
        if options.wscale != NO_WSCALE {
            tsval = (tsval & !TS_WSCALE_NONE) | u32::from(options.wscale);
        }
        if sack {
            tsval |= TS_SACK_PERM;
            reply[24] = OPT_SACK_PERM;
            reply[25] = OPT_SACK_PERM_LEN;
        } else {
            reply[24] = OPT_NOP;
            reply[25] = OPT_NOP;
        }
        reply[26] = OPT_TIMESTAMP;
        reply[27] = OPT_TIMESTAMP_LEN;
        reply[28..32].copy_from_slice(&tsval.to_be_bytes());
        reply[32..36].copy_from_slice(&tsecr.to_be_bytes());
        len = 36;
        if options.wscale != NO_WSCALE {
            reply[36] = OPT_NOP;
            reply[37] = OPT_WSCALE;
            reply[38] = OPT_WSCALE_LEN;
            reply[39] = advertised.wscale;
            len = 40;
        }
    }
    // Data offset in 32-bit words.
    reply[12] = ((len / 4) as u8) << 4;
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn(options: &[u8]) -> ([u8; TCP_BUFFER], usize) {
        let mut tcp = [0u8; TCP_BUFFER];
        tcp[..4].copy_from_slice(&[0x9c, 0x40, 0x00, 0x50]); // 40000 → 80
        tcp[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        let len = TCP_HEADER_MIN + options.len();
        tcp[12] = ((len / 4) as u8) << 4;
        tcp[13] = SYN;
        tcp[TCP_HEADER_MIN..len].copy_from_slice(options);
        (tcp, len)
    }

    const LINUX_SYN: [u8; 20] = [
        2, 4, 0x05, 0xb4, // MSS 1460
        4, 2, // SACK-permitted
        8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, // TS 0x1234
        1, // NOP
        3, 3, 7, // WS 7
    ];

    const ADVERTISED: Advertised = Advertised {
        mss: 1460,
        wscale: 9,
        sack: true,
        timestamps: true,
    };

    fn parse(tcp: &[u8; TCP_BUFFER], len: usize) -> Result<SynOptions, MalformedOptions> {
        let mut options = SynOptions::default();
        parse_options(tcp, len, &mut options).map(|()| options)
    }

    #[test]
    fn linux_syn_options_are_read() {
        let (tcp, len) = syn(&LINUX_SYN);
        assert_eq!(
            parse(&tcp, len),
            Ok(SynOptions {
                wscale: 7,
                sack_permitted: 1,
                timestamp: 1,
                _pad: 0,
                tsval: 0x1234,
            })
        );
    }

    #[test]
    fn truncated_and_short_options_are_malformed() {
        // A timestamp claiming 10 bytes with 4 left.
        let (tcp, len) = syn(&[1, 1, 1, 1, 8, 10, 0, 0]);
        assert_eq!(parse(&tcp, len), Err(MalformedOptions));
        // A length under 2 would never advance.
        let (tcp, len) = syn(&[2, 0, 0, 0]);
        assert_eq!(parse(&tcp, len), Err(MalformedOptions));
        // A kind with no room for its length.
        let (tcp, len) = syn(&[1, 1, 1, 3]);
        assert_eq!(parse(&tcp, len), Err(MalformedOptions));
    }

    #[test]
    fn end_of_options_stops_reading_and_big_shifts_are_clamped() {
        let (tcp, len) = syn(&[3, 3, 20, 0, 8, 10, 0, 0]);
        assert_eq!(
            parse(&tcp, len),
            Ok(SynOptions {
                wscale: 14,
                ..SynOptions::default()
            })
        );
    }

    #[test]
    fn a_syn_ack_to_a_full_syn_carries_every_option() {
        let (tcp, len) = syn(&LINUX_SYN);
        let options = parse(&tcp, len).unwrap();
        let mut reply = [0u8; SYN_ACK_MAX];
        let len = write_syn_ack(
            &tcp,
            &options,
            &ADVERTISED,
            0xdead_beef,
            0x1000_0047,
            &mut reply,
        );
        assert_eq!(len, 40);
        let tsval = ((0x1000_0047u32 & !0x3f) | 7 | TS_SACK_PERM).to_be_bytes();
        #[rustfmt::skip]
        let expected: [u8; SYN_ACK_MAX] = [
            0x00, 0x50, 0x9c, 0x40, // ports swapped
            0xde, 0xad, 0xbe, 0xef, // seq = cookie
            0x01, 0x02, 0x03, 0x05, // ack = seq + 1
            0xa0, 0x12, 0, 0, // 10 words, SYN|ACK, window 0
            0, 0, 0, 0, // checksum, urgent
            2, 4, 0x05, 0xb4, 4, 2, 8, 10,
            tsval[0], tsval[1], tsval[2], tsval[3],
            0, 0, 0x12, 0x34, // TSecr: the client's TSval
            1, 3, 3, 9,
        ];
        assert_eq!(reply, expected);
    }

    #[test]
    fn without_a_client_timestamp_only_mss_is_sent() {
        let (tcp, len) = syn(&[2, 4, 0x05, 0xb4, 4, 2, 1, 3, 3, 7, 0, 0]);
        let options = parse(&tcp, len).unwrap();
        let mut reply = [0xffu8; SYN_ACK_MAX];
        assert_eq!(
            write_syn_ack(&tcp, &options, &ADVERTISED, 1, 0, &mut reply),
            24
        );
        assert_eq!(reply[12], 6 << 4);
        assert_eq!(&reply[20..24], &[2, 4, 0x05, 0xb4]);
        assert!(reply[24..].iter().all(|b| *b == 0));
    }

    #[test]
    fn sack_off_sends_nops_and_no_window_scale_without_the_clients() {
        let (tcp, len) = syn(&[4, 2, 8, 10, 0, 0, 0, 9, 0, 0, 0, 0]);
        let options = parse(&tcp, len).unwrap();
        let mut reply = [0u8; SYN_ACK_MAX];
        let advertised = Advertised {
            sack: false,
            ..ADVERTISED
        };
        assert_eq!(
            write_syn_ack(&tcp, &options, &advertised, 1, 0, &mut reply),
            36
        );
        assert_eq!(&reply[24..28], &[1, 1, 8, 10]);
        // No window scale from the client: 0xf; SACK not advertised: bit 4 clear.
        assert_eq!(
            u32::from_be_bytes(reply[28..32].try_into().unwrap()) & 0x3f,
            0xf
        );
    }

    #[test]
    fn ports_and_destinations_are_matched_by_span_and_mask() {
        let mut settings = SynProxySettings {
            port_count: 2,
            v4_count: 1,
            ..SynProxySettings::default()
        };
        settings.ports[0] = PortSpan {
            first: 80,
            last: 80,
        };
        settings.ports[1] = PortSpan {
            first: 8000,
            last: 8100,
        };
        settings.v4[0] = V4Destination {
            addr: [10, 0, 0, 0],
            mask: [255, 0, 0, 0],
        };
        assert!(settings.covers_port(80) && settings.covers_port(8050));
        assert!(!settings.covers_port(81) && !settings.covers_port(443));
        assert!(settings.covers_v4(&[10, 1, 2, 3]));
        assert!(!settings.covers_v4(&[11, 0, 0, 1]));
        assert!(!settings.covers_v6(&[0; 16]));
        settings.all_destinations = 1;
        assert!(settings.covers_v6(&[0; 16]));
    }
}
