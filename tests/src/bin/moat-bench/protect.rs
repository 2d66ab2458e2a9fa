//! Protected destinations. Per packet (`BPF_PROG_TEST_RUN`, interleaved with the empty
//! program): the destination stage with 0, 1 and 256 entries. On the veth lab, a random-source
//! UDP flood from two cores at trafgen's full speed against one entry while a legitimate client
//! sends to the same service: the passed rate against the limit, how long after the flood's
//! start the attack is declared and its fingerprint installed, and the legitimate loss before
//! and after the fingerprint.

use std::{
    fmt::Write as _,
    os::fd::AsFd as _,
    path::Path,
    time::{Duration, Instant},
};

use agent_common::stats::{Action, Reason};
use moat::config::{Config, Overrides, Policy};
use moat_tests::{
    Lab, MoatProcess,
    frames::{DST_V4, Frame},
    lab::{LEGIT_V4, PROTECTED_V4},
    program::{LoadedProgram, XDP_DROP, XDP_PASS},
    trafgen::{self, Payload, UdpFlood},
    udp_service::{LEGIT_PPS, SERVICE_PORT, usual_traffic},
};

use crate::{Measured, Options, Table, floor, per_packet};

const SOURCE: &str = "192.0.2.10";
const LIMIT: u64 = 10_000;
const FLOOD_CPUS: u32 = 2;
/// The flood's packets share a source port and a payload (as a reflection's do).
const FLOOD_SRC_PORT: u16 = 1900;

fn policy(lab: &Lab, name: &str, text: &str) -> Policy {
    let path = lab.dir().join(name);
    std::fs::write(&path, format!("interfaces = [\"lo\"]\n{text}")).expect("write the policy");
    Config::from_file(&path)
        .and_then(|c| c.resolve(&Overrides::default()))
        .unwrap_or_else(|e| panic!("the {name} policy: {e}"))
        .policy
}

/// `count` protected /32s, the last one the frames' destination.
fn entries(count: usize, pps: u64) -> String {
    (0..count)
        .map(|i| {
            let destination = if i + 1 == count {
                DST_V4.to_string()
            } else {
                format!("10.1.{}.{}", i / 256, i % 256)
            };
            format!(
                "[[protect]]\nname = \"p{i}\"\ndestination = \"{destination}\"\nprotocol = \"udp\"\n\
                 pps = {pps}\nfingerprints = \"off\"\n"
            )
        })
        .collect()
}

struct Row {
    name: &'static str,
    program: usize,
    frame: Vec<u8>,
    expected: (u32, Action, Reason),
}

fn per_packet_table(lab: &Lab, options: &Options) -> Table {
    let mut programs: Vec<LoadedProgram> = [
        ("none.toml", String::new()),
        ("one.toml", entries(1, 1_000_000_000)),
        ("many.toml", entries(256, 1_000_000_000)),
        ("over.toml", entries(1, 1)),
    ]
    .iter()
    .map(|(name, text)| LoadedProgram::new(&policy(lab, name, text)))
    .collect();
    let to_dst = Frame::udp(SOURCE, 40_000, 53).bytes();
    let pass = (XDP_PASS, Action::Pass, Reason::NoMatch);
    let rows = [
        Row {
            name: "no [[protect]] entry",
            program: 0,
            frame: to_dst.clone(),
            expected: pass,
        },
        Row {
            name: "1 entry, packet to it (conforms)",
            program: 1,
            frame: to_dst.clone(),
            expected: pass,
        },
        Row {
            name: "256 entries, packet to the last (conforms)",
            program: 2,
            frame: to_dst.clone(),
            expected: pass,
        },
        Row {
            name: "256 entries, packet to no protected destination",
            program: 2,
            frame: Frame::udp(SOURCE, 40_000, 53).to("203.0.113.200").bytes(),
            expected: pass,
        },
        Row {
            name: "1 entry, packet over its limit (dst_limit)",
            program: 3,
            frame: to_dst,
            expected: (XDP_DROP, Action::Drop, Reason::DstLimit),
        },
    ];
    // Past the burst of the one over its limit.
    programs[3].run_repeated(&rows[4].frame, 1000);
    let empty = floor::empty_program();
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = rows.iter().map(|_| Default::default()).collect();
    for round in 1..=options.runs {
        for (row, (moat, baseline)) in rows.iter().zip(samples.iter_mut()) {
            let program = &mut programs[row.program];
            let (xdp, action, reason) = row.expected;
            let before = program.snapshot().get(1, action, reason).packets;
            let fd = program.fd();
            moat.push(per_packet::sample(
                fd.as_fd(),
                std::slice::from_ref(&row.frame),
                xdp,
                options,
                "moat",
            ));
            let counted = program.snapshot().get(1, action, reason).packets - before;
            // Over a 1 pps limit, one packet a second still conforms.
            let allowed = if xdp == XDP_DROP {
                options.repeat / 1000
            } else {
                0
            };
            assert!(
                counted + u64::from(allowed) >= u64::from(options.repeat),
                "{}: {counted} counted under {}/{}",
                row.name,
                action.name(),
                reason.name()
            );
            baseline.push(per_packet::sample(
                empty.as_fd(),
                std::slice::from_ref(&row.frame),
                XDP_PASS,
                options,
                "the empty program",
            ));
        }
        println!("protect: per-packet round {round} of {} done", options.runs);
    }
    let mut table = Table::new(&[
        "scenario",
        "moat ns/pkt",
        "empty program",
        "net of the empty program",
        "net, over no entry",
    ]);
    let measured: Vec<(Measured, Measured)> = samples
        .into_iter()
        .map(|(moat, empty)| (Measured::of(moat), Measured::of(empty)))
        .collect();
    let net = |(moat, empty): &(Measured, Measured)| moat.median - empty.median;
    let none = net(&measured[0]);
    for (row, pair) in rows.iter().zip(&measured) {
        table.row(vec![
            row.name.to_string(),
            pair.0.cell(),
            pair.1.cell(),
            format!("{:.1} ns", net(pair)),
            format!("{:+.1} ns", net(pair) - none),
        ]);
    }
    table
}

