//! End to end: moat as a privileged service that holds against a local user and an operator's
//! mistakes (issue 13's review). Each test reproduces one finding with the real daemon.

use std::{
    os::{
        fd::AsFd as _,
        unix::fs::{MetadataExt as _, PermissionsExt as _},
    },
    path::Path,
    time::Duration,
};

use moat_tests::{
    Lab, MoatProcess, Side, bpf_syscall, control_socket,
    heavy::heavy,
    lab::{ATTACKER_NET_V4, ATTACKER_V4, PROTECTED_V4},
    moat_process::moat_bin,
    netns,
    traffic::{BANNING, assert_answered, assert_unanswered, flood_until_banned},
};
use serde_json::Value;

/// The uid and gid of `nobody`: an unprivileged local user.
const NOBODY: u32 = 65534;

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

fn block_attacker(lab: &Lab) -> std::path::PathBuf {
    lab.write_config(&format!("[blocklist]\ncidrs = [\"{ATTACKER_NET_V4}\"]\n"))
}

/// Finding 1: bpffs mounted 1777, pin directories accepted whoever owned them, no link fd held:
/// deleting the link pin detached moat while `status` said "pinned".
#[test]
fn a_deleted_link_pin_does_not_detach_moat_and_status_says_so() {
    let lab = Lab::new();
    let config = block_attacker(&lab);
    let (moat, program_id) =
        MoatProcess::start(&lab, &["run", "--config", &config.to_string_lossy()]);

    // The kernel adds the sticky bit to a bpffs root whatever the mode asked for.
    assert_eq!(
        mode_of(&lab.bpffs_mount()),
        0o1700,
        "the bpffs moat mounted (the kernel's default is 1777)"
    );
    for dir in ["", "links", "links/native", "links/generic", "maps"] {
        let path = lab.bpffs().join(dir);
        assert_eq!(mode_of(&path), 0o700, "{}", path.display());
        assert_eq!(std::fs::metadata(&path).expect("stat").uid(), 0);
    }

    let pin = lab
        .bpffs()
        .join("links/native")
        .join(lab.interface(Side::Protected));
    let before = MoatProcess::status(&lab);
    assert_eq!(before["interfaces"][0]["attached"], true, "{before}");
    assert_eq!(before["interfaces"][0]["pinned"], true, "{before}");
    std::fs::remove_file(&pin).expect("delete the link pin");

    assert_eq!(
        lab.xdp(Side::Protected).map(|(id, _)| id),
        Some(program_id),
        "the daemon's fd keeps the link attached"
    );
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    let after = MoatProcess::status(&lab);
    assert_eq!(after["interfaces"][0]["attached"], true, "{after}");
    assert_eq!(
        after["interfaces"][0]["pinned"], false,
        "status reads the pin from the kernel: {after}"
    );
    let text = MoatProcess::cli(&lab, &["status"]).ok("status");
    assert!(text.contains("PIN MISSING"), "{text}");

    // Stopping pins the link again: the program keeps enforcing without the daemon.
    let (exit, log) = moat.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");
    assert!(log.contains("pinned it again"), "{log}");
    assert!(pin.exists(), "the pin is back");
    assert_eq!(lab.xdp(Side::Protected).map(|(id, _)| id), Some(program_id));
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    let bpffs = lab.bpffs().to_string_lossy().into_owned();
    MoatProcess::cli(&lab, &["down", "--bpffs", &bpffs]).ok("moat down");
}

/// Finding 1: a pin directory another user made (on a bpffs anyone may write to) is refused
/// before anything is attached.
#[test]
fn a_pin_directory_another_user_made_is_refused() {
    let lab = Lab::new();
    let config = block_attacker(&lab);
    let mount = lab.bpffs_mount().to_string_lossy().into_owned();
    let mounted = netns::run("mount", &["-t", "bpf", "bpf", &mount]);
    assert!(mounted.status.success(), "mount bpffs: {mounted:?}");
    let planted = lab.bpffs().join("links/generic");
    std::fs::create_dir_all(&planted).expect("create the directories");
    for dir in [lab.bpffs(), lab.bpffs().join("links"), planted.clone()] {
        std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
    }

    let (exit, log) =
        MoatProcess::run_to_exit(&lab, &["run", "--config", &config.to_string_lossy()]);
    assert!(!exit.success(), "moat must refuse: {log}");
    assert!(
        log.contains(&lab.bpffs().to_string_lossy().into_owned())
            && log.contains("owned by uid 65534"),
        "the error names the directory and its owner: {log}"
    );
    assert_eq!(lab.xdp(Side::Protected), None, "nothing attached");
}

