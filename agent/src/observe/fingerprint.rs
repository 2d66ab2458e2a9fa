//! Attack fingerprints: the smallest set of packet attributes, with one value each, that the
//! attack's sampled packets share and the destination's usual traffic does not (after
//! Cloudflare's dosd). Attributes are read from sampled frames exactly as the program compares
//! them (`agent_common::protect::Fingerprint`), so what is judged here is what is enforced.

use std::{collections::HashMap, fmt};

use agent_common::protect::{
    FP_IP_ID, FP_LENGTH, FP_PAYLOAD, FP_PAYLOAD_MAX, FP_SRC_PORT, FP_TCP_FLAGS, FP_TCP_WINDOW,
    FP_TTL, Fingerprint,
};
use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};

/// The share of the attack's samples a fingerprint must match, and the most of the baseline's
/// it may.
pub const MIN_ATTACK_COVERAGE: f64 = 0.95;
pub const MAX_BASELINE_COVERAGE: f64 = 0.01;
/// Fewer samples than these say too little to judge by.
pub const MIN_ATTACK_SAMPLES: usize = 50;
pub const MIN_BASELINE_SAMPLES: usize = 50;
/// The most attributes one fingerprint combines.
const MAX_ATTRIBUTES: usize = 3;

/// The attributes of one sampled packet that a fingerprint can name; `None` where the packet
/// has no such attribute (IPv6 has no identification, UDP no flags) or the sample did not
/// capture it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    pub src_port: Option<u16>,
    pub ttl: u8,
    pub length: u16,
    pub tcp_flags: Option<u8>,
    pub tcp_window: Option<u16>,
    pub ip_id: Option<u16>,
    /// The payload's first bytes as captured (at most [`FP_PAYLOAD_MAX`]), and how long the
    /// payload is by the IP header (which the program compares against).
    pub payload: [u8; FP_PAYLOAD_MAX],
    pub payload_captured: usize,
    pub payload_len: usize,
    /// The packets this sample stands for (the program paces samples per CPU and says how
    /// many it passed over); 0 counts as 1.
    pub weight: u32,
}

impl Attributes {
    /// Reads a sampled frame (its start) that starts with an Ethernet header, or with the IP
    /// header when `ip_first`. `None` for a frame that is not IP.
    pub fn of_frame(frame: &[u8], ip_first: bool) -> Option<Self> {
        let packet = if ip_first {
            LaxSlicedPacket::from_ip(frame).ok()?
        } else {
            LaxSlicedPacket::from_ethernet(frame).ok()?
        };
        let offset_in_frame = |slice: &[u8]| slice.as_ptr() as usize - frame.as_ptr() as usize;
        // Fragments never match a fingerprint (nor, in the program, are they matched by one).
        if packet.ip_payload().is_some_and(|p| p.fragmented) {
            return None;
        }
        let mut attributes = Self {
            weight: 1,
            ..Self::default()
        };
        // Where the IP packet ends by its header, in frame offsets.
        let ip_end = match packet.net.as_ref()? {
            LaxNetSlice::Ipv4(ip) => {
                let header = ip.header();
                attributes.ttl = header.ttl();
                attributes.length = header.total_len();
                attributes.ip_id = Some(header.identification());
                offset_in_frame(header.slice()) + usize::from(header.total_len())
            }
            LaxNetSlice::Ipv6(ip) => {
                let header = ip.header();
                attributes.ttl = header.hop_limit();
                attributes.length = header.payload_length().saturating_add(40);
                offset_in_frame(header.slice()) + 40 + usize::from(header.payload_length())
            }
            LaxNetSlice::Arp(_) => return None,
        };
        let payload: &[u8] = match &packet.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                attributes.src_port = Some(tcp.source_port());
                attributes.tcp_window = Some(tcp.window_size());
                attributes.tcp_flags = tcp.slice().get(13).copied();
                tcp.payload()
            }
            Some(TransportSlice::Udp(udp)) => {
                attributes.src_port = Some(udp.source_port());
                udp.payload()
            }
            _ => packet.ip_payload().map(|p| p.payload)?,
        };
        attributes.payload_len = ip_end.saturating_sub(offset_in_frame(payload));
        attributes.payload_captured = payload.len().min(FP_PAYLOAD_MAX);
        attributes.payload[..attributes.payload_captured]
            .copy_from_slice(&payload[..attributes.payload_captured]);
        Some(attributes)
    }

    /// The packets the sample stands for.
    pub fn packets(&self) -> u64 {
        u64::from(self.weight.max(1))
    }

    /// Whether the program would find that the packet matches `print`.
    pub fn matches(&self, print: &Fingerprint) -> bool {
        let fields = print.fields;
        let payload_len = (print.payload_len as usize).min(FP_PAYLOAD_MAX);
        (fields & FP_SRC_PORT == 0 || self.src_port == Some(print.src_port))
            && (fields & FP_TTL == 0 || self.ttl == print.ttl)
            && (fields & FP_LENGTH == 0 || self.length == print.length)
            && (fields & FP_TCP_FLAGS == 0 || self.tcp_flags == Some(print.tcp_flags))
            && (fields & FP_TCP_WINDOW == 0 || self.tcp_window == Some(print.tcp_window))
            && (fields & FP_IP_ID == 0 || self.ip_id == Some(print.ip_id))
            && (fields & FP_PAYLOAD == 0
                || (self.payload_len >= payload_len
                    && self.payload_captured >= payload_len
                    && self.payload[..payload_len] == print.payload[..payload_len]))
    }

    /// The fingerprint naming this packet's values of the attributes in `fields` (`FP_*`
    /// bits); `None` when the packet lacks one of them.
    pub fn fingerprint(&self, fields: u32) -> Option<Fingerprint> {
        let mut print = Fingerprint::default();
        for &field in FIELDS.iter().filter(|&&field| fields & field != 0) {
            self.name_in(&mut print, field)?;
        }
        Some(print)
    }

    /// Names this packet's value of one attribute in `print`; `None` when the packet has none.
    fn name_in(&self, print: &mut Fingerprint, field: u32) -> Option<()> {
        match field {
            FP_SRC_PORT => print.src_port = self.src_port?,
            FP_TTL => print.ttl = self.ttl,
            FP_LENGTH => print.length = self.length,
            FP_TCP_FLAGS => print.tcp_flags = self.tcp_flags?,
            FP_TCP_WINDOW => print.tcp_window = self.tcp_window?,
            FP_IP_ID => print.ip_id = self.ip_id?,
            FP_PAYLOAD => {
                let len = self.payload_captured.min(self.payload_len);
                if len == 0 {
                    return None;
                }
                print.payload_len = len as u32;
                print.payload[..len].copy_from_slice(&self.payload[..len]);
            }
            _ => return None,
        }
        print.fields |= field;
        Some(())
    }
}

