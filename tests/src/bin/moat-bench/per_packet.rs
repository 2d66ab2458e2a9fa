//! Per-packet cost: each contender runs each scenario's frame through `BPF_PROG_TEST_RUN`
//! (`repeat` times in the kernel, several rounds, contenders interleaved within each), so no
//! NIC, queue or scheduler is measured; an empty program's cost says what the test run itself
//! adds.
//!
//! - moat with the full policy: the million-prefix list, 100 rules, rate limiting and bans on;
//!   some scenarios also without the rate limiter, and with the list alone;
//! - xdp-filter (Debian's xdp-tools) twice: with only its IPv4 list (`-f ipv4`, its
//!   single-list path) and with every feature, holding the same addresses and port where it can
//!   express them (exact addresses only, at most 10,000 per family);
//! - the floor (`floor.rs`): parse to the IPv4 source, one hash lookup.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::Path,
    process::Command,
};

use agent_common::{
    rate_limit::RateState,
    stats::{Action, Reason},
};
use moat::{
    config::{Config, Overrides, Policy},
    program::{
        limiter::{self, ActiveBan},
        map_source::ProgramMapIds,
    },
};
use moat_tests::{
    Lab, Side,
    frames::{Extension, Frame},
    program::{LoadedProgram, TEST_RUN_IF_INDEX, XDP_DROP, XDP_PASS},
};

use moat_tests::bpf_syscall;

use crate::{
    Measured, Options, Table,
    floor::{self, Floor},
    list::PrefixList,
};

/// Sources of the scenarios, none in the list unless the scenario says so.
const CLEAN_V4: &str = "192.0.2.10";
const CLEAN_V6: &str = "2001:db8:2::10";
const BANNED: &str = "192.0.2.50";
const OVER_LIMIT: &str = "192.0.2.60";
const REFLECTOR_PORT: u16 = 11211;
/// Sources of the cold-cache scenario: their /24 table lines and hash buckets (4 MiB and more)
/// do not stay in the CPU's caches from one packet of a source to its next.
const COLD_SOURCES: usize = 65_536;
/// The limiter's room in the full policy: the cold scenario's sources and the pinned ones
/// without evictions (an evicted over-limit source would pass).
const MAX_SOURCES: usize = 4 * COLD_SOURCES;
/// xdp-filter's maps hold this many addresses per family.
const XDP_FILTER_CAPACITY: usize = 10_000;

/// What a contender should answer; `None`: it cannot express the scenario.
struct Scenario {
    name: &'static str,
    /// One frame, run `repeat` times (hot caches); or many, each run once (cold caches).
    frames: Vec<Vec<u8>>,
    moat: (Action, Reason),
    /// xdp-filter with `-f ipv4`, and with every feature.
    xdp_filter: [Option<u32>; 2],
    floor: Option<u32>,
    /// Which of moat's policies runs it.
    policy: MoatPolicy,
}

/// The policies moat runs the scenarios under.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MoatPolicy {
    /// The list, 100 rules, rate limiting and bans.
    Full,
    /// The list and the rules.
    NoRateLimit,
    /// The list alone.
    ListOnly,
}

