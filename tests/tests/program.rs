//! The real XDP program on crafted frames (BPF_PROG_TEST_RUN): every reason, every
//! encapsulation, every malformed shape, IPv4 and IPv6, with the counters each one moves.

use std::path::Path;

use agent_common::{
    lists::{LIST_ALLOW, LIST_BAN, LIST_BLOCK, SOURCE_CONFIG, SOURCE_RATE_LIMIT, hit_index},
    stats::{Action, Counter, Reason},
};
use moat::{
    config::{Config, Mode, Overrides, Policy},
    program::counters::Framing,
};
use moat_tests::{
    frames::{Frame, L3_OFFSET, TCP_SYN},
    program::{LoadedProgram, TEST_RUN_IF_INDEX, XDP_DROP, XDP_PASS, action_name},
};

#[path = "program/fixtures.rs"]
mod fixtures;

use fixtures::{BLOCKED_V4, BLOCKED_V6, LEGIT_V4, LEGIT_V6, POLICY, cases};

fn policy(text: &str) -> Policy {
    Config::from_str_at(text, Path::new("fixture.toml"))
        .and_then(|c| c.resolve(&Overrides::default()))
        .unwrap_or_else(|e| panic!("fixture policy: {e}"))
        .policy
}

fn xdp_action(action: Action) -> u32 {
    match action {
        Action::Drop => XDP_DROP,
        Action::Pass | Action::WouldDrop => XDP_PASS,
    }
}

fn delta(before: Counter, after: Counter) -> Counter {
    Counter {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
    }
}

