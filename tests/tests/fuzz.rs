//! A million random and mutated frames through the real program (lists, rules on every field,
//! protected destinations): it never aborts, and no frame from a blocked source is ever passed, however
//! it is mangled.

use std::{net::IpAddr, path::Path};

use agent_common::protect::{
    FP_LENGTH, FP_PAYLOAD, FP_PAYLOAD_MAX, FP_SRC_PORT, FP_TCP_FLAGS, FP_TCP_WINDOW, FP_TTL,
    Fingerprint,
};
use moat::config::{Cidr, Config, Overrides};
use moat_tests::{
    frames::{DST_V4, DST_V6, Extension, Frame, TCP_SYN},
    program::{LoadedProgram, XDP_DROP, XDP_PASS, action_name},
};

const FRAMES: u64 = 1_000_000;

const BLOCKED: [&str; 5] = [
    "198.51.100.0/24",
    "10.0.0.0/8",
    "203.0.113.128/25",
    "2001:db8:bad::/48",
    "2001:db8:beef::5/128",
];

/// xorshift64*: small, fast, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn seed_frames() -> Vec<Vec<u8>> {
    let sources = [
        "198.51.100.7",
        "10.9.8.7",
        "203.0.113.200",
        "203.0.113.9",
        "192.0.2.1",
        "2001:db8:bad::7",
        "2001:db8:beef::5",
        "2001:db8:1::2",
    ];
    let mut frames = Vec::new();
    for source in sources {
        frames.push(Frame::udp(source, 11211, 80).bytes());
        frames.push(Frame::tcp(source, 1, 80, TCP_SYN).vlan(3).bytes());
        frames.push(Frame::ping(source).qinq(1, 2).bytes());
        if source.contains(':') {
            frames.push(
                Frame::udp(source, 53, 5000)
                    .extension(Extension::HopByHop)
                    .extension(Extension::Fragment {
                        offset: 0,
                        more: true,
                    })
                    .extension(Extension::Ah)
                    .bytes(),
            );
        } else {
            frames.push(
                Frame::udp(source, 53, 5000)
                    .ipv4_options(4)
                    .ipv4_fragment(3, true)
                    .bytes(),
            );
        }
    }
    frames
}

/// Bytes likely to steer a parser somewhere interesting.
const INTERESTING: [u8; 12] = [
    0x00, 0xff, 0x08, 0x86, 0xdd, 0x81, 0x88, 0xa8, 0x45, 0x4f, 0x60, 0x2c,
];

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !frame.is_empty() => {
                let at = rng.below(frame.len());
                frame[at] ^= 1 << rng.below(8);
            }
            1 if !frame.is_empty() => {
                let at = rng.below(frame.len());
                frame[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if frame.len() > 14 => {
                let len = 14 + rng.below(frame.len() - 14);
                frame.truncate(len);
            }
            3 => {
                for _ in 0..rng.below(64) {
                    frame.push(rng.byte());
                }
            }
            _ => {
                // Force an IP EtherType (possibly behind a tag) onto whatever is there.
                if frame.len() >= 14 {
                    let ether_type: [u8; 2] = if rng.below(2) == 0 {
                        [0x08, 0x00]
                    } else {
                        [0x86, 0xdd]
                    };
                    frame[12..14].copy_from_slice(&ether_type);
                }
            }
        }
    }
}

fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let len = 14 + rng.below(200);
    let mut frame: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
    // Mostly IP, so the parser is exercised past Ethernet.
    let ether_type: [u8; 2] = match rng.below(4) {
        0 => [0x08, 0x00],
        1 => [0x86, 0xdd],
        2 => [0x81, 0x00],
        _ => [frame[12], frame[13]],
    };
    frame[12..14].copy_from_slice(&ether_type);
    frame
}

/// What any correct program must do with `frame`, judged from the outside: a frame whose
/// EtherType (behind at most two tags) says IP and whose source is blocked — or that is too
/// short to have a source — must be dropped. `None`: no claim.
fn must_drop(frame: &[u8], blocked: &[Cidr]) -> Option<String> {
    let mut offset = 12;
    let mut ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    for _ in 0..2 {
        if ether_type != 0x8100 && ether_type != 0x88a8 {
            break;
        }
        offset += 4;
        if frame.len() < offset + 2 {
            return Some("a VLAN tag cut short".into());
        }
        ether_type = u16::from_be_bytes([frame[offset], frame[offset + 1]]);
    }
    let l3 = offset + 2;
    let source: IpAddr = match ether_type {
        0x0800 => {
            let bytes: [u8; 4] = frame.get(l3 + 12..l3 + 16)?.try_into().ok()?;
            if frame.len() < l3 + 20 {
                return Some("a truncated IPv4 header".into());
            }
            bytes.into()
        }
        0x86dd => {
            let bytes: [u8; 16] = frame.get(l3 + 8..l3 + 24)?.try_into().ok()?;
            if frame.len() < l3 + 40 {
                return Some("a truncated IPv6 header".into());
            }
            bytes.into()
        }
        _ => return None,
    };
    blocked
        .iter()
        .any(|cidr| cidr.net().contains(&source))
        .then(|| format!("blocked source {source}"))
}

