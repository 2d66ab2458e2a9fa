//! The rate limiter's bans, as the agent sees them: read from the `BANS` map for listing and
//! saving, written back on start so that a ban outlives a restart. The program stamps a ban's
//! expiry with `bpf_ktime_get_ns` (CLOCK_MONOTONIC); the agent converts to wall-clock time,
//! which is what survives a reboot.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use agent_common::{
    lists::SOURCE_RATE_LIMIT,
    maps::BANS,
    rate_limit::{Ban, FAMILY_V4, FAMILY_V6, SourceKey},
};
use aya::{Ebpf, maps::Map};

use crate::{
    map_access::{self, MapAccessError, named},
    state::SavedBan,
};

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

/// The bans in force now, soonest expiry first.
pub fn active(ebpf: &mut Ebpf) -> Result<Vec<SavedBan>, MapAccessError> {
    let now_ns = monotonic_now_ns();
    let now = SystemTime::now();
    let map = map_access::hash::<SourceKey, Ban>(ebpf, BANS)?;
    let mut bans = Vec::new();
    for item in map.iter() {
        let (key, ban) = match item {
            Ok(item) => item,
            // An entry evicted or expired while iterating.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(named(BANS)(e)),
        };
        if ban.expires_at <= now_ns {
            continue;
        }
        if let Some(source) = address_of(key.family, key.addr) {
            bans.push(SavedBan {
                source,
                expires_at: now + Duration::from_nanos(ban.expires_at - now_ns),
            });
        }
    }
    bans.sort_by_key(|b| b.expires_at);
    Ok(bans)
}

/// Writes saved bans back into the program; returns how many were still in force.
pub fn restore(ebpf: &mut Ebpf, bans: &[SavedBan]) -> Result<usize, MapAccessError> {
    let now_ns = monotonic_now_ns();
    let now = SystemTime::now();
    let mut map = map_access::hash::<SourceKey, Ban>(ebpf, BANS)?;
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
        map.insert(key_of(ban.source), value, 0)
            .map_err(named(BANS))?;
        restored += 1;
    }
    Ok(restored)
}

/// Copies the bans still in force from the map of the program that ran before (same boot,
/// same clock); returns how many.
pub fn carry_over(ebpf: &mut Ebpf, previous: Map) -> Result<usize, MapAccessError> {
    let previous =
        aya::maps::HashMap::<_, SourceKey, Ban>::try_from(previous).map_err(named(BANS))?;
    let now_ns = monotonic_now_ns();
    let mut map = map_access::hash::<SourceKey, Ban>(ebpf, BANS)?;
    let mut copied = 0;
    for (key, ban) in previous.iter().filter_map(Result::ok) {
        if ban.expires_at > now_ns {
            map.insert(key, ban, 0).map_err(named(BANS))?;
            copied += 1;
        }
    }
    Ok(copied)
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
