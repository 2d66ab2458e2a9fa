//! Stateless rules as the config states them, and their validation.

use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use agent_common::rules::{MAX_RULES, PAYLOAD_COLUMNS, PAYLOAD_MAX, PAYLOAD_OFFSET_MAX};

/// A rule after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub protocol: Protocol,
    /// Empty: any port (and packets without ports).
    pub src_ports: Vec<PortRange>,
    pub dst_ports: Vec<PortRange>,
    pub tcp_flags: Option<TcpFlags>,
    /// Empty: any TTL (hop limit).
    pub ttl: Vec<PortRange>,
    /// IP total length (IPv6: payload length + 40); empty: any.
    pub length: Vec<PortRange>,
    /// Bytes the transport payload holds at an offset; `None`: any.
    pub payload: Option<PayloadMatch>,
    pub action: RuleAction,
}

/// 1..=8 bytes at an offset into the transport payload (after the TCP or UDP header; for other
/// protocols, from their header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadMatch {
    pub offset: u16,
    pub bytes: Vec<u8>,
}

impl PayloadMatch {
    /// `hex` (an optional `0x` and 1 to 8 bytes in hex) at `offset`.
    #[cfg(test)]
    fn parse(hex: &str, offset: i64) -> Result<Self, String> {
        Ok(Self {
            offset: payload_offset(offset)?,
            bytes: payload_bytes(hex)?,
        })
    }
}

/// A payload as written: an optional `0x` and 1 to 8 bytes in hex.
fn payload_bytes(hex: &str) -> Result<Vec<u8>, String> {
    let digits = hex
        .strip_prefix("0x")
        .or_else(|| hex.strip_prefix("0X"))
        .unwrap_or(hex);
    let bytes =
        hex::decode(digits).map_err(|e| format!("payload {hex:?} is not hex bytes: {e}"))?;
    if bytes.is_empty() || bytes.len() > PAYLOAD_MAX {
        return Err(format!(
            "payload {hex:?} is {} bytes: 1 to {PAYLOAD_MAX} are matched",
            bytes.len()
        ));
    }
    Ok(bytes)
}

fn payload_offset(offset: i64) -> Result<u16, String> {
    u16::try_from(offset)
        .ok()
        .filter(|o| *o <= PAYLOAD_OFFSET_MAX)
        .ok_or_else(|| format!("payload_offset {offset} is outside 0-{PAYLOAD_OFFSET_MAX}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Any,
}

impl Protocol {
    /// As the config writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
            Self::Any => "any",
        }
    }

    /// IP protocol numbers the rule applies to; `None` for any.
    pub fn number(self) -> Option<u8> {
        match self {
            Self::Tcp => Some(6),
            Self::Udp => Some(17),
            Self::Icmp => Some(1),
            Self::Icmpv6 => Some(58),
            Self::Any => None,
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Any)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Drop,
    Pass,
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    fn parse(text: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a number in 0-65535"))
        };
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(text)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("port range {text:?} runs backwards"));
        }
        Ok(Self { first, last })
    }
}

/// TCP flags to match, iptables style: the flags in `mask` must equal `set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFlags {
    pub mask: u8,
    pub set: u8,
}

const TCP_FLAG_NAMES: [(&str, u8); 8] = agent_common::tcp::FLAGS;

impl TcpFlags {
    /// `"MASK/SET"`, each a comma-separated list of FIN, SYN, RST, PSH, ACK, URG, ECE, CWR, or
    /// ALL or NONE: `"ALL/NONE"` is a NULL scan, `"FIN,SYN/FIN,SYN"` has both FIN and SYN.
    fn parse(text: &str) -> Result<Self, String> {
        let (mask, set) = text
            .split_once('/')
            .ok_or_else(|| format!("tcp_flags {text:?} is not MASK/SET (e.g. \"ALL/NONE\")"))?;
        let flags = |list: &str| -> Result<u8, String> {
            let mut bits = 0;
            for name in list.split(',').map(str::trim) {
                bits |= match name.to_ascii_uppercase().as_str() {
                    "ALL" => 0xff,
                    "NONE" => 0,
                    upper => TCP_FLAG_NAMES
                        .iter()
                        .find(|(n, _)| *n == upper)
                        .map(|(_, bit)| *bit)
                        .ok_or_else(|| format!("{name:?} is not a TCP flag (FIN SYN RST PSH ACK URG ECE CWR ALL NONE)"))?,
                };
            }
            Ok(bits)
        };
        let (mask, set) = (flags(mask)?, flags(set)?);
        if set & !mask != 0 {
            return Err(format!("tcp_flags {text:?} sets flags outside its mask"));
        }
        Ok(Self { mask, set })
    }