/// Finding 7: the link's interface index decides, not the pin's file name. After a rename, the
/// new daemon takes over the link under the interface's new name.
#[test]
fn after_an_interface_rename_the_link_is_taken_over_by_its_index() {
    let lab = Lab::new();
    let config = block_attacker(&lab);
    let (first, old_id) = MoatProcess::start(&lab, &["run", "--config", &config.to_string_lossy()]);
    let (exit, log) = first.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");

    let old_name = lab.interface(Side::Protected).to_string();
    let new_name = format!("{old_name}r");
    let protected = lab.netns(Side::Protected);
    for args in [
        &["link", "set", "dev", &old_name, "down"][..],
        &["link", "set", "dev", &old_name, "name", &new_name],
        &["link", "set", "dev", &new_name, "up"],
    ] {
        let out = protected.ip(args);
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }
    let renamed = lab.dir().join("renamed.toml");
    std::fs::write(
        &renamed,
        format!("interfaces = [\"{new_name}\"]\n[blocklist]\ncidrs = [\"{ATTACKER_NET_V4}\"]\n"),
    )
    .expect("write config");
    let second = MoatProcess::spawn(&lab, &["run", "--config", &renamed.to_string_lossy()]);
    let log = second.wait_for_log("moat is enforcing", 1);
    assert!(log.contains("renamed?"), "the rename is noticed: {log}");
    assert!(log.contains("took over the pinned link"), "{log}");

    let status = MoatProcess::status(&lab);
    let interface = &status["interfaces"][0];
    assert_eq!(interface["name"], new_name.as_str(), "{status}");
    assert_eq!(interface["attached"], true, "{status}");
    assert_eq!(interface["pinned"], true, "{status}");
    let links = lab.bpffs().join("links/native");
    assert!(links.join(&new_name).exists(), "pinned under the new name");
    assert!(!links.join(&old_name).exists(), "not under the old one");
    assert_ne!(
        status["program_id"], old_id,
        "the new program is in the link"
    );
    let (exit, log) = second.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");
    let bpffs = lab.bpffs().to_string_lossy().into_owned();
    MoatProcess::cli(&lab, &["down", "--bpffs", &bpffs]).ok("moat down");
}

/// Findings 6 and 8: a reload names what needs a restart, and bans the new policy no longer
/// checks are lifted (and logged), never listed as in force while ignored.
#[test]
fn a_reload_names_what_needs_a_restart_and_lifts_bans_it_no_longer_enforces() {
    let lab = Lab::new();
    let config = lab.write_config(BANNING);
    let (moat, _) = MoatProcess::start(&lab, &["run", "--config", &config.to_string_lossy()]);
    get_attacker_banned(&lab, &moat);
    let banned = MoatProcess::cli(&lab, &["block", "list"]).ok("block list");
    assert!(banned.contains("rate_limit"), "{banned}");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);

    lab.write_config("runtime_entries = 1000\nsocket_group = \"root\"\n");
    let out = MoatProcess::cli(&lab, &["reload"]).ok("reload");
    assert!(
        out.contains("needs a restart: socket_group, runtime_entries"),
        "{out}"
    );
    let listed = MoatProcess::cli(&lab, &["block", "list"]).ok("block list");
    assert!(!listed.contains("rate_limit"), "no ban listed: {listed}");
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    let log = moat.wait_for_log("the policy no longer bans", 1);
    assert!(log.contains("not applied: needs restart"), "{log}");
}

/// Bans `ATTACKER_V4` through the rate limiter of the lab's daemon, and checks it is dropped.
fn get_attacker_banned(lab: &Lab, moat: &MoatProcess) {
    flood_until_banned(lab, moat);
    assert_unanswered(lab, ATTACKER_V4, PROTECTED_V4);
}

