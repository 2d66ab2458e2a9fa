//! End to end on a veth pair: a SYN flood forging a new source for every packet (trafgen,
//! full speed) against a real TCP service behind moat's SYN proxy. The program answers every
//! SYN itself; legitimate clients complete their handshakes through netfilter's synproxy and
//! exchange data; the listener's own counters show it never saw the flood. moat installs the
//! nftables table and sysctls synproxy needs, and `moat down` takes them away again.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    time::Duration,
};

use agent_common::stats::{Action, Reason};
use moat::program::counters::Snapshot;
use moat_tests::{
    Lab, MoatProcess, Side,
    heavy::heavy,
    lab::{LEGIT_V4, PROTECTED_V4, PROTECTED_V6},
    moat_process::moat_bin,
    tcp_service::{EchoService, TCP_SERVICE_PORT, exchange, exchanges, tcp_ext},
    traffic::udp_paced,
    trafgen::{self, SynFlood},
};

/// How long each flood runs, and the cores trafgen sends from.
const FLOOD: Duration = Duration::from_secs(6);
const FLOOD_CPUS: u32 = 1;
/// Legitimate exchanges during the flood, and the clients making them at once.
const LEGIT_EXCHANGES: usize = 100;
const LEGIT_CLIENTS: usize = 4;
/// The listener's counters a SYN reaching it would move: a full queue, or a kernel cookie.
const LISTENER_COUNTERS: [&str; 3] = ["ListenOverflows", "ListenDrops", "SyncookiesSent"];

fn service_address(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("an address"), TCP_SERVICE_PORT)
}

/// What a test runs: moat, its program's id, the services, and the outside end's XDP program.
struct Running {
    moat: MoatProcess,
    id: u32,
    _services: [EchoService; 2],
    _receive: OwnedFd,
}

/// moat with the SYN proxy on the service's port, the service, and the outside end made able
/// to receive what the program sends back.
fn start(lab: &Lab) -> Running {
    start_with(lab, "", &[])
}

/// [`start`] with more configuration (`extra`, after `[syn_proxy]`) and arguments.
fn start_with(lab: &Lab, extra: &str, args: &[&str]) -> Running {
    let receive = lab.receive_xdp_tx();
    let v4 = EchoService::start(lab, service_address(PROTECTED_V4));
    let v6 = EchoService::start(lab, service_address(PROTECTED_V6));
    // Top-level keys (`mode = …`) of `extra` go before the tables.
    let (top, tables) = match extra.find('[') {
        Some(at) => extra.split_at(at),
        None => (extra, ""),
    };
    let config = lab.write_config(&format!(
        "{top}[syn_proxy]\nports = [{TCP_SERVICE_PORT}]\nverified_ttl = \"1m\"\n{tables}"
    ));
    let config = config.to_string_lossy();
    let mut all = vec![
        "run",
        "--config",
        &config,
        "--iface",
        lab.interface(Side::Protected),
    ];
    all.extend_from_slice(args);
    let (moat, id) = MoatProcess::start(lab, &all);
    Running {
        moat,
        id,
        _services: [v4, v6],
        _receive: receive,
    }
}

fn answered(id: u32, lab: &Lab) -> u64 {
    Snapshot::of_program(id)
        .expect("moat's counters")
        .get(lab.if_index(Side::Protected), Action::Tx, Reason::SynCookie)
        .packets
}

/// A flood to `destination` while 100 legitimate exchanges run; checks they all succeed, the
/// listener saw nothing of the flood, and the program answered its SYNs.
fn flood_and_exchange(lab: &Lab, id: u32, destination: &str) {
    let flood = SynFlood {
        destination: destination.parse::<IpAddr>().expect("an address"),
        dst_port: TCP_SERVICE_PORT,
    }
    .write(lab, "syn-flood.cfg");
    let listener_before = tcp_ext(lab, &LISTENER_COUNTERS);
    let answered_before = answered(id, lab);
    let (sent, (times, errors)) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| trafgen::run(lab, &flood, FLOOD, FLOOD_CPUS, None));
        std::thread::sleep(Duration::from_millis(500));
        let legit = exchanges(
            lab,
            service_address(destination),
            LEGIT_EXCHANGES,
            LEGIT_CLIENTS,
        );
        (flood.join().expect("the flood"), legit)
    });
    let listener_after = tcp_ext(lab, &LISTENER_COUNTERS);
    let answered_now = answered(id, lab) - answered_before;
    eprintln!(
        "{destination}: {sent} SYNs sent, {answered_now} answered by the program; {} of \
         {LEGIT_EXCHANGES} exchanges, slowest connect {:?}; listener {listener_before:?} → \
         {listener_after:?}",
        times.len(),
        times.iter().max()
    );
    assert!(
        errors.is_empty(),
        "every legitimate exchange must succeed during the flood; {} failed: {errors:?}",
        errors.len()
    );
    assert_eq!(
        listener_after, listener_before,
        "the listener's {LISTENER_COUNTERS:?} must not move: the flood never reaches it"
    );
    assert!(sent > 10_000, "the flood was a flood: {sent} SYNs");
    // The legitimate SYNs are answered too; a few flood frames may be lost on the veth.
    assert!(
        answered_now >= sent * 9 / 10 && answered_now <= sent + LEGIT_EXCHANGES as u64 * 4,
        "the program answers (about) every SYN: {answered_now} answered, {sent} sent"
    );
}

