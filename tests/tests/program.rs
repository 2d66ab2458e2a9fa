//! The real XDP program on crafted frames (BPF_PROG_TEST_RUN): every reason, every
//! encapsulation, every malformed shape, IPv4 and IPv6, with the counters each one moves.

use std::path::Path;

use agent_common::{
    clock::JiffiesClock,
    lists::{
        LIST_ALLOW, LIST_BAN, LIST_BLOCK, PrefixEntry, SOURCE_CLI, SOURCE_CONFIG,
        SOURCE_RATE_LIMIT, V4PrefixKey, V6PrefixKey, hit_index, v6_gate_position,
    },
    maps::{CLOCK, RATE_LIMITS, V4_LONG_STASH, V6_GATE, V6_PREFIXES},
    rate_limit::{RateSlot, RateState},
    stats::{Action, Counter, Reason},
};
use aya::maps::{Array, HashMap, MapData};
use moat::{
    config::{Cidr, Config, ListKind, Mode, Overrides, Policy},
    program::{
        counters::Framing, limiter, lists::ListChange, live::PolicyChange,
        map_source::ProgramMapIds,
    },
};
use moat_tests::{
    frames::{DST_V4, DST_V6, Frame, L3_OFFSET, TCP_SYN},
    program::{LoadedProgram, TEST_RUN_IF_INDEX, XDP_DROP, XDP_PASS, action_name, xdp_action},
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

/// The program's action on one UDP packet from `source`.
fn verdict(program: &mut LoadedProgram, source: &str) -> u32 {
    program.run(&Frame::udp(source, 40000, 443).bytes())
}

/// Fills the shared IPv6 hash `name` with entries no list holds (as a process behind moat's
/// back could), so that moat's next insert fails; returns the hash.
fn fill_with_unused<K: aya::Pod>(
    program: &mut LoadedProgram,
    name: &str,
    keys: impl Iterator<Item = K>,
) -> HashMap<MapData, K, PrefixEntry> {
    let ids = ProgramMapIds::of(program.program_id()).expect("the program's maps");
    let mut hash: HashMap<MapData, K, PrefixEntry> =
        HashMap::try_from(ids.open(name).expect("the hash")).expect("a hash");
    for key in keys {
        hash.insert(key, PrefixEntry::default(), 0).expect("fill");
    }
    hash
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
    for name in [agent_common::maps::STATS, agent_common::maps::V4_TABLE[1]] {
        assert!(declared.contains(name), "{name} in {declared:?}");
    }
    assert_eq!(
        resolved, declared,
        "maps the agent resolves vs maps the object declares"
    );
}

/// The verifier walks every path of the program, up to a million instructions. Every stage adds
/// to the walk (paths multiply): this keeps the margin in sight, so that the next stage is not
/// the one that finds the limit on a kernel in the field. (About 432,000 on 6.1 with the rules,
/// SYN proxy, protect stages and the IPv4 table's probe as global functions and the limiter's
/// table inlined: as functions of their own, its lookups took 6.1 past a million. The budget
/// keeps 6.1 clear of it.)
#[test]
fn the_verifier_walks_the_program_well_under_its_limit() {
    const BUDGET: u32 = 600_000;
    let mut program = LoadedProgram::new(&policy(POLICY));
    let info = moat::program::loader::program(&mut program.ebpf)
        .and_then(|p| p.info().map_err(moat::program::loader::LoadError::Verify))
        .expect("the program's info");
    let walked = info
        .verified_instruction_count()
        .expect("the kernel reports verified instructions (5.16+)");
    assert!(
        walked < BUDGET,
        "the verifier walked {walked} instructions: within {} of its limit",
        1_000_000 - walked
    );
    eprintln!("verifier: {walked} instructions walked (budget {BUDGET})");
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
    let sent = std::time::SystemTime::now();
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
    // The ban runs on the program's clock (jiffies, measured at load): it ends an hour from
    // now on CLOCK_MONOTONIC, within a tick or two.
    let ids = ProgramMapIds::of(program.program_id()).expect("the program's maps");
    let clock: Array<MapData, JiffiesClock> =
        Array::try_from(ids.open(CLOCK).expect("the clock")).expect("an array");
    let tick = clock.get(&0, 0).expect("the clock's slot").tick_ns;
    assert!(
        (1_000_000..=10_000_000).contains(&tick),
        "a jiffy of 1-10 ms, measured: {tick} ns"
    );
    let bans = program
        .limiter
        .reader()
        .expect("a reader")
        .scan(std::time::Instant::now() + std::time::Duration::from_secs(5))
        .bans;
    assert_eq!(bans.len(), 1, "{bans:?}");
    // Between an hour after the packets were sent and an hour from now (an emulated guest may
    // take seconds between the two), within the clock's ticks.
    let hour = std::time::Duration::from_secs(3600);
    let (first, last) = (sent + hour, std::time::SystemTime::now() + hour);
    let early = first.duration_since(bans[0].expires_at).unwrap_or_default();
    let late = bans[0].expires_at.duration_since(last).unwrap_or_default();
    assert!(
        early.as_nanos() < 3 * u128::from(tick) + 200_000_000 && late.as_nanos() < u128::from(tick),
        "the ban ends {early:?} before an hour after the packets, {late:?} after an hour from now"
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

/// IPv6 prefixes past /32 are probed only when the source's /32 passes the gate: the gate is
/// opened for the configuration's entries and for entries added while running, and a clear bit
/// really skips those probes (the test closes one by hand to see it).
#[test]
fn ipv6_prefixes_past_slash_32_are_reached_through_the_gate() {
    let mut program = LoadedProgram::new(&policy(
        "interfaces = [\"lo\"]\n[blocklist]\ncidrs = [\"2001:db8:bad::/48\", \"2001:db9::/32\"]\n",
    ));
    assert_eq!(
        verdict(&mut program, "2001:db8:bad::7"),
        XDP_DROP,
        "under the /48"
    );
    assert_eq!(
        verdict(&mut program, "2001:db9::1"),
        XDP_DROP,
        "under the /32"
    );
    assert_eq!(verdict(&mut program, "2001:db8:1::2"), XDP_PASS, "unlisted");

    // Added while running, in a /32 the gate had closed.
    let added: Cidr = "2001:db7:1:2::/64".parse().expect("a CIDR");
    assert_eq!(
        verdict(&mut program, "2001:db7:1:2::9"),
        XDP_PASS,
        "not listed yet"
    );
    let change = ListChange {
        upserts: vec![(added, SOURCE_CLI)],
        removals: Vec::new(),
    };
    program
        .live
        .apply(PolicyChange::of_list(ListKind::Block, change))
        .expect("block the /64");
    assert_eq!(
        verdict(&mut program, "2001:db7:1:2::9"),
        XDP_DROP,
        "added at run time"
    );

    // Close the /48's gate bit: its source passes, the /32's entry still holds.
    let ids = ProgramMapIds::of(program.program_id()).expect("the program's maps");
    let mut gate: Array<MapData, u64> =
        Array::try_from(ids.open(V6_GATE).expect("V6_GATE")).expect("an array");
    let (index, bit) = v6_gate_position(0x2001_0db8);
    let word = gate.get(&index, 0).expect("the gate word");
    assert_ne!(word & 1 << bit, 0, "the gate is open for 2001:db8::/32");
    gate.set(index, word & !(1 << bit), 0).expect("close it");
    assert_eq!(
        verdict(&mut program, "2001:db8:bad::7"),
        XDP_PASS,
        "behind a closed gate, the /48 is not probed"
    );
    assert_eq!(
        verdict(&mut program, "2001:db9::1"),
        XDP_DROP,
        "a /32 needs no gate"
    );
}

/// Both lists and both generations share the long-prefix stores: a change is refused when its new
/// entries and the ones they replace would not fit together (both are held until the switch),
/// and nothing moves; the same change in halves fits.
#[test]
fn a_change_whose_old_and_new_entries_overflow_the_shared_table_is_refused_whole() {
    let mut program = LoadedProgram::new(&policy("interfaces = [\"lo\"]\n"));
    let hosts = |first: u32, count: u32| -> Vec<Cidr> {
        (first..first + count)
            .map(|i| {
                let addr = std::net::Ipv4Addr::from(0x0a00_0000 + i);
                format!("{addr}/32").parse().expect("a CIDR")
            })
            .collect()
    };
    let change = |upserts: &[Cidr], removals: &[Cidr]| {
        PolicyChange::of_list(
            ListKind::Block,
            ListChange {
                upserts: upserts.iter().map(|c| (*c, SOURCE_CLI)).collect(),
                removals: removals.to_vec(),
            },
        )
    };
    let verdict =
        |program: &mut LoadedProgram, cidr: &Cidr| verdict(program, &cidr.net().addr().to_string());
    // The loaded table has room for 16,384 prefixes (the built-in default: the policy has none).
    let old = hosts(0, 10_000);
    let new = hosts(10_000, 10_000);
    program.live.apply(change(&old, &[])).expect("10,000 fit");
    let error = program
        .live
        .apply(change(&new, &old))
        .expect_err("20,000 at once do not fit");
    assert!(
        error.to_string().contains("raise runtime_entries"),
        "{error}"
    );
    assert_eq!(
        verdict(&mut program, &old[9_999]),
        XDP_DROP,
        "the old list holds"
    );
    assert_eq!(
        verdict(&mut program, &new[0]),
        XDP_PASS,
        "none of the new one"
    );
    for half in [0..5_000, 5_000..10_000] {
        program
            .live
            .apply(change(&new[half.clone()], &old[half]))
            .expect("5,000 at a time fit");
    }
    assert_eq!(verdict(&mut program, &old[9_999]), XDP_PASS);
    assert_eq!(verdict(&mut program, &new[9_999]), XDP_DROP);
}

/// The IPv4 table filled to 98% of its slots: prefixes whose two buckets are both full go to
/// the stash, and every prefix still drops; removing every other one moves stashed prefixes
/// into the freed slots, and what stays listed still drops while what went passes.
#[test]
fn a_nearly_full_ipv4_table_spills_into_its_stash_and_drains_it() {
    let mut program = LoadedProgram::new(&policy("interfaces = [\"lo\"]\n"));
    // The table has 16,384 slots (the built-in default, as the policy has none).
    let hosts: Vec<Cidr> = (0..16_000u32)
        .map(|i| {
            let addr =
                std::net::Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i.wrapping_mul(40_503)));
            format!("{addr}/32").parse().expect("a CIDR")
        })
        .collect();
    let change = |upserts: &[Cidr], removals: &[Cidr]| {
        PolicyChange::of_list(
            ListKind::Block,
            ListChange {
                upserts: upserts.iter().map(|c| (*c, SOURCE_CLI)).collect(),
                removals: removals.to_vec(),
            },
        )
    };
    let source = |cidr: &Cidr| cidr.net().addr().to_string();
    let stashed = |program: &mut LoadedProgram| {
        let ids = ProgramMapIds::of(program.program_id()).expect("the program's maps");
        let stash: HashMap<MapData, V4PrefixKey, PrefixEntry> =
            HashMap::try_from(ids.open(V4_LONG_STASH).expect("the stash")).expect("a hash");
        stash.keys().filter_map(Result::ok).count()
    };
    program.live.apply(change(&hosts, &[])).expect("16,000 fit");
    let full = stashed(&mut program);
    assert!(
        full > 50,
        "both buckets full for some prefixes: {full} stashed"
    );
    for cidr in &hosts {
        assert_eq!(verdict(&mut program, &source(cidr)), XDP_DROP, "{cidr}");
    }
    let gone: Vec<Cidr> = hosts.iter().step_by(2).copied().collect();
    let kept: Vec<Cidr> = hosts.iter().skip(1).step_by(2).copied().collect();
    program.live.apply(change(&[], &gone)).expect("removed");
    // The generation switched off lets go of the removed prefixes when it catches up.
    program.live.catch_up();
    let drained = stashed(&mut program);
    assert!(
        drained < full / 4,
        "freed slots took stashed prefixes: {full} -> {drained}"
    );
    for cidr in &kept {
        assert_eq!(verdict(&mut program, &source(cidr)), XDP_DROP, "{cidr}");
    }
    for cidr in &gone {
        assert_eq!(verdict(&mut program, &source(cidr)), XDP_PASS, "{cidr}");
    }
}

/// The IPv4 table's stash filled behind moat's back: a change whose prefixes need it fails with
/// an error that says so, and the policy in force holds; the next change rebuilds the
/// generation it failed in (clearing what no list holds, the stash's intruders included) and
/// applies, and then the first change fits.
#[test]
fn a_full_ipv4_stash_fails_the_change_and_the_next_one_repairs_it() {
    let mut program = LoadedProgram::new(&policy("interfaces = [\"lo\"]\n"));
    // The stash's room: an eighth of the table's 16,384 slots (the built-in default).
    let stash = fill_with_unused(
        &mut program,
        V4_LONG_STASH,
        (0..2_048u32).map(|i| V4PrefixKey {
            prefix_len: 32,
            addr: (0xac10_0000 + i).to_be_bytes(),
        }),
    );
    let hosts: Vec<Cidr> = (0..16_000u32)
        .map(|i| {
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 + i * 3);
            format!("{addr}/32").parse().expect("a CIDR")
        })
        .collect();
    let block = |cidrs: &[Cidr]| {
        PolicyChange::of_list(
            ListKind::Block,
            ListChange {
                upserts: cidrs.iter().map(|c| (*c, SOURCE_CLI)).collect(),
                removals: Vec::new(),
            },
        )
    };
    let source = |cidr: &Cidr| cidr.net().addr().to_string();
    let error = program
        .live
        .apply(block(&hosts))
        .expect_err("no room in the stash");
    assert!(
        moat::error_chain(&error).contains("stash of the IPv4 long-prefix table is full"),
        "{}",
        moat::error_chain(&error)
    );
    for cidr in [&hosts[0], &hosts[15_999]] {
        assert_eq!(
            verdict(&mut program, &source(cidr)),
            XDP_PASS,
            "not in force: {cidr}"
        );
    }
    let one: Cidr = "192.0.2.1/32".parse().expect("a CIDR");
    program
        .live
        .apply(block(&[one]))
        .expect("rebuilt, then applied");
    assert_eq!(verdict(&mut program, "192.0.2.1"), XDP_DROP);
    assert_eq!(
        verdict(&mut program, &source(&hosts[0])),
        XDP_PASS,
        "the failed change stays out"
    );
    program.live.catch_up();
    let left = stash.keys().filter_map(Result::ok).count();
    assert!(
        left < 16,
        "what no list holds was cleared: {left} entries left"
    );
    program.live.apply(block(&hosts)).expect("now it fits");
    for cidr in &hosts {
        assert_eq!(verdict(&mut program, &source(cidr)), XDP_DROP, "{cidr}");
    }
}