    pub fn matches(&self, flags: u8) -> bool {
        flags & self.mask == self.set
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x}/{:#04x}", self.mask, self.set)
    }
}

/// A port as written: a number or a `"first-last"` string.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PortText {
    Number(i64),
    Text(String),
}

/// A `[[rules]]` table as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: Spanned<String>,
    pub protocol: Protocol,
    #[serde(default)]
    pub src_ports: Vec<Spanned<PortText>>,
    #[serde(default)]
    pub dst_ports: Vec<Spanned<PortText>>,
    pub tcp_flags: Option<Spanned<String>>,
    #[serde(default)]
    pub ttl: Vec<Spanned<PortText>>,
    #[serde(default)]
    pub length: Vec<Spanned<PortText>>,
    pub payload: Option<Spanned<String>>,
    pub payload_offset: Option<Spanned<i64>>,
    pub action: RuleAction,
}

/// A validation error and the span it is about.
pub type Located = (std::ops::Range<usize>, String);

pub fn validate(rules: &[RuleConfig]) -> Result<Vec<Rule>, Located> {
    if rules.len() > MAX_RULES as usize {
        let span = rules
            .get(MAX_RULES as usize)
            .map(|r| r.name.span())
            .unwrap_or(0..0);
        return Err((
            span,
            format!("{} rules given, at most {MAX_RULES}", rules.len()),
        ));
    }
    let mut validated: Vec<Rule> = Vec::with_capacity(rules.len());
    // The distinct (offset, length) pairs payloads are matched at: the program reads each.
    let mut payload_columns: Vec<(u16, usize)> = Vec::new();
    for rule in rules {
        let name = rule.name.get_ref().trim().to_string();
        if name.is_empty() {
            return Err((rule.name.span(), "rule name is empty".into()));
        }
        if validated.iter().any(|r| r.name == name) {
            return Err((
                rule.name.span(),
                format!("rule name {name:?} is used twice"),
            ));
        }
        let ports = |list: &[Spanned<PortText>], key: &str| -> Result<Vec<PortRange>, Located> {
            if !list.is_empty() && !rule.protocol.has_ports() {
                return Err((
                    rule.name.span(),
                    format!("rule {name:?}: {key} needs protocol tcp, udp or any"),
                ));
            }
            port_ranges(list, &format!("rule {name:?}"))
        };
        let src_ports = ports(&rule.src_ports, "src_ports")?;
        let dst_ports = ports(&rule.dst_ports, "dst_ports")?;
        let tcp_flags = match &rule.tcp_flags {
            None => None,
            Some(text) => {
                if !matches!(rule.protocol, Protocol::Tcp) {
                    return Err((
                        text.span(),
                        format!("rule {name:?}: tcp_flags needs protocol tcp"),
                    ));
                }
                Some(
                    TcpFlags::parse(text.get_ref())
                        .map_err(|m| (text.span(), format!("rule {name:?}: {m}")))?,
                )
            }
        };
        let ttl = port_ranges(&rule.ttl, &format!("rule {name:?}: ttl"))?;
        if let Some((range, span)) = ttl.iter().zip(&rule.ttl).find(|(r, _)| r.last > 255) {
            return Err((
                span.span(),
                format!("rule {name:?}: ttl {} is not a TTL (0-255)", range.last),
            ));
        }
        let length = port_ranges(&rule.length, &format!("rule {name:?}: length"))?;
        let payload = match (&rule.payload, &rule.payload_offset) {
            (None, None) => None,
            (None, Some(offset)) => {
                return Err((
                    offset.span(),
                    format!("rule {name:?}: payload_offset without payload"),
                ));
            }
            (Some(hex), offset) => {
                let at =
                    |span: std::ops::Range<usize>, m: String| (span, format!("rule {name:?}: {m}"));
                Some(PayloadMatch {
                    bytes: payload_bytes(hex.get_ref()).map_err(|m| at(hex.span(), m))?,
                    offset: match offset {
                        None => 0,
                        Some(o) => payload_offset(*o.get_ref()).map_err(|m| at(o.span(), m))?,
                    },
                })
            }
        };
        if let (Some(matched), Some(hex)) = (&payload, &rule.payload) {
            let column = (matched.offset, matched.bytes.len());
            if !payload_columns.contains(&column) {
                if payload_columns.len() == PAYLOAD_COLUMNS as usize {
                    return Err((
                        hex.span(),
                        format!(
                            "rule {name:?}: payloads are matched at {PAYLOAD_COLUMNS} distinct \
                             (payload_offset, length) pairs at most; this is a fifth"
                        ),
                    ));
                }
                payload_columns.push(column);
            }
        }
        validated.push(Rule {
            name,
            protocol: rule.protocol,
            src_ports,
            dst_ports,
            tcp_flags,
            ttl,
            length,
            payload,
            action: rule.action,
        });
    }
    Ok(validated)
}