/// Finding 9: pinned maps of another layout (an upgrade) are never read as this moat's, and the
/// bans come back from the state directory, which is never saved with less.
#[test]
fn bans_survive_a_pinned_map_of_another_layout() {
    let lab = Lab::new();
    let config = lab.write_config(BANNING);
    let config_arg = config.to_string_lossy().into_owned();
    let (first, _) = MoatProcess::start(&lab, &["run", "--config", &config_arg]);
    get_attacker_banned(&lab, &first);
    let (exit, log) = first.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");
    let state = lab.state_dir().join("state.json");
    assert!(
        std::fs::read_to_string(&state)
            .expect("state")
            .contains(ATTACKER_V4),
        "the ban is saved"
    );

    // An "older moat" left a map of another value size where this one looks, and a map of an
    // old layout version beside it.
    let layout = lab.bpffs().join(format!(
        "maps/v{}",
        agent_common::maps::PINNED_LAYOUT_VERSION
    ));
    let bans = layout.join(agent_common::maps::BANS);
    std::fs::remove_file(&bans).expect("remove the pinned ban map");
    let foreign = bpf_syscall::map_create(bpf_syscall::BPF_MAP_TYPE_HASH, 20, 8, 16)
        .expect("create a map of another layout");
    bpf_syscall::obj_pin(foreign.as_fd(), &bans).expect("pin it");
    let old_layout = lab.bpffs().join("maps/v1");
    std::fs::create_dir(&old_layout).expect("mkdir on bpffs");
    bpf_syscall::obj_pin(foreign.as_fd(), &old_layout.join("BANS")).expect("pin it");

    let (second, _) = MoatProcess::start(&lab, &["run", "--config", &config_arg]);
    let log = second.wait_for_log("restored the bans in force from the state file", 1);
    assert!(log.contains("does not fit this moat's layout"), "{log}");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert!(!old_layout.exists(), "the old layout's pins are removed");
    let listed = MoatProcess::cli(&lab, &["block", "list"]).ok("block list");
    assert!(listed.contains("rate_limit"), "{listed}");
    let (exit, log) = second.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");
    assert!(
        std::fs::read_to_string(&state)
            .expect("state")
            .contains(ATTACKER_V4),
        "the state is not saved with less"
    );
    let bpffs = lab.bpffs().to_string_lossy().into_owned();
    MoatProcess::cli(&lab, &["down", "--bpffs", &bpffs]).ok("moat down");
}

/// A tmpfs mounted for a test, unmounted however the test ends.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).expect("mount point");
        let options = format!("size={size},mode=0700");
        let out = netns::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &options,
                "tmpfs",
                &at.to_string_lossy(),
            ],
        );
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = netns::run("umount", &["-l", &self.0.to_string_lossy()]);
    }
}

/// Fills the filesystem of `dir` with one file; returns it.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).expect("create the filler");
    let block = vec![0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    filler
}

