//! The `[syn_proxy]` table: TCP ports whose SYNs the XDP program answers with SYN cookies, in
//! front of netfilter's synproxy.

use std::time::Duration;

use agent_common::syn_proxy::{MAX_DESTINATIONS, MAX_PORT_SPANS};
use serde::Deserialize;
use toml::Spanned;

use super::{
    Cidr,
    rules::{Located, PortRange, PortText, port_ranges},
};

/// Defaults: what the kernel's own SYN-ACKs would carry on a 1500-byte Ethernet link.
const DEFAULT_MSS: u16 = 1460;
const DEFAULT_WSCALE: u8 = 7;
const DEFAULT_VERIFIED_TTL: Duration = Duration::from_secs(600);
/// An IPv6 header is 20 bytes longer than an IPv4 one: the MSS advertised over IPv6.
pub const IPV6_MSS_REDUCTION: u16 = 20;
/// TTL / hop limit of the SYN-ACKs (Linux's default).
pub const REPLY_TTL: u8 = 64;
/// The smallest MSS an IPv4 host must accept (RFC 879) and the largest an IPv4 packet holds.
const MSS_RANGE: std::ops::RangeInclusive<i64> = 536..=65_495;
/// The largest window scale (RFC 7323).
const MAX_WSCALE: i64 = 14;
const VERIFIED_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(30 * 86_400);

/// `[syn_proxy]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynProxyConfig {
    /// TCP destination ports (numbers or ranges); required.
    #[serde(default)]
    pub ports: Vec<Spanned<PortText>>,
    /// Destination CIDRs; none: every address.
    #[serde(default)]
    pub destinations: Vec<Spanned<String>>,
    pub mss: Option<Spanned<i64>>,
    pub wscale: Option<Spanned<i64>>,
    pub sack: Option<bool>,
    pub timestamps: Option<bool>,
    pub verified_ttl: Option<Spanned<String>>,
}

/// `[syn_proxy]` after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynProxy {
    pub ports: Vec<PortRange>,
    /// Empty: every destination.
    pub destinations: Vec<Cidr>,
    /// The MSS advertised over IPv4 (IPv6: [`IPV6_MSS_REDUCTION`] less).
    pub mss: u16,
    pub wscale: u8,
    pub sack: bool,
    pub timestamps: bool,
    pub verified_ttl: Duration,
}

impl SynProxy {
    pub fn mss_v6(&self) -> u16 {
        self.mss - IPV6_MSS_REDUCTION
    }

    /// `self`, covering `other`'s ports and destinations as well: what netfilter holds while a
    /// reload switches from `other` to `self`, so that a SYN the old program answered still
    /// finds synproxy for its final ACK.
    pub fn covering(&self, other: &Self) -> Self {
        let mut ports = self.ports.clone();
        ports.extend(other.ports.iter().filter(|p| !self.ports.contains(p)));
        let destinations = if self.destinations.is_empty() || other.destinations.is_empty() {
            Vec::new()
        } else {
            let mut all = self.destinations.clone();
            all.extend(
                other
                    .destinations
                    .iter()
                    .filter(|d| !self.destinations.contains(d)),
            );
            all
        };
        Self {
            ports,
            destinations,
            ..self.clone()
        }
    }
}

