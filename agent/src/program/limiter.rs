//! The rate limiter's maps, as the agent sees them: the per-source table (`RATE_LIMITS`,
//! see `source_table`: read for `moat top` and counts; a source's state carries a copy of its
//! ban, which the program checks first) and `BANS` (the list of record: read for listing and saving, written back on start so
//! that a ban outlives a restart, and by `block del` to lift one). The program stamps a ban's
//! expiry with its clock (CLOCK_MONOTONIC at tick resolution, within a tick of it: see
//! `agent_common::clock`); the agent converts to wall-clock time, which is what survives a
//! reboot. `VERIFIED` (sources the SYN proxy verified, keyed like the limiter) is
//! only counted.

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
use aya::maps::{HashMap, IterableMap as _, Map, MapData};

use super::{
    map_source::{self, MapAccessError, MapSource, Named, ResolveError, named},
    source_table::SourceTable,
};

/// A ban in force: the source address (cut to the rate limiter's prefix) and its expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveBan {
    pub source: IpAddr,
    pub expires_at: SystemTime,
}

/// The limiter's maps; only this module reads or writes them.
pub struct LimiterMaps {
    bans: Named<HashMap<MapData, SourceKey, Ban>>,
    sources: SourceTable,
    verified: Named<HashMap<MapData, SourceKey, u64>>,
}

