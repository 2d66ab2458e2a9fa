//! `cargo xtask test`: the one command CI runs.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::command::{cargo, describe, is_root, run, workspace_root};

/// `vm`: also run the integration tests on Debian's 6.1 kernel in a VM (what CI does).
pub fn run_all(vm: bool) -> anyhow::Result<()> {
    crate::setup::ensure_ready()?;
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
            .env("MOAT_BIN", &moat),
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
    if vm {
        crate::vm::run_all(&[crate::vm::Target::Image(crate::vm::debian_kernel()?)])?;
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

/// In "ok. 5 passed; 0 failed; …", the number before `word`.
pub fn count_before(result: &str, word: &str) -> u64 {
    result
        .find(word)
        .and_then(|end| result[..end].rsplit([' ', '.']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn counts_are_read_from_a_result_line() {
        let line =
            "FAILED. 20 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s";
        assert_eq!(count_before(line, " passed"), 20);
        assert_eq!(count_before(line, " failed"), 1);
        assert_eq!(count_before("ok. 0 passed; 0 failed", " passed"), 0);
    }
}
