//! Control plane: the real `moat run` (release) in a veth lab, driven by the real CLI.
//!
//! - start-up with the million-prefix list file in the configuration (spawn to "enforcing");
//! - `moat block import` of the same million prefixes into a running daemon;
//! - `moat block add` of one address under traffic from it: invocation to CLI return, and
//!   invocation to the first packet the kernel counts as dropped;
//! - the daemon's RSS idle and with the million prefixes (imported, and again with a TTL), and
//!   the kernel memory of its maps;
//! - `moat status`, one `/metrics` scrape and `moat block add` with the rate limiter's maps full
//!   (a million sources banned and the limiter's table of a million slots full, as a spoofed
//!   flood leaves them).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_common::stats::{Action, Reason};
use moat::program::maps::ProgramMaps;
use moat_tests::{
    Lab, MoatProcess, Side,
    lab::{ATTACKER_V4, PROTECTED_V4},
    metrics::scrape,
    spoofed_flood::fill_limiter,
    traffic::udp_paced,
};

use crate::{Measured, Options, Table, list::PrefixList};

/// Traffic rate while `block add` is timed: one packet every 50 µs.
const ATTACK_PPS: u64 = 20_000;
/// `block add` timings per daemon run: enough over the runs for a tail, not only a median.
const BLOCK_ADDS_PER_RUN: usize = 8;
/// Sources in the rate limiter's maps for the "limiter full" measures (its `max_sources`).
const LIMITER_SOURCES: u32 = 1 << 20;
/// Where the daemon serves `/metrics` inside the lab for those measures.
const METRICS: &str = "127.0.0.1:9465";

/// The daemon's resident memory, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// Kernel memory of the BPF maps the daemon holds (`memlock` of each map, once), in MiB.
fn map_memory_mib(pid: u32) -> f64 {
    // Once per map: the daemon holds several fds of some maps (its own handles for pinning and
    // for the limiter's walks), and each fd's fdinfo shows the map's whole memlock.
    let mut maps = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, memlock);
        }
    }
    let bytes: u64 = maps.values().sum();
    bytes as f64 / (1024.0 * 1024.0)
}

/// Starts a daemon on `config` and waits until it enforces; returns it and how long that took.
fn start(lab: &Lab, config: &Path) -> (MoatProcess, Duration) {
    let started = Instant::now();
    let moat = MoatProcess::spawn(lab, &["run", "--config", &config.to_string_lossy()]);
    moat.wait_for_log("moat is enforcing", 1);
    (moat, started.elapsed())
}

/// Stops the daemon and removes what it left (pins, state), for a cold start next.
fn stop_and_clean(lab: &Lab, moat: MoatProcess) {
    let (status, log) = moat.stop(libc::SIGTERM);
    assert!(status.success(), "moat failed:\n{log}");
    let bpffs = lab.bpffs().to_string_lossy().into_owned();
    MoatProcess::cli(lab, &["down", "--bpffs", &bpffs]).ok("moat down");
    let _ = std::fs::remove_dir_all(lab.state_dir());
}

fn write_config(lab: &Lab, prefixes: usize, list: Option<&Path>) -> PathBuf {
    let files = list.map_or(String::new(), |l| {
        format!("[blocklist]\nfiles = [\"{}\"]\n", l.display())
    });
    lab.write_config(&format!(
        "runtime_entries = {}\n{files}",
        prefixes + prefixes / 10
    ))
}

/// A cheap reader of one counter (blocklist drops on `if_index`): the maps are opened once, so
/// that polling it every 0.1 ms does not take the CPU the daemon needs (2 CPUs here).
fn drop_counter(program_id: u32, if_index: u32) -> impl Fn() -> u64 {
    let counters = ProgramMaps::of_program(program_id)
        .unwrap_or_else(|e| panic!("moat's maps: {}", moat::error_chain(&e)))
        .counters;
    move || {
        counters
            .packets(if_index, Action::Drop, Reason::Blocklist)
            .expect("read the counter")
    }
}