/// A `BANS` entry as a ban in force at (`now_ns` on the program's clock, `now` on the wall
/// clock); `None` once it expired, or for a key of no known family.
fn in_force(key: &SourceKey, ban: &Ban, now_ns: u64, now: SystemTime) -> Option<ActiveBan> {
    (ban.expires_at > now_ns).then_some(())?;
    Some(ActiveBan {
        source: address_of(key.family, key.addr)?,
        expires_at: now + Duration::from_nanos(ban.expires_at - now_ns),
    })
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

/// What a walk over the limiter's maps found: walks take time in proportion to the maps' fill
/// (a million sources under a spoofed flood), so they run away from the daemon's loop, with a
/// deadline, and the loop reads the latest.
#[derive(Clone, Debug, Default)]
pub struct LimiterScan {
    /// Bans in force, soonest expiry first.
    pub bans: Vec<ActiveBan>,
    /// Entries in the ban map, expired or not (what fills it).
    pub ban_entries: u64,
    /// Sources the limiter tracks.
    pub sources: u64,
    /// Sources the SYN proxy verified, still verified.
    pub verified: u64,
    /// Packets and bytes each source passed (sources that passed any).
    pub passed: Vec<(IpAddr, Counter)>,
    /// Whether the walk saw every entry before its deadline (else the numbers are a floor).
    pub complete: bool,
    /// When the walk started: changes made after it are not in it.
    pub started: Option<std::time::Instant>,
}

/// A second, read-only handle on the limiter's maps, for walks on another thread.
pub struct LimiterReader {
    bans: Named<HashMap<MapData, SourceKey, Ban>>,
    sources: SourceTable,
    verified: Named<HashMap<MapData, SourceKey, u64>>,
}

impl LimiterReader {
    /// Walks both maps until `deadline`.
    pub fn scan(&self, deadline: std::time::Instant) -> LimiterScan {
        let now_ns = monotonic_now_ns();
        let now = SystemTime::now();
        let mut scan = LimiterScan {
            complete: true,
            started: Some(std::time::Instant::now()),
            ..LimiterScan::default()
        };
        for item in self.bans.map.iter() {
            if std::time::Instant::now() > deadline {
                scan.complete = false;
                break;
            }
            // An entry evicted or expired while iterating is skipped.
            let Ok((key, ban)) = item else { continue };
            scan.ban_entries += 1;
            scan.bans.extend(in_force(&key, &ban, now_ns, now));
        }
        scan.bans.sort_by_key(|b| b.expires_at);
        let walked = self.sources.walk(|key, state| {
            if std::time::Instant::now() > deadline {
                scan.complete = false;
                return false;
            }
            scan.sources += 1;
            if state.passed_packets != 0
                && let Some(source) = address_of(key.family, key.addr)
            {
                let counter = Counter {
                    packets: state.passed_packets,
                    bytes: state.passed_bytes,
                };
                scan.passed.push((source, counter));
            }
            true
        });
        if let Err(e) = walked {
            tracing::warn!(error = %e, "walking the rate limiter's table failed");
            scan.complete = false;
        }
        for item in self.verified.map.iter() {
            if std::time::Instant::now() > deadline {
                scan.complete = false;
                break;
            }
            if item.is_ok_and(|(_, until)| until > now_ns) {
                scan.verified += 1;
            }
        }
        scan
    }
}

impl LimiterMaps {
    /// A second handle on the same maps, for walks on another thread.
    pub fn reader(&self) -> Result<LimiterReader, MapAccessError> {
        let reopen = |name: &'static str, map: &MapData| {
            map_source::duplicate(map)
                .and_then(Map::from_map_data)
                .map_err(named(name))
        };
        let bans = reopen(self.bans.name, self.bans.map.map())?;
        let verified = reopen(self.verified.name, self.verified.map.map())?;
        Ok(LimiterReader {
            bans: Named {
                name: self.bans.name,
                map: HashMap::try_from(bans).map_err(named(self.bans.name))?,
            },
            sources: self.sources.reopen()?,
            verified: Named {
                name: self.verified.name,
                map: HashMap::try_from(verified).map_err(named(self.verified.name))?,
            },
        })
    }

    /// Gives a freshly loaded program's per-source table its seed and size.
    pub fn init_table(&mut self) -> Result<(), MapAccessError> {
        self.sources.init()
    }

    /// The limiter's state of `source` (cut to the limiter's prefix), when it tracks it.
    pub fn state(&self, source: IpAddr) -> Option<RateState> {
        self.sources.get(&key_of(source))
    }

    /// Sets the limiter's state of `source` as the program would have made it (for tests and
    /// benchmarks that need a source over its limit, or many sources tracked).
    pub fn set_state(&mut self, source: IpAddr, state: RateState) -> Result<(), MapAccessError> {
        self.sources.set(&key_of(source), state)
    }

    /// Empties the limiter's state of `source`, as a flood of new sources would displace it.
    pub fn forget(&mut self, source: IpAddr) -> Result<(), MapAccessError> {
        self.sources.remove(&key_of(source))
    }

    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            bans: Named::resolve(source, maps::BANS)?,
            sources: SourceTable::resolve(source)?,
            verified: Named::resolve(source, maps::VERIFIED)?,
        })
    }

    /// Whether `source` is banned now (in the ban map, or in its state's copy).
    pub fn is_banned(&self, source: IpAddr) -> bool {
        let (key, now_ns) = (key_of(source), monotonic_now_ns());
        self.bans
            .map
            .get(&key, 0)
            .is_ok_and(|ban| ban.expires_at > now_ns)
            || self
                .sources
                .get(&key)
                .is_some_and(|state| self.sources.ban_copy_holds(&key, &state, now_ns))
    }

    /// Lifts the ban of `source`; one gone already (expired or evicted) is not an error. The
    /// source's limiter state goes too (it holds a copy of the ban): the source starts afresh.
    pub fn lift(&mut self, source: IpAddr) -> Result<(), MapAccessError> {
        let key = key_of(source);
        self.bans.remove_if_present(&key)?;
        self.sources.remove(&key)
    }

    /// Lifts every ban; returns the sources that were banned then.
    pub fn lift_all(&mut self) -> Result<Vec<IpAddr>, MapAccessError> {
        let (now_ns, now) = (monotonic_now_ns(), SystemTime::now());
        let entries: Vec<(SourceKey, Ban)> = self.bans.map.iter().filter_map(Result::ok).collect();
        let mut lifted = Vec::new();
        for (key, ban) in entries {
            lifted.extend(in_force(&key, &ban, now_ns, now).map(|ban| ban.source));
            self.bans.remove_if_present(&key)?;
            self.sources.remove(&key)?;
        }
        // Copies whose ban-map entry was evicted (the others went above): the table is walked
        // through a mapping.
        let mut copies = Vec::new();
        self.sources
            .walk(|key, state| {
                if self.sources.ban_copy_holds(key, state, now_ns) {
                    copies.push(*key);
                }
                true
            })
            .map_err(|source| MapAccessError::Mmap {
                map: maps::RATE_LIMITS,
                source,
            })?;
        for key in copies {
            lifted.extend(address_of(key.family, key.addr));
            self.sources.remove(&key)?;
        }
        Ok(lifted)
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
            self.ban(&key_of(ban.source), value)?;
            restored += 1;
        }
        Ok(restored)
    }

    /// Copies the bans still in force from the map of the program that ran before (same boot,
    /// same clock); returns how many.
    pub fn carry_over(&mut self, previous: Map) -> Result<usize, MapAccessError> {
        let previous =
            HashMap::<_, SourceKey, Ban>::try_from(previous).map_err(named(self.bans.name))?;
        let now_ns = monotonic_now_ns();
        let mut copied = 0;
        for (key, ban) in previous.iter().filter_map(Result::ok) {
            if ban.expires_at > now_ns {
                self.ban(&key, ban)?;
                copied += 1;
            }
        }
        Ok(copied)
    }

    /// Writes a ban as the program does: the ban map's entry and the copy in the source's
    /// state, which the program reads first.
    fn ban(&mut self, key: &SourceKey, ban: Ban) -> Result<(), MapAccessError> {
        self.bans
            .map
            .insert(key, ban, 0)
            .map_err(named(self.bans.name))?;
        let state = RateState {
            banned_until: ban.expires_at,
            ..RateState::default()
        };
        self.sources.set(key, state)
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
