//! `moat stats`: the program's counters, once or every interval with rates.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use super::{parse_ttl, print_json, unexpected};
use crate::control::{
    client::call,
    protocol::{CounterView, Reply, Request},
};

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Print JSON (the format is documented in README).
    #[arg(long)]
    pub json: bool,
    /// Print again every interval, with rates.
    #[arg(long)]
    pub watch: bool,
    /// The interval of --watch.
    #[arg(long, value_parser = parse_ttl, default_value = "1s", value_name = "DURATION")]
    pub interval: Duration,
}

fn counters(socket: &Path) -> anyhow::Result<Vec<CounterView>> {
    match call(socket, &Request::Stats)? {
        Reply::Stats { counters } => Ok(counters),
        reply => Err(unexpected(reply)),
    }
}

/// A counter with its rates over the last interval, as `moat stats --watch --json` prints it.
#[derive(serde::Serialize)]
struct RatedCounter<'a> {
    #[serde(flatten)]
    counter: &'a CounterView,
    packets_per_second: f64,
    bytes_per_second: f64,
}

pub fn stats(socket: &Path, args: StatsArgs) -> anyhow::Result<()> {
    if !args.watch {
        let counters = counters(socket)?;
        if args.json {
            return print_json(&counters);
        }
        print_counters(&counters, None);
        return Ok(());
    }
    let key = |c: &CounterView| (c.interface.clone(), c.action.clone(), c.reason.clone());
    let mut previous: Option<(Instant, BTreeMap<_, (u64, u64)>)> = None;
    loop {
        let counters = counters(socket)?;
        let now = Instant::now();
        let rates: Vec<(f64, f64)> = counters
            .iter()
            .map(|c| match &previous {
                Some((at, before)) => {
                    let seconds = now.duration_since(*at).as_secs_f64().max(1e-9);
                    let (packets, bytes) = before.get(&key(c)).copied().unwrap_or_default();
                    (
                        c.packets.saturating_sub(packets) as f64 / seconds,
                        c.bytes.saturating_sub(bytes) as f64 / seconds,
                    )
                }
                None => (0.0, 0.0),
            })
            .collect();
        if args.json {
            let rated: Vec<RatedCounter> = counters
                .iter()
                .zip(&rates)
                .map(|(counter, (pps, bps))| RatedCounter {
                    counter,
                    packets_per_second: *pps,
                    bytes_per_second: *bps,
                })
                .collect();
            print_json(&rated)?;
        } else {
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                print!("\x1b[H\x1b[2J");
            }
            print_counters(&counters, Some(&rates));
        }
        std::io::stdout().flush()?;
        previous = Some((
            now,
            counters
                .iter()
                .map(|c| (key(c), (c.packets, c.bytes)))
                .collect(),
        ));
        std::thread::sleep(args.interval);
    }
}

fn print_counters(counters: &[CounterView], rates: Option<&[(f64, f64)]>) {
    print!(
        "{:<16} {:<11} {:<11} {:>14} {:>16}",
        "INTERFACE", "ACTION", "REASON", "PACKETS", "BYTES"
    );
    if rates.is_some() {
        print!(" {:>12} {:>14}", "PACKETS/S", "BITS/S");
    }
    println!();
    for (i, c) in counters.iter().enumerate() {
        print!(
            "{:<16} {:<11} {:<11} {:>14} {:>16}",
            c.interface, c.action, c.reason, c.packets, c.bytes
        );
        if let Some((pps, bps)) = rates.and_then(|r| r.get(i)) {
            print!(" {pps:>12.0} {:>14.0}", bps * 8.0);
        }
        println!();
    }
}