/// A write the kernel refuses (here: the shared IPv6 hash filled behind moat's back) leaves the
/// policy in force untouched; the next change rebuilds the generation it failed in, clearing
/// what no list holds, and applies.
#[test]
fn a_failed_write_is_repaired_by_the_next_change() {
    let mut program = LoadedProgram::new(&policy(
        "interfaces = [\"lo\"]\n[blocklist]\ncidrs = [\"2001:db8:1::1/128\"]\n",
    ));
    // Entries no list holds, until the hash (16,384: the default) is full.
    let hash = fill_with_unused(
        &mut program,
        V6_PREFIXES,
        (1..16_384u32).map(|i| V6PrefixKey {
            prefix_len: 128,
            addr: (0x2001_0db8_0000_0000_0000_0000_0000_0000u128 + u128::from(i)).to_be_bytes(),
        }),
    );
    let add = |cidr: &str| {
        PolicyChange::of_list(
            ListKind::Block,
            ListChange {
                upserts: vec![(cidr.parse().expect("CIDR"), SOURCE_CLI)],
                removals: Vec::new(),
            },
        )
    };
    program
        .live
        .apply(add("2001:db8:1::2/128"))
        .expect_err("the kernel's hash is full");
    assert_eq!(
        verdict(&mut program, "2001:db8:1::1"),
        XDP_DROP,
        "the policy in force holds"
    );
    assert_eq!(
        verdict(&mut program, "2001:db8:1::2"),
        XDP_PASS,
        "the change is not in force"
    );
    program
        .live
        .apply(add("2001:db8:1::3/128"))
        .expect("rebuilt, then applied");
    for source in ["2001:db8:1::1", "2001:db8:1::3"] {
        assert_eq!(verdict(&mut program, source), XDP_DROP, "{source}");
    }
    assert_eq!(
        verdict(&mut program, "2001:db8:1::2"),
        XDP_PASS,
        "the failed change stays out"
    );
    let left = hash.keys().filter_map(Result::ok).count();
    assert!(
        left < 16,
        "what no list holds was cleared: {left} entries left"
    );
}