fn scenarios(list: &PrefixList) -> Vec<Scenario> {
    let udp = |source: &str| Frame::udp(source, 40_000, 53);
    let pass = (Action::Pass, Reason::NoMatch);
    vec![
        Scenario {
            name: "pass: IPv4, full policy, source not listed",
            frames: vec![udp(CLEAN_V4).bytes()],
            moat: pass,
            xdp_filter: [Some(XDP_PASS), Some(XDP_PASS)],
            floor: Some(XDP_PASS),
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "pass: IPv4, the list and 100 rules, rate limiting off",
            frames: vec![udp(CLEAN_V4).bytes()],
            moat: pass,
            xdp_filter: [Some(XDP_PASS), Some(XDP_PASS)],
            floor: Some(XDP_PASS),
            policy: MoatPolicy::NoRateLimit,
        },
        Scenario {
            name: "pass: IPv4, full policy, 65,536 tracked sources in turn (cold caches)",
            frames: {
                let sources = list.unlisted_v4(COLD_SOURCES);
                assert_eq!(
                    sources.len(),
                    COLD_SOURCES,
                    "unlisted sources for the cold row"
                );
                sources
                    .iter()
                    .map(|source| udp(&source.to_string()).bytes())
                    .collect()
            },
            moat: pass,
            xdp_filter: [Some(XDP_PASS), Some(XDP_PASS)],
            floor: Some(XDP_PASS),
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "pass: IPv4, the list alone (no rules, no rate limit)",
            frames: vec![udp(CLEAN_V4).bytes()],
            moat: pass,
            xdp_filter: [Some(XDP_PASS), Some(XDP_PASS)],
            floor: Some(XDP_PASS),
            policy: MoatPolicy::ListOnly,
        },
        Scenario {
            name: "pass: IPv6, full policy, source not listed",
            frames: vec![udp(CLEAN_V6).bytes()],
            moat: pass,
            xdp_filter: [None, Some(XDP_PASS)],
            floor: None,
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "drop: blocklist, IPv4 host among the list's /32s",
            frames: vec![udp(&list.deep_v4_host().to_string()).bytes()],
            moat: (Action::Drop, Reason::Blocklist),
            xdp_filter: [Some(XDP_DROP), Some(XDP_DROP)],
            floor: Some(XDP_DROP),
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "drop: blocklist, IPv4 inside a listed /16–/24",
            frames: vec![udp(&list.v4_network_member().to_string()).bytes()],
            moat: (Action::Drop, Reason::Blocklist),
            xdp_filter: [None, None],
            floor: None,
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "drop: blocklist, IPv6 /128 among the list's IPv6 prefixes",
            frames: vec![udp(&list.v6_host().to_string()).bytes()],
            moat: (Action::Drop, Reason::Blocklist),
            xdp_filter: [None, Some(XDP_DROP)],
            floor: None,
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "drop: ban (rate-limit ban in force)",
            frames: vec![udp(BANNED).bytes()],
            moat: (Action::Drop, Reason::Ban),
            xdp_filter: [None, None],
            floor: None,
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "drop: rule (UDP source port 11211, rule 100 of 100)",
            frames: vec![Frame::udp(CLEAN_V4, REFLECTOR_PORT, 40_000).bytes()],
            moat: (Action::Drop, Reason::Rule),
            xdp_filter: [None, Some(XDP_DROP)],
            floor: None,
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "drop: rate limit (source over its limit)",
            frames: vec![udp(OVER_LIMIT).bytes()],
            moat: (Action::Drop, Reason::RateLimit),
            xdp_filter: [None, None],
            floor: None,
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "pass: IPv6 with two extension headers",
            frames: vec![
                udp(CLEAN_V6)
                    .extension(Extension::HopByHop)
                    .extension(Extension::DestinationOptions)
                    .bytes(),
            ],
            moat: pass,
            xdp_filter: [None, Some(XDP_PASS)],
            floor: None,
            policy: MoatPolicy::Full,
        },
        Scenario {
            name: "pass: VLAN-tagged IPv4",
            frames: vec![udp(CLEAN_V4).vlan(42).bytes()],
            moat: pass,
            xdp_filter: [Some(XDP_PASS), Some(XDP_PASS)],
            floor: None,
            policy: MoatPolicy::Full,
        },
    ]
}