/// Every attribute a fingerprint may name, in the order a tie is broken by.
pub const FIELDS: [u32; 7] = [
    FP_SRC_PORT,
    FP_LENGTH,
    FP_PAYLOAD,
    FP_TTL,
    FP_TCP_FLAGS,
    FP_TCP_WINDOW,
    FP_IP_ID,
];

/// A fingerprint and how much of each sample set it matches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Judged {
    pub print: Fingerprint,
    pub attack_coverage: f64,
    pub baseline_coverage: f64,
}

/// Why no fingerprint was found.
#[derive(Clone, Debug, PartialEq)]
pub enum NoFingerprint {
    TooFewAttackSamples(usize),
    TooFewBaselineSamples(usize),
    /// The candidate that came closest.
    NoneGoodEnough(Option<Judged>),
}

impl fmt::Display for NoFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooFewAttackSamples(n) => write!(
                f,
                "{n} samples of the attack so far, {MIN_ATTACK_SAMPLES} needed"
            ),
            Self::TooFewBaselineSamples(n) => write!(
                f,
                "{n} samples of the destination's traffic before the attack, \
                 {MIN_BASELINE_SAMPLES} needed to tell the attack from it"
            ),
            Self::NoneGoodEnough(None) => {
                write!(f, "the attack's packets share no attribute")
            }
            Self::NoneGoodEnough(Some(best)) => write!(
                f,
                "the closest ({}) matches {:.1} % of the attack and {:.1} % of the usual \
                 traffic; at least {:.0} % and at most {:.0} % are needed",
                Described(&best.print),
                best.attack_coverage * 100.0,
                best.baseline_coverage * 100.0,
                MIN_ATTACK_COVERAGE * 100.0,
                MAX_BASELINE_COVERAGE * 100.0
            ),
        }
    }
}

