//! The settings record (mode, sampling, rule count, list shapes, rate limit) of each generation,
//! and the switch that puts one generation in force: the `SETTINGS` and `ACTIVE_GEN` maps.

use std::net::IpAddr;

use agent_common::{
    lists::ListShape,
    maps,
    settings::{MODE_ENFORCE, MODE_MONITOR, RateSettings, Settings},
    syn_proxy::{MAX_PORT_SPANS, PortSpan, SynProxySettings, V4Destination, V6Destination},
};
use aya::maps::{Array, MapData};

use super::map_source::{MapAccessError, MapSource, Named, ResolveError, named};
use crate::config::{BanScope, Mode, Policy, RateLimit, syn_proxy::REPLY_TTL};

/// The settings of both generations and the generation in force; only this module writes them.
pub struct SettingsMaps {
    settings: Named<Array<MapData, Settings>>,
    syn_proxy: Named<Array<MapData, SynProxySettings>>,
    active: Named<Array<MapData, u32>>,
}

impl SettingsMaps {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            settings: Named::resolve(source, maps::SETTINGS)?,
            syn_proxy: Named::resolve(source, maps::SYN_PROXY)?,
            active: Named::resolve(source, maps::ACTIVE_GENERATION)?,
        })
    }

    /// Writes one generation's settings and `[syn_proxy]` (its slot first: the settings say
    /// whether the program reads it).
    pub fn write(
        &mut self,
        generation: usize,
        settings: Settings,
        syn_proxy: SynProxySettings,
    ) -> Result<(), MapAccessError> {
        self.syn_proxy
            .map
            .set(generation as u32, syn_proxy, 0)
            .map_err(named(self.syn_proxy.name))?;
        self.settings
            .map
            .set(generation as u32, settings, 0)
            .map_err(named(self.settings.name))
    }

    /// Puts `generation` in force: one write, seen whole by the next packet.
    pub fn activate(&mut self, generation: usize) -> Result<(), MapAccessError> {
        self.active
            .map
            .set(0, generation as u32, 0)
            .map_err(named(self.active.name))
    }
}

/// The settings a policy gives the program, with its lists' shapes and the optional fields its
/// rules name (`RuleTables::fields`).
pub fn settings(policy: &Policy, allow: ListShape, block: ListShape, rule_fields: u32) -> Settings {
    Settings {
        mode: match policy.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Monitor => MODE_MONITOR,
        },
        sample_every: policy.sample_every,
        rule_count: policy.rules.len() as u32,
        check_bans: u32::from(policy.rate_limit.bans()),
        allow,
        block,
        rate: rate_settings(&policy.rate_limit),
        protect_count: policy.protect.len() as u32,
        rule_fields,
        syn_proxy: u32::from(policy.syn_proxy.is_some()),
        _pad: 0,
    }
}

/// `[syn_proxy]` as the program reads it (all zero when it is off).
pub fn syn_proxy_settings(policy: &Policy) -> SynProxySettings {
    let Some(proxy) = &policy.syn_proxy else {
        return SynProxySettings::default();
    };
    let mut settings = SynProxySettings {
        port_count: proxy.ports.len().min(MAX_PORT_SPANS) as u32,
        all_destinations: u32::from(proxy.destinations.is_empty()),
        mss_v4: proxy.mss,
        mss_v6: proxy.mss_v6(),
        wscale: proxy.wscale,
        sack: u8::from(proxy.sack),
        timestamps: u8::from(proxy.timestamps),
        ttl: REPLY_TTL,
        verified_ttl_ns: proxy.verified_ttl.as_nanos().min(u128::from(u64::MAX / 2)) as u64,
        ..SynProxySettings::default()
    };
    for (span, range) in settings.ports.iter_mut().zip(&proxy.ports) {
        *span = PortSpan {
            first: range.first,
            last: range.last,
        };
    }
    // The config holds at most MAX_DESTINATIONS of each family.
    for cidr in &proxy.destinations {
        let net = cidr.net();
        match (net.network(), net.netmask()) {
            (IpAddr::V4(addr), IpAddr::V4(mask)) => {
                if let Some(slot) = settings.v4.get_mut(settings.v4_count as usize) {
                    *slot = V4Destination {
                        addr: addr.octets(),
                        mask: mask.octets(),
                    };
                    settings.v4_count += 1;
                }
            }
            (IpAddr::V6(addr), IpAddr::V6(mask)) => {
                if let Some(slot) = settings.v6.get_mut(settings.v6_count as usize) {
                    *slot = V6Destination {
                        addr: addr.octets(),
                        mask: mask.octets(),
                    };
                    settings.v6_count += 1;
                }
            }
            _ => {}
        }
    }
    settings
}

pub const NS_PER_SECOND: u64 = 1_000_000_000;
const PS_PER_BYTE_AT_1BPS: u64 = 8_000_000_000_000;

/// A packet limit as the program's GCRA takes it: nanoseconds per packet; 0: no limit.
pub fn ns_per_packet(pps: u64) -> u64 {
    NS_PER_SECOND.checked_div(pps).map_or(0, |ns| ns.max(1))
}

/// A bit limit as the program's GCRA takes it: picoseconds per byte; 0: no limit.
pub fn ps_per_byte(bps: u64) -> u64 {
    PS_PER_BYTE_AT_1BPS
        .checked_div(bps)
        .map_or(0, |ps| ps.max(1))
}

fn rate_settings(rate: &RateLimit) -> RateSettings {
    let ns_per_packet = ns_per_packet(rate.pps);
    let ps_per_byte = ps_per_byte(rate.bps);
    // burst_packets back to back conform: the TAT may run (burst - 1) intervals ahead. With
    // only a bit limit, one second's worth of bits.
    let burst_ns = if ns_per_packet != 0 {
        ns_per_packet * rate.burst_packets.saturating_sub(1)
    } else {
        NS_PER_SECOND
    };
    RateSettings {
        ns_per_packet,
        ps_per_byte,
        burst_ns,
        ban_after_ns: rate.ban_after.as_nanos().min(u128::from(u64::MAX)) as u64,
        ban_ttl_ns: rate
            .ban_ttl
            .map_or(0, |ttl| ttl.as_nanos().min(u128::from(u64::MAX / 2)) as u64),
        v4_prefix: u32::from(rate.ipv4_prefix),
        v6_prefix: u32::from(rate.ipv6_prefix),
        ban_verified_only: u32::from(rate.ban_scope == BanScope::Verified),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rates_become_intervals() {
        let rate = RateLimit {
            pps: 1000,
            bps: 20_000_000,
            burst_packets: 2000,
            ban_after: Duration::from_secs(2),
            ban_ttl: Some(Duration::from_secs(600)),
            ..RateLimit::default()
        };
        let s = rate_settings(&rate);
        assert_eq!(s.ns_per_packet, 1_000_000);
        assert_eq!(s.ps_per_byte, 400_000);
        assert_eq!(s.burst_ns, 1_999_000_000);
        assert_eq!(s.ban_after_ns, 2_000_000_000);
        assert_eq!(s.ban_ttl_ns, 600_000_000_000);
        assert_eq!((s.v4_prefix, s.v6_prefix), (32, 64));
        assert_eq!(rate_settings(&RateLimit::default()).ns_per_packet, 0);
    }
}