#[test]
fn a_million_mangled_frames_never_abort_and_never_pass_a_blocked_source() {
    let text = format!(
        "interfaces = [\"lo\"]\n[blocklist]\ncidrs = [{}]\n[[rules]]\nname = \"r\"\nprotocol = \"udp\"\nsrc_ports = [11211]\naction = \"drop\"\n\
         [[rules]]\nname = \"t\"\nprotocol = \"any\"\nttl = [\"0-1\"]\nlength = [\"40-1000\"]\naction = \"pass\"\n\
         [[rules]]\nname = \"p\"\nprotocol = \"any\"\npayload = \"cdcd\"\npayload_offset = 2\naction = \"drop\"\n\
         [[rules]]\nname = \"q\"\nprotocol = \"udp\"\npayload = \"0x0102030405060708\"\naction = \"pass\"\n\
         [[protect]]\nname = \"v4\"\ndestination = \"{DST_V4}\"\npps = 100000\nbps = \"1Gbit\"\n\
         [[protect]]\nname = \"v6\"\ndestination = \"{DST_V6}\"\nprotocol = \"udp\"\npps = 100000\n",
        BLOCKED.map(|c| format!("\"{c}\"")).join(", ")
    );
    let policy = Config::from_str_at(&text, Path::new("fuzz.toml"))
        .and_then(|c| c.resolve(&Overrides::default()))
        .expect("fuzz policy")
        .policy;
    let blocked: Vec<Cidr> = BLOCKED.iter().map(|c| c.parse().expect("CIDR")).collect();
    let mut program = LoadedProgram::new(&policy);
    // An attack fingerprint on each protected destination, matching seeds of both, so that
    // mangled frames go through the fingerprint's reads too. (The payload rules read every
    // frame's payload but match none of the seeds — payloads of 0xab, ICMP headers — since
    // they would decide before the fingerprints.)
    let payload = |len: usize| {
        let mut bytes = [0u8; FP_PAYLOAD_MAX];
        bytes[..len].fill(0xab);
        bytes
    };
    let tcp_syn_from_port_1 = Fingerprint {
        fields: FP_SRC_PORT | FP_TCP_FLAGS | FP_TCP_WINDOW | FP_TTL | FP_PAYLOAD,
        src_port: 1,
        tcp_flags: TCP_SYN,
        tcp_window: 0xffff,
        ttl: 64,
        payload_len: 4,
        payload: payload(4),
        ..Fingerprint::default()
    };
    let udp_from_port_53 = Fingerprint {
        fields: FP_SRC_PORT | FP_LENGTH | FP_PAYLOAD,
        src_port: 53,
        length: 40 + 8 + 18,
        payload_len: 8,
        payload: payload(8),
        ..Fingerprint::default()
    };
    for (entry, print) in [(0, tcp_syn_from_port_1), (1, udp_from_port_53)] {
        program
            .fingerprints
            .install(entry, &print)
            .expect("install a fingerprint");
    }

    let seed = std::env::var("MOAT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d6f_6174_u64);
    let mut rng = Rng(seed | 1);
    let seeds = seed_frames();
    let (mut dropped, mut passed) = (0u64, 0u64);
    for n in 0..FRAMES {
        let frame = if rng.below(4) == 0 {
            random_frame(&mut rng)
        } else {
            let mut frame = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &mut frame);
            frame
        };
        let action = program.run(&frame);
        let shown = || frame.iter().map(|b| format!("{b:02x}")).collect::<String>();
        match action {
            XDP_DROP => dropped += 1,
            XDP_PASS => {
                passed += 1;
                if let Some(why) = must_drop(&frame, &blocked) {
                    panic!(
                        "frame {n} (seed {seed}) has {why} but was passed: {}",
                        shown()
                    );
                }
            }
            other => panic!(
                "frame {n} (seed {seed}) returned {}: {}",
                action_name(other),
                shown()
            ),
        }
    }
    // Both outcomes must have been exercised for the run to mean anything.
    assert!(
        dropped > FRAMES / 10 && passed > FRAMES / 10,
        "dropped {dropped}, passed {passed}"
    );
}