impl SynProxyConfig {
    pub fn validate(&self, span: std::ops::Range<usize>) -> Result<SynProxy, Located> {
        if self.ports.is_empty() {
            return Err((
                span,
                "syn_proxy: `ports` is required (the TCP ports whose SYNs are answered)".into(),
            ));
        }
        let ports = port_ranges(&self.ports, "syn_proxy: ports")?;
        if let Some(extra) = self.ports.get(MAX_PORT_SPANS) {
            return Err((
                extra.span(),
                format!("syn_proxy: at most {MAX_PORT_SPANS} ports or port ranges"),
            ));
        }
        let mut destinations: Vec<Cidr> = Vec::with_capacity(self.destinations.len());
        for text in &self.destinations {
            let cidr: Cidr = text
                .get_ref()
                .parse()
                .map_err(|m| (text.span(), format!("syn_proxy: destinations: {m}")))?;
            if destinations.contains(&cidr) {
                continue;
            }
            let same_family = destinations
                .iter()
                .filter(|d| d.net().network().is_ipv4() == cidr.net().network().is_ipv4())
                .count();
            if same_family == MAX_DESTINATIONS {
                return Err((
                    text.span(),
                    format!("syn_proxy: at most {MAX_DESTINATIONS} destinations per family"),
                ));
            }
            destinations.push(cidr);
        }
        let in_range =
            |value: &Option<Spanned<i64>>, key: &str, range: std::ops::RangeInclusive<i64>| {
                match value {
                    Some(v) if !range.contains(v.get_ref()) => Err((
                        v.span(),
                        format!(
                            "syn_proxy: {key} = {} is outside {}..={}",
                            v.get_ref(),
                            range.start(),
                            range.end()
                        ),
                    )),
                    v => Ok(v.as_ref().map(|v| *v.get_ref())),
                }
            };
        let mss = in_range(&self.mss, "mss", MSS_RANGE)?.map_or(DEFAULT_MSS, |m| m as u16);
        let wscale =
            in_range(&self.wscale, "wscale", 0..=MAX_WSCALE)?.map_or(DEFAULT_WSCALE, |w| w as u8);
        let verified_ttl = match &self.verified_ttl {
            None => DEFAULT_VERIFIED_TTL,
            Some(text) => {
                let ttl = humantime::parse_duration(text.get_ref()).map_err(|e| {
                    (
                        text.span(),
                        format!("syn_proxy: verified_ttl = {:?}: {e}", text.get_ref()),
                    )
                })?;
                if !VERIFIED_TTL_RANGE.contains(&ttl) {
                    return Err((
                        text.span(),
                        format!(
                            "syn_proxy: verified_ttl = {:?} is outside 1s..=30days",
                            text.get_ref()
                        ),
                    ));
                }
                ttl
            }
        };
        Ok(SynProxy {
            ports,
            destinations,
            mss,
            wscale,
            sack: self.sack.unwrap_or(true),
            timestamps: self.timestamps.unwrap_or(true),
            verified_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<SynProxy, String> {
        #[derive(Deserialize)]
        struct File {
            syn_proxy: SynProxyConfig,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        file.syn_proxy.validate(0..0).map_err(|(_, m)| m)
    }

    #[test]
    fn defaults_are_the_kernels() {
        let proxy = config("[syn_proxy]\nports = [\"80\", 443]").unwrap();
        assert_eq!(proxy.ports.len(), 2);
        assert_eq!((proxy.mss, proxy.mss_v6(), proxy.wscale), (1460, 1440, 7));
        assert!(proxy.sack && proxy.timestamps && proxy.destinations.is_empty());
        assert_eq!(proxy.verified_ttl, Duration::from_secs(600));
    }

    #[test]
    fn a_reload_covers_the_old_ports_and_destinations_too() {
        let old =
            config("[syn_proxy]\nports = [80, 443]\ndestinations = [\"192.0.2.0/24\"]").unwrap();
        let new = config(
            "[syn_proxy]\nports = [443, 8443]\ndestinations = [\"198.51.100.0/24\"]\nmss = 1400",
        )
        .unwrap();
        let bridge = new.covering(&old);
        let ports: Vec<u16> = bridge.ports.iter().map(|p| p.first).collect();
        assert_eq!(ports, [443, 8443, 80]);
        assert_eq!(bridge.destinations.len(), 2);
        assert_eq!(bridge.mss, 1400, "the new settings");
        let everywhere = config("[syn_proxy]\nports = [80]").unwrap();
        assert!(
            new.covering(&everywhere).destinations.is_empty(),
            "all stays all"
        );
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        for (text, expected) in [
            ("[syn_proxy]\n", "`ports` is required"),
            ("[syn_proxy]\nports = [\"http\"]", "syn_proxy: ports"),
            (
                "[syn_proxy]\nports = [80]\nmss = 100",
                "mss = 100 is outside",
            ),
            (
                "[syn_proxy]\nports = [80]\nwscale = 15",
                "wscale = 15 is outside",
            ),
            (
                "[syn_proxy]\nports = [80]\nverified_ttl = \"0s\"",
                "outside 1s",
            ),
            (
                "[syn_proxy]\nports = [80]\nverified_ttl = \"soon\"",
                "verified_ttl",
            ),
            (
                "[syn_proxy]\nports = [80]\ndestinations = [\"10.0.0.300/8\"]",
                "destinations",
            ),
            ("[syn_proxy]\nports = [80]\nmtu = 1500", "unknown field"),
        ] {
            let error = config(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
        let many: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        let error = config(&format!("[syn_proxy]\nports = {many:?}")).unwrap_err();
        assert!(error.contains("at most 16"), "{error}");
    }
}
