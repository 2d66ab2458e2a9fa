//! Flood: trafgen (netsniff-ng) sends minimum-size UDP frames at its maximum rate from one core
//! into the lab's veth pair while legitimate pings and a TCP transfer run beside it. The same
//! blocklist is enforced by moat (native and generic XDP) and by nftables (a `netdev` ingress
//! chain, and a `raw`-priority prerouting chain), one at a time.
//!
//! Measured per run: packets the filter dropped per second (its own counter), attack packets
//! that reached the protected host's UDP stack (`/proc/net/snmp` in its namespace), legitimate
//! pings lost, the TCP transfer's throughput, and the CPU time the receiving side spent in
//! softirq (`/proc/stat`, all CPUs) per million packets dropped.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_common::stats::{Action, Reason};
use moat::program::counters::Snapshot;
use moat_tests::{
    Lab, MoatProcess, Side,
    lab::{LEGIT_V4, PROTECTED_V4},
    traffic::ping,
    trafgen::{self, Payload, UdpFlood},
};

use crate::{Measured, Options, list::PrefixList};

/// The one attacker of the first variant.
const ATTACKER: &str = "198.51.100.7";
/// The lab's own /24 (protected and legitimate hosts): the only IPv4 space the flood list
/// leaves open, so that random sources are all blocked.
const LAB_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);
const TCP_PORT: u16 = 5001;
/// Legitimate pings per second (10 ms apart).
const PINGS_PER_SECOND: u64 = 100;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    MoatNative,
    MoatGeneric,
    NftIngress,
    NftRaw,
}

impl Contender {
    const ALL: [Self; 4] = [
        Self::MoatNative,
        Self::MoatGeneric,
        Self::NftIngress,
        Self::NftRaw,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::MoatNative => "moat, XDP native",
            Self::MoatGeneric => "moat, XDP generic",
            Self::NftIngress => "nftables, netdev ingress",
            Self::NftRaw => "nftables, prerouting (raw)",
        }
    }

    fn is_nft(self) -> bool {
        matches!(self, Self::NftIngress | Self::NftRaw)
    }
}

/// The filter in place, and how to read its drop counter.
enum Filter {
    Moat {
        daemon: MoatProcess,
        program_id: u32,
        if_index: u32,
    },
    Nft {
        family: &'static str,
    },
}

impl Filter {
    fn dropped(&self, lab: &Lab) -> u64 {
        match self {
            Self::Moat {
                program_id,
                if_index,
                ..
            } => {
                Snapshot::of_program(*program_id)
                    .expect("moat's counters")
                    .get(*if_index, Action::Drop, Reason::Blocklist)
                    .packets
            }
            Self::Nft { family } => nft_counter(lab, family),
        }
    }

    fn remove(self, lab: &Lab) {
        match self {
            Self::Moat { daemon, .. } => {
                let (status, log) = daemon.stop(libc::SIGTERM);
                assert!(status.success(), "moat failed:\n{log}");
                let bpffs = lab.bpffs().to_string_lossy().into_owned();
                MoatProcess::cli(lab, &["down", "--bpffs", &bpffs]).ok("moat down");
                let _ = std::fs::remove_dir_all(lab.state_dir());
            }
            Self::Nft { family } => {
                nft(lab, &["delete", "table", family, "moat_bench"]);
            }
        }
    }
}

