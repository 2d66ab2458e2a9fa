//! End to end on a veth pair: protected destinations under floods that forge a new source for
//! every packet (trafgen, both CPUs, full speed). The aggregate limit holds the passed rate; a
//! flood whose packets share attributes is fingerprinted and dropped as `fingerprint` while
//! legitimate traffic to the same service keeps flowing; a flood with nothing in common gets no
//! fingerprint and the log says why; attacks start and end in the log and in `moat attacks`.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use moat::{
    control::protocol::{AttackView, AttacksView},
    program::counters::Snapshot,
};
use moat_tests::{
    Lab, MoatProcess,
    heavy::heavy,
    lab::{LEGIT_V4, PROTECTED_OTHER_V4, PROTECTED_V4},
    traffic::ping,
    trafgen::{self, Payload, UdpFlood},
    udp_service::{LEGIT_PPS, SERVICE_PORT, UdpClient, UdpService, usual_traffic},
};

const LIMIT: u64 = 2000;
/// Half a second's worth: an emulated guest's clock can stand still for tens of milliseconds,
/// and a burst shorter than that would cost allowance the rate is owed.
const BURST: u64 = LIMIT / 2;
/// How long each flood runs, and the cores trafgen sends from.
const FLOOD: Duration = Duration::from_secs(10);
const FLOOD_CPUS: u32 = 2;
/// One of the legitimate clients' payload lengths.
const FLOOD_PAYLOAD: usize = 32;

/// moat protecting the service (fingerprints on, by default), and its program's id.
fn start(lab: &Lab) -> (MoatProcess, u32) {
    let config = lab.write_config(&format!(
        "[[protect]]\nname = \"svc\"\ndestination = \"{PROTECTED_V4}\"\nprotocol = \"udp\"\n\
         dst_ports = [{SERVICE_PORT}]\npps = {LIMIT}\nburst_packets = {BURST}\n\
         attack_after = \"1s\"\nattack_end_after = \"2s\"\n"
    ));
    MoatProcess::start(lab, &["run", "--config", &config.to_string_lossy()])
}

fn attacks(lab: &Lab) -> AttacksView {
    MoatProcess::attacks(lab)
}

/// moat, the service and a legitimate client, after the baseline of the service's usual
/// traffic ([`usual_traffic`]).
fn start_with_usual_traffic(lab: &Lab) -> ((MoatProcess, u32), UdpService, UdpClient) {
    let moat = start(lab);
    let (service, client) = usual_traffic(lab);
    (moat, service, client)
}

