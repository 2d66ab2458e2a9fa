//! SYN floods on the veth lab: a flood forging a new source per packet (trafgen, one core, full
//! speed) against a real TCP service, answered three ways, interleaved round by round: by
//! moat's XDP SYN cookies (netfilter's synproxy behind them), by the kernel's own SYN cookies
//! (no moat, `tcp_syncookies = 1`: cookies once the listener's queue overflows), and by
//! nftables' synproxy alone (moat's table, no XDP program). For each: the SYN-ACKs that came
//! back per second, legitimate exchanges during the flood (success, connect time p50 / p99),
//! and what the listener counted (queue overflows and drops, kernel cookies sent).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use moat::config::{Config, Overrides, syn_proxy::SynProxy};
use moat_tests::{
    Lab, MoatProcess, Side,
    lab::{LEGIT_V4, PROTECTED_V4},
    tcp_service::{EchoService, TCP_SERVICE_PORT, exchanges, tcp_ext},
    trafgen::{self, SynFlood},
};

use crate::{Measured, Options, Table};

const FLOOD_CPUS: u32 = 1;
const LEGIT_EXCHANGES: usize = 200;
const LEGIT_CLIENTS: usize = 4;
const LISTENER_COUNTERS: [&str; 3] = ["ListenOverflows", "ListenDrops", "SyncookiesSent"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    Xdp,
    KernelCookies,
    NftSynproxy,
}

impl Contender {
    const ALL: [Self; 3] = [Self::KernelCookies, Self::NftSynproxy, Self::Xdp];

    fn name(self) -> &'static str {
        match self {
            Self::Xdp => "moat: XDP SYN cookies (+ nft synproxy for the final ACK)",
            Self::KernelCookies => "kernel SYN cookies, no moat",
            Self::NftSynproxy => "nftables synproxy alone",
        }
    }
}

/// One flood's readings.
struct Round {
    syn_acks_per_second: f64,
    sent_per_second: f64,
    succeeded: usize,
    /// Connect times of the exchanges that succeeded, in milliseconds.
    connects: Vec<f64>,
    /// The listener's counters' growth, in [`LISTENER_COUNTERS`] order.
    listener: Vec<u64>,
}

fn rx_packets(lab: &Lab, side: Side) -> u64 {
    let output = lab
        .netns(side)
        .ip(&["-j", "-s", "link", "show", "dev", lab.interface(side)]);
    let links: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("`ip -j -s link` prints JSON");
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets in `ip -j -s link`")
}

fn syn_proxy(lab: &Lab) -> SynProxy {
    let path = lab.dir().join("syn-bench.toml");
    std::fs::write(
        &path,
        format!("interfaces = [\"lo\"]\n[syn_proxy]\nports = [{TCP_SERVICE_PORT}]\n"),
    )
    .expect("write the config");
    Config::from_file(&path)
        .and_then(|c| c.resolve(&Overrides::default()))
        .expect("the bench's [syn_proxy]")
        .policy
        .syn_proxy
        .expect("[syn_proxy] on")
}