/// One flood: what the lab saw.
struct FloodRun {
    flood_pps: f64,
    attack_after: f64,
    fingerprint_after: f64,
    legit_before: (u64, u64),
    legit_after: (u64, u64),
    attack_passed_after: u64,
    attack_after_total: u64,
}

fn flood_once(lab: &Lab, config: &Path, duration: Duration) -> FloodRun {
    let (_moat, _) = MoatProcess::start(lab, &["run", "--config", &config.to_string_lossy()]);
    let (service, client) = usual_traffic(lab);
    let flood = UdpFlood {
        source: None,
        destination: PROTECTED_V4.parse().expect("an address"),
        src_port: Some(FLOOD_SRC_PORT),
        dst_port: SERVICE_PORT,
        ttl: 64,
        payload: Payload::Fill(0x4d, 32),
    }
    .write(lab, "protect-flood.trafgen");
    let legit = Lab::addr(LEGIT_V4);
    std::thread::scope(|scope| {
        let start = Instant::now();
        let sender = scope.spawn(|| trafgen::run(lab, &flood, duration, FLOOD_CPUS, None));
        let at_start = (client.sent(), service.received(legit).0);
        let mut attack_after = f64::NAN;
        let fingerprint_after;
        loop {
            let view = MoatProcess::attacks(lab);
            let elapsed = start.elapsed().as_secs_f64();
            if attack_after.is_nan() && view.protected[0].under_attack {
                attack_after = elapsed;
            }
            if view
                .attacks
                .first()
                .is_some_and(|a| a.fingerprint.is_some())
            {
                fingerprint_after = elapsed;
                break;
            }
            assert!(
                elapsed < duration.as_secs_f64(),
                "no fingerprint during the flood"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let at_fingerprint = (client.sent(), service.received(legit));
        let counters = MoatProcess::attacks(lab).protected[0].clone();
        // A window with the fingerprint in force, ending before the flood does.
        let window = Duration::from_secs(2).min(
            duration
                .saturating_sub(start.elapsed())
                .saturating_sub(Duration::from_millis(500)),
        );
        std::thread::sleep(window);
        let at_end = (client.sent(), service.received(legit));
        let counters_end = MoatProcess::attacks(lab).protected[0].clone();
        let sent = sender.join().expect("trafgen");
        let attack_total = (counters_end.fingerprint_packets - counters.fingerprint_packets)
            + (counters_end.over_packets - counters.over_packets)
            + (at_end.1.1 - at_fingerprint.1.1);
        FloodRun {
            flood_pps: sent as f64 / duration.as_secs_f64(),
            attack_after,
            fingerprint_after,
            legit_before: (
                at_fingerprint.0 - at_start.0,
                at_fingerprint.1.0 - at_start.1,
            ),
            legit_after: (at_end.0 - at_fingerprint.0, at_end.1.0 - at_fingerprint.1.0),
            attack_passed_after: at_end.1.1 - at_fingerprint.1.1,
            attack_after_total: attack_total,
        }
    })
}

/// The passed rate of a random flood with nothing to fingerprint: the limit alone.
fn passed_rate(lab: &Lab, config: &Path, duration: Duration) -> (f64, f64) {
    let (_moat, _) = MoatProcess::start(lab, &["run", "--config", &config.to_string_lossy()]);
    let flood = UdpFlood {
        source: None,
        destination: PROTECTED_V4.parse().expect("an address"),
        src_port: None,
        dst_port: SERVICE_PORT,
        ttl: 64,
        payload: Payload::Random(32),
    }
    .write(lab, "protect-random.trafgen");
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| trafgen::run(lab, &flood, duration, FLOOD_CPUS, None));
        std::thread::sleep(duration / 4);
        let (t0, a) = (
            Instant::now(),
            MoatProcess::attacks(lab).protected[0].clone(),
        );
        std::thread::sleep(duration / 2);
        let (t1, b) = (
            Instant::now(),
            MoatProcess::attacks(lab).protected[0].clone(),
        );
        let sent = sender.join().expect("trafgen");
        let seconds = t1.duration_since(t0).as_secs_f64();
        (
            (b.conforming_packets - a.conforming_packets) as f64 / seconds,
            sent as f64 / duration.as_secs_f64(),
        )
    })
}

