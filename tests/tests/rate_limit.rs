//! End to end on a veth pair: the rate limiter's accuracy, bans that appear and expire on time,
//! monitor mode, and a legitimate source that keeps its traffic through another's flood.

use std::time::{Duration, Instant};

use agent_common::stats::{Action, Reason};
use moat::program::counters::Snapshot;
use moat_tests::{
    Lab, MoatProcess, Side,
    lab::{ATTACKER_NET_V4, ATTACKER_V4, LEGIT_V4, LEGIT_V6, PROTECTED_V4, PROTECTED_V6},
    traffic::{ping, udp_flood, udp_paced},
};

fn start_with_config(lab: &Lab, config: &str) -> (MoatProcess, u32) {
    let path = lab.write_config(config);
    MoatProcess::start(lab, &["run", "--config", &path.to_string_lossy()])
}

#[test]
fn the_passed_rate_is_within_ten_percent_of_the_limit() {
    const LIMIT: u64 = 1000;
    // Enough burst to absorb the sender's millisecond clumps; it is taken out of the rate below.
    const BURST: u64 = 50;
    let lab = Lab::new();
    let (_moat, program_id) = start_with_config(
        &lab,
        &format!("[rate_limit]\npps = {LIMIT}\nburst_packets = {BURST}\n"),
    );
    let if_index = lab.if_index(Side::Protected);
    let before = Snapshot::of_program(program_id).expect("counters");

    let (sent, took) = udp_paced(
        &lab,
        Lab::addr(ATTACKER_V4),
        Lab::addr(PROTECTED_V4),
        5 * LIMIT,
        Duration::from_secs(3),
    );

    let after = Snapshot::of_program(program_id).expect("counters");
    let passed = after.get(if_index, Action::Pass, Reason::NoMatch).packets
        - before.get(if_index, Action::Pass, Reason::NoMatch).packets;
    let limited = after.get(if_index, Action::Drop, Reason::RateLimit).packets;
    let rate = passed.saturating_sub(BURST) as f64 / took.as_secs_f64();
    assert!(
        (LIMIT as f64 * 0.9..=LIMIT as f64 * 1.1).contains(&rate),
        "passed {passed} of {sent} packets in {took:?}: {rate:.0}/s, want {LIMIT}/s ± 10% ({limited} rate-limited)"
    );
    eprintln!(
        "rate limit: {rate:.0} packets/s passed against a limit of {LIMIT}/s ({sent} sent in {took:?})"
    );
    assert!(
        passed + limited >= sent * 99 / 100,
        "counters should see the flood: {passed} + {limited} of {sent}"
    );
}

#[test]
fn a_flooding_source_is_banned_and_the_ban_expires_on_time() {
    let lab = Lab::new();
    let (moat, program_id) = start_with_config(
        &lab,
        "[rate_limit]\npps = 100\nburst_packets = 10\nban_after = \"1s\"\nban_ttl = \"3s\"\n[events]\nsample_every = 1\n",
    );
    let flood_start = Instant::now();
    let (sent, _) = udp_paced(
        &lab,
        Lab::addr(ATTACKER_V4),
        Lab::addr(PROTECTED_V4),
        1000,
        Duration::from_millis(1500),
    );
    let log = moat.log_text();
    assert!(
        log.contains("banned") && log.contains(&format!("source={ATTACKER_V4}")),
        "moat should log the ban after {sent} packets:\n{log}"
    );
    assert!(
        log.contains("dropped packet sample") && log.contains("reason=\"rate_limit\""),
        "with sample_every = 1, dropped packets should be sampled to the log:\n{log}"
    );
    // The ban came after ban_after of flooding: before that only rate limiting dropped.
    let if_index = lab.if_index(Side::Protected);
    let snapshot = Snapshot::of_program(program_id).expect("counters");
    let limited = snapshot
        .get(if_index, Action::Drop, Reason::RateLimit)
        .packets;
    assert!(
        limited >= 800,
        "about a second of flood should be rate-limited before the ban, got {limited}: {snapshot:?}"
    );
    assert!(
        snapshot.get(if_index, Action::Drop, Reason::Ban).packets > 0,
        "the rest of the flood is banned: {snapshot:?}"
    );

    // Banned: even a polite ping goes unanswered.
    let during = ping(&lab, ATTACKER_V4, PROTECTED_V4, 3);
    assert_eq!(during.received, 0, "a banned source must get no replies");
    assert_eq!(
        ping(&lab, LEGIT_V4, PROTECTED_V4, 3).received,
        3,
        "others are not banned"
    );

    // The ban started at most ~1.5 s after the flood began and lasts 3 s.
    let expiry = flood_start
        + Duration::from_millis(1500)
        + Duration::from_secs(3)
        + Duration::from_millis(300);
    std::thread::sleep(expiry.saturating_duration_since(Instant::now()));
    let after = ping(&lab, ATTACKER_V4, PROTECTED_V4, 3);
    assert_eq!(after.received, 3, "the ban should have expired by now");
}

#[test]
fn monitor_mode_drops_nothing_but_counts() {
    let lab = Lab::new();
    let (_moat, program_id) = start_with_config(
        &lab,
        &format!("mode = \"monitor\"\n[blocklist]\ncidrs = [\"{ATTACKER_NET_V4}\"]\n"),
    );
    let result = ping(&lab, ATTACKER_V4, PROTECTED_V4, 5);
    assert_eq!(result.received, 5, "monitor mode must not drop");
    let snapshot = Snapshot::of_program(program_id).expect("counters");
    let if_index = lab.if_index(Side::Protected);
    assert_eq!(
        snapshot
            .get(if_index, Action::WouldDrop, Reason::Blocklist)
            .packets,
        5,
        "{snapshot:?}"
    );
    assert_eq!(
        snapshot
            .get(if_index, Action::Drop, Reason::Blocklist)
            .packets,
        0,
        "{snapshot:?}"
    );
}

#[test]
fn a_legitimate_source_keeps_its_traffic_during_a_flood() {
    let lab = Lab::new();
    let (_moat, program_id) =
        start_with_config(&lab, "[rate_limit]\npps = 1000\nburst_packets = 100\n");
    let (legit_v4, legit_v6, (flooded, _)) = std::thread::scope(|scope| {
        let legit = scope.spawn(|| {
            (
                ping(&lab, LEGIT_V4, PROTECTED_V4, 100),
                ping(&lab, LEGIT_V6, PROTECTED_V6, 100),
            )
        });
        let flood = udp_flood(
            &lab,
            Lab::addr(ATTACKER_V4),
            Lab::addr(PROTECTED_V4),
            300_000,
            64,
            Duration::from_secs(3),
        );
        let (v4, v6) = legit.join().expect("pings");
        (v4, v6, flood)
    });
    assert_eq!(
        legit_v4.received, 100,
        "legitimate IPv4 lost packets during a flood of {flooded}"
    );
    assert_eq!(
        legit_v6.received, 100,
        "legitimate IPv6 lost packets during a flood of {flooded}"
    );
    let snapshot = Snapshot::of_program(program_id).expect("counters");
    let limited = snapshot
        .get(
            lab.if_index(Side::Protected),
            Action::Drop,
            Reason::RateLimit,
        )
        .packets;
    assert!(
        limited > flooded / 2,
        "most of the flood ({flooded}) should be rate-limited, {limited} were"
    );
}