/// The full policy: the list, 99 rules that do not match the frames, then the reflector rule;
/// rate limiting on (so high that the benchmark's own sources stay under it) with bans, and
/// room for every source the scenarios send from.
fn full_policy(lab: &Lab, list: &PrefixList) -> Policy {
    let mut text = format!(
        "interfaces = [\"lo\"]\n[blocklist]\nfiles = [\"{}\"]\n\
         [rate_limit]\npps = 1000000000\nban_after = \"1h\"\nban_ttl = \"10m\"\n\
         max_sources = {MAX_SOURCES}\n",
        list.path.display()
    );
    for i in 0..99 {
        let protocol = if i % 2 == 0 { "udp" } else { "tcp" };
        let _ = write!(
            text,
            "[[rules]]\nname = \"r{i}\"\nprotocol = \"{protocol}\"\ndst_ports = [\"{}\"]\n\
             action = \"drop\"\n",
            20_000 + i
        );
    }
    let _ = write!(
        text,
        "[[rules]]\nname = \"reflection\"\nprotocol = \"udp\"\nsrc_ports = [\"{REFLECTOR_PORT}\"]\n\
         action = \"drop\"\n"
    );
    let path = lab.dir().join("bench-policy.toml");
    std::fs::write(&path, text).expect("write the policy");
    let config = Config::from_file(&path).expect("the bench policy parses");
    config
        .resolve(&Overrides::default())
        .unwrap_or_else(|e| panic!("the bench policy: {e}"))
        .policy
}

/// moat with the full policy, plus the ban and the over-limit source the scenarios need.
fn load_moat(policy: &Policy) -> LoadedProgram {
    let mut program = LoadedProgram::new(policy);
    let hour = std::time::Duration::from_secs(3600);
    let ban = ActiveBan {
        source: Lab::addr(BANNED),
        expires_at: std::time::SystemTime::now() + hour,
    };
    program.limiter.restore(&[ban]).expect("insert the ban");
    // The agent writes a state only with a ban; the bench pins one over its limit.
    let over = RateState {
        packets_tat: limiter::monotonic_now_ns() + hour.as_nanos() as u64,
        ..RateState::default()
    };
    program
        .limiter
        .set_state(Lab::addr(OVER_LIMIT), over)
        .expect("insert the over-limit source");
    program
}

/// xdp-filter loaded on the lab's protected interface; unloaded on drop.
struct XdpFilter<'a> {
    lab: &'a Lab,
    program: OwnedFd,
}

impl<'a> XdpFilter<'a> {
    fn load(lab: &'a Lab, features: &str, list: &PrefixList) -> Self {
        let run = |args: &[&str]| {
            let out = lab
                .netns(Side::Protected)
                .command("xdp-filter")
                .env("LIBXDP_BPFFS", lab.bpffs_mount())
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run xdp-filter (xdp-tools): {e}"));
            assert!(
                out.status.success(),
                "xdp-filter {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let interface = lab.interface(Side::Protected);
        run(&[
            "load",
            interface,
            "--mode",
            "native",
            "--features",
            features,
        ]);
        let host = list.deep_v4_host().to_string();
        run(&["ip", &host, "--mode", "src"]);
        if features != "ipv4" {
            run(&["ip", &list.v6_host().to_string(), "--mode", "src"]);
            run(&[
                "port",
                &REFLECTOR_PORT.to_string(),
                "--mode",
                "src",
                "--proto",
                "udp",
            ]);
        }
        let (id, _) = lab
            .xdp(Side::Protected)
            .expect("xdp-filter attached a program");
        let filter = Self {
            lab,
            program: bpf_syscall::program_by_id(id).expect("xdp-filter's program"),
        };
        // Fill its IPv4 map to capacity with the list's hosts, as the CLI would have.
        filter.fill_ipv4(id, list);
        filter
    }

    fn fill_ipv4(&self, program_id: u32, list: &PrefixList) {
        let map_id = ProgramMapIds::of(program_id)
            .and_then(|maps| maps.id("filter_ipv4"))
            .unwrap_or_else(|e| panic!("xdp-filter's IPv4 map: {e}"));
        let map = bpf_syscall::map_by_id(map_id).expect("filter_ipv4");
        // A per-CPU value: copy what the CLI wrote for the first address.
        let mut value = vec![0u8; 8 * possible_cpus()];
        bpf_syscall::map_lookup(map.as_fd(), &list.deep_v4_host().octets(), &mut value)
            .expect("the CLI's entry");
        for host in list.v4_hosts().take(XDP_FILTER_CAPACITY - 1) {
            bpf_syscall::map_update(map.as_fd(), &host.octets(), &value).expect("fill filter_ipv4");
        }
    }
}

impl Drop for XdpFilter<'_> {
    fn drop(&mut self) {
        let _ = self
            .lab
            .netns(Side::Protected)
            .command("xdp-filter")
            .env("LIBXDP_BPFFS", self.lab.bpffs_mount())
            .args(["unload", self.lab.interface(Side::Protected)])
            .output();
    }
}

fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    text.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().expect("cpu") - a.parse::<usize>().expect("cpu") + 1,
            None => 1,
        })
        .sum()
}