/// Ports (or other 16-bit values: TTLs, lengths) as written, each a number or a range; errors
/// start with `context`.
pub fn port_ranges(list: &[Spanned<PortText>], context: &str) -> Result<Vec<PortRange>, Located> {
    list.iter()
        .map(|p| {
            let parsed = match p.get_ref() {
                PortText::Number(n) => u16::try_from(*n)
                    .map(|port| PortRange {
                        first: port,
                        last: port,
                    })
                    .map_err(|_| format!("{n} is outside 0-65535")),
                PortText::Text(text) => PortRange::parse(text),
            };
            parsed.map_err(|message| (p.span(), format!("{context}: {message}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(
            PortRange::parse("53"),
            Ok(PortRange {
                first: 53,
                last: 53
            })
        );
        assert_eq!(
            PortRange::parse("1024-65535"),
            Ok(PortRange {
                first: 1024,
                last: 65535
            })
        );
        assert!(PortRange::parse("65536").is_err());
        assert!(PortRange::parse("20-10").is_err());
        assert!(PortRange::parse("http").is_err());
        assert!(PortRange::parse("-5").is_err());
    }

    #[test]
    fn payloads_parse() {
        assert_eq!(
            PayloadMatch::parse("0x4d2d5345", 2),
            Ok(PayloadMatch {
                offset: 2,
                bytes: vec![0x4d, 0x2d, 0x53, 0x45]
            })
        );
        assert_eq!(
            PayloadMatch::parse("ffFF", 0).map(|p| p.bytes),
            Ok(vec![0xff, 0xff])
        );
        for (hex, offset) in [
            ("", 0),
            ("0x", 0),
            ("abc", 0),
            ("zz", 0),
            ("010203040506070809", 0),
            ("01", -1),
            ("01", 9001),
        ] {
            assert!(
                PayloadMatch::parse(hex, offset).is_err(),
                "{hex:?} at {offset}"
            );
        }
    }

    #[test]
    fn tcp_flags_parse() {
        assert_eq!(
            TcpFlags::parse("ALL/NONE"),
            Ok(TcpFlags { mask: 0xff, set: 0 })
        );
        assert_eq!(
            TcpFlags::parse("ALL/FIN,PSH,URG"),
            Ok(TcpFlags {
                mask: 0xff,
                set: 0x29
            })
        );
        assert_eq!(
            TcpFlags::parse("syn,ack/syn"),
            Ok(TcpFlags {
                mask: 0x12,
                set: 0x02
            })
        );
        assert!(TcpFlags::parse("SYN").is_err());
        assert!(TcpFlags::parse("SYN/ACK").is_err());
        assert!(TcpFlags::parse("ALL/XMAS").is_err());
        let null_scan = TcpFlags::parse("ALL/NONE").expect("valid");
        assert!(null_scan.matches(0) && !null_scan.matches(0x02));
    }
}