/// The smallest fingerprint (fewest attributes; then the most of the attack, the least of the
/// baseline) matching at least [`MIN_ATTACK_COVERAGE`] of `attack` and at most
/// [`MAX_BASELINE_COVERAGE`] of `baseline`. For each combination of attributes the candidate
/// is the attack's most common value of it.
pub fn find(attack: &[Attributes], baseline: &[Attributes]) -> Result<Judged, NoFingerprint> {
    if attack.len() < MIN_ATTACK_SAMPLES {
        return Err(NoFingerprint::TooFewAttackSamples(attack.len()));
    }
    if baseline.len() < MIN_BASELINE_SAMPLES {
        return Err(NoFingerprint::TooFewBaselineSamples(baseline.len()));
    }
    // Shares of the packets the samples stand for, not of the samples.
    let coverage = |print: &Fingerprint, samples: &[Attributes]| {
        let matching: u64 = samples
            .iter()
            .filter(|s| s.matches(print))
            .map(Attributes::packets)
            .sum();
        matching as f64 / samples.iter().map(Attributes::packets).sum::<u64>() as f64
    };
    let mut closest: Option<Judged> = None;
    for size in 1..=MAX_ATTRIBUTES {
        let mut found: Option<Judged> = None;
        for fields in combinations(size) {
            let Some(print) = most_common(attack, &fields) else {
                continue;
            };
            let judged = Judged {
                print,
                attack_coverage: coverage(&print, attack),
                baseline_coverage: coverage(&print, baseline),
            };
            let better = |than: &Option<Judged>| {
                than.is_none_or(|t| {
                    (judged.attack_coverage, -judged.baseline_coverage)
                        > (t.attack_coverage, -t.baseline_coverage)
                })
            };
            if judged.attack_coverage >= MIN_ATTACK_COVERAGE
                && judged.baseline_coverage <= MAX_BASELINE_COVERAGE
            {
                if better(&found) {
                    found = Some(judged);
                }
            } else if judged.baseline_coverage <= MAX_BASELINE_COVERAGE && better(&closest) {
                closest = Some(judged);
            }
        }
        if let Some(found) = found {
            return Ok(found);
        }
    }
    Err(NoFingerprint::NoneGoodEnough(closest))
}

/// Every choice of `size` attributes.
fn combinations(size: usize) -> Vec<Vec<u32>> {
    let mut all = Vec::new();
    let n = FIELDS.len();
    for mask in 0u32..(1 << n) {
        if mask.count_ones() as usize == size {
            all.push(
                (0..n)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| FIELDS[i])
                    .collect(),
            );
        }
    }
    all
}

/// The attack's most common value of the given attributes together, among samples that have
/// them all.
fn most_common(samples: &[Attributes], fields: &[u32]) -> Option<Fingerprint> {
    let fields = fields.iter().fold(0, |all, field| all | field);
    let mut counts: HashMap<Fingerprint, u64> = HashMap::new();
    for sample in samples {
        if let Some(print) = sample.fingerprint(fields) {
            *counts.entry(print).or_default() += sample.packets();
        }
    }
    counts
        .into_iter()
        .max_by_key(|(print, count)| (*count, std::cmp::Reverse(print.fields)))
        .map(|(print, _)| print)
}

