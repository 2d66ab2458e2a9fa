//! The Debian package `cargo xtask package` builds (`MOAT_DEB`; `cargo xtask test` builds it
//! and sets it): what it holds, what lintian says of it, and its life on a real systemd in a
//! throwaway root (installed, started, reloaded, upgraded, stopped, removed, purged), with
//! packets through the lab deciding whether each step left moat enforcing.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use moat_tests::{
    Lab, Side,
    lab::{ATTACKER_NET_V4, ATTACKER_V4, LEGIT_V4, LEGIT_V6, PROTECTED_V4, PROTECTED_V6},
    systemd_container::SystemdContainer,
    traffic::{assert_answered, assert_unanswered},
};

/// Every file the package installs but the manual pages (checked apart: one per subcommand).
const FILES: &[&str] = &[
    "./etc/moat/moat.toml",
    "./usr/bin/moat",
    "./usr/lib/systemd/system/moat.service",
    "./usr/share/bash-completion/completions/moat",
    "./usr/share/doc/moat/README.md.gz",
    "./usr/share/doc/moat/changelog.gz",
    "./usr/share/doc/moat/copyright",
    "./usr/share/doc/moat/examples/grafana-dashboard.json",
    "./usr/share/fish/vendor_completions.d/moat.fish",
    "./usr/share/lintian/overrides/moat",
    "./usr/share/zsh/vendor-completions/_moat",
];
const MAN_DIR: &str = "./usr/share/man/man1/";

fn deb() -> PathBuf {
    let path = std::env::var_os("MOAT_DEB").map(PathBuf::from).unwrap_or_else(|| {
        panic!("MOAT_DEB is not set: build the package with `cargo xtask package` and point MOAT_DEB at it (`cargo xtask test` does both)")
    });
    assert!(path.is_file(), "MOAT_DEB={} is not a file", path.display());
    path
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The package unpacked (files and control area) into a scratch directory.
struct Unpacked {
    dir: tempfile::TempDir,
}

impl Unpacked {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("scratch directory");
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb())
            .arg(dir.path().join("root")));
        run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb())
            .arg(dir.path().join("DEBIAN")));
        Self { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn control(&self, name: &str) -> PathBuf {
        self.dir.path().join("DEBIAN").join(name)
    }
}

#[test]
fn the_package_installs_exactly_its_files_owned_by_root_with_modes_that_fit() {
    // "-rwxr-xr-x root/root 6643440 2026-12-01 10:45 ./usr/bin/moat"
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(deb()));
    let mut files = BTreeSet::new();
    let mut pages = BTreeSet::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [mode, owner, _size, _date, _time, path] = fields[..] else {
            panic!("unexpected dpkg-deb --contents line {line:?}");
        };
        assert_eq!(owner, "root/root", "{path} is not owned by root");
        let wanted = match mode.chars().next() {
            Some('d') => "drwxr-xr-x",
            _ if path == "./usr/bin/moat" => "-rwxr-xr-x",
            Some('-') => "-rw-r--r--",
            _ => panic!("{path}: neither a file nor a directory ({mode})"),
        };
        assert_eq!(mode, wanted, "mode of {path}");
        if mode.starts_with('-') {
            match path.strip_prefix(MAN_DIR) {
                Some(page) => pages.insert(page.to_string()),
                None => files.insert(path.to_string()),
            };
        }
    }
    let expected: BTreeSet<String> = FILES.iter().map(ToString::to_string).collect();
    assert_eq!(files, expected, "the package's files (manual pages apart)");

    // One page for moat and one for each of its commands, as its --help lists them.
    let unpacked = Unpacked::new();
    let moat = unpacked.root().join("usr/bin/moat");
    let help = run(Command::new(&moat).arg("--help"));
    let mut expected_pages: BTreeSet<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|command| *command != "help")
        .map(|command| format!("moat-{command}.1.gz"))
        .collect();
    expected_pages.insert("moat.1.gz".into());
    let top_level: BTreeSet<String> = pages
        .iter()
        .filter(|p| p.matches('-').count() <= 1)
        .cloned()
        .collect();
    assert_eq!(
        top_level, expected_pages,
        "manual pages for moat and its commands"
    );
    assert!(
        pages.contains("moat-block-add.1.gz"),
        "subcommands of command groups have their pages: {pages:?}"
    );
    let page =
        run(Command::new("zcat").arg(unpacked.root().join("usr/share/man/man1/moat-run.1.gz")));
    assert!(
        page.starts_with(".ie") || page.contains(".TH moat-run 1"),
        "moat-run.1 is not a manual page: {}",
        &page[..page.len().min(200)]
    );
}