/// A flood to the service from random sources, as a trafgen configuration.
fn flood_config(
    lab: &Lab,
    name: &str,
    src_port: Option<u16>,
    payload: Payload,
) -> std::path::PathBuf {
    UdpFlood {
        source: None,
        destination: PROTECTED_V4.parse().expect("an address"),
        src_port,
        dst_port: SERVICE_PORT,
        ttl: 64,
        payload,
    }
    .write(lab, name)
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn seconds_between(from: &str, to: &str) -> f64 {
    let at = |t: &str| humantime::parse_rfc3339(t).unwrap_or_else(|e| panic!("{t}: {e}"));
    at(to)
        .duration_since(at(from))
        .unwrap_or_default()
        .as_secs_f64()
}

/// A flood from random sources, ports and payloads: nothing to fingerprint (its length and TTL
/// are legitimate traffic's too). The passed rate is the limit ±10 %, pings to another
/// address of the host lose nothing, the attack is logged with how spread its sources are,
/// and the log says why no fingerprint was found.
#[test]
fn a_random_flood_is_held_to_the_limit_and_gets_no_fingerprint() {
    let _heavy = heavy();
    let lab = Lab::new();
    let ((moat, program_id), service, _client) = start_with_usual_traffic(&lab);

    let config = flood_config(&lab, "random.trafgen", None, Payload::Random(FLOOD_PAYLOAD));
    std::thread::scope(|scope| {
        let flood = scope.spawn(|| trafgen::run(&lab, &config, FLOOD, FLOOD_CPUS, None));
        std::thread::sleep(Duration::from_millis(1500));
        // Straight from the maps: a CLI round trip takes long in an emulated guest.
        let read = |lab: &Lab| {
            let counts = Snapshot::of_program(program_id)
                .expect("moat's counters")
                .protected(0);
            (Instant::now(), counts, trafgen::udp_arrived(lab))
        };
        let (t0, before, arrived_before) = read(&lab);
        let pings = ping(&lab, LEGIT_V4, PROTECTED_OTHER_V4, 200);
        let (t1, after, arrived_after) = read(&lab);
        let sent_by_trafgen = flood.join().expect("trafgen");

        let seconds = t1.duration_since(t0).as_secs_f64();
        let passed = (after.conforming.packets - before.conforming.packets) as f64 / seconds;
        let over = (after.over.packets - before.over.packets) as f64 / seconds;
        let arrived = (arrived_after - arrived_before) as f64 / seconds;
        eprintln!(
            "random flood: trafgen sent {sent_by_trafgen} in {FLOOD:?}; over {seconds:.1} s moat \
         passed {passed:.0}/s (limit {LIMIT}/s, legitimate {LEGIT_PPS}/s among them), dropped \
         {over:.0}/s; the host's UDP stack saw {arrived:.0}/s"
        );
        let band = LIMIT as f64 * 0.9..=LIMIT as f64 * 1.1;
        assert!(
            band.contains(&passed),
            "moat passed {passed:.0}/s, want {LIMIT} ± 10 %"
        );
        // What passed reached the host (an emulated guest's stack may drop some of it for
        // want of CPU), and nothing more did.
        assert!(
            arrived > passed * 0.5 && arrived < passed * 1.05,
            "the host received {arrived:.0}/s of the {passed:.0}/s moat passed"
        );
        assert!(
            over > passed * 5.0,
            "the flood ({over:.0}/s over) was not well above the limit"
        );
        assert_eq!(
            pings.received, pings.transmitted,
            "pings to another address: {pings:?}"
        );
    });

    let log = moat.wait_for_log("no attack fingerprint", 1);
    let started = log
        .lines()
        .find(|l| l.contains("attack started"))
        .unwrap_or_else(|| panic!("no \"attack started\" line:\n{log}"));
    assert!(
        started.contains("protect=svc") || started.contains("protect=\"svc\""),
        "{started}"
    );
    let field = |name: &str| -> u64 {
        started
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {started}"))
    };
    let (sampled, distinct) = (field("sources_sampled"), field("distinct_sources"));
    assert!(
        sampled >= 10 && distinct * 10 >= sampled * 9,
        "a random-source flood looks spread: {started}"
    );
    let view = attacks(&lab);
    let attack = &view.attacks[0];
    assert!(attack.fingerprint.is_none(), "{attack:?}");
    assert!(
        attack
            .no_fingerprint
            .as_deref()
            .is_some_and(|why| why.contains("closest") || why.contains("share no")),
        "{attack:?}"
    );

    // The flood is over: the attack ends after attack_end_after (2 s), and is logged.
    wait_for("the attack to end", Duration::from_secs(6), || {
        attacks(&lab).attacks[0].ended.is_some()
    });
    moat.wait_for_log("attack ended", 1);
    assert!(
        service.received(Lab::addr(LEGIT_V4)).0 > 0,
        "the legitimate client reached the service"
    );
}

/// A reflection-like flood: random sources, but one source port and one payload. A fingerprint
/// is installed within 3 s of the attack's start; after that at most 1 % of the attack passes
/// and at most 1 % of the legitimate traffic to the same service is lost; when the flood stops
/// the fingerprint goes within attack_end_after + 2 s.
#[test]
fn a_flood_sharing_attributes_is_fingerprinted_and_legitimate_traffic_flows() {
    let _heavy = heavy();
    let lab = Lab::new();
    let ((moat, _), service, client) = start_with_usual_traffic(&lab);

    let config = flood_config(
        &lab,
        "reflection.trafgen",
        Some(1900),
        Payload::Fill(0x4d, FLOOD_PAYLOAD),
    );
    std::thread::scope(|scope| {
        let flood = scope.spawn(|| trafgen::run(&lab, &config, FLOOD, FLOOD_CPUS, None));
        let mut fingerprinted: Option<AttackView> = None;
        let start = Instant::now();
        let log = || {
            moat.log_text()
                .lines()
                .filter(|l| l.contains("attack") || l.contains("fingerprint"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        while fingerprinted.is_none() {
            fingerprinted = attacks(&lab)
                .attacks
                .into_iter()
                .find(|a| a.fingerprint.is_some());
            assert!(
                start.elapsed() < FLOOD - Duration::from_secs(3),
                "no fingerprint while the flood ran; moat's log:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let attack = fingerprinted.expect("an attack with a fingerprint");
        let installed_after = seconds_between(
            &attack.started,
            attack
                .fingerprint_installed
                .as_deref()
                .expect("installed at"),
        );
        eprintln!("fingerprint installed {installed_after:.3} s after the attack's start");
        assert!(
            installed_after <= 3.0,
            "installed {installed_after} s after the start: {attack:?}; moat's log:\n{}",
            log()
        );
        assert_eq!(
            attack.fingerprint.as_deref(),
            Some("src_port=1900"),
            "{attack:?}"
        );

        // A window with the fingerprint in force.
        let legit = Lab::addr(LEGIT_V4);
        let read = |lab: &Lab| {
            let entry = attacks(lab).protected[0].clone();
            let (from_legit, from_others) = service.received(legit);
            (entry, from_legit, from_others, client.sent())
        };
        std::thread::sleep(Duration::from_millis(300));
        let (before, legit_before, attack_before, sent_before) = read(&lab);
        std::thread::sleep(Duration::from_secs(2));
        let (after, legit_after, attack_after, sent_after) = read(&lab);
        let dropped = (after.fingerprint_packets - before.fingerprint_packets)
            + (after.over_packets - before.over_packets);
        let attack_passed = attack_after - attack_before;
        let legit_sent_window = sent_after - sent_before;
        let legit_got = legit_after - legit_before;
        eprintln!(
            "reflection flood, fingerprint in force: {dropped} attack packets dropped, {attack_passed} \
         passed; legitimate {legit_got} of {legit_sent_window} received"
        );
        assert!(dropped > 10_000, "the flood was running: {dropped} dropped");
        assert!(
            attack_passed * 100 <= dropped + attack_passed,
            "{attack_passed} attack packets passed of {}",
            dropped + attack_passed
        );
        // In flight at either end of the window: a datagram or two either way.
        assert!(
            legit_got * 100 + 200 >= legit_sent_window * 99,
            "legitimate traffic lost: {legit_got} of {legit_sent_window} received"
        );
        let _ = flood.join().expect("trafgen");
    });

    // The flood is over: the fingerprint goes within attack_end_after (2 s) + 2 s.
    let took = wait_for("the fingerprint to go", Duration::from_secs(8), || {
        attacks(&lab).attacks[0].ended.is_some()
    });
    assert!(took <= Duration::from_secs(6), "{took:?}");
    let log = moat.wait_for_log("attack ended", 1);
    assert!(log.contains("attack fingerprint installed"), "{log}");
    let view = attacks(&lab);
    assert!(!view.protected[0].under_attack);
    assert_eq!(view.protected[0].attacks_total, 1);
    // Once ended, its packets are no longer dropped as `fingerprint`.
    let before = view.protected[0].fingerprint_packets;
    let one = trafgen::run(
        &lab,
        &UdpFlood {
            source: Some(Ipv4Addr::new(198, 51, 100, 9)),
            destination: PROTECTED_V4.parse().expect("an address"),
            src_port: Some(1900),
            dst_port: SERVICE_PORT,
            ttl: 64,
            payload: Payload::Fill(0x4d, FLOOD_PAYLOAD),
        }
        .write(&lab, "after.trafgen"),
        Duration::from_millis(200),
        1,
        Some(500),
    );
    assert!(one > 0);
    assert_eq!(attacks(&lab).protected[0].fingerprint_packets, before);
}
