//! End to end: the daemon's control plane. The real `moat run` in a veth lab, driven by the real
//! `moat` CLI (and by hand-made socket frames), checked with real packets.

use std::{
    io::Write as _,
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use agent_common::stats::{Action, Reason};
use moat::program::counters::Snapshot;
use moat_tests::{
    Lab, MoatProcess, Side,
    control_socket::{exchange, frame},
    lab::{
        ATTACKER_NET_V4, ATTACKER_NET_V6, ATTACKER_V4, ATTACKER_V6, LEGIT_V4, LEGIT_V6,
        PROTECTED_V4, PROTECTED_V6,
    },
    moat_process::moat_bin,
    traffic::{ASSERT_PINGS, assert_answered, assert_unanswered, ping, udp_flood},
};
use serde_json::Value;

fn start(lab: &Lab, config: &Path) -> (MoatProcess, u32) {
    MoatProcess::start(lab, &["run", "--config", &config.to_string_lossy()])
}

/// Runs a CLI command that prints JSON, and parses it.
fn json(lab: &Lab, args: &[&str]) -> Value {
    let out = MoatProcess::cli(lab, args).ok(&format!("moat {}", args.join(" ")));
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("moat {args:?} printed something that is not JSON ({e}): {out}"))
}

/// `moat <list> list --json`: every entry, checked for the documented shape.
fn entries(lab: &Lab, list: &str) -> Vec<Value> {
    let value = json(lab, &[list, "list", "--json"]);
    let entries = value
        .as_array()
        .unwrap_or_else(|| panic!("{list} list --json should print an array: {value}"))
        .clone();
    for entry in &entries {
        let keys: Vec<&str> = entry
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["cidr", "comment", "expires_at", "source"],
            "documented fields only: {entry}"
        );
        assert!(
            ["config", "cli", "rate_limit"].contains(&entry["source"].as_str().unwrap_or("")),
            "{entry}"
        );
    }
    entries
}

fn entry<'a>(entries: &'a [Value], cidr: &str) -> Option<&'a Value> {
    entries.iter().find(|e| e["cidr"] == cidr)
}

/// `moat stats --json`'s packets for (interface, action, reason).
fn stat_packets(lab: &Lab, action: &str, reason: &str) -> u64 {
    let counters = json(lab, &["stats", "--json"]);
    let interface = lab.interface(Side::Protected);
    counters
        .as_array()
        .expect("stats --json prints an array")
        .iter()
        .find(|c| c["interface"] == interface && c["action"] == action && c["reason"] == reason)
        .map_or(0, |c| c["packets"].as_u64().expect("packets is a number"))
}

/// One daemon in one lab, shared by the CLI cases: starting a lab and a daemon per case would
/// multiply the suite's time (in the 6.1 VM above all). The cases run in order; each leaves the
/// lists as it found them unless its name says otherwise.
struct Session {
    lab: Lab,
    config: std::path::PathBuf,
    moat: MoatProcess,
    program_id: u32,
    iface: String,
    /// Echo requests the blocklist dropped so far, for the stats case.
    blocked_pings: u64,
}

/// A named step of the shared session.
type Case = fn(&mut Session);

#[test]
fn every_cli_command_works_end_to_end() {
    let lab = Lab::new();
    let config = lab.write_config(&format!("[blocklist]\ncidrs = [\"{ATTACKER_NET_V6}\"]\n"));
    config_check_names_file_line_and_column(&lab, &config);
    a_client_without_a_daemon_says_where_it_looked(&lab);
    let (moat, program_id) = start(&lab, &config);
    let iface = lab.interface(Side::Protected).to_string();
    let mut session = Session {
        lab,
        config,
        moat,
        program_id,
        iface,
        blocked_pings: 0,
    };
    let cases: [(&str, Case); 7] = [
        ("status", status_describes_the_daemon),
        ("block add, list, del", block_add_list_and_del),
        ("allow add, list, del", allow_wins_over_block),
        ("block and allow import", lists_are_imported_from_files),
        ("stats", stats_count_every_blocked_packet),
        ("reload", reload_applies_the_file_or_keeps_the_policy),
        ("log", every_change_is_logged),
    ];
    for (name, case) in cases {
        eprintln!("== case: {name}");
        case(&mut session);
    }
}