/// Waits until the daemon's state file holds every change (its journal is emptied then).
fn wait_until_saved(lab: &Lab) {
    let journal = lab.state_dir().join(moat::daemon::JOURNAL_FILE);
    // Present while a save is being written.
    let sealed = lab.state_dir().join(moat::daemon::SEALED_FILE);
    let started = Instant::now();
    while sealed.exists() || std::fs::metadata(&journal).is_ok_and(|m| m.len() > 0) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon did not save its state within 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The change whose state save another lands in, and how long after it that one comes (the
/// save starts 50 ms after a change and takes a few hundred with a million runtime entries).
const SAVED_BESIDE: &str = "198.18.0.1";
const INTO_THE_SAVE: Duration = Duration::from_millis(80);

/// One `block add` under traffic from the address: (invocation → CLI return, invocation → first
/// drop counted), in milliseconds.
fn time_block_add(lab: &Lab, program_id: u32, address: &str) -> (f64, f64) {
    let dropped = drop_counter(program_id, lab.if_index(Side::Protected));
    std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            udp_paced(
                lab,
                Lab::addr(address),
                Lab::addr(PROTECTED_V4),
                ATTACK_PPS,
                Duration::from_millis(1500),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let before = dropped();
        let invoked = Instant::now();
        let cli = scope.spawn(move || {
            MoatProcess::cli_here(lab, &["block", "add", address]).ok("block add");
            invoked.elapsed()
        });
        let first_drop = loop {
            if dropped() > before {
                break invoked.elapsed();
            }
            assert!(
                invoked.elapsed() < Duration::from_secs(1),
                "no drop within a second of block add"
            );
            std::thread::sleep(Duration::from_micros(100));
        };
        let returned = cli.join().expect("cli");
        traffic.join().expect("traffic");
        MoatProcess::cli(lab, &["block", "del", address]).ok("block del");
        (returned.as_secs_f64() * 1e3, first_drop.as_secs_f64() * 1e3)
    })
}

pub fn run(lab: &Lab, list: &PrefixList, options: &Options) -> Table {
    let n = list.count;
    let mut table = Table::new(&["measure", "median", "min–max"]);
    let mut add_row = |what: String, unit: &str, samples: Vec<f64>| {
        let measured = Measured::of(samples);
        println!("control plane: {what}: {}", measured.cell());
        table.row(vec![
            what,
            format!("{:.1} {unit}", measured.median),
            format!("{:.1}–{:.1}", measured.min, measured.max),
        ]);
    };

    // Start-up with the list in the configuration, cold (nothing pinned, no state).
    let with_list = write_config(lab, n, Some(&list.path));
    let mut startup = Vec::new();
    let mut rss_full = Vec::new();
    let mut maps_full = Vec::new();
    for _ in 0..options.runs {
        let (moat, took) = start(lab, &with_list);
        startup.push(took.as_secs_f64());
        std::thread::sleep(Duration::from_millis(500));
        rss_full.push(rss_mib(moat.pid()));
        maps_full.push(map_memory_mib(moat.pid()));
        stop_and_clean(lab, moat);
    }
    add_row(
        format!("start-up with {n} prefixes in the config (spawn → enforcing)"),
        "s",
        startup,
    );

    // Import into a running daemon, then one address blocked under traffic.
    let empty = write_config(lab, n, None);
    let mut import = Vec::new();
    let mut rss_idle = Vec::new();
    let mut rss_import = Vec::new();
    let mut rss_import_ttl = Vec::new();
    let mut add_return = Vec::new();
    let mut add_effect = Vec::new();
    let mut add_during_save = Vec::new();
    for run in 0..options.runs {
        let (moat, _) = start(lab, &empty);
        std::thread::sleep(Duration::from_millis(300));
        rss_idle.push(rss_mib(moat.pid()));
        let started = Instant::now();
        MoatProcess::cli(lab, &["block", "import", &list.path.to_string_lossy()]).ok("import");
        import.push(started.elapsed().as_secs_f64());
        // Let the state save and the allocator's trim run.
        std::thread::sleep(Duration::from_secs(2));
        rss_import.push(rss_mib(moat.pid()));
        let (program_id, _) = lab.xdp(Side::Protected).expect("attached");
        for _ in 0..BLOCK_ADDS_PER_RUN {
            // Not inside the previous change's state save (measured apart below).
            wait_until_saved(lab);
            let (returned, effect) = time_block_add(lab, program_id, ATTACKER_V4);
            add_return.push(returned);
            add_effect.push(effect);
        }
        // Inside another change's save of the million-entry state (written away from the
        // control thread; a change meanwhile copies the runtime record the save is reading).
        wait_until_saved(lab);
        MoatProcess::cli_here(lab, &["block", "add", SAVED_BESIDE]).ok("block add");
        std::thread::sleep(INTO_THE_SAVE);
        let sealed = lab.state_dir().join(moat::daemon::SEALED_FILE);
        assert!(
            sealed.exists(),
            "no save in progress {INTO_THE_SAVE:?} after a change"
        );
        let invoked = Instant::now();
        MoatProcess::cli_here(lab, &["block", "add", ATTACKER_V4]).ok("block add");
        let returned = invoked.elapsed();
        add_during_save.push(returned.as_secs_f64() * 1e3);
        for address in [SAVED_BESIDE, ATTACKER_V4] {
            MoatProcess::cli(lab, &["block", "del", address]).ok("block del");
        }
        // The same list again with a TTL: every entry now expires (and is indexed for it).
        let path = list.path.to_string_lossy();
        MoatProcess::cli(lab, &["block", "import", &path, "--ttl", "1h"]).ok("import --ttl");
        wait_until_saved(lab);
        std::thread::sleep(Duration::from_secs(2));
        rss_import_ttl.push(rss_mib(moat.pid()));
        println!("control plane: run {} of {} done", run + 1, options.runs);
        stop_and_clean(lab, moat);
    }
    add_row(
        format!("`moat block import` of {n} prefixes (CLI wall clock)"),
        "s",
        import,
    );
    add_row(
        format!("`moat block add` with {n} prefixes loaded: invocation → CLI returns"),
        "ms",
        add_return,
    );
    add_row(
        "`moat block add`: invocation → first packet dropped".into(),
        "ms",
        add_effect,
    );
    add_row(
        "`moat block add` 80 ms after another change (inside that change's state save): \
         invocation → CLI returns"
            .into(),
        "ms",
        add_during_save,
    );
    add_row("daemon RSS, idle (empty lists)".into(), "MiB", rss_idle);
    add_row(
        format!("daemon RSS with {n} imported prefixes"),
        "MiB",
        rss_import,
    );
    add_row(
        format!("daemon RSS with the {n} prefixes imported again with `--ttl 1h`"),
        "MiB",
        rss_import_ttl,
    );
    add_row(
        format!("daemon RSS after start-up with {n} prefixes in the config"),
        "MiB",
        rss_full,
    );
    add_row(
        format!("kernel memory of the maps with {n} prefixes (memlock)"),
        "MiB",
        maps_full,
    );

    let full = limiter_full(lab, options);
    let sources = LIMITER_SOURCES;
    add_row(
        format!("`moat status` with {sources} sources banned, the limiter full"),
        "ms",
        full.status,
    );
    add_row(
        format!("one `/metrics` scrape with {sources} sources banned, the limiter full"),
        "ms",
        full.scrape,
    );
    add_row(
        format!(
            "`moat block add` with {sources} sources banned, the limiter full (CLI wall clock)"
        ),
        "ms",
        full.block_add,
    );
    table
}

/// Control-plane timings with the limiter's maps full, in milliseconds.
struct LimiterFull {
    status: Vec<f64>,
    scrape: Vec<f64>,
    block_add: Vec<f64>,
}

/// Fills the rate limiter's maps of a running daemon to `max_sources`, as a flood of spoofed
/// sources would, then times the commands an operator runs during such a flood.
fn limiter_full(lab: &Lab, options: &Options) -> LimiterFull {
    let config = lab.write_config(&format!(
        "metrics_listen = \"{METRICS}\"\n[rate_limit]\npps = 100000\nban_ttl = \"1h\"\n\
         max_sources = {LIMITER_SOURCES}\n"
    ));
    let (moat, _) = start(lab, &config);
    let (program_id, _) = lab.xdp(Side::Protected).expect("attached");
    fill_limiter(program_id, LIMITER_SOURCES);
    let timed = |what: &dyn Fn()| {
        let started = Instant::now();
        what();
        started.elapsed().as_secs_f64() * 1e3
    };
    let mut full = LimiterFull {
        status: Vec::new(),
        scrape: Vec::new(),
        block_add: Vec::new(),
    };
    for i in 0..options.runs {
        full.status.push(timed(&|| {
            MoatProcess::cli_here(lab, &["status"]).ok("status");
        }));
        full.scrape.push(timed(&|| {
            scrape(lab, METRICS);
        }));
        let address = format!("192.0.2.{}", i + 1);
        full.block_add.push(timed(&|| {
            MoatProcess::cli_here(lab, &["block", "add", &address]).ok("block add");
        }));
    }
    println!("control plane: limiter full done");
    stop_and_clean(lab, moat);
    full
}