/// The contenders, in the order of a row's samples.
const MOAT: usize = 0;
const FILTER_IPV4: usize = 1;
const FILTER_ALL: usize = 2;
const FLOOR: usize = 3;
/// A program that only returns XDP_PASS: what `BPF_PROG_TEST_RUN` itself costs per packet.
const EMPTY: usize = 4;
const CONTENDERS: usize = 5;

/// ns/packet of a scenario's frames (one frame: one test run of `repeat` packets; many: one
/// run of each, their times averaged); checks every verdict.
pub fn sample(
    program: BorrowedFd,
    frames: &[Vec<u8>],
    expected: u32,
    options: &Options,
    who: &str,
) -> f64 {
    let repeat = if frames.len() == 1 { options.repeat } else { 1 };
    let mut total = 0.0;
    for frame in frames {
        let (action, ns) = bpf_syscall::test_run(program, frame, repeat)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {who}: {e}"));
        assert_eq!(
            action, expected,
            "{who} answered {action}, expected {expected}"
        );
        total += f64::from(ns);
    }
    total / frames.len() as f64
}

/// The packets one sample of the scenario runs.
fn packets(scenario: &Scenario, options: &Options) -> u64 {
    if scenario.frames.len() == 1 {
        u64::from(options.repeat)
    } else {
        scenario.frames.len() as u64
    }
}

/// One sample of moat; checks that its counters saw every packet under the expected action and
/// reason.
fn sample_moat(moat: &mut LoadedProgram, scenario: &Scenario, options: &Options) -> f64 {
    let before = moat.snapshot();
    let (action, reason) = scenario.moat;
    let expected = if action == Action::Pass {
        XDP_PASS
    } else {
        XDP_DROP
    };
    let program = moat.fd();
    let ns = sample(program.as_fd(), &scenario.frames, expected, options, "moat");
    let counted = moat
        .snapshot()
        .get(TEST_RUN_IF_INDEX, action, reason)
        .packets
        - before.get(TEST_RUN_IF_INDEX, action, reason).packets;
    assert_eq!(
        counted,
        packets(scenario, options),
        "{}: moat counted {counted} as {}/{}",
        scenario.name,
        action.name(),
        reason.name()
    );
    ns
}