/// No daemon needed; errors name file:line:col.
fn config_check_names_file_line_and_column(lab: &Lab, config: &Path) {
    let out =
        MoatProcess::cli(lab, &["config", "check", &config.to_string_lossy()]).ok("config check");
    assert!(out.contains("OK") && out.contains("1 blocklist"), "{out}");
    let bad = lab.dir().join("bad.toml");
    std::fs::write(
        &bad,
        "interfaces = [\"x\"]\n[blocklist]\ncidrs = [\"10.0.0.0/40\"]\n",
    )
    .expect("write bad config");
    let reason = MoatProcess::cli(lab, &["config", "check", &bad.to_string_lossy()])
        .refused("config check of a bad file");
    assert!(reason.contains("bad.toml:3:10"), "{reason}");
}

fn a_client_without_a_daemon_says_where_it_looked(lab: &Lab) {
    let reason = MoatProcess::cli(lab, &["status"]).refused("status without a daemon");
    assert!(
        reason.contains(&lab.socket().to_string_lossy().into_owned()),
        "{reason}"
    );
}

/// `status`, with the socket given after the subcommand this time, as JSON and as text.
fn status_describes_the_daemon(s: &mut Session) {
    let output = s
        .lab
        .netns(Side::Protected)
        .command(&moat_bin().to_string_lossy())
        .args(["status", "--json", "--socket"])
        .arg(s.lab.socket())
        .output()
        .expect("run moat status");
    assert!(output.status.success(), "{output:?}");
    let status: Value = serde_json::from_slice(&output.stdout).expect("status --json is JSON");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["pid"], s.moat.pid());
    assert_eq!(status["program_id"], s.program_id);
    assert_eq!(status["mode"], "enforce");
    assert_eq!(status["interfaces"][0]["name"], s.iface.as_str());
    assert_eq!(status["interfaces"][0]["xdp_mode"], "native");
    assert_eq!(status["interfaces"][0]["pinned"], true);
    let text = MoatProcess::cli(&s.lab, &["status"]).ok("status");
    assert!(
        text.contains(&s.iface) && text.contains(&format!("id {}", s.program_id)),
        "{text}"
    );
}

fn block_add_list_and_del(s: &mut Session) {
    let lab = &s.lab;
    let out = MoatProcess::cli(
        lab,
        &["block", "add", ATTACKER_V4, "--comment", "seen scanning"],
    )
    .ok("block add");
    assert!(out.contains("added 1"), "{out}");
    assert_unanswered(lab, ATTACKER_V4, PROTECTED_V4);
    assert_unanswered(lab, ATTACKER_V6, PROTECTED_V6);
    s.blocked_pings += 2;
    assert_answered(lab, LEGIT_V4, PROTECTED_V4);
    let list = entries(lab, "block");
    let added = entry(&list, "198.51.100.7/32").expect("the CLI entry is listed");
    assert_eq!(added["source"], "cli");
    assert_eq!(added["comment"], "seen scanning");
    assert_eq!(added["expires_at"], Value::Null);
    assert_eq!(
        entry(&list, ATTACKER_NET_V6).expect("the config entry")["source"],
        "config"
    );
    let text = MoatProcess::cli(lab, &["block", "list"]).ok("block list");
    assert!(
        text.contains("198.51.100.7/32") && text.contains("seen scanning"),
        "{text}"
    );

    let reason = MoatProcess::cli(lab, &["block", "del", ATTACKER_NET_V6])
        .refused("block del of a config entry");
    assert!(reason.contains("configuration"), "{reason}");
    let reason = MoatProcess::cli(lab, &["block", "add", "198.51.100.9", "not-a-cidr"])
        .refused("block add with one bad entry");
    assert!(reason.contains("not-a-cidr"), "{reason}");
    assert!(
        entry(&entries(lab, "block"), "198.51.100.9/32").is_none(),
        "a refused add must add nothing"
    );
    MoatProcess::cli(lab, &["block", "del", ATTACKER_V4]).ok("block del");
    assert_answered(lab, ATTACKER_V4, PROTECTED_V4);
    let reason =
        MoatProcess::cli(lab, &["block", "del", ATTACKER_V4]).refused("block del of nothing");
    assert!(reason.contains("not in the blocklist"), "{reason}");
    MoatProcess::cli(lab, &["block", "add", "--ttl", "0s", ATTACKER_V4]).refused("ttl 0");
}