/// Runs every case and checks the action, and that exactly one counter moved by exactly this
/// frame. `monitor` turns expected drops into would-drops that pass.
fn run_cases(mode: Mode) {
    let mut policy = policy(POLICY);
    policy.mode = mode;
    let mut program = LoadedProgram::new(&policy);
    let mut failures = Vec::new();
    for case in cases() {
        let expected_action = match (mode, case.action) {
            (Mode::Monitor, Action::Drop) => Action::WouldDrop,
            (_, action) => action,
        };
        let before = program.snapshot();
        let returned = program.run(&case.frame);
        let after = program.snapshot();
        let moved = delta(
            before.get(TEST_RUN_IF_INDEX, expected_action, case.reason),
            after.get(TEST_RUN_IF_INDEX, expected_action, case.reason),
        );
        let total = delta(before.total(), after.total());
        let expected_counter = Counter {
            packets: 1,
            bytes: case.frame.len() as u64,
        };
        if returned != xdp_action(expected_action)
            || moved != expected_counter
            || total != expected_counter
        {
            failures.push(format!(
                "{}: expected {} under {}/{} ({expected_counter:?}), got {} with {}/{} moved by {moved:?} and all counters by {total:?}",
                case.name,
                action_name(xdp_action(expected_action)),
                expected_action.name(),
                case.reason.name(),
                action_name(returned),
                expected_action.name(),
                case.reason.name(),
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The agent resolves every map by a name of `agent_common::maps`; the program declares each by
/// its static's identifier. The two sets must be the same, or a map would be missing at load
/// or left without an owner.
#[test]
fn the_agent_owns_exactly_the_maps_the_object_declares() {
    let declared = moat::program::loader::object_map_names()
        .unwrap_or_else(|e| panic!("reading the object's maps: {}", moat::error_chain(&e)));
    let program = LoadedProgram::new(&Policy::default());
    let resolved: std::collections::BTreeSet<String> = program
        .map_handles
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    for name in [
        agent_common::maps::STATS,
        agent_common::maps::BLOCK_V4_TABLE[1],
    ] {
        assert!(declared.contains(name), "{name} in {declared:?}");
    }
    assert_eq!(
        resolved, declared,
        "maps the agent resolves vs maps the object declares"
    );
}

/// An interface without an Ethernet header (tun, WireGuard, IPIP, GRE, PPP): its frames are IP
/// packets, parsed from the first byte, and the same policy holds.
#[test]
fn frames_of_an_ip_only_interface_are_parsed_from_the_ip_header() {
    let mut program = LoadedProgram::with_framing(&policy(POLICY), Framing::Ip);
    let ip = |frame: Frame| frame.bytes()[L3_OFFSET..].to_vec();
    #[rustfmt::skip]
    let cases: [(&str, Vec<u8>, u32, Action, Reason); 6] = [
        ("blocked IPv4", ip(Frame::udp(BLOCKED_V4, 1, 2)), XDP_DROP, Action::Drop, Reason::Blocklist),
        ("blocked IPv6", ip(Frame::udp(BLOCKED_V6, 1, 2)), XDP_DROP, Action::Drop, Reason::Blocklist),
        ("a rule", ip(Frame::udp(LEGIT_V4, 11211, 80)), XDP_DROP, Action::Drop, Reason::Rule),
        ("legitimate IPv4", ip(Frame::udp(LEGIT_V4, 40000, 443)), XDP_PASS, Action::Pass, Reason::NoMatch),
        ("legitimate IPv6", ip(Frame::tcp(LEGIT_V6, 40000, 443, TCP_SYN)), XDP_PASS, Action::Pass, Reason::NoMatch),
        // What an Ethernet frame would be read as here: not IP (its first byte is a MAC's).
        ("an Ethernet frame", Frame::udp(BLOCKED_V4, 1, 2).bytes(), XDP_PASS, Action::Pass, Reason::NotIp),
    ];
    for (name, frame, xdp, action, reason) in cases {
        let before = program.snapshot().get(TEST_RUN_IF_INDEX, action, reason);
        assert_eq!(program.run(&frame), xdp, "{name}");
        let after = program.snapshot().get(TEST_RUN_IF_INDEX, action, reason);
        assert_eq!(
            after.packets,
            before.packets + 1,
            "{name}: counted under {reason:?}"
        );
    }
    // The same frames from an Ethernet interface are not IP at all.
    let mut ethernet = LoadedProgram::new(&policy(POLICY));
    assert_eq!(ethernet.run(&ip(Frame::udp(BLOCKED_V4, 1, 2))), XDP_PASS);
}

#[test]
fn every_reason_and_shape_in_enforce_mode() {
    run_cases(Mode::Enforce);
}

#[test]
fn monitor_mode_passes_everything_and_counts_would_be_drops() {
    run_cases(Mode::Monitor);
}

#[test]
fn rule_and_list_hits_are_counted_per_rule_and_source() {
    let mut program = LoadedProgram::new(&policy(POLICY));
    for _ in 0..3 {
        program.run(&Frame::udp(LEGIT_V4, 11211, 80).bytes());
    }
    program.run(&Frame::tcp(LEGIT_V4, 1, 80, 0).bytes());
    program.run(&Frame::udp(BLOCKED_V6, 1, 2).bytes());
    program.run(&Frame::udp("192.0.2.1", 1, 2).bytes());
    let snapshot = program.snapshot();
    let packets: Vec<u64> = snapshot
        .rule_hits
        .iter()
        .take(6)
        .map(|c| c.packets)
        .collect();
    assert_eq!(packets, [3, 0, 0, 1, 0, 0], "hits per rule in config order");
    assert_eq!(
        snapshot.list_hits[hit_index(LIST_BLOCK, SOURCE_CONFIG) as usize].packets,
        1
    );
    assert_eq!(
        snapshot.list_hits[hit_index(LIST_ALLOW, SOURCE_CONFIG) as usize].packets,
        1
    );
}

#[test]
fn a_source_over_its_rate_is_limited_then_banned() {
    let mut limited = policy(
        "interfaces = [\"lo\"]\n[rate_limit]\npps = 1\nburst_packets = 10\nban_after = \"0s\"\nban_ttl = \"1h\"\n",
    );
    limited.sample_every = 1;
    let mut program = LoadedProgram::new(&limited);
    let frame = Frame::udp(LEGIT_V4, 40000, 443).bytes();
    // 1000 back-to-back runs take far less than the 1 s a new token needs.
    let last = program.run_repeated(&frame, 1000);
    assert_eq!(
        last, XDP_DROP,
        "the last of 1000 packets at 1 pps must be dropped"
    );
    let snapshot = program.snapshot();
    let passed = snapshot
        .get(TEST_RUN_IF_INDEX, Action::Pass, Reason::NoMatch)
        .packets;
    let limited_count = snapshot
        .get(TEST_RUN_IF_INDEX, Action::Drop, Reason::RateLimit)
        .packets;
    let banned = snapshot
        .get(TEST_RUN_IF_INDEX, Action::Drop, Reason::Ban)
        .packets;
    assert_eq!(passed, 10, "exactly the burst passes: {snapshot:?}");
    assert_eq!(
        limited_count, 2,
        "one packet starts the streak, the next one bans: {snapshot:?}"
    );
    assert_eq!(
        banned, 988,
        "everything after the ban is dropped as banned: {snapshot:?}"
    );
    assert_eq!(
        snapshot.list_hits[hit_index(LIST_BAN, SOURCE_RATE_LIMIT) as usize].packets,
        988
    );
    // Another source is not affected.
    assert_eq!(
        program.run(&Frame::udp("203.0.113.10", 40000, 443).bytes()),
        XDP_PASS
    );
    // IPv6 sources in the same /64 share a limit.
    for host in 1..=10 {
        assert_eq!(
            program.run(&Frame::udp(&format!("2001:db8:1::{host:x}"), 1, 2).bytes()),
            XDP_PASS
        );
    }
    assert_eq!(
        program.run(&Frame::udp("2001:db8:1::99", 1, 2).bytes()),
        XDP_DROP,
        "the /64's 11th packet"
    );
    assert_eq!(
        program.run(&Frame::udp("2001:db8:2::1", 1, 2).bytes()),
        XDP_PASS,
        "another /64"
    );
}

#[test]
fn the_bit_limit_holds_a_source_to_its_bytes() {
    // 8 kbit/s is 1000 bytes/s; with no packet limit the burst is one second's worth of bits.
    let mut program = LoadedProgram::new(&policy(
        "interfaces = [\"lo\"]\n[rate_limit]\nbps = \"8kbit\"\n",
    ));
    let frame = Frame::udp(LEGIT_V4, 40000, 443).bytes();
    program.run_repeated(&frame, 1000);
    let snapshot = program.snapshot();
    let passed = snapshot
        .get(TEST_RUN_IF_INDEX, Action::Pass, Reason::NoMatch)
        .packets;
    let expected = 1000 / frame.len() as u64 + 1;
    assert!(
        (expected - 1..=expected + 1).contains(&passed),
        "{}-byte frames at 1000 bytes/s with a 1 s burst: about {expected} pass, got {passed}: {snapshot:?}",
        frame.len()
    );
    assert_eq!(
        snapshot
            .get(TEST_RUN_IF_INDEX, Action::Drop, Reason::RateLimit)
            .packets,
        1000 - passed
    );
}

#[test]
fn live_changes_take_effect_whole_and_reach_both_generations() {
    let first = policy(
        "interfaces = [\"lo\"]\n[blocklist]\ncidrs = [\"198.51.100.0/24\", \"2001:db8:bad::/48\"]\n",
    );
    let second = policy(
        "interfaces = [\"lo\"]\n[blocklist]\ncidrs = [\"10.0.0.0/8\", \"203.0.113.77\", \"2001:db8:beef::/64\"]\n\
         [[rules]]\nname = \"m\"\nprotocol = \"udp\"\nsrc_ports = [11211]\naction = \"drop\"\n",
    );
    let third = policy(
        "interfaces = [\"lo\"]\nmode = \"monitor\"\n[blocklist]\ncidrs = [\"10.1.0.0/16\"]\n",
    );
    let mut program = LoadedProgram::new(&first);

    let expect = |program: &mut LoadedProgram, stage: &str, cases: &[(&str, u32)]| {
        for (source, action) in cases {
            let got = program.run(&Frame::udp(source, 11211, 80).bytes());
            assert_eq!(
                got,
                *action,
                "{stage}: UDP from {source} returned {}",
                action_name(got)
            );
        }
    };
    expect(
        &mut program,
        "first",
        &[
            (BLOCKED_V4, XDP_DROP),
            (BLOCKED_V6, XDP_DROP),
            ("10.9.9.9", XDP_PASS),
        ],
    );

    // Every change goes into the standby generation and then into the other: three changes in
    // a row exercise both generations in both roles.
    for (stage, next, cases) in [
        (
            "second",
            &second,
            vec![
                (BLOCKED_V4, XDP_DROP),
                ("10.9.9.9", XDP_DROP),
                ("203.0.113.77", XDP_DROP),
                ("203.0.113.78", XDP_DROP),
                ("2001:db8:beef::1", XDP_DROP),
                (BLOCKED_V6, XDP_DROP),
            ],
        ),
        (
            "third",
            &third,
            vec![
                (BLOCKED_V4, XDP_PASS),
                ("10.1.2.3", XDP_PASS),
                ("203.0.113.77", XDP_PASS),
            ],
        ),
        (
            "first again",
            &first,
            vec![
                (BLOCKED_V4, XDP_DROP),
                ("10.1.2.3", XDP_PASS),
                ("203.0.113.77", XDP_PASS),
                (BLOCKED_V6, XDP_DROP),
                ("2001:db8:beef::1", XDP_PASS),
            ],
        ),
        (
            "second again",
            &second,
            vec![
                ("10.200.0.1", XDP_DROP),
                ("203.0.113.77", XDP_DROP),
                ("198.51.100.200", XDP_DROP),
            ],
        ),
    ] {
        program
            .live
            .replace(next.clone())
            .unwrap_or_else(|e| panic!("{stage}: {e}"));
        expect(&mut program, stage, &cases);
    }
    // In the second policy, 198.51.100.x is no longer blocked but the memcached rule drops it:
    // check a non-memcached packet too.
    assert_eq!(
        program.run(&Frame::udp(BLOCKED_V4, 40000, 80).bytes()),
        XDP_PASS,
        "second: not blocked any more"
    );
    assert_eq!(
        program.run(&Frame::udp("10.200.0.1", 40000, 80).bytes()),
        XDP_DROP,
        "second: 10/8 blocked"
    );

    // A policy the program cannot hold is refused and changes nothing.
    let too_many: String = (20..=40).map(|len| format!("\"::/{len}\", ")).collect();
    let refused = policy(&format!(
        "interfaces = [\"lo\"]\n[blocklist]\ncidrs = [{too_many}]\n"
    ));
    let error = program
        .live
        .replace(refused)
        .expect_err("21 IPv6 prefix lengths");
    assert!(
        error.to_string().contains("distinct IPv6 prefix lengths"),
        "{error}"
    );
    assert_eq!(program.live.policy(), &second);
    assert_eq!(
        program.run(&Frame::udp("10.200.0.1", 40000, 80).bytes()),
        XDP_DROP,
        "still the second policy"
    );
}