/// Finding 10: with the disk full, a change is in force but reported as not saved (exit status
/// and message), `status` and a metric show it, the save is retried, and once there is room
/// again everything is saved.
#[test]
fn a_change_that_cannot_be_saved_is_reported_and_saved_once_it_can() {
    const METRICS: &str = "127.0.0.1:9977";
    let lab = Lab::new();
    let _state = Tmpfs::mount(&lab.state_dir(), "256k");
    let config = lab.write_config(&format!("metrics_listen = \"{METRICS}\"\n"));
    let config_arg = config.to_string_lossy().into_owned();
    let (moat, _) = MoatProcess::start(&lab, &["run", "--config", &config_arg]);
    let filler = fill(&lab.state_dir());

    let reason =
        MoatProcess::cli(&lab, &["block", "add", ATTACKER_V4]).refused("block add on a full disk");
    assert!(reason.contains("in force but NOT saved"), "{reason}");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    let failing = MoatProcess::status(&lab);
    assert!(
        failing["persistence_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{failing}"
    );
    let text = MoatProcess::cli(&lab, &["status"]).ok("status");
    assert!(text.contains("NOT SAVED"), "{text}");
    let metrics = moat_tests::metrics::scrape(&lab, METRICS);
    assert!(
        metrics.lines().any(|l| l == "moat_state_saved 0"),
        "{metrics}"
    );

    std::fs::remove_file(&filler).expect("make room");
    moat.wait_for_log("saved the state again", 1);
    let saved = MoatProcess::status(&lab);
    assert_eq!(saved["persistence_error"], Value::Null, "{saved}");
    let metrics = moat_tests::metrics::scrape(&lab, METRICS);
    assert!(
        metrics.lines().any(|l| l == "moat_state_saved 1"),
        "{metrics}"
    );

    // A cold start (nothing pinned) finds the entry in the state directory.
    let (exit, log) = moat.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");
    let bpffs = lab.bpffs().to_string_lossy().into_owned();
    MoatProcess::cli(&lab, &["down", "--bpffs", &bpffs]).ok("moat down");
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    let (again, _) = MoatProcess::start(&lab, &["run", "--config", &config_arg]);
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    drop(again);
}

/// Capture clients started in the background, killed however the test ends.
struct Captures(Vec<std::process::Child>);

impl Drop for Captures {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A client command that must answer within 10 s.
fn cli_in_time(lab: &Lab, args: &[&str]) -> std::process::Output {
    let socket = lab.socket().to_string_lossy().into_owned();
    std::process::Command::new("timeout")
        .arg("10")
        .arg(moat_bin())
        .args(["--socket", &socket])
        .args(args)
        .output()
        .expect("run the CLI")
}

/// Finding 5: captures waiting for frames that never come hold no command's place, and a
/// request whose client hung up before it was served is not applied.
#[test]
fn captures_never_starve_commands_and_withdrawn_requests_change_nothing() {
    let lab = Lab::new();
    let config = block_attacker(&lab);
    let (moat, _) = MoatProcess::start(&lab, &["run", "--config", &config.to_string_lossy()]);
    let socket = lab.socket().to_string_lossy().into_owned();
    // No rules: a capture of rule drops waits for ever.
    let mut captures = Captures(Vec::new());
    for n in 0..10 {
        let out = lab.dir().join(format!("never-{n}.pcap"));
        let child = std::process::Command::new(moat_bin())
            .args([
                "--socket", &socket, "capture", "-c", "1", "--reason", "rule", "-w",
            ])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start a capture");
        captures.0.push(child);
    }
    moat.wait_for_log("capture started", 4);
    let refused = (0..50)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            let exited = captures
                .0
                .iter_mut()
                .filter_map(|c| c.try_wait().ok().flatten())
                .count();
            (exited >= 6).then_some(exited)
        })
        .expect("the captures beyond the pool's 4 are refused");
    assert_eq!(refused, 6);

    let added = cli_in_time(&lab, &["block", "add", "192.0.2.99"]);
    assert!(
        added.status.success(),
        "block add beside 4 captures: {added:?}"
    );
    let status = cli_in_time(&lab, &["status"]);
    assert!(
        status.status.success(),
        "status beside 4 captures: {status:?}"
    );

    // A request sent while the daemon is stopped, by a client that hangs up before the daemon
    // could serve it, is withdrawn.
    moat.signal(libc::SIGSTOP);
    {
        use std::io::Write as _;
        let mut client = std::os::unix::net::UnixStream::connect(lab.socket()).expect("connect");
        client
            .write_all(&control_socket::block_add_frame("198.51.100.99"))
            .expect("send the request");
    }
    moat.signal(libc::SIGCONT);
    moat.wait_for_log("withdrawn", 1);
    let listed = MoatProcess::cli(&lab, &["block", "list"]).ok("block list");
    assert!(listed.contains("192.0.2.99/32"), "{listed}");
    assert!(
        !listed.contains("198.51.100.99"),
        "withdrawn, not applied: {listed}"
    );
    drop(captures);
    let (exit, log) = moat.stop(libc::SIGTERM);
    assert!(exit.success(), "{log}");
}

/// A process's memory figure from /proc (kB).
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Finding 13: a request of the largest size, of tens of millions of empty strings, costs the
/// daemon about its frame, not gigabytes.
#[test]
fn a_huge_request_costs_no_more_than_its_frame() {
    let _heavy = heavy();
    let lab = Lab::new();
    let config = lab.write_config("");
    let (moat, _) = MoatProcess::start(&lab, &["run", "--config", &config.to_string_lossy()]);
    let before = proc_status_kb(moat.pid(), "VmRSS:");
    let head = br#"{"command":"list_add","arguments":{"list":"blocklist","cidrs":["#;
    let tail = br#"],"ttl_seconds":null,"comment":null}}"#;
    let room = (moat::control::protocol::MAX_REQUEST_BYTES as usize) - head.len() - tail.len();
    let mut body = head.to_vec();
    body.extend_from_slice(b"\"\"");
    body.extend_from_slice(&b",\"\"".repeat((room - 2) / 3));
    body.extend_from_slice(tail);
    let response = control_socket::exchange(&lab.socket(), &control_socket::frame(&body));
    drop(body);
    let error = response["error"].as_str().expect("an error response");
    assert!(error.contains("entry 1"), "{error}");
    let peak = proc_status_kb(moat.pid(), "VmHWM:");
    let frame_kb = u64::from(moat::control::protocol::MAX_REQUEST_BYTES) / 1024;
    assert!(
        peak < before + frame_kb + 64 * 1024,
        "peak {peak} kB for a {frame_kb} kB request (RSS before: {before} kB)"
    );
    MoatProcess::cli(&lab, &["status"]).ok("still serving");
}