/// The allowlist wins over the blocklist.
fn allow_wins_over_block(s: &mut Session) {
    let lab = &s.lab;
    MoatProcess::cli(lab, &["block", "add", "203.0.113.0/24"]).ok("block add /24");
    assert_unanswered(lab, LEGIT_V4, PROTECTED_V4);
    s.blocked_pings += 1;
    MoatProcess::cli(lab, &["allow", "add", LEGIT_V4, "--comment", "monitoring"]).ok("allow add");
    assert_answered(lab, LEGIT_V4, PROTECTED_V4);
    let allowed = entries(lab, "allow");
    assert_eq!(
        entry(&allowed, "203.0.113.2/32").expect("allow entry")["comment"],
        "monitoring"
    );
    assert!(
        MoatProcess::cli(lab, &["allow", "list"])
            .ok("allow list")
            .contains("203.0.113.2/32")
    );
    MoatProcess::cli(lab, &["allow", "del", LEGIT_V4]).ok("allow del");
    assert_unanswered(lab, LEGIT_V4, PROTECTED_V4);
    s.blocked_pings += 1;
    MoatProcess::cli(lab, &["block", "del", "203.0.113.0/24"]).ok("block del /24");
    assert_answered(lab, LEGIT_V4, PROTECTED_V4);
}

/// FireHOL/Spamhaus-style files; leaves the attacker's network blocked and the legitimate
/// IPv6 host allowed.
fn lists_are_imported_from_files(s: &mut Session) {
    let lab = &s.lab;
    let list_file = lab.dir().join("drop.txt");
    std::fs::write(
        &list_file,
        format!(
            "# a drop list\n\n{ATTACKER_NET_V4} ; SBL0001\n192.0.2.0/24\n2001:db8:ff::/48 # x\n"
        ),
    )
    .expect("write list file");
    let out = MoatProcess::cli(
        lab,
        &[
            "block",
            "import",
            &list_file.to_string_lossy(),
            "--comment",
            "drop list",
        ],
    )
    .ok("block import");
    assert!(out.contains("added 3"), "{out}");
    assert_unanswered(lab, ATTACKER_V4, PROTECTED_V4);
    s.blocked_pings += 1;
    let mut allow_file = std::fs::File::create(lab.dir().join("allow.txt")).expect("create");
    writeln!(allow_file, "{LEGIT_V6}").expect("write");
    MoatProcess::cli(
        lab,
        &[
            "allow",
            "import",
            &lab.dir().join("allow.txt").to_string_lossy(),
        ],
    )
    .ok("allow import");
    assert!(entry(&entries(lab, "allow"), "2001:db8:1::2/128").is_some());
}

/// Every blocked echo request counted, nothing else dropped.
fn stats_count_every_blocked_packet(s: &mut Session) {
    assert_eq!(
        stat_packets(&s.lab, "drop", "blocklist"),
        s.blocked_pings * u64::from(ASSERT_PINGS),
        "stats --json should count each blocked echo request"
    );
    let text = MoatProcess::cli(&s.lab, &["stats"]).ok("stats");
    assert!(
        text.contains("blocklist") && text.contains(&s.iface),
        "{text}"
    );
}