fn nft(lab: &Lab, args: &[&str]) -> String {
    let out = lab
        .netns(Side::Protected)
        .command("nft")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nft (nftables): {e}"));
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packets counted by every rule of the bench's nft table.
fn nft_counter(lab: &Lab, family: &str) -> u64 {
    let json: serde_json::Value =
        serde_json::from_str(&nft(lab, &["-j", "list", "table", family, "moat_bench"]))
            .expect("nft -j prints JSON");
    let mut packets = 0;
    for item in json["nftables"].as_array().into_iter().flatten() {
        for expr in item["rule"]["expr"].as_array().into_iter().flatten() {
            packets += expr["counter"]["packets"].as_u64().unwrap_or(0);
        }
    }
    packets
}

/// The flood list: the benchmark list plus every IPv4 prefix outside the lab's /24.
fn flood_list(lab: &Lab, list: &PrefixList) -> (PathBuf, Vec<String>) {
    let mut entries: Vec<String> = std::fs::read_to_string(&list.path)
        .expect("the list")
        .lines()
        .map(str::to_string)
        .collect();
    // The complement of LAB_NET/24: for each bit of its prefix, the half it is not in.
    let lab_net = u32::from(LAB_NET);
    for len in 1..=24u32 {
        let flipped = (lab_net ^ (1 << (32 - len))) & (u32::MAX << (32 - len));
        entries.push(format!("{}/{len}", Ipv4Addr::from(flipped)));
    }
    let path = lab.dir().join("flood-list.txt");
    std::fs::write(&path, entries.join("\n") + "\n").expect("write the flood list");
    (path, entries)
}

fn install(lab: &Lab, contender: Contender, list_path: &Path, entries: &[String]) -> Filter {
    let interface = lab.interface(Side::Protected);
    match contender {
        Contender::MoatNative | Contender::MoatGeneric => {
            let mode = if contender == Contender::MoatNative {
                "native"
            } else {
                "generic"
            };
            let config = lab.write_config(&format!(
                "xdp_mode = \"{mode}\"\n[blocklist]\nfiles = [\"{}\"]\n",
                list_path.display()
            ));
            let daemon = MoatProcess::spawn(lab, &["run", "--config", &config.to_string_lossy()]);
            daemon.wait_for_log("moat is enforcing", 1);
            let (program_id, attached) = lab.xdp(Side::Protected).expect("moat attached");
            assert_eq!(attached, mode, "attached in {mode} mode");
            Filter::Moat {
                daemon,
                program_id,
                if_index: lab.if_index(Side::Protected),
            }
        }
        Contender::NftIngress | Contender::NftRaw => {
            let (v4, v6): (Vec<&String>, Vec<&String>) =
                entries.iter().partition(|e| !e.contains(':'));
            let join = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",");
            let (family, hook) = if contender == Contender::NftIngress {
                (
                    "netdev",
                    format!("type filter hook ingress device \"{interface}\" priority -500;"),
                )
            } else {
                (
                    "inet",
                    "type filter hook prerouting priority raw;".to_string(),
                )
            };
            let ruleset = format!(
                "table {family} moat_bench {{\n\
                 set block4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}\n\
                 set block6 {{ type ipv6_addr; flags interval; auto-merge; elements = {{ {} }} }}\n\
                 chain filter {{ {hook} policy accept;\n\
                 ip saddr @block4 counter drop\n\
                 ip6 saddr @block6 counter drop\n}}\n}}\n",
                join(&v4),
                join(&v6)
            );
            let file = lab.dir().join("flood.nft");
            std::fs::write(&file, ruleset).expect("write the ruleset");
            let started = Instant::now();
            nft(lab, &["-f", &file.to_string_lossy()]);
            println!(
                "flood: nft loaded {} entries in {:.1} s",
                entries.len(),
                started.elapsed().as_secs_f64()
            );
            Filter::Nft { family }
        }
    }
}

/// softirq time of all CPUs so far, in milliseconds.
fn softirq_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .expect("the cpu line")
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().expect("a number"))
        .collect();
    // user nice system idle iowait irq softirq …, in USER_HZ ticks.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    fields[6] * 1000.0 / hz
}

/// Legitimate TCP: a client at LEGIT_V4 sends to the protected host for `duration`; bytes
/// received.
fn tcp_transfer(lab: &Lab, duration: Duration) -> u64 {
    let listener = lab.netns(Side::Protected).enter(|| {
        TcpListener::bind(SocketAddr::new(Lab::addr(PROTECTED_V4), TCP_PORT)).expect("listen")
    });
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let (mut stream, peer) = listener.accept().expect("accept");
            // The outside end's address on the protected /24 is the legitimate host's, so the
            // kernel picks it as the source; the transfer is only legitimate if it did.
            assert_eq!(peer.ip(), Lab::addr(LEGIT_V4), "the transfer's source");
            let mut buffer = vec![0u8; 1 << 16];
            let mut total = 0u64;
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            total
        });
        lab.netns(Side::Outside).enter(|| {
            let mut stream = TcpStream::connect(SocketAddr::new(Lab::addr(PROTECTED_V4), TCP_PORT))
                .expect("connect to the protected host");
            let chunk = vec![0x5au8; 1 << 16];
            let start = Instant::now();
            while start.elapsed() < duration {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        server.join().expect("server")
    })
}

/// One flood against one filter: first alone, for the filter's rate and CPU cost; then again
/// beside legitimate pings and a TCP transfer, for what they lose (the transfer's own softirq
/// work would otherwise be counted as the filter's).
struct Run {
    offered_pps: f64,
    dropped_pps: f64,
    cpu_ms_per_mpkt: f64,
    leaked: u64,
    pings_sent: u64,
    pings_lost: u64,
    tcp_mbit: f64,
}