#[test]
fn the_control_area_declares_dependencies_conffiles_and_sound_scripts() {
    let unpacked = Unpacked::new();
    let control = std::fs::read_to_string(unpacked.control("control")).expect("control");
    let field = |name: &str| {
        control
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in control:\n{control}"))
    };
    assert_eq!(field("Package"), "moat");
    let version = run(Command::new(unpacked.root().join("usr/bin/moat")).arg("--version"));
    assert_eq!(version.trim(), format!("moat {}", field("Version")));
    let depends = field("Depends");
    for dependency in ["libc6", "adduser"] {
        assert!(
            depends.split(", ").any(|d| d.starts_with(dependency)),
            "Depends lacks {dependency}: {depends}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(unpacked.control("conffiles")).expect("conffiles"),
        "/etc/moat/moat.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let path = unpacked.control(script);
        run(Command::new("sh").arg("-n").arg(&path));
        let text = std::fs::read_to_string(&path).expect("script");
        assert!(
            text.starts_with("#!/bin/sh\n"),
            "{script} is not a sh script"
        );
        assert!(
            text.contains("\nset -e\n"),
            "{script} does not stop at an error"
        );
    }
    // The md5sums match the files, and name every file but the conffile.
    let md5sums = std::fs::read_to_string(unpacked.control("md5sums")).expect("md5sums");
    run(Command::new("md5sum")
        .current_dir(unpacked.root())
        .args(["--check", "--quiet"])
        .arg(unpacked.control("md5sums")));
    assert!(md5sums.contains("  usr/bin/moat\n") && !md5sums.contains("etc/moat"));

    // What the unit runs is in the package, and the shipped config passes its own check.
    let unit = std::fs::read_to_string(unpacked.root().join("usr/lib/systemd/system/moat.service"))
        .expect("unit");
    for line in unit.lines().filter(|l| l.starts_with("ExecStart")) {
        let program = line
            .split_once('=')
            .and_then(|(_, command)| command.split_whitespace().next())
            .expect("an Exec line names its program");
        assert_eq!(program, "/usr/bin/moat", "{line}");
    }
    let check = run(Command::new(unpacked.root().join("usr/bin/moat"))
        .args(["config", "check"])
        .arg(unpacked.root().join("etc/moat/moat.toml")));
    assert!(check.contains(": OK"), "{check}");
    run(Command::new("bash").arg("-n").arg(
        unpacked
            .root()
            .join("usr/share/bash-completion/completions/moat"),
    ));
}

#[test]
fn lintian_finds_nothing_that_is_not_overridden_with_a_reason() {
    let output = Command::new("lintian")
        .args([
            "--pedantic",
            "--display-info",
            "--fail-on",
            "error,warning,info,pedantic",
        ])
        .arg(deb())
        .output()
        .expect("lintian (`cargo xtask setup` installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.trim().is_empty(),
        "lintian ({}):\n{text}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // Every override is preceded by the comment that gives its reason.
    let overrides = std::fs::read_to_string(
        Unpacked::new()
            .root()
            .join("usr/share/lintian/overrides/moat"),
    )
    .expect("overrides");
    let lines: Vec<&str> = overrides.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("moat: ") {
            assert!(
                i > 0 && lines[i - 1].starts_with("# "),
                "override without a reason: {line}"
            );
        }
    }
}

/// The path of the .deb inside the container.
fn deb_inside() -> String {
    let name = deb()
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a .deb file name")
        .to_string();
    format!("/share/{name}")
}

fn main_pid(container: &SystemdContainer) -> u32 {
    container
        .ok(
            "systemctl show --property=MainPID --value moat",
            "moat's main pid",
        )
        .trim()
        .parse()
        .expect("MainPID is a number")
}

#[test]
fn the_package_lives_under_systemd_installed_started_reloaded_upgraded_stopped_removed() {
    let lab = Lab::new();
    let deb = deb();
    let share = deb.parent().expect("the .deb's directory");
    let container = SystemdContainer::boot(lab.netns(Side::Protected), share);
    let install = format!("dpkg -i {}", deb_inside());
    // This machine's image forbids maintainer scripts to start or stop services (Debian's
    // policy-rc.d convention for images); a real host has no such file.
    container.ok("rm -f /usr/sbin/policy-rc.d", "allowing service actions");

    // Installed: the group exists, the service neither enabled nor started (the example
    // config names an interface that may not be the one to protect).
    container.ok(&install, "installing the package");
    container.ok("getent group moat", "the moat group");
    let state = container.sh("systemctl is-enabled moat || true; systemctl is-active moat || true");
    assert_eq!(
        String::from_utf8_lossy(&state.stdout),
        "disabled\ninactive\n",
        "a fresh install leaves moat disabled and stopped"
    );
    container.ok("man -w moat && man -w moat-block-add", "the manual pages");

    // Started with a config for the lab's interface: the attacker's network is dropped. The
    // rate limiter and the metrics are on, so that their map walks run under the unit too.
    let config = |blocked: &[&str]| {
        let cidrs: Vec<String> = blocked.iter().map(|c| format!("\"{c}\"")).collect();
        format!(
            "cat > /etc/moat/moat.toml <<'EOF'\n\
             interfaces = [\"{}\"]\n\
             metrics_listen = \"127.0.0.1:9977\"\n\
             [blocklist]\ncidrs = [{}]\n\
             [rate_limit]\npps = 10000\nban_after = \"2s\"\nban_ttl = \"10m\"\n\
             EOF",
            lab.interface(Side::Protected),
            cidrs.join(", ")
        )
    };
    container.ok(&config(&[ATTACKER_NET_V4]), "writing the config");
    container.ok("systemctl enable --now moat", "starting moat");
    container.ok("systemctl is-active moat", "moat running");
    assert!(lab.xdp(Side::Protected).is_some(), "moat attached XDP");
    let status = container.ok("moat status", "moat status under systemd");
    assert!(status.contains("attached, pinned"), "{status}");
    let unit_status = container.ok(
        "systemctl show --property=StatusText --value moat",
        "the status moat tells systemd",
    );
    assert_eq!(unit_status.trim(), "enforcing on 1 interface(s)");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert_answered(&lab, LEGIT_V4, PROTECTED_V4);
    let metrics = container.ok(
        "curl -sf http://127.0.0.1:9977/metrics",
        "scraping the metrics",
    );
    assert!(
        metrics.contains("moat_bans_active"),
        "the scrape walked the limiter's maps"
    );

    // Reloaded: the legitimate client's /32 joins the blocklist, with no restart.
    let pid = main_pid(&container);
    container.ok(
        &config(&[ATTACKER_NET_V4, "203.0.113.2/32"]),
        "editing the config",
    );
    container.ok("systemctl reload moat", "reloading moat");
    assert_eq!(main_pid(&container), pid, "a reload keeps the daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !container
        .ok("moat block list", "listing the blocklist")
        .contains("203.0.113.2/32")
    {
        assert!(Instant::now() < deadline, "the reload never applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_unanswered(&lab, LEGIT_V4, PROTECTED_V4);
    assert_answered(&lab, LEGIT_V6, PROTECTED_V6);

    // Upgraded (the same version again): the postinst restarts the running daemon, which
    // takes the pinned program over and keeps the policy.
    container.ok(&install, "upgrading the package");
    let restarted = main_pid(&container);
    assert!(
        restarted != 0 && restarted != pid,
        "the upgrade restarted moat"
    );
    container.ok("systemctl is-active moat", "moat running after the upgrade");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);

    // Stopped: the pinned program goes on enforcing.
    container.ok("systemctl stop moat", "stopping moat");
    assert_unanswered(&lab, ATTACKER_V4, PROTECTED_V4);
    assert!(
        lab.xdp(Side::Protected).is_some(),
        "stopping moat keeps its program"
    );

    // Removed: the prerm detaches the program; the conffile stays until purge.
    container.ok("dpkg -r moat", "removing the package");
    assert_eq!(lab.xdp(Side::Protected), None, "removal detaches moat");
    assert_answered(&lab, ATTACKER_V4, PROTECTED_V4);
    container.ok(
        "! test -e /usr/bin/moat && test -f /etc/moat/moat.toml",
        "removal keeps only the conffile",
    );

    // Purged: config and saved state gone; the group stays, as Debian leaves system groups.
    container.ok("dpkg -P moat", "purging the package");
    container.ok(
        "! test -e /etc/moat && ! test -e /var/lib/moat && getent group moat",
        "purge removes the config and the state",
    );
}
