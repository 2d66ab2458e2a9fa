//! The `[[protect]]` tables: destinations whose aggregate traffic, over all sources, is held to
//! a limit (a flood forging a new source per packet escapes every per-source limit).

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use agent_common::protect::MAX_PROTECTED;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

use super::{
    Cidr,
    rate_limit::{BitRateText, bit_rate, min_burst},
    rules::{Located, PortRange, PortText, Protocol, port_ranges},
};

/// Default: over the limit this long, a destination is under attack.
pub const DEFAULT_ATTACK_AFTER: Duration = Duration::from_secs(1);
/// Default: under the limit this long, an attack is over.
pub const DEFAULT_ATTACK_END_AFTER: Duration = Duration::from_secs(10);
/// The agent reads the counters once a second, so no shorter duration can be told apart.
const SHORTEST_ATTACK_DURATION: Duration = Duration::from_secs(1);
const LONGEST_ATTACK_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Bounds of the limits: a destination cannot be held below one packet a second, nor above
/// what no interface carries.
const MAX_PPS: i64 = 1_000_000_000;
const MIN_BPS: u64 = 8_000;
const MAX_BPS: u64 = 1_000_000_000_000;

/// Whether an attack on the entry is answered with a fingerprint rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fingerprints {
    #[default]
    Auto,
    Off,
}

/// A `[[protect]]` table as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectConfig {
    pub name: Spanned<String>,
    pub destination: Spanned<String>,
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub dst_ports: Vec<Spanned<PortText>>,
    pub pps: Option<Spanned<i64>>,
    pub bps: Option<Spanned<BitRateText>>,
    pub burst_packets: Option<Spanned<i64>>,
    pub attack_after: Option<Spanned<String>>,
    pub attack_end_after: Option<Spanned<String>>,
    pub fingerprints: Option<Spanned<Fingerprints>>,
}

/// A protected destination after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protected {
    pub name: String,
    pub destination: Cidr,
    pub protocol: Protocol,
    /// Empty: any port (and packets without ports).
    pub dst_ports: Vec<PortRange>,
    /// Packets per second over all sources; 0: no packet limit.
    pub pps: u64,
    /// Bits per second over all sources; 0: no bit limit.
    pub bps: u64,
    /// Packets that may arrive back to back.
    pub burst_packets: u64,
    pub attack_after: Duration,
    pub attack_end_after: Duration,
    pub fingerprints: Fingerprints,
}

impl Protected {
    /// Whether a packet could belong to both entries: the destinations overlap (one holds the
    /// other), and so do the protocols and the ports. An entry with ports takes only TCP and
    /// UDP (and their later fragments), so it shares nothing with one of another protocol.
    fn overlaps(&self, other: &Self) -> bool {
        let (a, b) = (self.destination.net(), other.destination.net());
        let destinations = a.contains(&b.network()) || b.contains(&a.network());
        let carries_ports = |n: u8| n == IPPROTO_TCP || n == IPPROTO_UDP;
        let (protocols, shared_has_ports) = match (self.protocol.number(), other.protocol.number())
        {
            (Some(x), Some(y)) => (x == y, x == y && carries_ports(x)),
            (Some(x), None) | (None, Some(x)) => (true, carries_ports(x)),
            (None, None) => (true, true),
        };
        let ports = match (self.dst_ports.is_empty(), other.dst_ports.is_empty()) {
            (true, true) => true,
            (true, false) | (false, true) => shared_has_ports,
            (false, false) => self.dst_ports.iter().any(|x| {
                other
                    .dst_ports
                    .iter()
                    .any(|y| x.first <= y.last && y.first <= x.last)
            }),
        };
        destinations && protocols && ports
    }
}

pub fn validate(entries: &[ProtectConfig]) -> Result<Vec<Protected>, Located> {
    if let Some(extra) = entries.get(MAX_PROTECTED as usize) {
        return Err((
            extra.name.span(),
            format!(
                "{} protect entries given, at most {MAX_PROTECTED}",
                entries.len()
            ),
        ));
    }
    let mut validated: Vec<Protected> = Vec::with_capacity(entries.len());
    for entry in entries {
        let protected = entry.validate()?;
        if let Some(earlier) = validated.iter().find(|e| e.name == protected.name) {
            return Err((
                entry.name.span(),
                format!("protect name {:?} is used twice", earlier.name),
            ));
        }
        if let Some(earlier) = validated.iter().find(|e| e.overlaps(&protected)) {
            return Err((
                entry.destination.span(),
                format!(
                    "protect {:?} overlaps {:?}: their destinations, protocols and ports \
                     share packets, and a packet is charged to one entry only",
                    protected.name, earlier.name
                ),
            ));
        }
        validated.push(protected);
    }
    Ok(validated)
}

