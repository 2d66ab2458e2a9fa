//! End to end: the real `moat` binary on a veth pair, real packets, counters read back from the
//! kernel's maps.

use agent_common::stats::{Action, Reason};
use moat::program::counters::Snapshot;
use moat_tests::{
    Lab, MoatProcess, Side,
    lab::{
        ATTACKER_NET_V4, ATTACKER_NET_V6, ATTACKER_V4, ATTACKER_V6, LEGIT_V4, LEGIT_V6,
        PROTECTED_V4, PROTECTED_V6,
    },
    traffic::{ASSERT_PINGS, assert_answered, assert_unanswered, ping_frame_len},
};

const PINGS: u32 = ASSERT_PINGS;

/// Blocks the attacker networks from the command line, on the protected interface.
fn start_blocking(lab: &Lab, extra: &[&str]) -> (MoatProcess, u32) {
    let mut args = vec![
        "run",
        "--iface",
        lab.interface(Side::Protected),
        "--block",
        ATTACKER_NET_V4,
        "--block",
        ATTACKER_NET_V6,
    ];
    args.extend_from_slice(extra);
    MoatProcess::start(lab, &args)
}

#[test]
fn blocked_sources_get_no_replies_and_every_drop_is_counted() {
    let lab = Lab::new();
    let (moat, program_id) = start_blocking(&lab, &[]);

    assert_answered(&lab, LEGIT_V4, PROTECTED_V4);
    assert_answered(&lab, LEGIT_V6, PROTECTED_V6);
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert_unanswered(&lab, ATTACKER_V6, PROTECTED_V6);

    let snapshot = Snapshot::of_program(program_id).expect("read the program's counters");
    let if_index = lab.if_index(Side::Protected);
    let dropped = snapshot.get(if_index, Action::Drop, Reason::Blocklist);
    let v4_frame = ping_frame_len(Lab::addr(PROTECTED_V4));
    let v6_frame = ping_frame_len(Lab::addr(PROTECTED_V6));
    assert_eq!(
        (dropped.packets, dropped.bytes),
        (
            2 * u64::from(PINGS),
            u64::from(PINGS) * (v4_frame + v6_frame)
        ),
        "drop/blocklist should count exactly the attacker's echo requests; all counters: {snapshot:?}"
    );
    // Legitimate echo requests pass; the kernel's own IPv6 link-local chatter may add to them.
    let passed = snapshot.get(if_index, Action::Pass, Reason::NoMatch);
    assert!(
        passed.packets >= 2 * u64::from(PINGS),
        "pass/no_match should count at least the {} legitimate echo requests: {snapshot:?}",
        2 * PINGS
    );
    assert!(
        snapshot
            .rows
            .iter()
            .all(|r| r.action == Action::Pass || r.reason == Reason::Blocklist),
        "nothing but the blocklist should drop here: {snapshot:?}"
    );

    let (status, log) = moat.stop(libc::SIGTERM);
    assert!(
        status.success(),
        "moat should exit 0 on SIGTERM, got {status}; log:\n{log}"
    );
    assert!(
        log.contains("reason=\"blocklist\" packets=10"),
        "moat should log its final counters:\n{log}"
    );
    // SIGTERM (systemctl stop/restart) leaves the pinned program enforcing, and says so.
    assert!(
        log.contains("keeps enforcing"),
        "moat should log that the pinned program keeps enforcing:\n{log}"
    );
    assert_eq!(lab.xdp(Side::Protected), Some((program_id, "native")));
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);

    // `moat down` detaches deliberately; with moat gone, the attacker is answered again.
    let bpffs = lab.bpffs().to_string_lossy().into_owned();
    let printed = MoatProcess::cli(&lab, &["down", "--bpffs", &bpffs]).ok("moat down");
    assert!(
        printed.contains(lab.interface(Side::Protected)),
        "moat down should name the interface it detached from: {printed}"
    );
    assert_eq!(
        lab.xdp(Side::Protected),
        None,
        "no XDP program may stay attached after moat down"
    );
    assert!(!lab.bpffs().exists(), "moat down should remove the pins");
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    let printed = MoatProcess::cli(&lab, &["down", "--bpffs", &bpffs]).ok("a second moat down");
    assert!(printed.contains("nothing pinned"), "{printed}");
}

