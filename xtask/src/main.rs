//! Developer and CI entry points: `cargo xtask setup | lab | test | vm-test | bench | package`.

mod bench;
mod command;
mod lab;
mod package;
mod setup;
mod test;
mod test_results;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "moat's developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready to build and test moat (idempotent): nightly's rust-src,
    /// bpf-linker built against nightly's own LLVM, and the lab's system tools.
    Setup,
    /// See it work: set up, build, run moat in a throwaway veth lab against a legitimate flow
    /// and a blocklisted flood, print what passed and what was dropped, clean up. Needs root.
    Lab,
    /// Every check CI runs: rustfmt, clippy -D warnings, unit tests, the privileged
    /// end-to-end tests, and those tests again on Debian's 6.1 kernel in a VM (needs root: it
    /// fails, rather than skips, without it).
    Test(test::Options),
    /// Boot each kernel in a throwaway VM (virtme-ng + QEMU) and run the privileged integration
    /// tests inside; print a table of results and the verifier's view of the program. Without
    /// --kernel: Debian's 6.1 LTS image, and the running kernel (natively).
    VmTest(vm::Options),
    /// Measure moat (release builds, veth lab; needs root) and write the results into
    /// BENCHMARKS.md.
    Bench(bench::Options),
    /// Build the Debian package (release binary, systemd unit, example config as a conffile,
    /// the `moat` group, manual pages, shell completions) into target/debian.
    Package(package::Options),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::ensure_ready(),
        Task::Lab => lab::run_demo(),
        Task::Test(options) => test::run_all(options),
        Task::VmTest(options) => vm::run_tests(options),
        Task::Bench(options) => bench::run_bench(options),
        Task::Package(options) => package::run_package(options),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
