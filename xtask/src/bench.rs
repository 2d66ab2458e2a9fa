//! `cargo xtask bench [--quick]`: release builds, then `moat-bench` on a veth lab (per-packet
//! cost, floods, control plane); writes BENCHMARKS.md's measured section (between its markers)
//! with the machine and the versions it ran with.

use anyhow::{Context as _, bail};

use crate::command::{cargo, is_root, output, run, workspace_root};

/// BENCHMARKS.md's generated part lies between these lines; the prose around it is kept.
const BEGIN: &str = "<!-- cargo xtask bench: begin -->";
const END: &str = "<!-- cargo xtask bench: end -->";

/// `cargo xtask bench`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// A smoke run: smaller lists, one run of each measure.
    #[arg(long)]
    quick: bool,
}

pub fn run_bench(options: Options) -> anyhow::Result<()> {
    let quick = options.quick;
    crate::setup::ensure_bench_ready()?;
    if !is_root() {
        bail!("the benchmarks need root (network namespaces, veth pairs, XDP)");
    }
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "moat",
        "--package",
        "moat-tests",
        "--bins",
    ]))?;
    let release = workspace_root().join("target").join("release");
    let results = workspace_root().join("target").join("bench-results.md");
    let mut bench = std::process::Command::new(release.join("moat-bench"));
    bench.arg(&results).env("MOAT_BIN", release.join("moat"));
    if quick {
        bench.arg("--quick");
    }
    run(&mut bench)?;
    let table = std::fs::read_to_string(&results)
        .with_context(|| format!("reading {}", results.display()))?;

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = output(std::process::Command::new("uname").arg("-r"))?;
    let rustc = output(std::process::Command::new("rustc").arg("-V"))?;
    let date = output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    let peers = output(std::process::Command::new("dpkg-query").args([
        "-W",
        "-f",
        "${Package} ${Version}, ",
        "xdp-tools",
        "nftables",
        "netsniff-ng",
    ]))?;
    let generated = format!(
        "{BEGIN}\nMeasured {} on {cpu} ({cores} CPUs), kernel {}, {}; moat {} (release); {}.{}\n\n\
         {table}{END}",
        date.trim(),
        kernel.trim(),
        rustc.trim(),
        env!("CARGO_PKG_VERSION"),
        peers.trim().trim_end_matches(','),
        if quick {
            " **--quick run: 100,000 prefixes, one run each, 2 s floods; not the published \
             numbers.**"
        } else {
            ""
        },
    );
    let path = workspace_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!("{}{generated}{}", &old[..begin], &old[end + END.len()..])
        }
        _ => format!("# Benchmarks\n\n{generated}\n"),
    };
    std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
    println!("bench: wrote {}", path.display());
    Ok(())
}