/// A fingerprint as logs and `moat attacks` show it, e.g. `src_port=1900 length=60`.
pub struct Described<'a>(pub &'a Fingerprint);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let print = self.0;
        let mut parts = Vec::new();
        for field in FIELDS {
            if print.fields & field == 0 {
                continue;
            }
            parts.push(match field {
                FP_SRC_PORT => format!("src_port={}", print.src_port),
                FP_TTL => format!("ttl={}", print.ttl),
                FP_LENGTH => format!("length={}", print.length),
                FP_TCP_FLAGS => format!("tcp_flags={:#04x}", print.tcp_flags),
                FP_TCP_WINDOW => format!("tcp_window={}", print.tcp_window),
                FP_IP_ID => format!("ip_id={}", print.ip_id),
                _ => {
                    let len = (print.payload_len as usize).min(FP_PAYLOAD_MAX);
                    let hex: String = print.payload[..len]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    format!("payload=0x{hex}")
                }
            });
        }
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src_port: u16, ttl: u8, payload: &[u8]) -> Attributes {
        let mut attributes = Attributes {
            src_port: Some(src_port),
            ttl,
            length: (20 + 8 + payload.len()) as u16,
            ip_id: Some(src_port.wrapping_mul(7)),
            payload_len: payload.len(),
            payload_captured: payload.len().min(FP_PAYLOAD_MAX),
            ..Attributes::default()
        };
        attributes.payload[..attributes.payload_captured]
            .copy_from_slice(&payload[..attributes.payload_captured]);
        attributes
    }

    /// Legitimate traffic: ephemeral ports, lengths and payloads that vary.
    fn baseline() -> Vec<Attributes> {
        (0..500u16)
            .map(|i| {
                let payload: Vec<u8> = (0..(20 + i % 40)).map(|b| (b * i) as u8).collect();
                udp(32768 + i * 13, 64, &payload)
            })
            .collect()
    }

    #[test]
    fn a_reflection_attack_is_told_by_its_source_port() {
        // An NTP-like reflection: source port 123, one length, but TTLs that vary by path.
        let attack: Vec<Attributes> = (0..400u16)
            .map(|i| {
                udp(
                    123,
                    40 + (i % 20) as u8,
                    &[0x17, 0x00, 0x03, 0x2a, 0, 0, 0, 0, 1],
                )
            })
            .collect();
        let judged = find(&attack, &baseline()).expect("a fingerprint");
        assert_eq!(judged.print.fields, FP_SRC_PORT, "one attribute suffices");
        assert_eq!(judged.print.src_port, 123);
        assert_eq!(judged.attack_coverage, 1.0);
        assert_eq!(Described(&judged.print).to_string(), "src_port=123");
    }

    /// Samples stand for the packets the program passed over: a flood on one CPU, sampled one
    /// in thousands, outweighs legitimate packets over the limit on another, sampled all.
    #[test]
    fn coverage_counts_packets_not_samples() {
        let mut attack: Vec<Attributes> = (0..60u16)
            .map(|i| Attributes {
                weight: 1000,
                ..udp(1900, 64, &[i as u8; 20])
            })
            .collect();
        attack.extend((0..40u16).map(|i| udp(40_000 + i, 64, &[i as u8; 30])));
        let judged = find(&attack, &baseline()).expect("a fingerprint");
        assert_eq!(Described(&judged.print).to_string(), "src_port=1900");
        assert!(judged.attack_coverage > 0.99, "{judged:?}");
    }

    #[test]
    fn attributes_are_combined_when_none_suffices_alone() {
        // The attack's source port and TTL are each common in legitimate traffic, not both.
        let mut baseline = baseline();
        for i in 0..200u16 {
            baseline.push(udp(5000, 50 + (i % 5) as u8, &[i as u8; 30]));
            baseline.push(udp(6000 + i, 99, &[i as u8; 31]));
        }
        let attack: Vec<Attributes> = (0..300u16)
            .map(|i| udp(5000, 99, &vec![(i % 251) as u8; 2 + usize::from(i % 10)]))
            .collect();
        let judged = find(&attack, &baseline).expect("a fingerprint");
        assert_eq!(
            judged.print.fields.count_ones(),
            2,
            "{}",
            Described(&judged.print)
        );
        assert!(judged.baseline_coverage <= MAX_BASELINE_COVERAGE);
    }

    #[test]
    fn an_attack_with_nothing_in_common_has_no_fingerprint() {
        let attack: Vec<Attributes> = (0..400u16)
            .map(|i| {
                let payload: Vec<u8> = (0..(i % 50)).map(|b| (b ^ i) as u8).collect();
                udp(1024 + i * 7, (i % 200) as u8 + 1, &payload)
            })
            .collect();
        let error = find(&attack, &baseline()).expect_err("nothing in common");
        assert!(matches!(error, NoFingerprint::NoneGoodEnough(_)), "{error}");
        assert!(matches!(
            find(&attack[..10], &baseline()),
            Err(NoFingerprint::TooFewAttackSamples(10))
        ));
        assert!(matches!(
            find(&attack, &[]),
            Err(NoFingerprint::TooFewBaselineSamples(0))
        ));
    }

    #[test]
    fn frames_are_read_as_the_program_reads_them() {
        // Ethernet, IPv4 (TTL 61, ID 0x1234), UDP 1900 → 53, payload "M-SEARCH" + 4 bytes.
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let payload = b"M-SEARCH1234";
        let total = (20 + 8 + payload.len()) as u16;
        frame.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0x12, 0x34, 0, 0]);
        frame.extend_from_slice(&[61, 17, 0, 0, 198, 51, 100, 7, 203, 0, 113, 1]);
        let udp_len = 8 + payload.len() as u16;
        frame.extend_from_slice(&[0x07, 0x6c, 0, 53, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
        frame.extend_from_slice(payload);
        let attributes = Attributes::of_frame(&frame, false).expect("an IPv4 frame");
        assert_eq!(attributes.src_port, Some(1900));
        assert_eq!((attributes.ttl, attributes.length), (61, total));
        assert_eq!(attributes.ip_id, Some(0x1234));
        assert_eq!(attributes.payload_len, payload.len());
        assert_eq!(&attributes.payload, b"M-SEARCH");
        let ip_first = Attributes::of_frame(&frame[14..], true).expect("the same, IP first");
        assert_eq!(ip_first, attributes);
        // A capture cut inside the payload still knows the payload's length.
        let cut = Attributes::of_frame(&frame[..frame.len() - 6], false).expect("cut");
        assert_eq!((cut.payload_len, cut.payload_captured), (payload.len(), 6));
        assert!(Attributes::of_frame(&[0u8; 20], false).is_none(), "not IP");
    }
}