/// A change to one list keeps what the generation in force holds of the same CIDR in the other
/// list: here a blocklist change naming an allowlisted address fails half-way (the IPv6 hash
/// filled behind moat's back), and the address still passes by the allowlist.
#[test]
fn a_change_to_one_list_keeps_the_other_lists_entry_in_force() {
    let mut program = LoadedProgram::new(&policy(
        "interfaces = [\"lo\"]\n[allowlist]\ncidrs = [\"192.0.2.77/32\"]\n\
         [blocklist]\ncidrs = [\"192.0.2.77/32\", \"192.0.2.78/32\"]\n",
    ));
    fill_with_unused(
        &mut program,
        V6_PREFIXES,
        (0..16_384u128).map(|i| V6PrefixKey {
            prefix_len: 128,
            addr: (0x2001_0db8_0000_0000_0000_0000_0000_0000 + i).to_be_bytes(),
        }),
    );
    assert_eq!(verdict(&mut program, "192.0.2.77"), XDP_PASS, "allowed");
    assert_eq!(verdict(&mut program, "192.0.2.78"), XDP_DROP, "blocked");
    let change = ListChange {
        upserts: vec![("2001:db8:5::/48".parse().expect("CIDR"), SOURCE_CLI)],
        removals: vec!["192.0.2.77/32".parse().expect("CIDR")],
    };
    program
        .live
        .apply(PolicyChange::of_list(ListKind::Block, change))
        .expect_err("the IPv6 hash is full");
    assert_eq!(
        verdict(&mut program, "192.0.2.77"),
        XDP_PASS,
        "the allowlist entry in force is untouched by the failed blocklist change"
    );
    assert_eq!(verdict(&mut program, "192.0.2.78"), XDP_DROP);
}