impl ProtectConfig {
    fn validate(&self) -> Result<Protected, Located> {
        let name = self.name.get_ref().trim().to_string();
        if name.is_empty() {
            return Err((self.name.span(), "protect name is empty".into()));
        }
        let context = format!("protect {name:?}");
        let destination = self.destination.get_ref().parse::<Cidr>().map_err(|m| {
            (
                self.destination.span(),
                format!("{context}: destination: {m}"),
            )
        })?;
        let protocol = self.protocol.unwrap_or(Protocol::Any);
        let family_mismatch = match protocol {
            Protocol::Icmp => !destination.net().addr().is_ipv4(),
            Protocol::Icmpv6 => destination.net().addr().is_ipv4(),
            _ => false,
        };
        if family_mismatch {
            return Err((
                self.destination.span(),
                format!(
                    "{context}: protocol {} never reaches an {} destination",
                    protocol.name(),
                    if destination.net().addr().is_ipv4() {
                        "IPv4"
                    } else {
                        "IPv6"
                    }
                ),
            ));
        }
        if !self.dst_ports.is_empty() && !protocol.has_ports() {
            return Err((
                self.name.span(),
                format!("{context}: dst_ports needs protocol tcp, udp or any"),
            ));
        }
        let dst_ports = port_ranges(&self.dst_ports, &context)?;
        let pps = match &self.pps {
            None => 0,
            Some(pps) if (1..=MAX_PPS).contains(pps.get_ref()) => *pps.get_ref() as u64,
            Some(pps) => {
                return Err((
                    pps.span(),
                    format!(
                        "{context}: pps = {} is outside 1..={MAX_PPS}",
                        pps.get_ref()
                    ),
                ));
            }
        };
        let bps = match &self.bps {
            None => 0,
            Some(text) => {
                let bps = bit_rate(text, &format!("{context}: bps"))?;
                if !(MIN_BPS..=MAX_BPS).contains(&bps) {
                    return Err((
                        text.span(),
                        format!("{context}: bps = {bps} is outside {MIN_BPS}..={MAX_BPS}"),
                    ));
                }
                bps
            }
        };
        if pps == 0 && bps == 0 {
            return Err((
                self.name.span(),
                format!("{context}: set pps, bps or both (the limit over all sources)"),
            ));
        }
        let burst_packets = match &self.burst_packets {
            None => pps.max(min_burst(pps)),
            Some(burst) if pps == 0 => {
                return Err((burst.span(), format!("{context}: burst_packets needs pps")));
            }
            Some(burst) if (1..=MAX_PPS).contains(burst.get_ref()) => *burst.get_ref() as u64,
            Some(burst) => {
                return Err((
                    burst.span(),
                    format!(
                        "{context}: burst_packets = {} is outside 1..={MAX_PPS}",
                        burst.get_ref()
                    ),
                ));
            }
        };
        // Within one tick of the program's clock time stands still: a shorter burst would
        // drop traffic under the limit.
        if pps != 0 && burst_packets < min_burst(pps) {
            let span = self
                .burst_packets
                .as_ref()
                .map_or(self.name.span(), Spanned::span);
            return Err((
                span,
                format!(
                    "{context}: burst_packets = {burst_packets} is under one tick of the \
                     program's clock at {pps} pps; at least {}",
                    min_burst(pps)
                ),
            ));
        }
        let duration = |text: &Option<Spanned<String>>, key: &str, default: Duration| {
            let Some(text) = text else {
                return Ok(default);
            };
            let value = humantime::parse_duration(text.get_ref())
                .map_err(|e| (text.span(), format!("{context}: {key}: {e}")))?;
            if !(SHORTEST_ATTACK_DURATION..=LONGEST_ATTACK_DURATION).contains(&value) {
                return Err((
                    text.span(),
                    format!(
                        "{context}: {key} = {:?} is outside 1s..=24h (the counters are read \
                         once a second)",
                        text.get_ref()
                    ),
                ));
            }
            Ok(value)
        };
        let attack_after = duration(&self.attack_after, "attack_after", DEFAULT_ATTACK_AFTER)?;
        let attack_end_after = duration(
            &self.attack_end_after,
            "attack_end_after",
            DEFAULT_ATTACK_END_AFTER,
        )?;
        Ok(Protected {
            name,
            destination,
            protocol,
            dst_ports,
            pps,
            bps,
            burst_packets,
            attack_after,
            attack_end_after,
            fingerprints: self
                .fingerprints
                .as_ref()
                .map_or(Fingerprints::default(), |f| *f.get_ref()),
        })
    }
}