/// The file's new entries apply; a broken file is refused and the policy stays.
fn reload_applies_the_file_or_keeps_the_policy(s: &mut Session) {
    let lab = &s.lab;
    let written = lab.write_config(&format!("[blocklist]\ncidrs = [\"{LEGIT_V4}\"]\n"));
    assert_eq!(written, s.config, "the daemon's config file is rewritten");
    MoatProcess::cli(lab, &["reload"]).ok("reload");
    assert_unanswered(lab, LEGIT_V4, PROTECTED_V4);
    assert_answered(lab, ATTACKER_V6, PROTECTED_V6);
    lab.write_config("[blocklist]\ncidrs = [\"not-a-cidr\"]\n");
    let reason = MoatProcess::cli(lab, &["reload"]).refused("reload of a broken config");
    assert!(
        reason.contains("not-a-cidr") && reason.contains("running policy stays"),
        "{reason}"
    );
    assert_unanswered(lab, LEGIT_V4, PROTECTED_V4);
    assert_answered(lab, ATTACKER_V6, PROTECTED_V6);
    assert_unanswered(lab, ATTACKER_V4, PROTECTED_V4);
}

fn every_change_is_logged(s: &mut Session) {
    let log = s.moat.wait_for_log("reload rejected", 1);
    for logged in ["list entries added", "list entries deleted", "reloaded"] {
        assert!(
            log.contains(logged),
            "the log should say {logged:?}:\n{log}"
        );
    }
}

#[test]
fn ttl_entries_expire_on_time() {
    let lab = Lab::new();
    let config = lab.write_config("");
    let (moat, _) = start(&lab, &config);
    let added = Instant::now();
    MoatProcess::cli(&lab, &["block", "add", ATTACKER_NET_V4, "--ttl", "3s"]).ok("block add");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    let list = entries(&lab, "block");
    let expires = entry(&list, ATTACKER_NET_V4).expect("listed")["expires_at"]
        .as_str()
        .expect("expires_at is an RFC 3339 string")
        .to_string();
    assert!(
        expires.len() >= 20 && expires.as_bytes()[10] == b'T' && expires.ends_with('Z'),
        "expires_at should be RFC 3339 UTC: {expires}"
    );

    std::thread::sleep(Duration::from_secs(3).saturating_sub(added.elapsed()));
    let log = moat.wait_for_log("list entry expired", 1);
    assert!(
        added.elapsed() < Duration::from_secs(5),
        "the entry should expire within 2 s of its ttl:\n{log}"
    );
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert!(entry(&entries(&lab, "block"), ATTACKER_NET_V4).is_none());

    // An import whose TTL ends is removed whole and logged as one line, not one per entry.
    const IMPORTED: usize = 2000;
    let file = lab.dir().join("expiring.txt");
    std::fs::write(
        &file,
        format!("{}{ATTACKER_V4}\n", generated_list(IMPORTED - 1)),
    )
    .expect("write list");
    let cli = ["block", "import", &file.to_string_lossy(), "--ttl", "4s"];
    MoatProcess::cli(&lab, &cli).ok("block import --ttl");
    assert_eq!(entries(&lab, "block").len(), IMPORTED);
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    let log = moat.wait_for_log("list entries expired", 1);
    let line = log
        .lines()
        .find(|l| l.contains("list entries expired"))
        .expect("the line waited for");
    assert!(
        line.contains(&format!("removed={IMPORTED}"))
            || line.contains(&format!("\"removed\":{IMPORTED}")),
        "one line for all {IMPORTED} entries: {line}"
    );
    assert_eq!(
        log.matches("list entry expired").count(),
        1,
        "only the single entry above gets a line of its own:\n{log}"
    );
    assert!(entries(&lab, "block").is_empty());
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
}

