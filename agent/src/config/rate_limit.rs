//! The `[rate_limit]` table.

use std::{str::FromStr, time::Duration};

use serde::Deserialize;

/// A bit rate: an integer (bits/s) or a number with a unit (`kbit`, `Mbit`, `Gbit`, `Tbit`;
/// SI, as `tc` reads them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitRate(pub u64);

impl FromStr for BitRate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a bit rate (e.g. \"20Mbit\")"))?;
        let scale: u64 = match unit.trim() {
            "" | "bit" => 1,
            "kbit" => 1_000,
            "Mbit" | "mbit" => 1_000_000,
            "Gbit" | "gbit" => 1_000_000_000,
            "Tbit" | "tbit" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "unknown bit rate unit {other:?} (bit, kbit, Mbit, Gbit, Tbit)"
                ));
            }
        };
        number
            .checked_mul(scale)
            .map(BitRate)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum BitRateText {
    Number(i64),
    Text(String),
}

/// `[rate_limit]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub pps: Option<toml::Spanned<i64>>,
    pub bps: Option<toml::Spanned<BitRateText>>,
    pub burst_packets: Option<toml::Spanned<i64>>,
    pub ban_after: Option<toml::Spanned<String>>,
    pub ban_ttl: Option<toml::Spanned<String>>,
    pub ipv4_prefix: Option<toml::Spanned<i64>>,
    pub ipv6_prefix: Option<toml::Spanned<i64>>,
    pub max_sources: Option<toml::Spanned<i64>>,
    pub ban: Option<toml::Spanned<BanScope>>,
}

/// Which sources over their limit may be banned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BanScope {
    /// Any source (its address may be forged: a flood forging a client's address gets the
    /// client banned).
    #[default]
    Any,
    /// Only sources the SYN proxy verified (they completed a handshake from that address).
    Verified,
}

/// The rate limiter after validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Packets per second per source; 0: no packet limit.
    pub pps: u64,
    /// Bits per second per source; 0: no bit limit.
    pub bps: u64,
    /// How many packets a source may send back to back.
    pub burst_packets: u64,
    /// The `burst_packets` the file gave when it was under one tick of the program's clock and
    /// was raised to the fewest that span one (logged as a warning).
    pub burst_raised_from: Option<u64>,
    /// Over the limit this long → banned for `ban_ttl`; no `ban_ttl`: never banned.
    pub ban_after: Duration,
    pub ban_ttl: Option<Duration>,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Sources the limiter tracks at once (its table has the next power of two of slots).
    pub max_sources: u32,
    pub ban_scope: BanScope,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            pps: 0,
            bps: 0,
            burst_packets: 0,
            burst_raised_from: None,
            ban_after: Duration::from_secs(2),
            ban_ttl: None,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            max_sources: agent_common::maps::RATE_LIMITS_DEFAULT_CAPACITY,
            ban_scope: BanScope::Any,
        }
    }
}

impl RateLimit {
    pub fn is_on(&self) -> bool {
        self.pps != 0 || self.bps != 0
    }

    /// The prefix length that keys a source of `address`'s family.
    pub fn prefix_of(&self, address: std::net::IpAddr) -> u8 {
        if address.is_ipv4() {
            self.ipv4_prefix
        } else {
            self.ipv6_prefix
        }
    }

    /// Whether sources over their limit are banned (and bans are checked).
    pub fn bans(&self) -> bool {
        self.is_on() && self.ban_ttl.is_some()
    }
}

type Located = super::rules::Located;

/// The longest tick of the program's clock (it advances once a jiffy: 4 ms at Debian's HZ=250,
/// 10 ms at HZ=100).
pub const CLOCK_TICK_MAX: Duration = Duration::from_millis(10);

/// The fewest packets whose burst (`burst - 1` intervals) spans [`CLOCK_TICK_MAX`] at `pps`:
/// within one tick the clock stands still, and a burst shorter than that would drop a source
/// sending under its limit.
pub fn min_burst(pps: u64) -> u64 {
    let per_tick = u128::from(pps) * CLOCK_TICK_MAX.as_nanos();
    (per_tick.div_ceil(1_000_000_000) as u64) + 1
}

/// A bit rate as written (bits/s, or a number with a unit); errors start with `key`.
pub fn bit_rate(text: &toml::Spanned<BitRateText>, key: &str) -> Result<u64, Located> {
    match text.get_ref() {
        BitRateText::Number(n) => {
            u64::try_from(*n).map_err(|_| (text.span(), format!("{key} = {n} is negative")))
        }
        BitRateText::Text(t) => Ok(t
            .parse::<BitRate>()
            .map_err(|m| (text.span(), format!("{key}: {m}")))?
            .0),
    }
}