/// A source's ban is read from its limiter state (one lookup) and, for a source the limiter no
/// longer tracks, from the ban map; lifting a ban clears both, so the source starts afresh.
#[test]
fn a_ban_holds_from_either_copy_and_lifting_clears_both() {
    let mut program = LoadedProgram::new(&policy(
        "interfaces = [\"lo\"]\n[rate_limit]\npps = 1\nburst_packets = 10\nban_after = \"0s\"\nban_ttl = \"1h\"\n\
         [[rules]]\nname = \"dns\"\nprotocol = \"udp\"\ndst_ports = [53]\naction = \"pass\"\n\
         [[rules]]\nname = \"discard\"\nprotocol = \"udp\"\ndst_ports = [9]\naction = \"drop\"\n",
    ));
    let frame = Frame::udp(LEGIT_V4, 40000, 443).bytes();
    let source: std::net::IpAddr = LEGIT_V4.parse().expect("address");
    let drops_as_ban = |program: &mut LoadedProgram| {
        let before = program
            .snapshot()
            .get(TEST_RUN_IF_INDEX, Action::Drop, Reason::Ban);
        let verdict = program.run(&frame);
        let after = program
            .snapshot()
            .get(TEST_RUN_IF_INDEX, Action::Drop, Reason::Ban);
        verdict == XDP_DROP && after.packets == before.packets + 1
    };

    // Banned by the program: the state carries the ban.
    program.run_repeated(&frame, 20);
    let state = program.limiter.state(source).expect("the source's state");
    assert!(
        state.banned_until > limiter::monotonic_now_ns(),
        "{state:?}"
    );
    assert!(program.limiter.is_banned(source));
    assert!(drops_as_ban(&mut program), "banned through the state");

    // The state displaced (as a flood of new sources would): the ban map still holds it, a
    // pass rule does not exempt the source, and a packet a rule drops is counted under the rule
    // (dropped either way; the ban map is not read for it).
    program.limiter.forget(source).expect("drop the state");
    assert!(drops_as_ban(&mut program), "banned through the ban map");
    assert!(
        program.limiter.state(source).is_none(),
        "a banned packet makes no state"
    );
    let count = |program: &LoadedProgram, reason| {
        (program.snapshot())
            .get(TEST_RUN_IF_INDEX, Action::Drop, reason)
            .packets
    };
    let (bans, rules) = (count(&program, Reason::Ban), count(&program, Reason::Rule));
    assert_eq!(
        program.run(&Frame::udp(LEGIT_V4, 40000, 53).bytes()),
        XDP_DROP
    );
    assert_eq!(
        program.run(&Frame::udp(LEGIT_V4, 40000, 9).bytes()),
        XDP_DROP
    );
    assert_eq!(
        count(&program, Reason::Ban),
        bans + 1,
        "the pass rule's packet"
    );
    assert_eq!(
        count(&program, Reason::Rule),
        rules + 1,
        "the drop rule's packet"
    );

    // Lifted: both copies go, and the source has its burst again.
    program.run_repeated(&frame, 1);
    program.limiter.lift(source).expect("lift");
    assert!(!program.limiter.is_banned(source));
    assert_eq!(program.run(&frame), XDP_PASS, "a lifted source passes");

    // A ban only the state holds (its ban-map entry evicted) is enforced, seen, and lifted.
    let banned = RateState {
        banned_until: limiter::monotonic_now_ns() + 3_600_000_000_000,
        ..RateState::default()
    };
    program
        .limiter
        .set_state(source, banned)
        .expect("ban through the state");
    assert!(program.limiter.is_banned(source));
    assert!(drops_as_ban(&mut program), "banned through the state alone");
    program.limiter.lift(source).expect("lift");
    assert_eq!(program.run(&frame), XDP_PASS, "lifted");

    // Banned again by the program: lift_all takes both copies.
    program.run_repeated(&frame, 20);
    assert!(program.limiter.is_banned(source));
    let lifted = program.limiter.lift_all().expect("lift all");
    assert_eq!(lifted, [source]);
    assert!(!program.limiter.is_banned(source));
    assert_eq!(program.run(&frame), XDP_PASS, "lifted by lift_all");

    // A copy left in the slot by a ban of another source (CPUs racing as the slot changed
    // hands) bans no one; lift_all finds a copy whose ban-map entry is gone.
    program
        .limiter
        .set_state(source, banned)
        .expect("ban through the state");
    let ids = ProgramMapIds::of(program.program_id()).expect("the program's maps");
    let mut slots: Array<MapData, RateSlot> =
        Array::try_from(ids.open(RATE_LIMITS).expect("RATE_LIMITS")).expect("an array");
    let key = limiter::key_of(source);
    let (index, mut slot) = (0..slots.len())
        .find_map(|i| Some((i, slots.get(&i, 0).ok()?)).filter(|(_, slot)| slot.key == key))
        .expect("the source's slot");
    slot.state.banned_key ^= 1;
    slots.set(index, slot, 0).expect("retag the copy");
    assert!(!program.limiter.is_banned(source));
    assert_eq!(program.run(&frame), XDP_PASS, "another source's copy");
    slot.state.banned_key ^= 1;
    slots.set(index, slot, 0).expect("tag it back");
    assert!(drops_as_ban(&mut program), "the source's own copy");
    assert_eq!(program.limiter.lift_all().expect("lift all"), [source]);
    assert!(!program.limiter.is_banned(source));
}