/// `count` distinct prefixes: /32s in 10/8, /24s from 20.0.0.0 up, /64s in 2001:db8::/32.
fn generated_list(count: usize) -> String {
    let mut text = String::with_capacity(count * 20);
    for i in 0..count {
        let i = u32::try_from(i).expect("count fits u32");
        match i % 4 {
            0 | 1 => text.push_str(&format!(
                "10.{}.{}.{}\n",
                (i >> 16) & 0xff,
                (i >> 8) & 0xff,
                i & 0xff
            )),
            2 => {
                let j = i / 4;
                text.push_str(&format!(
                    "{}.{}.{}.0/24\n",
                    20 + (j >> 16),
                    (j >> 8) & 0xff,
                    j & 0xff
                ))
            }
            _ => text.push_str(&format!("2001:db8:{:x}:{:x}::/64\n", i >> 16, i & 0xffff)),
        }
    }
    text
}

#[test]
fn a_large_list_is_imported_whole_or_not_at_all() {
    const ENTRIES: usize = 100_000;
    let lab = Lab::new();
    let config = lab.write_config("runtime_entries = 100000\n");
    let (moat, _) = start(&lab, &config);

    // A bad line anywhere refuses the whole file, naming the line.
    let bad = lab.dir().join("bad.txt");
    std::fs::write(
        &bad,
        format!("{}10.1.2.3/33\n{ATTACKER_V4}\n", generated_list(1000)),
    )
    .expect("write list");
    let reason = MoatProcess::cli(&lab, &["block", "import", &bad.to_string_lossy()])
        .refused("import of a file with a bad line");
    assert!(reason.contains("bad.txt:1001"), "{reason}");
    assert!(
        entries(&lab, "block").is_empty(),
        "a refused import adds nothing"
    );

    let file = lab.dir().join("big.txt");
    std::fs::write(&file, format!("{}{ATTACKER_V4}\n", generated_list(ENTRIES))).expect("write");
    let started = Instant::now();
    let out = MoatProcess::cli(&lab, &["block", "import", &file.to_string_lossy()]).ok("import");
    let took = started.elapsed();
    eprintln!(
        "moat block import of {} prefixes: {took:?} ({out})",
        ENTRIES + 1
    );
    assert!(out.contains(&format!("added {}", ENTRIES + 1)), "{out}");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert_answered(&lab, LEGIT_V4, PROTECTED_V4);
    assert_eq!(entries(&lab, "block").len(), ENTRIES + 1);

    // The same file again updates, adds nothing.
    let out = MoatProcess::cli(&lab, &["block", "import", &file.to_string_lossy()]).ok("again");
    assert!(
        out.contains("added 0") && out.contains(&format!("updated {}", ENTRIES + 1)),
        "{out}"
    );
    drop(moat);
}

