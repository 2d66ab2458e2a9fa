//! The fleet: real `moat run` (release) on two labs joined to one nats-server in the fleet
//! lab's hub.
//!
//! - propagation: a block added on A (through its control socket) until B has applied it, from
//!   B's log, over 1,000 adds; p50 and p99;
//! - joining: B started with an empty state into a bucket of 100,000 entries, until it has
//!   applied them all (its "fleet reconciled" line), against the spawn;
//! - watching: B's CPU while A makes 1,000 changes a second for 10 s.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use moat_tests::{MoatProcess, control_socket, fleet_lab::FleetLab};
use serde_json::Value;

use crate::{Measured, Options, Table};

const PROPAGATION_ADDS: usize = 1_000;
const JOIN_ENTRIES: usize = 100_000;
const WATCH_RATE: u32 = 1_000;
const WATCH_TIME: Duration = Duration::from_secs(10);
/// Addresses per `block add` request while B watches.
const WATCH_BATCH: usize = 10;
/// Room for everything the measures add.
const NODE_CONFIG: &str = "runtime_entries = 262144";
const WAIT: Duration = Duration::from_secs(120);

fn start(fleet: &FleetLab, i: usize, url: &str) -> (MoatProcess, Instant) {
    let config = fleet.node(i).write_config(&format!(
        "{NODE_CONFIG}\n{}",
        fleet.fleet_config(i, &[url], "")
    ));
    let _ = std::fs::remove_dir_all(fleet.node(i).state_dir());
    let spawned = Instant::now();
    let (moat, _) = MoatProcess::start(
        fleet.node(i),
        &["run", "--no-pin", "--config", &config.to_string_lossy()],
    );
    (moat, spawned)
}

fn fleet_status(fleet: &FleetLab, i: usize) -> Value {
    MoatProcess::status(fleet.node(i))["fleet"].clone()
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// When B's log says each CIDR was added from the fleet.
fn applied_at(log: &str) -> HashMap<String, SystemTime> {
    log.lines()
        .filter(|line| line.contains("list entry added") && line.contains("cause=\"fleet\""))
        .filter_map(|line| {
            let at = humantime::parse_rfc3339(line.split_whitespace().next()?).ok()?;
            let cidr = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("cidr="))?;
            Some((cidr.to_string(), at))
        })
        .collect()
}

/// Utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command's closing parenthesis; utime and stime are the 12th and
    // 13th of them.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn address(space: u32, i: usize) -> String {
    let i = i as u32;
    format!("10.{space}.{}.{}", (i >> 8) & 0xff, i & 0xff)
}

