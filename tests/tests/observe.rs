//! End to end: what operators watch during an attack. Prometheus metrics (checked by promtool
//! and against a counted flood), the Grafana dashboard's queries, `moat top`, `moat capture`
//! (read back by tcpdump), and the JSON log with one line per change and rate-limited samples.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use agent_common::events::CaptureSettings;
use moat::program::maps::ProgramMaps;
use moat_tests::{
    Lab, MoatProcess, Side,
    lab::{ATTACKER_NET_V4, ATTACKER_V4, LEGIT_V4, PROTECTED_V4},
    moat_process::moat_bin,
    traffic::{ping, udp_flood, udp_paced, udp_paced_until},
};
use serde_json::Value;

/// Where the lab's daemon serves metrics: loopback inside the protected namespace, so no test
/// shares a port with another.
const METRICS: &str = "127.0.0.1:9977";
/// UDP payload of the floods; a frame is 14 + 20 + 8 bytes of headers more.
const PAYLOAD: usize = 100;
const FRAME_LEN: u64 = 14 + 20 + 8 + PAYLOAD as u64;

fn start(lab: &Lab, body: &str, extra: &[&str]) -> (MoatProcess, u32) {
    let config = lab.write_config(body);
    let mut args = vec!["run", "--config", config.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    MoatProcess::start(lab, &args)
}

fn scrape(lab: &Lab) -> String {
    moat_tests::metrics::scrape(lab, METRICS)
}

/// The value of the sample `name{labels…}` (labels in any order); `None` when absent.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let rest = rest.strip_suffix('}')?;
        let found: Vec<&str> = rest.split(',').filter(|l| !l.is_empty()).collect();
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        (found.len() == wanted.len() && wanted.iter().all(|w| found.contains(&w.as_str())))
            .then(|| value.parse().expect("a number"))
    })
}

fn drops(lab: &Lab, text: &str, metric: &str) -> f64 {
    let interface = lab.interface(Side::Protected);
    let labels = [
        ("interface", interface),
        ("action", "drop"),
        ("reason", "blocklist"),
    ];
    sample(text, metric, &labels).unwrap_or(0.0)
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool (cargo xtask setup installs it): {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics refused the metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `moat_*` and `process_*` metric a dashboard query uses.
fn dashboard_metrics() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dashboard: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 4, "a dashboard with a few panels");
    let mut names = Vec::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("each target has an expr");
            for (start, _) in expr
                .match_indices("moat_")
                .chain(expr.match_indices("process_"))
            {
                let name: String = expr[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.push(name);
            }
        }
    }
    names.sort();
    names.dedup();
    assert!(!names.is_empty(), "the dashboard queries moat's metrics");
    names
}

#[test]
fn metrics_pass_promtool_and_count_a_flood_exactly() {
    let lab = Lab::new();
    let (moat, _) = start(
        &lab,
        &format!(
            "metrics_listen = \"{METRICS}\"\n[blocklist]\ncidrs = [\"{ATTACKER_NET_V4}\", \
             \"2001:db8:bad::/48\"]\n[rate_limit]\npps = 100000\n\
             [[protect]]\nname = \"web\"\ndestination = \"{PROTECTED_V4}\"\nprotocol = \"tcp\"\n\
             pps = 100000\n"
        ),
        &[],
    );
    let before = scrape(&lab);
    promtool_check(&before);
    let interface = lab.interface(Side::Protected);
    for (list, family, entries) in [
        ("blocklist", "ipv4", 1.0),
        ("blocklist", "ipv6", 1.0),
        ("allowlist", "ipv4", 0.0),
    ] {
        assert_eq!(
            sample(
                &before,
                "moat_list_entries",
                &[("list", list), ("family", family)]
            ),
            Some(entries),
            "{list} {family}"
        );
    }
    for name in [
        "moat_bans_active",
        "moat_rate_limited_sources",
        "moat_events_lost_total",
        "process_resident_memory_bytes",
    ] {
        assert!(sample(&before, name, &[]).is_some(), "{name} missing");
    }
    assert!(
        before.lines().any(|l| l.starts_with("moat_build_info{")
            && l.contains("program_tag=\"")
            && !l.contains("unknown")
            && l.ends_with(" 1")),
        "build info with the program's tag:\n{before}"
    );

    // A counted flood moves the drop counters by exactly its packets and bytes.
    let (sent, _) = udp_flood(
        &lab,
        Lab::addr(ATTACKER_V4),
        Lab::addr(PROTECTED_V4),
        500,
        PAYLOAD,
        Duration::from_secs(10),
    );
    assert_eq!(sent, 500);
    let packets_before = drops(&lab, &before, "moat_packets_total");
    let bytes_before = drops(&lab, &before, "moat_bytes_total");
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let text = scrape(&lab);
        if drops(&lab, &text, "moat_packets_total") - packets_before >= sent as f64
            || Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        drops(&lab, &after, "moat_packets_total") - packets_before,
        sent as f64
    );
    assert_eq!(
        drops(&lab, &after, "moat_bytes_total") - bytes_before,
        (sent * FRAME_LEN) as f64
    );
    // The rate limiter tracks the legitimate source that pinged.
    let pinged = ping(&lab, LEGIT_V4, PROTECTED_V4, 3);
    assert_eq!(pinged.received, 3);
    let after = scrape(&lab);
    let passed = sample(
        &after,
        "moat_packets_total",
        &[
            ("interface", interface),
            ("action", "pass"),
            ("reason", "no_match"),
        ],
    );
    assert!(passed.is_some_and(|p| p >= 3.0), "{after}");
    // The limiter's gauges come from a walk of its maps every second, away from the daemon's
    // loop: the source shows within two.
    let deadline = Instant::now() + Duration::from_secs(3);
    let after = loop {
        let after = scrape(&lab);
        if sample(&after, "moat_rate_limited_sources", &[]).is_some_and(|n| n >= 1.0) {
            break after;
        }
        assert!(Instant::now() < deadline, "no tracked source in:\n{after}");
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&after);

    // Every metric the Grafana dashboard queries exists.
    for name in dashboard_metrics() {
        assert!(
            after
                .lines()
                .any(|l| l == format!("# TYPE {name} counter")
                    || l == format!("# TYPE {name} gauge")),
            "the dashboard queries {name}, which /metrics does not serve"
        );
    }
    moat.stop(libc::SIGTERM);
}