#[test]
fn kill_9_keeps_the_pinned_program_dropping_and_a_restart_takes_over() {
    let lab = Lab::new();
    let config = lab.write_config("");
    let (moat, old_id) = start(&lab, &config);
    MoatProcess::cli(
        &lab,
        &["block", "add", ATTACKER_NET_V4, "--comment", "incident 42"],
    )
    .ok("block add");

    // SIGKILL in the middle of a flood: no destructor runs, the pinned program stays.
    let if_index = lab.if_index(Side::Protected);
    let (sent, dropped_after_kill) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            udp_flood(
                &lab,
                Lab::addr(ATTACKER_V4),
                Lab::addr(PROTECTED_V4),
                400_000,
                64,
                Duration::from_secs(4),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        moat.kill_hard();
        let at_kill = Snapshot::of_program(old_id)
            .expect("the pinned program's counters")
            .get(if_index, Action::Drop, Reason::Blocklist)
            .packets;
        let (sent, _) = flood.join().expect("flood");
        let at_end = Snapshot::of_program(old_id)
            .expect("counters")
            .get(if_index, Action::Drop, Reason::Blocklist)
            .packets;
        (sent, at_end - at_kill)
    });
    assert_eq!(
        lab.xdp(Side::Protected),
        Some((old_id, "native")),
        "the pinned program must stay attached after kill -9"
    );
    assert!(
        dropped_after_kill > 0,
        "the flood ({sent} packets) should still be dropped after the daemon died"
    );
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);

    // A new daemon takes over while traffic flows: the attacker is never answered, the client
    // never loses a ping.
    let (attacker, legit, new) = std::thread::scope(|scope| {
        let attacker = scope.spawn(|| ping(&lab, ATTACKER_V4, PROTECTED_V4, 300));
        let legit = scope.spawn(|| ping(&lab, LEGIT_V4, PROTECTED_V4, 300));
        std::thread::sleep(Duration::from_millis(200));
        let new = MoatProcess::spawn(&lab, &["run", "--config", &config.to_string_lossy()]);
        new.wait_for_log("moat is enforcing", 1);
        (
            attacker.join().expect("attacker pings"),
            legit.join().expect("legit pings"),
            new,
        )
    });
    let log = new.log_text();
    assert!(log.contains("took over the pinned link"), "{log}");
    let (new_id, _) = lab.xdp(Side::Protected).expect("still attached");
    assert_ne!(
        new_id, old_id,
        "the new daemon's program should be in the link"
    );
    assert_eq!(
        attacker.received, 0,
        "no attacker ping answered during the restart"
    );
    assert_eq!(
        legit.received, legit.transmitted,
        "no legitimate ping lost during the restart"
    );
    let listed = entries(&lab, "block");
    assert_eq!(
        entry(&listed, ATTACKER_NET_V4).expect("restored")["comment"],
        "incident 42"
    );

    // After `moat down` nothing is pinned: the next start restores from the state directory.
    let (status, log) = new.stop(libc::SIGTERM);
    assert!(status.success(), "{log}");
    let bpffs = lab.bpffs().to_string_lossy().into_owned();
    MoatProcess::cli(&lab, &["down", "--bpffs", &bpffs]).ok("moat down");
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    let (third, _) = start(&lab, &config);
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    let listed = entries(&lab, "block");
    assert_eq!(
        entry(&listed, ATTACKER_NET_V4).expect("restored from disk")["source"],
        "cli"
    );
    drop(third);
}

/// The permission bits of `path`.
fn mode_of(path: &Path) -> u32 {
    let metadata =
        std::fs::metadata(path).unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o777
}

/// The nobody user and group of Debian.
const NOBODY: (u32, u32) = (65534, 65534);

#[test]
fn only_root_or_the_socket_group_may_use_the_socket() {
    let lab = Lab::new();
    let config = lab.write_config("");
    let (moat, _) = start(&lab, &config);
    let socket = lab.socket();
    let mode = mode_of(&socket);
    assert_eq!(mode, 0o600, "the socket is root's alone");
    let reason =
        MoatProcess::cli_as(&lab, &["status"], Some(NOBODY), &socket).refused("status as nobody");
    assert!(reason.contains("ermission denied"), "{reason}");

    // Even when the file mode lets them in, the daemon checks the peer's credentials.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .expect("chmod");
    let reason = MoatProcess::cli_as(&lab, &["block", "add", ATTACKER_V4], Some(NOBODY), &socket)
        .refused("block add as nobody");
    assert!(reason.contains("uid 65534"), "{reason}");
    assert!(
        entries(&lab, "block").is_empty(),
        "the refused client changed nothing"
    );
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    let (status, log) = moat.stop(libc::SIGTERM);
    assert!(
        status.success() && log.contains("control connection refused"),
        "{log}"
    );

    // With socket_group set, the group's members are let in, others are not.
    let config = lab.write_config("socket_group = \"nogroup\"\n");
    let (_moat, _) = start(&lab, &config);
    let mode = mode_of(&socket);
    assert_eq!(mode, 0o660);
    MoatProcess::cli_as(&lab, &["block", "add", ATTACKER_V4], Some(NOBODY), &socket)
        .ok("block add by a member of socket_group");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    MoatProcess::cli_as(&lab, &["status"], Some((65534, 100)), &socket)
        .refused("status by a non-member");
}