#[test]
fn a_config_file_drives_the_same_policy() {
    let lab = Lab::new();
    let config = lab.write_config(&format!(
        "xdp_mode = \"native\"\n[blocklist]\ncidrs = [\"{ATTACKER_V4}\", \"{ATTACKER_NET_V6}\"]\n"
    ));
    let (moat, _) = MoatProcess::start(
        &lab,
        &["run", "--no-pin", "--config", &config.to_string_lossy()],
    );
    assert_eq!(
        lab.xdp(Side::Protected).map(|(_, mode)| mode),
        Some("native")
    );

    assert_answered(&lab, LEGIT_V4, PROTECTED_V4);
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert_unanswered(&lab, ATTACKER_V6, PROTECTED_V6);
    assert_answered(&lab, LEGIT_V6, PROTECTED_V6);

    let (status, log) = moat.stop(libc::SIGINT);
    assert!(
        status.success(),
        "moat should exit 0 on SIGINT, got {status}; log:\n{log}"
    );
    assert_eq!(
        lab.xdp(Side::Protected),
        None,
        "with --no-pin, SIGINT should detach"
    );
    assert!(
        log.contains("detached"),
        "moat should log that it detached:\n{log}"
    );
}

#[test]
fn generic_mode_blocks_too() {
    let lab = Lab::new();
    let (moat, program_id) = start_blocking(&lab, &["--xdp-mode", "generic", "--no-pin"]);
    assert_eq!(lab.xdp(Side::Protected), Some((program_id, "generic")));

    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert_answered(&lab, LEGIT_V4, PROTECTED_V4);

    let dropped = Snapshot::of_program(program_id).expect("counters").get(
        lab.if_index(Side::Protected),
        Action::Drop,
        Reason::Blocklist,
    );
    assert_eq!(dropped.packets, u64::from(PINGS));
    let (status, _) = moat.stop(libc::SIGTERM);
    assert!(status.success());
    assert_eq!(lab.xdp(Side::Protected), None);
}

#[test]
fn a_missing_interface_attaches_nothing() {
    let lab = Lab::new();
    let config = lab.dir().join("moat.toml");
    std::fs::write(
        &config,
        format!(
            "interfaces = [\n  \"{}\",\n  \"nosuch0\",\n]\n",
            lab.interface(Side::Protected)
        ),
    )
    .expect("write config");
    let (status, log) =
        MoatProcess::run_to_exit(&lab, &["run", "--config", &config.to_string_lossy()]);
    assert!(
        !status.success(),
        "moat must fail when an interface is missing:\n{log}"
    );
    assert!(
        log.contains("moat.toml:3:3") && log.contains("\"nosuch0\" does not exist"),
        "the error should name the interface and its line:\n{log}"
    );
    assert_eq!(
        lab.xdp(Side::Protected),
        None,
        "nothing may be attached after a failed start"
    );
}

#[test]
fn bad_input_fails_before_anything_is_attached() {
    let lab = Lab::new();
    let iface = lab.interface(Side::Protected).to_string();
    let bad_config = lab.dir().join("bad.toml");
    std::fs::write(
        &bad_config,
        format!("interfaces = [\"{iface}\"]\n[blocklist]\ncidrs = [\"198.51.100.0/33\"]\n"),
    )
    .expect("write config");
    let bad_config = bad_config.to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 4] = [
        (
            &["run", "--iface", &iface, "--block", "198.51.100.300"],
            "198.51.100.300",
        ),
        (&["run", "--iface", &iface, "--xdp-mode", "turbo"], "turbo"),
        (&["run", "--config", &bad_config], "bad.toml:3:10"),
        (
            &["run", "--config", "/nonexistent/moat.toml"],
            "/nonexistent/moat.toml",
        ),
    ];
    for (args, expected) in cases {
        let (status, log) = MoatProcess::run_to_exit(&lab, args);
        assert!(!status.success(), "moat {args:?} must fail:\n{log}");
        assert!(
            log.contains(expected),
            "moat {args:?} should mention {expected:?}:\n{log}"
        );
        assert_eq!(
            lab.xdp(Side::Protected),
            None,
            "moat {args:?} attached something"
        );
    }
}

#[test]
fn sighup_reloads_the_policy_and_a_broken_config_keeps_it() {
    let lab = Lab::new();
    let write = |cidrs: &str| lab.write_config(&format!("[blocklist]\ncidrs = [{cidrs}]\n"));
    let config = write(&format!("\"{ATTACKER_NET_V4}\""));
    let (moat, _) = MoatProcess::start(&lab, &["run", "--config", &config.to_string_lossy()]);
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert_answered(&lab, LEGIT_V4, PROTECTED_V4);

    // Block the legitimate client instead of the attacker.
    write(&format!("\"{LEGIT_V4}\""));
    moat.signal(libc::SIGHUP);
    moat.wait_for_log("reloaded the configuration", 1);
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert_unanswered(&lab, LEGIT_V4, PROTECTED_V4);

    // A broken file is refused and the running policy stays.
    write("\"not-a-cidr\"");
    moat.signal(libc::SIGHUP);
    let log = moat.wait_for_log("reload rejected", 1);
    assert!(
        log.contains("not-a-cidr"),
        "the rejection should say why:\n{log}"
    );
    assert_unanswered(&lab, LEGIT_V4, PROTECTED_V4);
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);

    let (status, log) = moat.stop(libc::SIGTERM);
    assert!(status.success(), "{log}");
}