/// The `CAPTURE` override of the program `program_id`.
fn capture_override(program_id: u32) -> CaptureSettings {
    ProgramMaps::of_program(program_id)
        .unwrap_or_else(|e| panic!("moat's maps: {}", moat::error_chain(&e)))
        .sampling
        .get()
        .expect("the override")
}

/// Starts `moat capture args…` against the lab's daemon; it returns when the daemon logged the
/// capture's start.
fn spawn_capture(
    lab: &Lab,
    moat: &MoatProcess,
    args: &[&str],
    started: usize,
) -> std::process::Child {
    let child = Command::new(moat_bin())
        .arg("--socket")
        .arg(lab.socket())
        .arg("capture")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moat capture");
    moat.wait_for_log("capture started", started);
    child
}

/// Waits for `child`'s output, killing it if it runs longer than `within`.
fn wait_output(child: std::process::Child, within: Duration) -> std::process::Output {
    let pid = child.id();
    let (exited, exit) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        // Stops waiting as soon as the child is reaped, so that its pid, free for reuse from
        // then on, is not killed later.
        if exit.recv_timeout(within).is_err() {
            // SAFETY: kill on the pid of a child not yet waited for.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("wait");
    let _ = exited.send(());
    watchdog.join().expect("watchdog");
    out
}

fn tcpdump(file: &Path) -> Vec<String> {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run tcpdump (cargo xtask setup installs it): {e}"));
    assert!(
        out.status.success(),
        "tcpdump cannot read {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn capture_writes_dropped_and_passed_frames_that_tcpdump_reads() {
    let lab = Lab::new();
    let (moat, program_id) = start(
        &lab,
        &format!("[blocklist]\ncidrs = [\"{ATTACKER_NET_V4}\"]\n"),
        &[],
    );
    assert_eq!(capture_override(program_id), CaptureSettings::default());

    // Dropped frames: every blocked packet is sampled while the capture runs.
    let drops_file = lab.dir().join("drops.pcap");
    let drops_path = drops_file.to_str().expect("utf-8");
    let capture = spawn_capture(
        &lab,
        &moat,
        &["--reason", "blocklist", "-c", "20", "-w", drops_path],
        1,
    );
    assert_eq!(
        capture_override(program_id).dropped_every,
        1,
        "sampling every drop while capturing"
    );
    let (sent, _) = udp_flood(
        &lab,
        Lab::addr(ATTACKER_V4),
        Lab::addr(PROTECTED_V4),
        200,
        PAYLOAD,
        Duration::from_secs(10),
    );
    assert_eq!(sent, 200);
    let out = wait_output(capture, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "moat capture: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("captured 20 frames"));
    let lines = tcpdump(&drops_file);
    assert_eq!(lines.len(), 20, "{lines:#?}");
    let flow = format!("{ATTACKER_V4}.");
    let target = format!("> {PROTECTED_V4}.9: UDP, length {PAYLOAD}");
    for line in &lines {
        assert!(
            line.contains(&flow) && line.contains(&target),
            "not the flood's packet: {line}"
        );
    }
    moat.wait_for_log("capture ended", 1);
    assert_eq!(
        capture_override(program_id),
        CaptureSettings::default(),
        "the override is lifted"
    );

    // Passed frames: only while a capture asks for them.
    let passed_file = lab.dir().join("passed.pcap");
    let capture = spawn_capture(
        &lab,
        &moat,
        &[
            "--passed",
            "--reason",
            "no_match",
            "-c",
            "4",
            "-w",
            passed_file.to_str().expect("utf-8"),
        ],
        2,
    );
    assert_eq!(capture_override(program_id).passed_every, 1);
    let pinged = ping(&lab, LEGIT_V4, PROTECTED_V4, 4);
    assert_eq!(
        pinged.received, 4,
        "capturing passed frames does not drop them"
    );
    let out = wait_output(capture, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "moat capture --passed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = tcpdump(&passed_file);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let echo = format!("{LEGIT_V4} > {PROTECTED_V4}: ICMP echo request");
    assert!(lines.iter().any(|l| l.contains(&echo)), "{lines:#?}");
    moat.wait_for_log("capture ended", 2);

    // A client that goes away mid-capture ends it, and the override with it.
    let capture = spawn_capture(&lab, &moat, &["-c", "1000", "-w", "/dev/null"], 3);
    // SAFETY: kill on a child we started.
    unsafe { libc::kill(capture.id() as i32, libc::SIGKILL) };
    let _ = wait_output(capture, Duration::from_secs(5));
    moat.wait_for_log("capture ended", 3);
    assert_eq!(capture_override(program_id), CaptureSettings::default());

    // Bad requests are refused and change nothing.
    for args in [
        vec!["capture", "--reason", "nonsense", "-w", "/dev/null"],
        vec!["capture", "-c", "0", "-w", "/dev/null"],
        vec!["capture", "--every", "0", "-w", "/dev/null"],
        vec!["capture", "-w", "/nonexistent/dir/x.pcap"],
    ] {
        MoatProcess::cli(&lab, &args).refused(&format!("moat {}", args.join(" ")));
    }
    assert_eq!(capture_override(program_id), CaptureSettings::default());
    moat.stop(libc::SIGTERM);
}

#[test]
fn top_ranks_the_flooding_source_and_the_legitimate_one() {
    let lab = Lab::new();
    let (moat, _) = start(
        &lab,
        &format!(
            "[blocklist]\ncidrs = [\"{ATTACKER_NET_V4}\"]\n[rate_limit]\npps = 100000\n\
             [events]\nsample_every = 10\n"
        ),
        &[],
    );
    // The floods last until both readings are taken, however slow the machine (an emulated
    // guest on a loaded host takes seconds to start a client).
    let stop = AtomicBool::new(false);
    let limit = Duration::from_secs(120);
    let (view, screen, attacker_rate, legit_rate) = std::thread::scope(|scope| {
        let attacker = scope.spawn(|| {
            udp_paced_until(
                &lab,
                Lab::addr(ATTACKER_V4),
                Lab::addr(PROTECTED_V4),
                2000,
                &stop,
                limit,
            )
        });
        let legit = scope.spawn(|| {
            udp_paced_until(
                &lab,
                Lab::addr(LEGIT_V4),
                Lab::addr(PROTECTED_V4),
                200,
                &stop,
                limit,
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let out =
            MoatProcess::cli(&lab, &["top", "--json", "--interval", "2s"]).ok("moat top --json");
        let view: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        // The live screen, as an operator sees it (stdout is not a terminal: no escapes).
        let top = Command::new(moat_bin())
            .arg("--socket")
            .arg(lab.socket())
            .args(["top", "--interval", "1s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moat top");
        std::thread::sleep(Duration::from_millis(2500));
        let screen = wait_output(top, Duration::ZERO);
        stop.store(true, Ordering::Relaxed);
        // The rates the senders achieved (a slow machine or an emulated VM falls short of
        // the schedule); top's rates are checked against these.
        let rate = |(sent, took): (u64, Duration)| sent as f64 / took.as_secs_f64();
        let attacker_rate = rate(attacker.join().expect("attacker"));
        let legit_rate = rate(legit.join().expect("legit"));
        let screen = String::from_utf8_lossy(&screen.stdout).into_owned();
        (view, screen, attacker_rate, legit_rate)
    });
    let near =
        |measured: u64, sent: f64| (measured as f64) > sent * 0.5 && (measured as f64) < sent * 1.5;
    let interval = view["interval_ms"].as_u64().expect("interval_ms");
    assert!((1000..=4000).contains(&interval), "{view}");
    let dropped = &view["dropped"][0];
    assert_eq!(dropped["source"], ATTACKER_V4, "{view}");
    assert_eq!(dropped["reason"], "blocklist", "{view}");
    let pps = dropped["packets_per_second"].as_u64().expect("pps");
    assert!(
        near(pps, attacker_rate),
        "{attacker_rate:.0} pkt/s sent, estimated from 1 in 10: {view}"
    );
    assert_eq!(view["sample_every"], 10);
    assert_eq!(view["passed_by_source"], true);
    let legit = view["passed"]
        .as_array()
        .expect("passed")
        .iter()
        .find(|r| r["source"] == LEGIT_V4)
        .unwrap_or_else(|| panic!("the legitimate source is in the passed table: {view}"));
    let legit_pps = legit["packets_per_second"].as_u64().expect("pps");
    assert!(
        near(legit_pps, legit_rate),
        "{legit_rate:.0} pkt/s sent, counted: {view}"
    );
    let dropped_total = view["dropped_packets_per_second"].as_u64().expect("total");
    assert!(near(dropped_total, attacker_rate), "{view}");
    assert!(
        screen.contains("DROPPED FROM") && screen.contains("PASSED FROM"),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with(ATTACKER_V4) && l.contains("blocklist")),
        "{screen}"
    );
    MoatProcess::cli(&lab, &["top", "--rows", "0"]).refused("moat top --rows 0");
    moat.stop(libc::SIGTERM);
}

/// The log's lines, each parsed as JSON (the test fails on any line that is not).
fn json_lines(moat: &MoatProcess) -> Vec<Value> {
    moat.log_text()
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
        })
        .collect()
}

fn with_message<'a>(lines: &'a [Value], message: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["message"] == message).collect()
}

#[test]
fn json_logs_name_each_change_once_with_its_cause_and_bound_samples() {
    let lab = Lab::new();
    let (moat, _) = start(
        &lab,
        "[rate_limit]\npps = 100\nburst_packets = 10\nban_after = \"1s\"\nban_ttl = \"2s\"\n\
         [events]\nsample_every = 1\n",
        &["--log-format", "json"],
    );
    MoatProcess::cli(
        &lab,
        &["block", "add", "192.0.2.99", "--comment", "scanner"],
    )
    .ok("block add");
    MoatProcess::cli(&lab, &["reload"]).ok("reload");
    // Over the limit for longer than ban_after: banned once; every drop is sampled.
    let flood_started = Instant::now();
    let (sent, _) = udp_paced(
        &lab,
        Lab::addr(ATTACKER_V4),
        Lab::addr(PROTECTED_V4),
        2000,
        Duration::from_millis(2000),
    );
    assert!(sent >= 1000, "sent {sent}");
    moat.wait_for_log("\"ban expired\"", 1);
    let elapsed = flood_started.elapsed().as_secs() + 2;

    let lines = json_lines(&moat);
    for line in &lines {
        for field in ["timestamp", "level", "message"] {
            assert!(line.get(field).is_some(), "{field} missing: {line}");
        }
    }
    let added = with_message(&lines, "list entries added");
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0]["cause"], "cli");
    assert_eq!(added[0]["first"], "192.0.2.99/32");
    assert_eq!(added[0]["comment"], "scanner");
    let reloaded = with_message(&lines, "reloaded the configuration");
    assert_eq!(reloaded.len(), 1);
    assert_eq!(reloaded[0]["cause"], "moat reload");
    let banned = with_message(&lines, "banned");
    assert_eq!(banned.len(), 1, "{banned:?}");
    assert_eq!(banned[0]["source"], ATTACKER_V4);
    assert_eq!(banned[0]["cause"], "rate_limit");
    let expired = with_message(&lines, "ban expired");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["source"], ATTACKER_V4);
    assert_eq!(expired[0]["cause"], "ttl");

    // Thousands of sampled drops, at most ten lines a second, the rest summarised.
    let samples = with_message(&lines, "dropped packet sample");
    assert!(!samples.is_empty());
    assert!(
        samples.len() as u64 <= 10 * (elapsed + 1),
        "{} sample lines in about {elapsed} s",
        samples.len()
    );
    let suppressed: u64 = with_message(
        &lines,
        "dropped packet samples not logged (rate limit on log lines)",
    )
    .iter()
    .map(|l| l["suppressed"].as_u64().expect("a count"))
    .sum();
    assert!(
        suppressed > sent / 4,
        "held-back samples are counted: {suppressed} of {sent} sent"
    );
    moat.stop(libc::SIGTERM);
}