#[test]
fn legitimate_connections_complete_through_a_spoofed_syn_flood() {
    let _heavy = heavy();
    let lab = Lab::new();
    let running = start(&lab);
    let id = running.id;
    let table = table_text(&lab);
    assert!(
        table.contains("synproxy mss 1460 wscale 7 timestamp sack-perm")
            && table.contains("synproxy mss 1440"),
        "moat installed its synproxy table:\n{table}"
    );
    // Before any flood, one exchange of each family.
    for address in [PROTECTED_V4, PROTECTED_V6] {
        exchange(&lab, service_address(address), 0)
            .unwrap_or_else(|e| panic!("{address}: an exchange through the proxy fails: {e}"));
    }
    // The status reads the daemon's latest walk of the maps: wait for one after the exchanges.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = MoatProcess::cli(&lab, &["status"]).ok("moat status");
        if status.contains("verified sources (SYN proxy): 2 of") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client's IPv4 address and IPv6 /64 are verified:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    flood_and_exchange(&lab, id, PROTECTED_V4);
    flood_and_exchange(&lab, id, PROTECTED_V6);
    drop(running);
}

/// In generic mode the kernel sends the program's SYN-ACKs out through the stack's transmit
/// path: the handshakes complete the same.
#[test]
fn generic_mode_answers_syns_too() {
    let lab = Lab::new();
    let running = start_with(&lab, "", &["--xdp-mode", "generic"]);
    assert_eq!(
        lab.xdp(Side::Protected).map(|(_, mode)| mode),
        Some("generic")
    );
    for address in [PROTECTED_V4, PROTECTED_V6] {
        exchange(&lab, service_address(address), 0)
            .unwrap_or_else(|e| panic!("{address}: an exchange in generic mode fails: {e}"));
    }
    // At least: a SYN retransmitted before its answer arrived is answered again.
    assert!(
        answered(running.id, &lab) >= 2,
        "both SYNs answered by the program"
    );
}

/// In monitor mode moat changes nothing: SYNs reach the listener, netfilter and the sysctls
/// are left alone, and what would have been answered is counted.
#[test]
fn monitor_mode_leaves_the_host_alone() {
    let lab = Lab::new();
    let running = start_with(&lab, "mode = \"monitor\"\n", &[]);
    assert!(!table_listed(&lab), "no table in monitor mode");
    exchange(&lab, service_address(PROTECTED_V4), 0)
        .unwrap_or_else(|e| panic!("an exchange in monitor mode fails: {e}"));
    let would = Snapshot::of_program(running.id)
        .expect("counters")
        .get(
            lab.if_index(Side::Protected),
            Action::WouldTx,
            Reason::SynCookie,
        )
        .packets;
    assert!(would >= 1, "the SYN is counted as would_tx");
    assert_eq!(answered(running.id, &lab), 0, "and not answered");
}

/// The review's case, on the wire: a stream with a client's address at 8× its limit for 3 s
/// (it may be forged: the address never proved itself) has its excess dropped but bans nobody
/// with `ban = "verified"`; once the address completes a handshake, the same stream bans it.
#[test]
fn with_ban_verified_a_stream_bans_its_source_only_once_the_source_is_verified() {
    let lab = Lab::new();
    let running = start_with(
        &lab,
        "[rate_limit]\npps = 50\nburst_packets = 50\nban_after = \"1s\"\nban_ttl = \"10m\"\n\
         ban = \"verified\"\n",
        &[],
    );
    let if_index = lab.if_index(Side::Protected);
    let counted = |reason| {
        Snapshot::of_program(running.id)
            .expect("counters")
            .get(if_index, Action::Drop, reason)
            .packets
    };
    let stream = || {
        udp_paced(
            &lab,
            Lab::addr(LEGIT_V4),
            Lab::addr(PROTECTED_V4),
            400,
            Duration::from_secs(3),
        )
    };
    stream();
    assert!(counted(Reason::RateLimit) > 500, "the excess is dropped");
    assert_eq!(
        counted(Reason::Ban),
        0,
        "an unverified source is never banned"
    );
    assert!(
        !running.moat.log_text().contains("banned"),
        "no ban logged:\n{}",
        running.moat.log_text()
    );
    // The address proves itself (the exchange's own packets are within the limit again).
    std::thread::sleep(Duration::from_secs(2));
    exchange(&lab, service_address(PROTECTED_V4), 0)
        .unwrap_or_else(|e| panic!("the client's exchange fails: {e}"));
    stream();
    running.moat.wait_for_log("banned", 1);
    assert!(counted(Reason::Ban) > 0, "the verified source is banned");
}