impl RateLimitConfig {
    pub fn validate(&self) -> Result<RateLimit, Located> {
        let defaults = RateLimit::default();
        let in_range = |value: &Option<toml::Spanned<i64>>,
                        key: &str,
                        min: i64,
                        max: i64|
         -> Result<Option<i64>, Located> {
            match value {
                Some(v) if *v.get_ref() < min || *v.get_ref() > max => Err((
                    v.span(),
                    format!(
                        "rate_limit: {key} = {} is outside {min}..={max}",
                        v.get_ref()
                    ),
                )),
                v => Ok(v.as_ref().map(|v| *v.get_ref())),
            }
        };
        let pps = in_range(&self.pps, "pps", 0, 1_000_000_000)?.unwrap_or(0) as u64;
        let bps = match &self.bps {
            None => 0,
            Some(text) => bit_rate(text, "rate_limit: bps")?,
        };
        // A second's worth of packets unless stated, and never less than a tick's: within a
        // tick the clock stands still. A smaller burst (valid before the clock was coarse) is
        // raised rather than refused, so that an upgraded daemon still starts.
        let written =
            in_range(&self.burst_packets, "burst_packets", 1, 1_000_000_000)?.map(|b| b as u64);
        let burst_packets = written.unwrap_or(pps).max(min_burst(pps));
        let burst_raised_from = written.filter(|&w| w < burst_packets);
        let duration = |text: &Option<toml::Spanned<String>>,
                        key: &str|
         -> Result<Option<Duration>, Located> {
            text.as_ref()
                .map(|t| {
                    humantime::parse_duration(t.get_ref()).map_err(|e| {
                        (
                            t.span(),
                            format!("rate_limit: {key} = {:?}: {e}", t.get_ref()),
                        )
                    })
                })
                .transpose()
        };
        let ban_after = duration(&self.ban_after, "ban_after")?.unwrap_or(defaults.ban_after);
        let ban_ttl = duration(&self.ban_ttl, "ban_ttl")?.filter(|ttl| !ttl.is_zero());
        let ipv4_prefix = in_range(&self.ipv4_prefix, "ipv4_prefix", 1, 32)?
            .map_or(defaults.ipv4_prefix, |p| p as u8);
        let ipv6_prefix = in_range(&self.ipv6_prefix, "ipv6_prefix", 1, 128)?
            .map_or(defaults.ipv6_prefix, |p| p as u8);
        let max_sources = in_range(&self.max_sources, "max_sources", 1, 1 << 26)?
            .map_or(defaults.max_sources, |m| m as u32);
        Ok(RateLimit {
            pps,
            bps,
            burst_packets,
            burst_raised_from,
            ban_after,
            ban_ttl,
            ipv4_prefix,
            ipv6_prefix,
            max_sources,
            ban_scope: self.ban.as_ref().map_or(BanScope::Any, |b| *b.get_ref()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_rates_parse() {
        assert_eq!("20Mbit".parse(), Ok(BitRate(20_000_000)));
        assert_eq!("1Gbit".parse(), Ok(BitRate(1_000_000_000)));
        assert_eq!("500kbit".parse(), Ok(BitRate(500_000)));
        assert_eq!("1234".parse(), Ok(BitRate(1234)));
        assert!("20MB".parse::<BitRate>().is_err());
        assert!("fast".parse::<BitRate>().is_err());
        assert!("99999999999Tbit".parse::<BitRate>().is_err());
    }

    #[test]
    fn a_burst_spans_at_least_one_tick_of_the_clock() {
        assert_eq!(min_burst(100), 2, "one interval of 10 ms");
        assert_eq!(min_burst(10_000), 101);
        assert_eq!(min_burst(1), 2);
        assert_eq!(min_burst(0), 1);
        let config = |burst: i64| RateLimitConfig {
            pps: Some(toml::Spanned::new(0..1, 10_000)),
            burst_packets: Some(toml::Spanned::new(0..1, burst)),
            ..RateLimitConfig::default()
        };
        let burst = |burst: i64| {
            config(burst)
                .validate()
                .map(|r| (r.burst_packets, r.burst_raised_from))
        };
        assert_eq!(
            burst(50),
            Ok((101, Some(50))),
            "raised to one tick, and said so"
        );
        assert_eq!(burst(101), Ok((101, None)));
        assert_eq!(burst(5000), Ok((5000, None)));
    }
}