fn flood_once(lab: &Lab, filter: &Filter, trafgen_config: &Path, duration: Duration) -> Run {
    let seconds = duration.as_secs_f64();
    let dropped_before = filter.dropped(lab);
    let arrived_before = trafgen::udp_arrived(lab);
    let softirq_before = softirq_ms();
    let sent = trafgen::run(lab, trafgen_config, duration, 1, None);
    let softirq = softirq_ms() - softirq_before;
    let dropped = filter.dropped(lab) - dropped_before;

    // The legitimate traffic starts with the flood and ends before it.
    let legit_time = duration.mul_f64(0.8);
    let (pings, tcp_bytes) = std::thread::scope(|scope| {
        let pings = scope.spawn(|| {
            let count = (legit_time.as_secs_f64() * PINGS_PER_SECOND as f64) as u32;
            ping(lab, LEGIT_V4, PROTECTED_V4, count)
        });
        let tcp = scope.spawn(|| tcp_transfer(lab, legit_time));
        trafgen::run(lab, trafgen_config, duration, 1, None);
        (pings.join().expect("ping"), tcp.join().expect("tcp"))
    });
    let run = Run {
        offered_pps: sent as f64 / seconds,
        dropped_pps: dropped as f64 / seconds,
        cpu_ms_per_mpkt: if dropped == 0 {
            f64::NAN
        } else {
            softirq / (dropped as f64 / 1e6)
        },
        leaked: trafgen::udp_arrived(lab) - arrived_before,
        pings_sent: pings.transmitted,
        pings_lost: pings.transmitted - pings.received,
        tcp_mbit: tcp_bytes as f64 * 8.0 / 1e6 / legit_time.as_secs_f64(),
    };
    println!(
        "flood: offered {:.0} pkt/s, dropped {:.0} pkt/s, {:.0} ms softirq per Mpkt; beside \
         the legitimate traffic: leaked {}, pings lost {} of {}, TCP {:.0} Mbit/s",
        run.offered_pps,
        run.dropped_pps,
        run.cpu_ms_per_mpkt,
        run.leaked,
        run.pings_lost,
        run.pings_sent,
        run.tcp_mbit
    );
    run
}

pub fn run(lab: &Lab, list: &PrefixList, options: &Options) -> String {
    let (list_path, entries) = flood_list(lab, list);
    let mut text = format!(
        "### Flood\n\ntrafgen (one core, 60-byte UDP frames) floods the protected end of the veth \
         pair for {:.0} s with nothing else running (dropped pkt/s, softirq CPU), then {:.0} s more \
         beside {PINGS_PER_SECOND} pings/s and a TCP transfer from the legitimate host (leaks, \
         losses, throughput); {} runs per filter. Every filter enforces the same list: the \
         {}-prefix list plus every IPv4 prefix outside the lab's /24 ({} entries), so that random \
         sources are all blocked. Medians, min–max in brackets; leaks and losses are totals.\n\n",
        options.flood.as_secs_f64(),
        options.flood.as_secs_f64(),
        options.runs,
        list.count,
        entries.len()
    );
    for random in [false, true] {
        let config = UdpFlood {
            source: (!random).then(|| ATTACKER.parse().expect("an address")),
            destination: PROTECTED_V4.parse().expect("an address"),
            src_port: Some(40000),
            dst_port: 9,
            ttl: 64,
            payload: Payload::Fill(0, 18),
        }
        .write(
            lab,
            if random {
                "random.trafgen"
            } else {
                "one.trafgen"
            },
        );
        let mut rows = Vec::new();
        for contender in Contender::ALL {
            println!(
                "flood: {} sources, {}",
                if random { "random" } else { "one" },
                contender.name()
            );
            let filter = install(lab, contender, &list_path, &entries);
            let runs: Vec<Run> = (0..options.runs)
                .map(|_| flood_once(lab, &filter, &config, options.flood))
                .collect();
            filter.remove(lab);
            rows.push((contender, runs));
        }
        let best_nft_cpu = rows
            .iter()
            .filter(|(c, _)| c.is_nft())
            .map(|(_, runs)| Measured::of(runs.iter().map(|r| r.cpu_ms_per_mpkt).collect()).median)
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            text,
            "**{}**\n\n| filter | offered pkt/s | dropped pkt/s | softirq CPU ms per Mpkt dropped | \
             CPU ÷ best nftables | attack leaked | legit pings lost | TCP Mbit/s beside the flood |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- |",
            if random {
                "Random sources over the whole IPv4 space (trafgen `drnd()`)"
            } else {
                "One attacker address"
            }
        );
        for (contender, runs) in &rows {
            let m = |f: fn(&Run) -> f64| Measured::of(runs.iter().map(f).collect());
            let cpu = m(|r| r.cpu_ms_per_mpkt);
            let total = |f: fn(&Run) -> u64| runs.iter().map(f).sum::<u64>();
            let _ = writeln!(
                text,
                "| {} | {} | {} | {} | {:.2}× | {} | {} of {} | {} |",
                contender.name(),
                m(|r| r.offered_pps).cell(),
                m(|r| r.dropped_pps).cell(),
                cpu.cell(),
                cpu.median / best_nft_cpu,
                total(|r| r.leaked),
                total(|r| r.pings_lost),
                total(|r| r.pings_sent),
                m(|r| r.tcp_mbit).cell(),
            );
        }
        text.push('\n');
    }
    text
}
