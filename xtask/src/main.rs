//! Developer and CI entry points: `cargo xtask setup | lab | test`.

mod command;
mod lab;
mod setup;
mod test;

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
    /// Every check CI runs: rustfmt, clippy -D warnings, unit tests and the privileged
    /// end-to-end tests (needs root: it fails, rather than skips, without it).
    Test,
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::ensure_ready(),
        Task::Lab => lab::run_demo(),
        Task::Test => test::run_all(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