/// How long a CLI command takes, the best of three.
fn best_of_three(lab: &Lab, args: &[&str]) -> Duration {
    (0..3)
        .map(|_| {
            let started = std::time::Instant::now();
            MoatProcess::cli(lab, args).ok(&args.join(" "));
            started.elapsed()
        })
        .min()
        .expect("three runs")
}

/// Finding 15: the limiter's maps full (a spoofed flood fills them) cost `status`, `/metrics`
/// and `block add` nothing: the daemon's loop never walks them.
#[test]
fn a_full_limiter_does_not_slow_the_control_plane() {
    const SOURCES: u32 = 1 << 17;
    let _heavy = heavy();
    let lab = Lab::new();
    let config = lab.write_config(&format!(
        "[rate_limit]\npps = 100000\nban_ttl = \"1h\"\nmax_sources = {SOURCES}\n"
    ));
    let (_moat, program_id) =
        MoatProcess::start(&lab, &["run", "--config", &config.to_string_lossy()]);
    let status_empty = best_of_three(&lab, &["status"]);
    let add_empty = best_of_three(&lab, &["block", "add", "192.0.2.1"]);

    // Fill both maps as a flood of spoofed sources would.
    moat_tests::spoofed_flood::fill_limiter(program_id, SOURCES);

    let status_full = best_of_three(&lab, &["status"]);
    let add_full = best_of_three(&lab, &["block", "add", "192.0.2.2"]);
    let slack = |empty: Duration| empty * 2 + Duration::from_millis(150);
    assert!(
        status_full < slack(status_empty),
        "status took {status_full:?} with {SOURCES} sources, {status_empty:?} without"
    );
    assert!(
        add_full < slack(add_empty),
        "block add took {add_full:?} with {SOURCES} sources, {add_empty:?} without"
    );
}

/// Finding 11: only a stale socket is replaced; a file or a symlink at the socket's path is
/// refused and left as it was.
#[test]
fn nothing_but_a_stale_socket_is_replaced_at_the_socket_path() {
    let lab = Lab::new();
    let config = block_attacker(&lab);
    let precious = lab.dir().join("precious");
    std::fs::write(&precious, "keep me").expect("write");
    std::fs::set_permissions(&precious, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let link = lab.dir().join("link.sock");
    std::os::unix::fs::symlink(&precious, &link).expect("symlink");
    for path in [&precious, &link] {
        let socket = path.to_string_lossy().into_owned();
        let (exit, log) = MoatProcess::run_to_exit(
            &lab,
            &[
                "run",
                "--config",
                &config.to_string_lossy(),
                "--socket",
                &socket,
            ],
        );
        assert!(!exit.success(), "{log}");
        assert!(log.contains("is not a socket"), "{log}");
        assert_eq!(lab.xdp(Side::Protected), None, "nothing attached");
    }
    assert_eq!(std::fs::read_to_string(&precious).expect("read"), "keep me");
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("the symlink")
            .file_type()
            .is_symlink()
    );
    assert_eq!(mode_of(&precious), 0o640, "no chmod through the symlink");
}

/// Finding 12: a capture that fails leaves a file already at its path as it was, and no
/// temporary file behind.
#[test]
fn a_failed_capture_leaves_the_file_it_would_replace() {
    let lab = Lab::new();
    let out = lab.dir().join("capture.pcap");
    std::fs::write(&out, "an earlier capture").expect("write");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // No daemon is running: the capture fails.
    let reason = MoatProcess::cli(&lab, &["capture", "-c", "1", "-w", &out.to_string_lossy()])
        .refused("a capture without a daemon");
    assert!(reason.contains("cannot reach the moat daemon"), "{reason}");
    assert_eq!(
        std::fs::read_to_string(&out).expect("read"),
        "an earlier capture"
    );
    let left: Vec<String> = std::fs::read_dir(lab.dir())
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}
