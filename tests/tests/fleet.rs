//! The fleet, end to end: real nats-server processes in a hub namespace, three moat daemons in
//! three labs, each on its own veth, sharing their blocks through a JetStream bucket. Every
//! propagation is timed and then checked with packets on the node that received it.

use std::time::{Duration, Instant};

use moat_tests::{
    Lab, MoatProcess,
    fleet_lab::{FleetLab, HUB_ADDRESS},
    lab::{ATTACKER_V4, PROTECTED_V4},
    metrics::scrape,
    nats::publish_raw,
    traffic::{BANNING, assert_answered, assert_unanswered, flood_until_banned},
};
use serde_json::Value;

/// The issue's bound: a change made on one node is enforced on the others within this.
const PROPAGATION: Duration = Duration::from_secs(1);
/// For what waits on a reconnection or a server's restart.
const CONVERGENCE: Duration = Duration::from_secs(20);
const METRICS: &str = "127.0.0.1:9977";

fn start_node(
    fleet: &FleetLab,
    i: usize,
    servers: &[&str],
    fleet_extra: &str,
    extra: &str,
) -> MoatProcess {
    let config = fleet.node(i).write_config(&format!(
        "{extra}\n{}",
        fleet.fleet_config(i, servers, fleet_extra)
    ));
    MoatProcess::start(
        fleet.node(i),
        &["run", "--config", &config.to_string_lossy()],
    )
    .0
}