fn flood_once(lab: &Lab, contender: Contender, duration: Duration, state: &Path) -> Round {
    let moat = match contender {
        Contender::Xdp => {
            let config = lab.write_config(&format!("[syn_proxy]\nports = [{TCP_SERVICE_PORT}]\n"));
            Some(
                MoatProcess::start(
                    lab,
                    &["run", "--config", &config.to_string_lossy(), "--no-pin"],
                )
                .0,
            )
        }
        Contender::NftSynproxy => {
            let proxy = syn_proxy(lab);
            lab.netns(Side::Protected)
                .enter(|| moat::netfilter::sync(Some(&proxy), state))
                .expect("install the synproxy table");
            None
        }
        Contender::KernelCookies => None,
    };
    let flood = SynFlood {
        destination: PROTECTED_V4.parse().expect("an address"),
        dst_port: TCP_SERVICE_PORT,
    }
    .write(lab, "syn-bench.trafgen");
    let to = SocketAddr::new(PROTECTED_V4.parse().expect("an address"), TCP_SERVICE_PORT);
    let listener_before = tcp_ext(lab, &LISTENER_COUNTERS);
    let rx_before = rx_packets(lab, Side::Outside);
    let started = Instant::now();
    let (sent, (times, errors)) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| trafgen::run(lab, &flood, duration, FLOOD_CPUS, None));
        std::thread::sleep(Duration::from_millis(500));
        let legit = exchanges(lab, to, LEGIT_EXCHANGES, LEGIT_CLIENTS);
        (flood.join().expect("the flood"), legit)
    });
    let elapsed = started.elapsed().as_secs_f64().max(duration.as_secs_f64());
    let rx = rx_packets(lab, Side::Outside) - rx_before;
    let listener_after = tcp_ext(lab, &LISTENER_COUNTERS);
    match contender {
        // SIGTERM: an unpinned daemon takes its netfilter table with it.
        Contender::Xdp => {
            if let Some(moat) = moat {
                moat.stop(libc::SIGTERM);
            }
        }
        Contender::NftSynproxy => lab
            .netns(Side::Protected)
            .enter(|| moat::netfilter::remove(state))
            .expect("remove the synproxy table"),
        Contender::KernelCookies => {}
    }
    if !errors.is_empty() {
        println!(
            "syn-flood: {}: {} exchanges failed, e.g. {}",
            contender.name(),
            errors.len(),
            errors[0]
        );
    }
    Round {
        syn_acks_per_second: rx as f64 / elapsed,
        sent_per_second: sent as f64 / duration.as_secs_f64(),
        succeeded: times.len(),
        connects: times.iter().map(|t| t.as_secs_f64() * 1000.0).collect(),
        listener: listener_after
            .iter()
            .zip(&listener_before)
            .map(|(a, b)| a - b)
            .collect(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

pub fn run(options: &Options) -> String {
    let lab = Lab::new();
    // The kernel answers a spoofed source only if it has a route to it: everything goes back
    // to the outside end (whose neighbour entry is static).
    lab.netns(Side::Protected)
        .ip(&["route", "add", "default", "via", LEGIT_V4]);
    let _receive = lab.receive_xdp_tx();
    let _service = EchoService::start(
        &lab,
        SocketAddr::new(PROTECTED_V4.parse().expect("an address"), TCP_SERVICE_PORT),
    );
    let state = lab.dir().join("syn-bench-state");
    std::fs::create_dir_all(&state).expect("a state directory");
    let mut rounds: Vec<Vec<Round>> = Contender::ALL.iter().map(|_| Vec::new()).collect();
    for round in 1..=options.runs {
        for (contender, results) in Contender::ALL.iter().zip(rounds.iter_mut()) {
            results.push(flood_once(&lab, *contender, options.flood, &state));
        }
        println!("syn-flood: round {round} of {} done", options.runs);
    }
    let mut table = Table::new(&[
        "answered by",
        "SYNs sent/s",
        "SYN-ACKs back/s",
        "legit exchanges OK",
        "connect p50 ms",
        "connect p99 ms",
        "listener overflows / drops / kernel cookies",
    ]);
    for (contender, results) in Contender::ALL.iter().zip(&rounds) {
        let mut connects: Vec<f64> = results.iter().flat_map(|r| r.connects.clone()).collect();
        connects.sort_by(f64::total_cmp);
        let succeeded: usize = results.iter().map(|r| r.succeeded).sum();
        let listener: Vec<String> = (0..LISTENER_COUNTERS.len())
            .map(|i| Measured::of(results.iter().map(|r| r.listener[i] as f64).collect()).cell())
            .collect();
        table.row(vec![
            contender.name().to_string(),
            Measured::of(results.iter().map(|r| r.sent_per_second).collect()).cell(),
            Measured::of(results.iter().map(|r| r.syn_acks_per_second).collect()).cell(),
            format!("{succeeded} of {}", LEGIT_EXCHANGES * results.len()),
            format!("{:.2}", percentile(&connects, 0.5)),
            format!("{:.2}", percentile(&connects, 0.99)),
            listener.join(" / "),
        ]);
    }
    let mut text = String::new();
    let _ = write!(
        text,
        "### SYN floods\n\nA random-source SYN flood from trafgen ({FLOOD_CPUS} core, full speed, \
         {} s per run, {} runs, contenders interleaved) against a TCP echo service, while \
         {LEGIT_CLIENTS} clients make {LEGIT_EXCHANGES} exchanges (connect, send a line, read it \
         back; connect timeout 10 s). SYN-ACKs back: frames the outside end received per \
         second. Listener counters: growth per run of TcpExt ListenOverflows, ListenDrops, \
         SyncookiesSent in the protected namespace (median and min–max).\n\n{}\n",
        options.flood.as_secs(),
        options.runs,
        table.markdown()
    );
    text
}
