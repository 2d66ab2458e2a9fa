//! `cargo xtask test`: the one command CI runs.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    command::{cargo, describe, is_root, run, workspace_root},
    package, setup,
    test_results::count_before,
    vm,
};

/// `cargo xtask test`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Skip the 6.1 VM pass (a quicker local run; CI never passes this).
    #[arg(long)]
    no_vm: bool,
}

/// Every check; unless `--no-vm`, also the integration tests on Debian's 6.1 kernel in a VM
/// (what CI does).
pub fn run_all(options: Options) -> anyhow::Result<()> {
    let with_vm = !options.no_vm;
    setup::ensure_ready()?;
    if !is_root() {
        bail!(
            "the end-to-end tests need root (network namespaces, veth pairs, XDP): run `sudo -E cargo xtask test`; \
             they are never skipped"
        );
    }
    run(cargo().args(["fmt", "--all", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    // The XDP program is linted on its own target; the rest on the host.
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "+nightly",
            "clippy",
            "--package",
            "agent-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(workspace_root().join("target").join("ebpf-clippy"))
        .args(["--", "-D", "warnings"]))?;
    // The package's tests install what `cargo xtask package` ships (a release build).
    let deb = package::build(&workspace_root().join("target").join("debian"))?;
    run(cargo().args(["build", "--package", "moat"]))?;
    let moat = workspace_root().join("target").join("debug").join("moat");
    let totals = run_tests(
        cargo()
            .args([
                "test",
                "--workspace",
                "--exclude",
                "agent-ebpf",
                "--no-fail-fast",
            ])
            .env("MOAT_BIN", &moat)
            .env("MOAT_DEB", &deb)
            .env("MOAT_NATS_SERVER", setup::nats_server()),
    )?;
    // One closing line for every test binary together.
    println!(
        "xtask test: {} passed, {} failed",
        totals.passed, totals.failed
    );
    if totals.failed > 0 || !totals.success {
        bail!("tests failed");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    if with_vm {
        vm::run_all(&[vm::Target::Image(setup::debian_kernel()?)])?;
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    success: bool,
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn run_tests(command: &mut Command) -> anyhow::Result<Totals> {
    eprintln!("+ {}", describe(command));
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(command)))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            totals.passed += count_before(result, " passed");
            totals.failed += count_before(result, " failed");
        }
    }
    totals.success = child.wait().context("waiting for cargo test")?.success();
    Ok(totals)
}
