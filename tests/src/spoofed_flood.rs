//! The rate limiter's maps as a flood of spoofed sources leaves them: every source tracked and
//! banned. Written through the maps' ids (a real flood of a million sources would take the lab
//! minutes), for the tests and the benchmark that time the control plane against full maps.

use agent_common::{
    lists::SOURCE_RATE_LIMIT,
    maps::BANS,
    rate_limit::{Ban, RateState, SourceKey},
};
use aya::maps::{HashMap, MapData};
use moat::program::{limiter, map_source::ProgramMapIds, maps::ProgramMaps};

/// Fills the limiter's table and ban map of moat's program `program_id` with `sources` IPv4
/// sources (10.0.0.0 onwards), each banned for an hour, as the program would have (a source
/// whose two slots are taken displaces the less active, as in the program: with as many
/// sources as slots, the table ends full and a few of the sources displaced).
pub fn fill_limiter(program_id: u32, sources: u32) {
    let maps = ProgramMapIds::of(program_id).unwrap_or_else(|e| panic!("moat's maps: {e}"));
    let mut bans: HashMap<MapData, SourceKey, Ban> =
        HashMap::try_from(maps.open(BANS).unwrap_or_else(|e| panic!("{e}")))
            .expect("BANS is a hash");
    let mut program =
        ProgramMaps::of_program(program_id).unwrap_or_else(|e| panic!("moat's maps: {e}"));
    let in_an_hour = limiter::monotonic_now_ns() + 3_600_000_000_000;
    let ban = Ban {
        expires_at: in_an_hour,
        source: SOURCE_RATE_LIMIT,
        _pad: 0,
    };
    for i in 0..sources {
        let source = std::net::Ipv4Addr::from(0x0a00_0000 | i).into();
        // Later sources a little more active, so that each displaces an earlier one.
        let state = RateState {
            passed_packets: 1,
            passed_bytes: 60,
            banned_until: in_an_hour + u64::from(i),
            ..RateState::default()
        };
        (program.limiter)
            .set_state(source, state)
            .expect("fill the limiter");
        bans.insert(limiter::key_of(source), ban, 0)
            .expect("fill the bans");
    }
}