/// `(cidr, source, origin)` of each entry of `list`.
fn entries(lab: &Lab, list: &str) -> Vec<(String, String, Option<String>)> {
    let text = MoatProcess::cli(lab, &[list, "list", "--json"]).ok("list --json");
    let entries: Vec<Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{list} list --json: {e}: {text}"));
    entries
        .iter()
        .map(|e| {
            (
                e["cidr"].as_str().unwrap_or_default().to_string(),
                e["source"].as_str().unwrap_or_default().to_string(),
                e["origin"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn has_entry(lab: &Lab, list: &str, cidr: &str) -> bool {
    entries(lab, list).iter().any(|(c, _, _)| c == cidr)
}

/// Polls `condition` until it holds; returns how long that took, or panics with `what`.
fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if condition() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two nodes on one server, both connected: the lab, A and B (each with the `[fleet]` and
/// top-level extras given), and the server's URL.
fn two_nodes(
    a_fleet: &str,
    a_extra: &str,
    b_extra: &str,
) -> (FleetLab, MoatProcess, MoatProcess, String) {
    let mut fleet = FleetLab::new(2);
    let url = fleet.start_server(None);
    let a = start_node(&fleet, 0, &[&url], a_fleet, a_extra);
    let b = start_node(&fleet, 1, &[&url], "", b_extra);
    wait_connected(fleet.node(0));
    wait_connected(fleet.node(1));
    (fleet, a, b, url)
}

fn wait_connected(lab: &Lab) {
    wait_until("the fleet connected", CONVERGENCE, || {
        MoatProcess::status(lab)["fleet"]["connected"] == true
    });
}

#[test]
fn a_block_on_one_node_is_enforced_on_every_node_within_a_second() {
    let mut fleet = FleetLab::new(3);
    let url = fleet.start_server(None);
    let metrics = format!("metrics_listen = \"{METRICS}\"");
    let nodes: Vec<MoatProcess> = (0..3)
        .map(|i| start_node(&fleet, i, &[&url], "", &metrics))
        .collect();
    for i in 0..3 {
        wait_connected(fleet.node(i));
        assert_answered(fleet.node(i), ATTACKER_V4, PROTECTED_V4);
    }

    let added = MoatProcess::cli(
        fleet.node(0),
        &["block", "add", ATTACKER_V4, "--comment", "scanner"],
    )
    .ok("block add on A");
    assert!(added.contains("fleet: published"), "{added}");
    let cidr = format!("{ATTACKER_V4}/32");
    for i in 1..3 {
        let took = wait_until("B and C hold A's block", PROPAGATION, || {
            has_entry(fleet.node(i), "block", &cidr)
        });
        eprintln!("node {i} enforced A's block {took:?} after A answered");
    }
    for i in 0..3 {
        assert_unanswered(fleet.node(i), ATTACKER_V4, PROTECTED_V4);
    }
    let on_b = entries(fleet.node(1), "block");
    assert!(
        on_b.contains(&(cidr.clone(), "fleet".into(), Some("edge-a".into()))),
        "{on_b:?}"
    );
    let text = MoatProcess::cli(fleet.node(1), &["block", "list"]).ok("block list");
    assert!(text.contains("[edge-a] scanner"), "{text}");

    // Deleted on C: gone everywhere.
    let deleted =
        MoatProcess::cli(fleet.node(2), &["block", "del", ATTACKER_V4]).ok("block del on C");
    assert!(deleted.contains("fleet: published"), "{deleted}");
    for i in [0, 1] {
        wait_until("A and B drop C's delete", PROPAGATION, || {
            !has_entry(fleet.node(i), "block", &cidr)
        });
    }
    for i in 0..3 {
        assert_answered(fleet.node(i), ATTACKER_V4, PROTECTED_V4);
    }

    let fleet_status = &MoatProcess::status(fleet.node(1))["fleet"];
    assert_eq!(fleet_status["node"], "edge-b", "{fleet_status}");
    assert!(
        fleet_status["last_revision"].as_u64() >= Some(2),
        "{fleet_status}"
    );
    assert!(fleet_status["lag_ms"].as_u64().is_some(), "{fleet_status}");
    let text = scrape(fleet.node(1), METRICS);
    for line in [
        "moat_fleet_connected 1",
        "moat_fleet_entries 0",
        "moat_fleet_publish_failures_total 0",
        "moat_fleet_apply_seconds_count 2",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    drop(nodes);
}

#[test]
fn a_node_that_was_away_matches_the_fleet_when_it_returns() {
    let (fleet, a, b, url) = two_nodes("", "", "");
    let (node_a, node_b) = (fleet.node(0), fleet.node(1));
    MoatProcess::cli(node_a, &["block", "add", ATTACKER_V4, "192.0.2.1"]).ok("block add");
    wait_until("B holds A's blocks", PROPAGATION, || {
        has_entry(node_b, "block", "192.0.2.1/32")
    });
    assert_unanswered(node_b, ATTACKER_V4, PROTECTED_V4);

    let (exit, log) = b.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");
    // While B is away: a delete (its ghost must not survive), adds to both lists.
    MoatProcess::cli(node_a, &["block", "del", ATTACKER_V4]).ok("block del");
    MoatProcess::cli(node_a, &["block", "add", "192.0.2.3", "--ttl", "1h"]).ok("block add");
    MoatProcess::cli(node_a, &["allow", "add", "203.0.113.77"]).ok("allow add");

    let b = start_node(&fleet, 1, &[&url], "", "");
    let want_block = entries(node_a, "block");
    let want_allow = entries(node_a, "allow");
    let matched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("B matches A exactly", CONVERGENCE, || {
            entries(node_b, "block") == want_block && entries(node_b, "allow") == want_allow
        })
    }));
    assert!(
        matched.is_ok(),
        "A: {want_block:?} {want_allow:?}\nB: {:?} {:?}\nB's log:\n{}",
        entries(node_b, "block"),
        entries(node_b, "allow"),
        b.log_text()
    );
    assert_eq!(want_block.len(), 2, "{want_block:?}");
    assert_answered(node_b, ATTACKER_V4, PROTECTED_V4);
    let log = b.wait_for_log("fleet reconciled", 1);
    assert!(log.contains("removed=1"), "{log}");
    drop(a);
}

#[test]
fn the_fleet_converges_after_its_server_is_killed_mid_burst() {
    let (mut fleet, _a, _b, _) = two_nodes("", "", "");
    let adds: Vec<String> = (1..=40).map(|n| format!("192.0.2.{n}")).collect();
    for (n, address) in adds.iter().enumerate() {
        if n == 10 {
            fleet.server(0).kill();
        }
        let started = Instant::now();
        let reply =
            MoatProcess::cli(fleet.node(0), &["block", "add", address]).ok("block add mid-burst");
        // Local enforcement never waits on the fleet.
        assert!(started.elapsed() < Duration::from_secs(2), "{reply}");
        assert!(has_entry(fleet.node(0), "block", &format!("{address}/32")));
    }
    let reply = MoatProcess::cli(fleet.node(0), &["block", "add", ATTACKER_V4]).ok("block add");
    assert!(reply.contains("queued, fleet unreachable"), "{reply}");
    assert_unanswered(fleet.node(0), ATTACKER_V4, PROTECTED_V4);
    let down = MoatProcess::status(fleet.node(0));
    assert_eq!(down["fleet"]["connected"], false, "{down}");
    assert!(down["fleet"]["queued"].as_u64() > Some(0), "{down}");

    fleet.server(0).restart();
    for address in adds.iter().chain([&ATTACKER_V4.to_string()]) {
        let cidr = format!("{address}/32");
        wait_until("B holds every add of the burst", CONVERGENCE, || {
            has_entry(fleet.node(1), "block", &cidr)
        });
    }
    assert_unanswered(fleet.node(1), ATTACKER_V4, PROTECTED_V4);
    let up = MoatProcess::status(fleet.node(0));
    assert_eq!(up["fleet"]["queued"], 0, "{up}");
    assert_eq!(
        entries(fleet.node(0), "block"),
        entries(fleet.node(1), "block")
    );
}

#[test]
fn a_three_server_cluster_keeps_propagating_with_one_server_down() {
    let mut fleet = FleetLab::new(2);
    let urls = fleet.start_servers(3, None);
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    // A knows only the server that will die; the cluster tells it of the others.
    let _a = start_node(&fleet, 0, &urls[..1], "replicas = 3", "");
    let _b = start_node(&fleet, 1, &urls[1..], "replicas = 3", "");
    wait_connected(fleet.node(0));
    wait_connected(fleet.node(1));
    MoatProcess::cli(fleet.node(0), &["block", "add", "192.0.2.1"]).ok("block add");
    wait_until("B holds the first block", PROPAGATION, || {
        has_entry(fleet.node(1), "block", "192.0.2.1/32")
    });

    fleet.server(0).kill();
    MoatProcess::cli(fleet.node(0), &["block", "add", ATTACKER_V4]).ok("block add");
    let took = wait_until(
        "B holds the block made with a server down",
        CONVERGENCE,
        || has_entry(fleet.node(1), "block", &format!("{ATTACKER_V4}/32")),
    );
    eprintln!("propagated {took:?} after the add, with one of three servers down");
    assert_unanswered(fleet.node(1), ATTACKER_V4, PROTECTED_V4);
}

#[test]
fn fleet_entries_expire_everywhere_and_bans_are_shared() {
    let (fleet, a, _b, _) = two_nodes("share = [\"cli\", \"bans\"]", BANNING, "");

    MoatProcess::cli(fleet.node(0), &["block", "add", "192.0.2.9", "--ttl", "3s"]).ok("block add");
    let added = Instant::now();
    wait_until("B holds the entry", PROPAGATION, || {
        has_entry(fleet.node(1), "block", "192.0.2.9/32")
    });
    // Each node on its own: neither lets it go early (nor does the bucket, for B).
    for i in [1, 0] {
        wait_until("the entry expires", Duration::from_secs(8), || {
            !has_entry(fleet.node(i), "block", "192.0.2.9/32")
        });
        let took = added.elapsed();
        assert!(
            took > Duration::from_millis(2500),
            "node {i} expired it after {took:?}"
        );
    }

    // A bans the flooding source; B blocks it too.
    flood_until_banned(fleet.node(0), &a);
    let cidr = format!("{ATTACKER_V4}/32");
    wait_until("B holds A's ban", PROPAGATION, || {
        has_entry(fleet.node(1), "block", &cidr)
    });
    assert_unanswered(fleet.node(1), ATTACKER_V4, PROTECTED_V4);
    let text = MoatProcess::cli(fleet.node(1), &["block", "list"]).ok("block list");
    assert!(text.contains("rate-limit ban on edge-a"), "{text}");

    // Lifted on A: the ban goes, and its fleet entry with it.
    let lifted = MoatProcess::cli(fleet.node(0), &["block", "del", ATTACKER_V4]).ok("block del");
    assert!(lifted.contains("fleet: published"), "{lifted}");
    wait_until("B drops A's lifted ban", PROPAGATION, || {
        !has_entry(fleet.node(1), "block", &cidr)
    });
    for i in [0, 1] {
        assert_answered(fleet.node(i), ATTACKER_V4, PROTECTED_V4);
    }
}

#[test]
fn an_unreachable_or_refusing_fleet_leaves_local_enforcement_alone() {
    let mut fleet = FleetLab::new(2);
    let url = fleet.start_server(Some("right-token"));
    let _a = start_node(&fleet, 0, &[&url], "token = \"wrong-token\"", "");
    let nobody = format!("nats://{HUB_ADDRESS}:4299");
    let _b = start_node(&fleet, 1, &[&nobody], "", "");
    // Long enough for the clients to have tried (and, for A, been refused) a few times.
    std::thread::sleep(Duration::from_secs(2));
    for (i, error) in [(0, "authorization"), (1, "")] {
        let lab = fleet.node(i);
        let reply = MoatProcess::cli(lab, &["block", "add", ATTACKER_V4]).ok("block add");
        assert!(reply.contains("queued, fleet unreachable"), "{reply}");
        assert_unanswered(lab, ATTACKER_V4, PROTECTED_V4);
        let down = MoatProcess::status(lab);
        assert_eq!(down["fleet"]["connected"], false, "{down}");
        if !error.is_empty() {
            wait_until("the refusal is reported", CONVERGENCE, || {
                MoatProcess::status(lab)["fleet"]["error"]
                    .as_str()
                    .is_some_and(|e| e.to_lowercase().contains(error))
            });
        }
        let text = MoatProcess::cli(lab, &["status"]).ok("status");
        assert!(text.contains("fleet      node edge-"), "{text}");
        assert!(text.contains("DOWN: enforcing locally"), "{text}");
    }
}

#[test]
fn values_that_are_not_moats_are_skipped_and_nothing_else_is_affected() {
    let (fleet, a, _b, _) = two_nodes("", "", "");
    let valid = |cidr: &str| {
        format!(
            r#"{{"version":1,"list":"blocklist","cidr":"{cidr}","expires_at":null,"comment":null,"origin":"x"}}"#
        )
    };
    let far = format!(
        r#"{{"version":1,"list":"blocklist","cidr":"192.0.2.8/32","expires_at":{},"comment":null,"origin":"x"}}"#,
        u64::MAX / 2
    );
    let bad: [(&str, String); 5] = [
        ("blocklist.192.0.2.0/24", "not json".into()),
        ("blocklist.192.0.2.7/32", valid("192.0.2.70/32")),
        ("blocklist.192.0.2.8/32", far),
        ("blocklist.192.0.2.9", valid("192.0.2.9/32")),
        ("stray.key", "{}".into()),
    ];
    for (key, value) in &bad {
        publish_raw(
            fleet.hub(),
            HUB_ADDRESS,
            4222,
            &format!("$KV.moat.{key}"),
            value.as_bytes(),
        );
    }
    MoatProcess::cli(fleet.node(1), &["block", "add", ATTACKER_V4]).ok("block add on B");
    wait_until("A holds B's block", PROPAGATION * 5, || {
        has_entry(fleet.node(0), "block", &format!("{ATTACKER_V4}/32"))
    });
    assert_unanswered(fleet.node(0), ATTACKER_V4, PROTECTED_V4);
    let blocks = entries(fleet.node(0), "block");
    assert_eq!(
        blocks.len(),
        1,
        "nothing of the bad values applied: {blocks:?}"
    );
    let log = a.wait_for_log("skipped a fleet value that is not moat's", bad.len());
    for (key, _) in &bad {
        assert!(
            log.contains(&format!("key={key}")),
            "{key} named in:\n{log}"
        );
    }
    assert_eq!(
        MoatProcess::status(fleet.node(0))["fleet"]["rejected"],
        bad.len() as u64
    );
    assert_eq!(
        MoatProcess::status(fleet.node(0))["fleet"]["connected"],
        true
    );
}

#[test]
fn changes_made_while_the_fleet_is_down_survive_a_restart() {
    let (mut fleet, a, _b, url) = two_nodes("", "", "");
    MoatProcess::cli(fleet.node(0), &["block", "add", "192.0.2.1"]).ok("block add");
    wait_until("B holds the first block", PROPAGATION, || {
        has_entry(fleet.node(1), "block", "192.0.2.1/32")
    });

    // The servers go away; A blocks one source and lifts the first block, then restarts.
    fleet.server(0).kill();
    wait_until("A sees the fleet down", CONVERGENCE, || {
        MoatProcess::status(fleet.node(0))["fleet"]["connected"] == false
    });
    let reply = MoatProcess::cli(fleet.node(0), &["block", "add", ATTACKER_V4]).ok("block add");
    assert!(reply.contains("queued, fleet unreachable"), "{reply}");
    MoatProcess::cli(fleet.node(0), &["block", "del", "192.0.2.1"]).ok("block del");
    let (exit, log) = a.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");
    fleet.server(0).restart();
    let a = start_node(&fleet, 0, &[&url], "", "");

    let cidr = format!("{ATTACKER_V4}/32");
    wait_until(
        "B holds the block made while the fleet was down",
        CONVERGENCE,
        || {
            has_entry(fleet.node(1), "block", &cidr)
                && !has_entry(fleet.node(1), "block", "192.0.2.1/32")
        },
    );
    assert_unanswered(fleet.node(1), ATTACKER_V4, PROTECTED_V4);
    // A reconciled against a bucket that already held its queued changes: nothing undone.
    assert!(
        has_entry(fleet.node(0), "block", &cidr),
        "{:?}",
        entries(fleet.node(0), "block")
    );
    assert!(!has_entry(fleet.node(0), "block", "192.0.2.1/32"));
    let log = a.wait_for_log("fleet reconciled", 1);
    assert!(
        log.contains("publishing the changes an earlier run could not"),
        "{log}"
    );
}

#[test]
fn tls_and_an_nkey_let_a_node_in_and_another_key_is_refused() {
    let mut fleet = FleetLab::new(2);
    let member = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let (url, ca) = fleet.start_tls_server(&[member.public_key()]);
    for (i, key) in [(0, &member), (1, &stranger)] {
        let seed = fleet.node(i).dir().join("fleet.nk");
        std::fs::write(&seed, key.seed().expect("seed")).expect("write the seed");
    }
    let auth = |i: usize| {
        format!(
            "nkey = {:?}\nca = {:?}",
            fleet.node(i).dir().join("fleet.nk"),
            ca
        )
    };
    let _a = start_node(&fleet, 0, &[&url], &auth(0), "");
    let _b = start_node(&fleet, 1, &[&url], &auth(1), "");
    wait_connected(fleet.node(0));
    let reply = MoatProcess::cli(fleet.node(0), &["block", "add", ATTACKER_V4]).ok("block add");
    assert!(reply.contains("fleet: published"), "{reply}");
    let status_a = MoatProcess::status(fleet.node(0));
    assert!(
        status_a["fleet"]["server"]
            .as_str()
            .is_some_and(|s| s.contains("tls0")),
        "{status_a}"
    );
    // The stranger is refused, and still enforces its own.
    wait_until("the stranger's refusal is reported", CONVERGENCE, || {
        MoatProcess::status(fleet.node(1))["fleet"]["error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("authorization"))
    });
    assert_eq!(
        MoatProcess::status(fleet.node(1))["fleet"]["connected"],
        false
    );
    assert!(!has_entry(
        fleet.node(1),
        "block",
        &format!("{ATTACKER_V4}/32")
    ));
    MoatProcess::cli(fleet.node(1), &["block", "add", ATTACKER_V4]).ok("block add on B");
    assert_unanswered(fleet.node(1), ATTACKER_V4, PROTECTED_V4);
}

#[test]
fn a_node_whose_lists_are_full_refuses_the_rest_and_logs_it() {
    const SHARED: usize = 20_000;
    // B has no room beyond the built-in minimum of the long-prefix table (16,384).
    let (fleet, _a, b, _) = two_nodes("", "", "runtime_entries = 0");
    let file = fleet.dir().join("many.txt");
    let lines: Vec<String> = (0..SHARED)
        .map(|i| format!("10.9.{}.{}", i >> 8, i & 0xff))
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("write the list");
    MoatProcess::cli(fleet.node(0), &["block", "import", &file.to_string_lossy()]).ok("import");
    wait_until("B applied or refused every entry", CONVERGENCE, || {
        let fleet_b = &MoatProcess::status(fleet.node(1))["fleet"];
        fleet_b["entries"].as_u64().unwrap_or(0) + fleet_b["refused"].as_u64().unwrap_or(0)
            >= SHARED as u64
    });
    let fleet_b = &MoatProcess::status(fleet.node(1))["fleet"];
    let held = fleet_b["entries"].as_u64().expect("entries");
    assert!(held > 10_000 && held < SHARED as u64, "{fleet_b}");
    assert_eq!(
        entries(fleet.node(1), "block").len() as u64,
        held,
        "what B lists is what it holds"
    );
    assert_eq!(
        entries(fleet.node(0), "block").len(),
        SHARED,
        "A holds them all"
    );
    let log = b.wait_for_log("fleet entries refused", 1);
    assert!(log.contains("raise runtime_entries"), "{log}");
    // B still enforces its own.
    MoatProcess::cli(fleet.node(1), &["block", "del", "10.9.0.0"]).ok("block del on B");
    let reply =
        MoatProcess::cli(fleet.node(1), &["block", "add", ATTACKER_V4]).ok("block add on B");
    assert!(reply.contains("fleet: published"), "{reply}");
    assert_unanswered(fleet.node(1), ATTACKER_V4, PROTECTED_V4);
}