pub fn run(lab: &Lab, options: &Options) -> String {
    let mut text = String::from("### Protected destinations\n\n");
    let table = per_packet_table(lab, options);
    let _ = write!(
        text,
        "Per packet, `BPF_PROG_TEST_RUN` of a UDP frame ({} packets per run, median and min–max \
         of {} runs, interleaved with the empty program): no list, rule or rate limit, so the \
         rows differ only by the destination stage.\n\n{}\n",
        options.repeat,
        options.runs,
        table.markdown()
    );
    // One entry for the service; the flood's runs take it with fingerprints off, then on.
    let service_entry = |fingerprints: &str| {
        format!(
            "[[protect]]\nname = \"svc\"\ndestination = \"{PROTECTED_V4}\"\nprotocol = \"udp\"\n\
             dst_ports = [{SERVICE_PORT}]\npps = {LIMIT}\nburst_packets = {}\nattack_after = \"1s\"\n\
             attack_end_after = \"2s\"\nfingerprints = \"{fingerprints}\"\n",
            LIMIT / 10
        )
    };
    let limit_config = lab.write_config(&service_entry("off"));
    let duration = Duration::from_secs(6);
    let mut passed = Vec::new();
    let mut offered = Vec::new();
    for run in 1..=options.runs.min(3) {
        let (rate, flood) = passed_rate(lab, &limit_config, duration);
        passed.push(rate);
        offered.push(flood);
        println!("protect: limit run {run}: passed {rate:.0}/s of {flood:.0}/s offered");
    }
    let fingerprint_config = lab.write_config(&service_entry("auto"));
    let mut runs = Vec::new();
    for run in 1..=options.runs.min(3) {
        let result = flood_once(lab, &fingerprint_config, duration);
        println!(
            "protect: fingerprint run {run}: attack after {:.2} s, fingerprint after {:.2} s",
            result.attack_after, result.fingerprint_after
        );
        runs.push(result);
    }
    let passed = Measured::of(passed);
    let offered = Measured::of(offered);
    let mut table = Table::new(&["measure", "median [min–max]"]);
    table.row(vec![
        format!("random-source flood offered (trafgen, {FLOOD_CPUS} cores), packets/s"),
        offered.cell(),
    ]);
    table.row(vec![
        format!("passed by the {LIMIT} pps limit, packets/s (middle half of each flood)"),
        passed.cell(),
    ]);
    table.row(vec![
        "passed ÷ limit".into(),
        format!("{:.3}", passed.median / LIMIT as f64),
    ]);
    let of = |f: &dyn Fn(&FloodRun) -> f64| Measured::of(runs.iter().map(f).collect());
    table.row(vec![
        "reflection-like flood offered, packets/s".into(),
        of(&|r| r.flood_pps).cell(),
    ]);
    table.row(vec![
        "flood start → attack declared (attack_after = 1 s), s".into(),
        of(&|r| r.attack_after).cell(),
    ]);
    table.row(vec![
        "flood start → fingerprint installed, s".into(),
        of(&|r| r.fingerprint_after).cell(),
    ]);
    table.row(vec![
        "legitimate datagrams lost before the fingerprint, %".into(),
        of(&|r| loss(r.legit_before)).cell(),
    ]);
    table.row(vec![
        "legitimate datagrams lost with the fingerprint in force, %".into(),
        of(&|r| loss(r.legit_after)).cell(),
    ]);
    table.row(vec![
        "attack packets passed with the fingerprint in force, %".into(),
        of(&|r| 100.0 * r.attack_passed_after as f64 / r.attack_after_total.max(1) as f64).cell(),
    ]);
    let _ = write!(
        text,
        "On the veth lab: trafgen floods a UDP service on the protected host from random sources \
         on {FLOOD_CPUS} cores for {} s (the program runs on both CPUs); the entry allows \
         {LIMIT} packets/s. The passed rate is read from moat's counters over the middle half of a \
         flood with nothing in common (fingerprints off). For the fingerprint rows the flood's \
         packets share source port {FLOOD_SRC_PORT} and their payload while a legitimate client \
         sends {LEGIT_PPS} datagrams/s from changing ports and lengths; the times are measured \
         from the flood's start by polling `moat attacks` every 50 ms. {} runs each.\n\n{}\n",
        duration.as_secs(),
        runs.len(),
        table.markdown()
    );
    text
}

/// Percent of `(sent, received)` lost.
fn loss((sent, received): (u64, u64)) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    100.0 * sent.saturating_sub(received) as f64 / sent as f64
}
