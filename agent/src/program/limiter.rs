//! The rate limiter's two maps, as the agent sees them: `RATE_LIMITS` (per-source state, read
//! for `moat top` and counts) and `BANS` (read for listing and saving, written back on start so
//! that a ban outlives a restart, and by `block del` to lift one). The program stamps a ban's
//! expiry with `bpf_ktime_get_ns` (CLOCK_MONOTONIC); the agent converts to wall-clock time,
//! which is what survives a reboot.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use agent_common::{
    lists::SOURCE_RATE_LIMIT,
    maps,
    rate_limit::{Ban, FAMILY_V4, FAMILY_V6, RateState, SourceKey},
    stats::Counter,
};
use aya::maps::{HashMap, Map, MapData, MapError};

use super::map_source::{MapAccessError, MapSource, Named, ResolveError, named};

/// A ban in force: the source address (cut to the rate limiter's prefix) and its expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveBan {
    pub source: IpAddr,
    pub expires_at: SystemTime,
}

/// The limiter's maps; only this module reads or writes them.
pub struct LimiterMaps {
    bans: Named<HashMap<MapData, SourceKey, Ban>>,
    sources: Named<HashMap<MapData, SourceKey, RateState>>,
}

/// CLOCK_MONOTONIC in nanoseconds: the program's clock.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The address in a source key or an event: the family tells how many of the 16 bytes count.
pub fn address_of(family: u32, bytes: [u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(bytes))),
        _ => None,
    }
}

pub fn key_of(address: IpAddr) -> SourceKey {
    let mut key = SourceKey::default();
    match address {
        IpAddr::V4(v4) => {
            key.family = FAMILY_V4;
            key.addr[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            key.family = FAMILY_V6;
            key.addr = v6.octets();
        }
    }
    key
}

impl LimiterMaps {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            bans: Named::resolve(source, maps::BANS)?,
            sources: Named::resolve(source, maps::RATE_LIMITS)?,
        })
    }

    /// The bans in force now, soonest expiry first.
    pub fn active(&self) -> Result<Vec<ActiveBan>, MapAccessError> {
        let now_ns = monotonic_now_ns();
        let now = SystemTime::now();
        let mut bans = Vec::new();
        for item in self.bans.map.iter() {
            let (key, ban) = match item {
                Ok(item) => item,
                // An entry evicted or expired while iterating.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(named(self.bans.name)(e)),
            };
            if ban.expires_at <= now_ns {
                continue;
            }
            if let Some(source) = address_of(key.family, key.addr) {
                bans.push(ActiveBan {
                    source,
                    expires_at: now + Duration::from_nanos(ban.expires_at - now_ns),
                });
            }
        }
        bans.sort_by_key(|b| b.expires_at);
        Ok(bans)
    }

    /// Whether `source` is banned now.
    pub fn is_banned(&self, source: IpAddr) -> bool {
        let now_ns = monotonic_now_ns();
        self.bans
            .map
            .get(&key_of(source), 0)
            .is_ok_and(|ban| ban.expires_at > now_ns)
    }

    /// Lifts the ban of `source`; one gone already (expired or evicted) is not an error.
    pub fn lift(&mut self, source: IpAddr) -> Result<(), MapAccessError> {
        match self.bans.map.remove(&key_of(source)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(named(self.bans.name)(e)),
        }
    }

    /// Lifts every ban; returns the sources that were banned then.
    pub fn lift_all(&mut self) -> Result<Vec<IpAddr>, MapAccessError> {
        let lifted: Vec<IpAddr> = self.active()?.into_iter().map(|ban| ban.source).collect();
        let keys: Vec<SourceKey> = self.bans.map.keys().filter_map(Result::ok).collect();
        for key in keys {
            match self.bans.map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(named(self.bans.name)(e)),
            }
        }
        Ok(lifted)
    }

    /// Entries in the ban map, expired or not (what fills it).
    pub fn ban_entries(&self) -> u64 {
        self.bans.map.keys().filter(Result::is_ok).count() as u64
    }

    /// Sources the rate limiter tracks now.
    pub fn tracked_sources(&self) -> u64 {
        self.sources.map.keys().filter(Result::is_ok).count() as u64
    }

    /// Packets and bytes the limiter passed per source, for sources that passed any.
    pub fn passed_by_source(&self) -> Vec<(IpAddr, Counter)> {
        self.sources
            .map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| state.passed_packets != 0)
            .filter_map(|(key, state)| {
                let counter = Counter {
                    packets: state.passed_packets,
                    bytes: state.passed_bytes,
                };
                Some((address_of(key.family, key.addr)?, counter))
            })
            .collect()
    }

    /// Writes saved bans back into the program; returns how many were still in force.
    pub fn restore(&mut self, bans: &[ActiveBan]) -> Result<usize, MapAccessError> {
        let now_ns = monotonic_now_ns();
        let now = SystemTime::now();
        let mut restored = 0;
        for ban in bans {
            let Ok(left) = ban.expires_at.duration_since(now) else {
                continue;
            };
            let value = Ban {
                expires_at: now_ns.saturating_add(left.as_nanos().min(u128::from(u64::MAX)) as u64),
                source: SOURCE_RATE_LIMIT,
                _pad: 0,
            };
            self.bans
                .map
                .insert(key_of(ban.source), value, 0)
                .map_err(named(self.bans.name))?;
            restored += 1;
        }
        Ok(restored)
    }

    /// Copies the bans still in force from the map of the program that ran before (same boot,
    /// same clock); returns how many.
    pub fn carry_over(&mut self, previous: Map) -> Result<usize, MapAccessError> {
        let name = self.bans.name;
        let previous = HashMap::<_, SourceKey, Ban>::try_from(previous).map_err(named(name))?;
        let now_ns = monotonic_now_ns();
        let mut copied = 0;
        for (key, ban) in previous.iter().filter_map(Result::ok) {
            if ban.expires_at > now_ns {
                self.bans.map.insert(key, ban, 0).map_err(named(name))?;
                copied += 1;
            }
        }
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_addresses_convert_both_ways() {
        for text in ["192.0.2.1", "2001:db8::1"] {
            let address: IpAddr = text.parse().expect("addr");
            let key = key_of(address);
            assert_eq!(address_of(key.family, key.addr), Some(address));
        }
        let unknown = SourceKey::default();
        assert_eq!(address_of(unknown.family, unknown.addr), None);
    }
}