pub fn run(options: &Options) -> String {
    let mut fleet = FleetLab::new(2);
    let url = fleet.start_server(None);
    let (a, _) = start(&fleet, 0, &url);
    let (b, _) = start(&fleet, 1, &url);
    for i in 0..2 {
        wait_for("connected", || fleet_status(&fleet, i)["connected"] == true);
    }
    let socket_a = fleet.node(0).socket();
    let mut table = Table::new(&["measure", "result", "target"]);

    // Propagation, one add at a time.
    let mut sent = Vec::with_capacity(PROPAGATION_ADDS);
    for i in 0..PROPAGATION_ADDS {
        let cidr = address(1, i);
        let at = SystemTime::now();
        let reply = control_socket::exchange(&socket_a, &control_socket::block_add_frame(&cidr));
        assert!(reply.get("error").is_none(), "{reply}");
        sent.push((format!("{cidr}/32"), at));
        std::thread::sleep(Duration::from_millis(2));
    }
    wait_for("B applied every add", || {
        applied_at(&b.log_text()).len() >= PROPAGATION_ADDS
    });
    let applied = applied_at(&b.log_text());
    let mut latencies: Vec<f64> = sent
        .iter()
        .map(|(cidr, at)| {
            let done = applied
                .get(cidr)
                .unwrap_or_else(|| panic!("{cidr} not applied on B"));
            done.duration_since(*at)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64()
                * 1e3
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "fleet: propagation p50 {:.1} ms p99 {:.1} ms",
        pct(0.5),
        pct(0.99)
    );
    table.row(vec![
        format!("propagation A → B over {PROPAGATION_ADDS} adds (`block add` sent → applied on B): p50 / p99 / max"),
        format!("{:.1} / {:.1} / {:.1} ms", pct(0.5), pct(0.99), latencies[latencies.len() - 1]),
        "p99 ≤ 1 s (aim ≤ 100 ms)".into(),
    ]);

    // Joining: 100k entries in the bucket, B started empty.
    let (exit, _) = b.stop(libc::SIGTERM);
    assert!(exit.success());
    let file = fleet.dir().join("join.txt");
    let lines: Vec<String> = (0..JOIN_ENTRIES)
        .map(|i| address(100 + (i >> 16) as u32, i))
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("write the list");
    let published = Instant::now();
    MoatProcess::cli(fleet.node(0), &["block", "import", &file.to_string_lossy()]).ok("import");
    wait_for("A published the import", || {
        fleet_status(&fleet, 0)["queued"] == 0
    });
    let publish_rate = JOIN_ENTRIES as f64 / published.elapsed().as_secs_f64();
    println!("fleet: A published {JOIN_ENTRIES} entries at {publish_rate:.0}/s");
    let total = JOIN_ENTRIES + PROPAGATION_ADDS;
    let mut joins = Vec::new();
    let mut enforcing = Vec::new();
    let mut b = None;
    for _ in 0..options.runs.min(3) {
        drop(b.take());
        let (node, spawned) = start(&fleet, 1, &url);
        enforcing.push(spawned.elapsed().as_secs_f64());
        let reconciled = format!("entries={total}");
        wait_for("B reconciled", || {
            node.log_text()
                .lines()
                .any(|l| l.contains("fleet reconciled") && l.contains(&reconciled))
        });
        joins.push(spawned.elapsed().as_secs_f64());
        assert_eq!(fleet_status(&fleet, 1)["entries"], total as u64);
        // Where the time went, from B's log.
        let log = node.log_text();
        let at = |text: &str| {
            log.lines()
                .find(|l| l.contains(text))
                .and_then(|l| humantime::parse_rfc3339(l.split_whitespace().next()?).ok())
        };
        let ms = |a: Option<SystemTime>, b: Option<SystemTime>| {
            a.zip(b)
                .and_then(|(a, b)| b.duration_since(a).ok())
                .map_or("?".into(), |d| d.as_millis().to_string())
        };
        let enforcing = at("moat is enforcing");
        let read = at("snapshot read");
        println!(
            "fleet: join: enforcing → snapshot read {} ms → reconciled {} ms",
            ms(enforcing, read),
            ms(read, at("fleet reconciled"))
        );
        b = Some(node);
    }
    let join = Measured::of(joins);
    table.row(vec![
        format!("a node joining a bucket of {total} entries: spawn → all applied (spawn → enforcing locally: {:.2} s)", Measured::of(enforcing).median),
        format!("{} s", join.cell()),
        "≤ 2 s".into(),
    ]);
    table.row(vec![
        format!("publishing an import of {JOIN_ENTRIES} entries (one node, in windows of 256)"),
        format!("{publish_rate:.0} entries/s"),
        "—".into(),
    ]);

    // Watching 1,000 changes a second.
    let b = b.expect("B runs");
    let before = fleet_status(&fleet, 1)["entries"]
        .as_u64()
        .expect("entries");
    let cpu_before = (cpu_seconds(b.pid()), cpu_seconds(a.pid()));
    let started = Instant::now();
    let count = (u64::from(WATCH_RATE) * WATCH_TIME.as_secs()) as usize;
    // Requests of WATCH_BATCH addresses, paced: one control request per change would measure
    // A's control socket (each change is journaled and synced before its reply), not B.
    for request in 0..count / WATCH_BATCH {
        let due = started
            + Duration::from_secs_f64((request * WATCH_BATCH) as f64 / f64::from(WATCH_RATE));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let cidrs: Vec<String> = (0..WATCH_BATCH)
            .map(|j| format!("{:?}", address(2, request * WATCH_BATCH + j)))
            .collect();
        let body = format!(
            r#"{{"command":"list_add","arguments":{{"list":"blocklist","cidrs":[{}],"ttl_seconds":null,"comment":null}}}}"#,
            cidrs.join(",")
        );
        let reply = control_socket::exchange(&socket_a, &control_socket::frame(body.as_bytes()));
        assert!(reply.get("error").is_none(), "{reply}");
    }
    let sent_rate = count as f64 / started.elapsed().as_secs_f64();
    wait_for("B applied the changes", || {
        fleet_status(&fleet, 1)["entries"].as_u64() >= Some(before + count as u64)
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_b = (cpu_seconds(b.pid()) - cpu_before.0) / elapsed * 100.0;
    let cpu_a = (cpu_seconds(a.pid()) - cpu_before.1) / elapsed * 100.0;
    println!("fleet: {sent_rate:.0} changes/s: B {cpu_b:.1}% of a core, A {cpu_a:.1}%");
    table.row(vec![
        format!("CPU of the watching node (B) at {sent_rate:.0} changes/s for {} s (the publishing node A: {cpu_a:.1} %)", WATCH_TIME.as_secs()),
        format!("{cpu_b:.1} % of a core"),
        "—".into(),
    ]);
    format!(
        "### Fleet\n\nTwo release daemons in two labs, one nats-server 2.15.1 (file store) in the \
         fleet lab's hub, joined by veth on a bridge. Latencies are B's log timestamps against \
         the moment A's add was sent (one clock).\n\n{}\n",
        table.markdown()
    )
}