/// The limiter's table holds a source in one of two slots, and a new source takes the less
/// active occupant's. A flood of sources seen once churns through the table (the newest are
/// tracked, the oldest displaced) without displacing a source that is over its limit.
#[test]
fn a_flood_of_new_sources_displaces_the_idle_not_a_source_over_its_limit() {
    const SLOTS: u32 = 1024;
    const FLOOD: u32 = SLOTS * 8;
    let mut program = LoadedProgram::new(&policy(&format!(
        "interfaces = [\"lo\"]\n[rate_limit]\npps = 10\nburst_packets = 20\nmax_sources = {SLOTS}\n"
    )));
    let heavy: std::net::IpAddr = LEGIT_V4.parse().expect("address");
    let frame = Frame::udp(LEGIT_V4, 40000, 443).bytes();
    assert_eq!(
        program.run_repeated(&frame, 100),
        XDP_DROP,
        "over its limit"
    );
    let before = program.limiter.state(heavy).expect("the source's state");
    assert!(
        before.over_since != 0 && before.passed_packets == 20,
        "{before:?}"
    );

    let flooder = |i: u32| std::net::Ipv4Addr::from(0x0a00_0000 | i);
    for i in 0..FLOOD {
        let packet = Frame::udp(&flooder(i).to_string(), 40000, 443).bytes();
        assert_eq!(
            program.run(&packet),
            XDP_PASS,
            "a new source's first packet"
        );
    }
    // Its streak and its count, not a fresh state (no timing: an emulated guest is slow).
    let after = program.limiter.state(heavy);
    assert!(
        after.is_some_and(|after| after.over_since == before.over_since
            && after.passed_packets == before.passed_packets),
        "the source over its limit keeps its state: {after:?}, was {before:?}"
    );

    let tracked = |range: std::ops::Range<u32>| {
        range
            .filter(|&i| program.limiter.state(flooder(i).into()).is_some())
            .count()
    };
    let (oldest, newest) = (tracked(0..64), tracked(FLOOD - 64..FLOOD));
    assert!(
        oldest <= 8,
        "{oldest} of the 64 oldest sources still tracked"
    );
    assert!(newest >= 48, "{newest} of the 64 newest sources tracked");
    let scan = (program.limiter.reader().expect("a reader"))
        .scan(std::time::Instant::now() + std::time::Duration::from_secs(10));
    assert!(scan.complete);
    assert!(
        (u64::from(SLOTS) * 9 / 10..=u64::from(SLOTS)).contains(&scan.sources),
        "{} sources tracked in {SLOTS} slots",
        scan.sources
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

/// A protected destination is held to its rate over all sources: a flood forging a new source
/// per packet passes exactly the burst, the rest is dropped as `dst_limit` and counted on the
/// entry; other ports, protocols and destinations are untouched; the entry's bucket is shared,
/// so the same holds for IPv6.
#[test]
fn a_protected_destination_is_held_to_its_rate_whatever_the_source() {
    let mut program = LoadedProgram::new(&policy(&format!(
        "interfaces = [\"lo\"]\n\
         [[protect]]\nname = \"dns\"\ndestination = \"{DST_V4}\"\nprotocol = \"udp\"\n\
         dst_ports = [53]\npps = 1\nburst_packets = 10\n\
         [[protect]]\nname = \"web6\"\ndestination = \"2001:db8:1::/64\"\nprotocol = \"tcp\"\n\
         pps = 1\nburst_packets = 5\n"
    )));
    let spoofed = |n: u32| format!("198.18.{}.{}", n / 250, n % 250 + 1);
    let mut dropped = 0;
    for n in 0..1000 {
        match program.run(&Frame::udp(&spoofed(n), 40000 + n as u16, 53).bytes()) {
            XDP_DROP => dropped += 1,
            XDP_PASS => {}
            other => panic!("packet {n}: {}", action_name(other)),
        }
    }
    assert_eq!(
        dropped, 990,
        "a new source per packet: only the burst of 10 passes"
    );
    let snapshot = program.snapshot();
    let dns = snapshot.protected(0);
    assert_eq!(
        (dns.conforming.packets, dns.over.packets),
        (10, 990),
        "{dns:?}"
    );
    assert_eq!(
        snapshot
            .get(TEST_RUN_IF_INDEX, Action::Drop, Reason::DstLimit)
            .packets,
        990
    );
    for (frame, what) in [
        (Frame::udp(LEGIT_V4, 40000, 54), "another port"),
        (Frame::tcp(LEGIT_V4, 40000, 53, TCP_SYN), "another protocol"),
        (
            Frame::udp(LEGIT_V4, 40000, 53).to("203.0.113.2"),
            "another destination",
        ),
        (
            Frame::ping(LEGIT_V4),
            "ICMP, which has no ports, to a port-bound entry",
        ),
        (
            Frame::tcp(LEGIT_V4, 40000, 53, TCP_SYN).ipv4_fragment(185, false),
            "a later fragment of another protocol",
        ),
    ] {
        assert_eq!(program.run(&frame.bytes()), XDP_PASS, "{what}");
    }
    assert_eq!(
        program.snapshot().protected(0),
        dns,
        "nothing else was charged"
    );
    // A later UDP fragment carries no port, but is the entry's traffic all the same.
    let fragment = Frame::udp(&spoofed(5000), 40000, 53).ipv4_fragment(185, false);
    assert_eq!(program.run(&fragment.bytes()), XDP_DROP, "a later fragment");
    assert_eq!(program.snapshot().protected(0).over.packets, 991);

    // IPv6, a prefix destination, any port.
    let tcp6 =
        |host: u32, to: &str| Frame::tcp(&format!("2001:db8:f::{host:x}"), 1, 80, TCP_SYN).to(to);
    let passed = (0..20)
        .filter(|&host| program.run(&tcp6(host, "2001:db8:1::99").bytes()) == XDP_PASS)
        .count();
    assert_eq!(passed, 5, "the /64's shared burst");
    assert_eq!(
        program.run(&tcp6(1, "2001:db8:2::1").bytes()),
        XDP_PASS,
        "outside the protected prefix"
    );
    assert_eq!(program.snapshot().protected(1).over.packets, 15);
}

/// A bit limit holds the destination to its bytes; monitor mode passes the excess and counts it
/// as `would_drop` and on the entry.
#[test]
fn a_protected_destinations_bit_limit_holds_and_monitor_mode_only_counts() {
    let text = format!(
        "interfaces = [\"lo\"]\n[[protect]]\nname = \"bits\"\ndestination = \"{DST_V4}\"\n\
         bps = 8000\n"
    );
    let frame = Frame::udp(LEGIT_V4, 40000, 443).payload(100).bytes();
    // 1000 bytes a second, a second's worth of burst: the frames that fit in 1000 bytes.
    let fit = 1000 / frame.len() as u64 + 1;
    let mut program = LoadedProgram::new(&policy(&text));
    program.run_repeated(&frame, 100);
    let counts = program.snapshot().protected(0);
    assert!(
        (fit - 1..=fit).contains(&counts.conforming.packets)
            && counts.over.packets == 100 - counts.conforming.packets,
        "{fit} frames of {} bytes fit in a second's 1000 bytes: {counts:?}",
        frame.len()
    );

    let mut monitored = policy(&text);
    monitored.mode = Mode::Monitor;
    let mut program = LoadedProgram::new(&monitored);
    assert_eq!(program.run_repeated(&frame, 100), XDP_PASS);
    let snapshot = program.snapshot();
    assert_eq!(
        snapshot
            .get(TEST_RUN_IF_INDEX, Action::WouldDrop, Reason::DstLimit)
            .packets,
        snapshot.protected(0).over.packets
    );
    assert!(snapshot.protected(0).over.packets >= 100 - fit);
}

/// A reload that changes a protected entry puts the new limit in force at once, with an empty
/// bucket; removing every entry lets the traffic through.
#[test]
fn protected_entries_change_live() {
    let entry = |pps: u32| {
        format!(
            "interfaces = [\"lo\"]\n[[protect]]\nname = \"p\"\ndestination = \"{DST_V4}\"\n\
             pps = {pps}\nburst_packets = {pps}\n"
        )
    };
    let mut program = LoadedProgram::new(&policy(&entry(10)));
    let frame = Frame::udp(LEGIT_V4, 40000, 443).bytes();
    assert_eq!(program.run_repeated(&frame, 100), XDP_DROP);
    program
        .live
        .replace(policy(&entry(50)))
        .expect("a new limit");
    let before = program.snapshot().protected(0).conforming.packets;
    assert_eq!(program.run_repeated(&frame, 100), XDP_DROP);
    assert_eq!(
        program.snapshot().protected(0).conforming.packets - before,
        50,
        "the new burst, from an empty bucket"
    );
    // The daemon restarts a changed entry's counters (so that it inherits none).
    assert_ne!(program.snapshot().protected(0), Default::default());
    program.counters.reset_protected([0]).expect("reset");
    assert_eq!(program.snapshot().protected(0), Default::default());
    program
        .live
        .replace(policy("interfaces = [\"lo\"]\n"))
        .expect("no entry");
    assert_eq!(program.run_repeated(&frame, 100), XDP_PASS);
}

/// The program matches a fingerprint exactly as the agent reads the attributes from a sampled
/// frame: for frames of every shape, a fingerprint of each attribute (and of all of them) made
/// from the agent's reading drops the frame as `fingerprint`, before the bucket; the same
/// fingerprint with that attribute's value changed lets it through.
#[test]
fn fingerprints_match_what_the_agent_reads_from_samples() {
    use agent_common::protect::{FP_PAYLOAD, FP_PAYLOAD_MAX, FP_SRC_PORT, Fingerprint};
    use moat::observe::fingerprint::{Attributes, FIELDS};

    let mut program = LoadedProgram::new(&policy(&format!(
        "interfaces = [\"lo\"]\n\
         [[protect]]\nname = \"v4\"\ndestination = \"{DST_V4}\"\npps = 1000000000\n\
         [[protect]]\nname = \"v6\"\ndestination = \"{DST_V6}\"\npps = 1000000000\n"
    )));
    let frames = [
        Frame::udp(LEGIT_V4, 1900, 53).payload(40),
        Frame::tcp(LEGIT_V4, 40000, 80, TCP_SYN).vlan(7).payload(3),
        Frame::udp(LEGIT_V4, 123, 123).ipv4_options(2).payload(2),
        Frame::ping(LEGIT_V4),
        Frame::udp(LEGIT_V6, 1900, 53).payload(12),
        Frame::tcp(LEGIT_V6, 40000, 443, TCP_SYN | 0x10).qinq(1, 2),
    ];
    // The same fingerprint with the value of every attribute it names changed.
    let changed = |print: &Fingerprint| {
        let mut print = *print;
        print.src_port ^= 1;
        print.ttl ^= 1;
        print.length ^= 1;
        print.tcp_flags ^= 1;
        print.tcp_window ^= 1;
        print.ip_id ^= 1;
        let last = (print.payload_len as usize).clamp(1, FP_PAYLOAD_MAX) - 1;
        print.payload[last] ^= 1;
        print
    };
    let mut checked = 0;
    for frame in frames {
        let bytes = frame.bytes();
        let attributes = Attributes::of_frame(&bytes, false).expect("the agent reads the frame");
        // IPv4 frames (which have an identification) belong to entry 0, IPv6 ones to entry 1.
        let entry = u32::from(attributes.ip_id.is_none());
        let present: Vec<u32> = FIELDS
            .iter()
            .copied()
            .filter(|&field| attributes.fingerprint(field).is_some())
            .collect();
        let all = present.iter().fold(0, |all, field| all | field);
        for fields in present.iter().copied().chain([all]) {
            let print = attributes.fingerprint(fields).expect("present attributes");
            program
                .fingerprints
                .install(entry, &print)
                .expect("install the fingerprint");
            let before = program.snapshot().protected(entry).fingerprint.packets;
            assert_eq!(
                program.run(&bytes),
                XDP_DROP,
                "{frame:?}: fingerprint {print:?} must match"
            );
            assert_eq!(
                program.snapshot().protected(entry).fingerprint.packets,
                before + 1
            );
            let changed = changed(&print);
            program
                .fingerprints
                .install(entry, &changed)
                .expect("install the changed fingerprint");
            assert_eq!(
                program.run(&bytes),
                XDP_PASS,
                "{frame:?}: fingerprint {changed:?} differs in every attribute it names"
            );
            checked += 1;
        }
        program.fingerprints.remove(entry).expect("remove");
        assert_eq!(program.run(&bytes), XDP_PASS);
    }
    assert!(checked >= 30, "only {checked} fingerprints checked");

    // The agent learns from whole packets only; the program applies the fingerprint to a first
    // fragment as well (it carries the transport header and the payload's start).
    let whole = Frame::udp(LEGIT_V4, 1900, 53).payload(40);
    let print = Attributes::of_frame(&whole.bytes(), false)
        .and_then(|a| a.fingerprint(FP_SRC_PORT | FP_PAYLOAD))
        .expect("a UDP fingerprint");
    program.fingerprints.install(0, &print).expect("install");
    assert_eq!(program.run(&whole.bytes()), XDP_DROP);
    let first_fragment = whole.ipv4_fragment(0, true).bytes();
    assert!(Attributes::of_frame(&first_fragment, false).is_none());
    assert_eq!(program.run(&first_fragment), XDP_DROP, "a first fragment");
    let later_fragment = Frame::udp(LEGIT_V4, 1900, 53)
        .payload(40)
        .ipv4_fragment(185, false)
        .bytes();
    assert_eq!(
        program.run(&later_fragment),
        XDP_PASS,
        "a later fragment has no port or payload start to match"
    );

    // A payload fingerprint longer than the packet's payload does not match it.
    let short = Frame::udp(LEGIT_V4, 1900, 53).payload(3).bytes();
    let mut print = Attributes::of_frame(&short, false)
        .and_then(|a| a.fingerprint(FP_PAYLOAD))
        .expect("a payload");
    assert_eq!(print.payload_len, 3);
    program.fingerprints.install(0, &print).expect("install");
    assert_eq!(program.run(&short), XDP_DROP);
    print.payload_len = 4;
    program.fingerprints.install(0, &print).expect("install");
    assert_eq!(
        program.run(&short),
        XDP_PASS,
        "a 4-byte prefix of a 3-byte payload"
    );
}
