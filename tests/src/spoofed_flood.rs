//! The rate limiter's maps as a flood of spoofed sources leaves them: every source tracked and
//! banned. Written through the maps' ids (a real flood of a million sources would take the lab
//! minutes), for the tests and the benchmark that time the control plane against full maps.

use agent_common::{
    lists::SOURCE_RATE_LIMIT,
    maps::{BANS, RATE_LIMITS},
    rate_limit::{Ban, RateState, SourceKey},
};
use aya::maps::{HashMap, MapData};
use moat::program::{limiter, map_source::ProgramMapIds};

/// Fills the limiter's state and ban maps of moat's program `program_id` with `sources` IPv4
/// sources (10.0.0.0 onwards), each banned for an hour, as the program would have.
pub fn fill_limiter(program_id: u32, sources: u32) {
    let maps = ProgramMapIds::of(program_id).unwrap_or_else(|e| panic!("moat's maps: {e}"));
    let open = |name: &str| maps.open(name).unwrap_or_else(|e| panic!("{e}"));
    let mut states: HashMap<MapData, SourceKey, RateState> =
        HashMap::try_from(open(RATE_LIMITS)).expect("RATE_LIMITS is a hash");
    let mut bans: HashMap<MapData, SourceKey, Ban> =
        HashMap::try_from(open(BANS)).expect("BANS is a hash");
    let in_an_hour = limiter::monotonic_now_ns() + 3_600_000_000_000;
    let ban = Ban {
        expires_at: in_an_hour,
        source: SOURCE_RATE_LIMIT,
        _pad: 0,
    };
    let state = RateState {
        passed_packets: 1,
        passed_bytes: 60,
        banned_until: in_an_hour,
        ..RateState::default()
    };
    for i in 0..sources {
        let key = limiter::key_of(std::net::Ipv4Addr::from(0x0a00_0000 | i).into());
        states.insert(key, state, 0).expect("fill the limiter");
        bans.insert(key, ban, 0).expect("fill the bans");
    }
}
