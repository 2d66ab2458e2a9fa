//! `cargo xtask lab`: moat in a throwaway veth lab. A legitimate client pings the protected host
//! while a blocklisted attacker floods it over IPv4 and IPv6; the counters read back from the
//! kernel show what passed and what was dropped. Everything is removed at the end.

use std::time::Duration;

use agent_common::stats::{Action, Reason};
use moat::program::counters::Snapshot;
use moat_tests::{
    Lab, MoatProcess, Side,
    lab::{
        ATTACKER_NET_V4, ATTACKER_NET_V6, ATTACKER_V4, ATTACKER_V6, LEGIT_V4, LEGIT_V6,
        PROTECTED_V4, PROTECTED_V6,
    },
    traffic::{ping, udp_flood},
};

/// Flood size per family: bounded in count and time.
const FLOOD_PACKETS: u64 = 200_000;
const FLOOD_MAX_TIME: Duration = Duration::from_secs(10);
const FLOOD_PAYLOAD: usize = 64;
const LEGIT_PINGS: u32 = 50;

fn main() {
    let lab = Lab::new();
    let protected_if = lab.interface(Side::Protected).to_string();
    println!(
        "lab: namespace {} ({protected_if}: {PROTECTED_V4}, {PROTECTED_V6})",
        lab.netns(Side::Protected).name()
    );
    println!(
        "     namespace {} ({}: client {LEGIT_V4} {LEGIT_V6}, attacker {ATTACKER_V4} {ATTACKER_V6})",
        lab.netns(Side::Outside).name(),
        lab.interface(Side::Outside)
    );
    println!(
        "moat run --iface {protected_if} --block {ATTACKER_NET_V6}  (embedded default config)"
    );
    let (moat, program_id) = MoatProcess::start(
        &lab,
        &["run", "--iface", &protected_if, "--block", ATTACKER_NET_V6],
    );
    let (_, mode) = lab.xdp(Side::Protected).expect("attached");
    println!("moat attached: XDP program {program_id}, {mode} mode");
    let add = [
        "block",
        "add",
        ATTACKER_NET_V4,
        "--ttl",
        "10m",
        "--comment",
        "lab attacker",
    ];
    println!("moat {}", add.join(" "));
    print!("{}", MoatProcess::cli(&lab, &add).ok("moat block add"));
    println!("moat block list");
    println!(
        "{}",
        MoatProcess::cli(&lab, &["block", "list"]).ok("moat block list")
    );

    let (legit_v4, legit_v6, flood_v4, flood_v6) = std::thread::scope(|scope| {
        let legit = scope.spawn(|| {
            (
                ping(&lab, LEGIT_V4, PROTECTED_V4, LEGIT_PINGS),
                ping(&lab, LEGIT_V6, PROTECTED_V6, LEGIT_PINGS),
            )
        });
        let flood_v4 = udp_flood(
            &lab,
            Lab::addr(ATTACKER_V4),
            Lab::addr(PROTECTED_V4),
            FLOOD_PACKETS,
            FLOOD_PAYLOAD,
            FLOOD_MAX_TIME,
        );
        let flood_v6 = udp_flood(
            &lab,
            Lab::addr(ATTACKER_V6),
            Lab::addr(PROTECTED_V6),
            FLOOD_PACKETS,
            FLOOD_PAYLOAD,
            FLOOD_MAX_TIME,
        );
        let (legit_v4, legit_v6) = legit.join().expect("legitimate pings");
        (legit_v4, legit_v6, flood_v4, flood_v6)
    });
    let attacker_ping = ping(&lab, ATTACKER_V4, PROTECTED_V4, 5);

    println!("traffic sent from the outside:");
    println!(
        "  client   {LEGIT_V4:<16} ping      {:>7} sent, {:>7} answered",
        legit_v4.transmitted, legit_v4.received
    );
    println!(
        "  client   {LEGIT_V6:<16} ping      {:>7} sent, {:>7} answered",
        legit_v6.transmitted, legit_v6.received
    );
    for (address, (sent, took)) in [(ATTACKER_V4, flood_v4), (ATTACKER_V6, flood_v6)] {
        println!(
            "  attacker {address:<16} UDP flood {sent:>7} sent in {:.2} s ({:.0} packets/s)",
            took.as_secs_f64(),
            sent as f64 / took.as_secs_f64()
        );
    }
    println!(
        "  attacker {ATTACKER_V4:<16} ping      {:>7} sent, {:>7} answered\n",
        attacker_ping.transmitted, attacker_ping.received
    );

    let snapshot = Snapshot::of_program(program_id).expect("read moat's counters");
    let if_index = lab.if_index(Side::Protected);
    println!("moat's counters on {protected_if} (read from the kernel's per-CPU map):");
    println!(
        "  {:<6} {:<10} {:>10} {:>12}",
        "action", "reason", "packets", "bytes"
    );
    for row in snapshot
        .rows
        .iter()
        .filter(|r| r.if_index == Some(if_index))
    {
        println!(
            "  {:<6} {:<10} {:>10} {:>12}",
            row.action.name(),
            row.reason.name(),
            row.counter.packets,
            row.counter.bytes
        );
    }
    let dropped = snapshot
        .get(if_index, Action::Drop, Reason::Blocklist)
        .packets;
    let attack_sent = flood_v4.0 + flood_v6.0 + attacker_ping.transmitted;
    println!(
        "\n  dropped {dropped} of the {attack_sent} attack packets the attacker's kernel sent \
         (a gap is what the veth queue itself dropped under the flood, before XDP)"
    );

    println!("moat status");
    println!("{}", MoatProcess::cli(&lab, &["status"]).ok("moat status"));
    let (status, log) = moat.stop(libc::SIGTERM);
    println!("moat stopped ({status}); its log:\n{log}");
    let still_enforcing = lab.xdp(Side::Protected).is_some();
    println!("XDP program still attached after the daemon stopped: {still_enforcing}");
    let bpffs = lab.bpffs().to_string_lossy().into_owned();
    println!("moat down");
    print!(
        "{}",
        MoatProcess::cli(&lab, &["down", "--bpffs", &bpffs]).ok("moat down")
    );
    let detached = lab.xdp(Side::Protected).is_none();
    let legit_ok =
        legit_v4.received == legit_v4.transmitted && legit_v6.received == legit_v6.transmitted;
    let blocked_ok = attacker_ping.received == 0 && dropped > 0;
    println!(
        "result: legitimate traffic {}, attack {}",
        if legit_ok { "all answered" } else { "LOST" },
        if blocked_ok { "dropped" } else { "NOT DROPPED" }
    );
    drop(lab);
    println!("lab removed");
    if !(legit_ok && blocked_ok && status.success() && still_enforcing && detached) {
        std::process::exit(1);
    }
}