pub fn run(lab: &Lab, list: &PrefixList, options: &Options) -> Table {
    mount_bpffs(&lab.bpffs_mount());
    let policy = full_policy(lab, list);
    let scenarios = scenarios(list);
    println!("per-packet: loading moat with the full policy");
    let mut moat = load_moat(&policy);
    let without_rate_limit = Policy {
        rate_limit: Default::default(),
        ..policy.clone()
    };
    let mut lean = LoadedProgram::new(&without_rate_limit);
    let mut list_only = LoadedProgram::new(&Policy {
        rules: Default::default(),
        ..without_rate_limit.clone()
    });
    let floor = Floor::load(&list.v4_hosts().collect::<Vec<Ipv4Addr>>());
    let empty = floor::empty_program();

    // The cold row measures sources the limiter already tracks (a new source's first packet
    // also inserts its state): one unmeasured pass first.
    for scenario in scenarios.iter().filter(|s| s.frames.len() > 1) {
        sample_moat(&mut moat, scenario, options);
    }

    // Interleaved: every round measures every contender on every scenario once, so that the
    // machine's drift (its speed moves by 2× between runs here) falls on all of them alike.
    let mut samples: Vec<[Vec<f64>; CONTENDERS]> =
        scenarios.iter().map(|_| Default::default()).collect();
    for round in 1..=options.runs {
        for (scenario, row) in scenarios.iter().zip(samples.iter_mut()) {
            let moat = match scenario.policy {
                MoatPolicy::Full => &mut moat,
                MoatPolicy::NoRateLimit => &mut lean,
                MoatPolicy::ListOnly => &mut list_only,
            };
            row[MOAT].push(sample_moat(moat, scenario, options));
            if let Some(expected) = scenario.floor {
                let program = floor.program.as_fd();
                row[FLOOR].push(sample(
                    program,
                    &scenario.frames,
                    expected,
                    options,
                    "floor",
                ));
            }
            row[EMPTY].push(sample(
                empty.as_fd(),
                &scenario.frames,
                XDP_PASS,
                options,
                "the empty program",
            ));
        }
        for (column, features) in [(FILTER_IPV4, "ipv4"), (FILTER_ALL, "all")] {
            let filter = XdpFilter::load(lab, features, list);
            for (scenario, row) in scenarios.iter().zip(samples.iter_mut()) {
                if let Some(expected) = scenario.xdp_filter[column - FILTER_IPV4] {
                    let program = filter.program.as_fd();
                    row[column].push(sample(
                        program,
                        &scenario.frames,
                        expected,
                        options,
                        "xdp-filter",
                    ));
                }
            }
        }
        println!("per-packet: round {round} of {} done", options.runs);
    }

    let mut table = Table::new(&[
        "scenario",
        "moat ns/pkt",
        "xdp-filter -f ipv4",
        "xdp-filter (all)",
        "floor",
        "empty program",
        "moat ÷ xdp-filter -f ipv4",
        "moat ÷ floor",
        "net of the empty program: moat ÷ xdp-filter -f ipv4",
        "net: moat ÷ floor",
    ]);
    for (scenario, row) in scenarios.iter().zip(samples) {
        let measured: Vec<Option<Measured>> = row
            .into_iter()
            .map(|samples| (!samples.is_empty()).then(|| Measured::of(samples)))
            .collect();
        let moat = measured[MOAT].as_ref().expect("moat ran every scenario");
        let test_run = measured[EMPTY]
            .as_ref()
            .expect("the empty program ran every scenario");
        let cell = |m: &Option<Measured>| m.as_ref().map_or("n/a".to_string(), Measured::cell);
        // n/a where a contender costs no more than the empty program: no ratio is meaningful.
        let ratio = |m: &Option<Measured>, net: f64| match m {
            Some(other) if other.median > net => {
                format!("{:.2}×", (moat.median - net) / (other.median - net))
            }
            _ => "n/a".to_string(),
        };
        println!("per-packet: {}: moat {:.1} ns", scenario.name, moat.median);
        table.row(vec![
            scenario.name.to_string(),
            moat.cell(),
            cell(&measured[FILTER_IPV4]),
            cell(&measured[FILTER_ALL]),
            cell(&measured[FLOOR]),
            test_run.cell(),
            ratio(&measured[FILTER_IPV4], 0.0),
            ratio(&measured[FLOOR], 0.0),
            ratio(&measured[FILTER_IPV4], test_run.median),
            ratio(&measured[FLOOR], test_run.median),
        ]);
    }
    table
}

fn mount_bpffs(path: &Path) {
    std::fs::create_dir_all(path).expect("bpffs mount point");
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&path.to_string_lossy()));
    if !mounted {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(path)
            .status()
            .expect("mount");
        assert!(status.success(), "mounting bpffs on {}", path.display());
    }
}