/// moat's nftables table in the protected namespace, as `nft` lists it; empty when absent.
fn table_text(lab: &Lab) -> String {
    let out = lab
        .netns(Side::Protected)
        .command("nft")
        .args(["list", "table", "inet", "moat"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn table_listed(lab: &Lab) -> bool {
    !table_text(lab).is_empty()
}

fn set_sysctl(lab: &Lab, assignment: &str) {
    let set = lab
        .netns(Side::Protected)
        .command("sysctl")
        .args(["-qw", assignment])
        .status()
        .expect("sysctl");
    assert!(set.success(), "sysctl -w {assignment}");
}

fn sysctl(lab: &Lab, name: &str) -> String {
    let out = lab
        .netns(Side::Protected)
        .command("sysctl")
        .args(["-n", name])
        .output()
        .expect("sysctl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The table and the sysctls follow `[syn_proxy]` through reloads, stay with the pinned
/// program when the daemon stops, and go with `moat down`, the sysctls back as they were.
#[test]
fn the_netfilter_setup_follows_the_config_and_moat_down_removes_it() {
    let lab = Lab::new();
    // A value synproxy cannot work with, to be put back afterwards.
    set_sysctl(&lab, "net.ipv4.tcp_timestamps=0");
    let running = start(&lab);
    assert!(table_listed(&lab));
    assert_eq!(sysctl(&lab, "net.ipv4.tcp_timestamps"), "1");
    assert_eq!(sysctl(&lab, "net.netfilter.nf_conntrack_tcp_loose"), "0");

    let with_proxy = std::fs::read_to_string(lab.dir().join("moat.toml")).expect("config");
    lab.write_config("");
    MoatProcess::cli(&lab, &["reload"]).ok("moat reload without [syn_proxy]");
    assert!(
        !table_listed(&lab),
        "a reload without [syn_proxy] removes the table"
    );
    assert_eq!(
        sysctl(&lab, "net.ipv4.tcp_timestamps"),
        "0",
        "and restores the sysctl"
    );
    std::fs::write(lab.dir().join("moat.toml"), &with_proxy).expect("config");
    MoatProcess::cli(&lab, &["reload"]).ok("moat reload with [syn_proxy]");
    assert!(table_listed(&lab), "a reload with [syn_proxy] puts it back");
    // Another port: the table ends with the new one only (it covered both during the switch).
    let other_port = TCP_SERVICE_PORT + 1;
    lab.write_config(&format!("[syn_proxy]\nports = [{other_port}]\n"));
    MoatProcess::cli(&lab, &["reload"]).ok("moat reload with another port");
    let table = table_text(&lab);
    assert!(
        table.contains(&other_port.to_string()) && !table.contains(&TCP_SERVICE_PORT.to_string()),
        "the table follows the port:\n{table}"
    );
    std::fs::write(lab.dir().join("moat.toml"), &with_proxy).expect("config");
    MoatProcess::cli(&lab, &["reload"]).ok("moat reload back");
    assert_eq!(sysctl(&lab, "net.ipv4.tcp_timestamps"), "1");
    // An operator's own change while moat runs (2: timestamps on, without offsets) is theirs:
    // moat does not put its saved value over it.
    set_sysctl(&lab, "net.ipv4.tcp_timestamps=2");

    let (status, log) = running.moat.stop(libc::SIGTERM);
    assert!(status.success(), "moat stops cleanly:\n{log}");
    assert!(
        table_listed(&lab),
        "the table stays while the pinned program answers SYNs"
    );
    MoatProcess::cli(
        &lab,
        &[
            "down",
            "--bpffs",
            &lab.bpffs().to_string_lossy(),
            "--state-dir",
            &lab.state_dir().to_string_lossy(),
        ],
    )
    .ok("moat down");
    assert!(!table_listed(&lab), "moat down removes the table");
    assert_eq!(
        sysctl(&lab, "net.netfilter.nf_conntrack_tcp_loose"),
        "1",
        "moat down puts conntrack's loose pickup back"
    );
    assert_eq!(
        sysctl(&lab, "net.ipv4.tcp_timestamps"),
        "2",
        "the operator's later value stays"
    );
    assert!(
        !lab.state_dir().join("syn-proxy-sysctls.json").exists(),
        "nothing left to restore"
    );
}

/// Without nftables, `[syn_proxy]` cannot work: moat refuses to start, saying what is missing,
/// and attaches nothing.
#[test]
fn without_nft_moat_refuses_to_start() {
    let lab = Lab::new();
    let config = lab.write_config(&format!("[syn_proxy]\nports = [{TCP_SERVICE_PORT}]\n"));
    let out = std::process::Command::new("/usr/bin/nsenter")
        .arg(format!(
            "--net={}",
            lab.netns(Side::Protected).path().display()
        ))
        .arg("--")
        .arg(moat_bin())
        .args(["run", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(lab.socket())
        .arg("--state-dir")
        .arg(lab.state_dir())
        .arg("--bpffs")
        .arg(lab.bpffs())
        // A PATH with nothing in it: no nft wherever the distribution keeps it.
        .env("PATH", lab.dir().join("empty-path"))
        .output()
        .expect("run moat");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "moat must not start without nft:\n{text}"
    );
    assert!(
        text.contains("[syn_proxy] needs nftables"),
        "the error names what is missing:\n{text}"
    );
    assert_eq!(lab.xdp(Side::Protected), None, "nothing attached");
}