#[test]
fn bad_socket_messages_get_errors_and_the_daemon_keeps_serving() {
    let lab = Lab::new();
    let config = lab.write_config("");
    let (moat, _) = start(&lab, &config);
    let socket = lab.socket();

    // A client that connects and says nothing holds no one else up.
    let _silent = UnixStream::connect(&socket).expect("connect");
    let mut truncated = frame(br#"{"command":"stats"}"#);
    truncated.truncate(12);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", frame(b"\x00\xffnot json at all"), "not valid JSON"),
        ("an unknown command", frame(br#"{"command":"format_disk"}"#), "not valid JSON"),
        (
            "an unknown field",
            frame(br#"{"command":"list_show","arguments":{"list":"blocklist","all":true}}"#),
            "not valid JSON",
        ),
        ("a truncated frame", truncated, "truncated"),
        ("a short header", vec![0, 0], "truncated"),
        ("an oversized frame", vec![0xff, 0xff, 0xff, 0xff, b'{'], "exceeds the limit"),
        (
            "a bad CIDR",
            frame(br#"{"command":"list_add","arguments":{"list":"blocklist","cidrs":["198.51.100.7","1.2.3.4/99"],"ttl_seconds":null,"comment":null}}"#),
            "1.2.3.4/99",
        ),
        (
            "a zero ttl",
            frame(br#"{"command":"list_add","arguments":{"list":"blocklist","cidrs":["198.51.100.7"],"ttl_seconds":0,"comment":null}}"#),
            "ttl",
        ),
        (
            "a comment with control characters",
            frame(br#"{"command":"list_add","arguments":{"list":"blocklist","cidrs":["198.51.100.7"],"ttl_seconds":null,"comment":"a\nb"}}"#),
            "comment",
        ),
        (
            "an empty list",
            frame(br#"{"command":"list_add","arguments":{"list":"blocklist","cidrs":[],"ttl_seconds":null,"comment":null}}"#),
            "no CIDR",
        ),
        (
            "a top reading over no interval",
            frame(br#"{"command":"top","arguments":{"interval_ms":0,"limit":10}}"#),
            "interval_ms must be",
        ),
        (
            "a top of no rows",
            frame(br#"{"command":"top","arguments":{"interval_ms":1000,"limit":0}}"#),
            "limit must be",
        ),
        (
            "a capture of no frames",
            frame(br#"{"command":"capture","arguments":{"passed":false,"reason":null,"count":0,"every":1}}"#),
            "count must be",
        ),
        (
            "a capture of an unknown reason",
            frame(br#"{"command":"capture","arguments":{"passed":false,"reason":"nonsense","count":5,"every":1}}"#),
            "unknown reason",
        ),
        (
            "a capture sampling every 0th packet",
            frame(br#"{"command":"capture","arguments":{"passed":true,"reason":null,"count":5,"every":0}}"#),
            "every must be",
        ),
    ];
    for (what, bytes, expected) in cases {
        let response = exchange(&socket, &bytes);
        let error = response["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what} should get an error response, got {response}"));
        assert!(
            error.contains(expected),
            "{what}: {error:?} should mention {expected:?}"
        );
    }
    // A client that connects and leaves is no error at all.
    drop(UnixStream::connect(&socket).expect("connect"));

    // Still serving, and nothing changed.
    let response = exchange(&socket, &frame(br#"{"command":"status"}"#));
    assert_eq!(response["ok"]["reply"], "status", "{response}");
    assert!(
        entries(&lab, "block").is_empty(),
        "no bad request may change the lists"
    );
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    MoatProcess::cli(&lab, &["block", "add", ATTACKER_V4]).ok("a good request after bad ones");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert_answered(&lab, LEGIT_V6, PROTECTED_V6);
    let (status, log) = moat.stop(libc::SIGTERM);
    assert!(
        status.success(),
        "the daemon should have survived every bad client:\n{log}"
    );
}
