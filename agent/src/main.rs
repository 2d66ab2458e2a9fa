//! `moat`: parses the command line and dispatches, to the daemon (`moat run`) or to a client
//! command; every refusal is one line.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use moat::{
    cli::{Cli, Command},
    daemon, logging,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and a bare `moat block`: the help text is the answer.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            // One line, like every other refusal; `--help` has the rest.
            let text = e.to_string();
            let reason = text.lines().next().unwrap_or_default();
            eprintln!(
                "moat: {} (see moat --help)",
                reason.strip_prefix("error: ").unwrap_or(reason)
            );
            return ExitCode::from(2);
        }
    };
    logging::init(&cli.log_level, cli.log_format);
    let daemon = matches!(cli.command, Command::Run(_));
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if daemon => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            // One line, for people and scripts.
            eprintln!("moat: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket();
    match cli.command {
        Command::Run(args) => {
            let source = daemon::ConfigSource {
                path: args.config.clone(),
                overrides: args.overrides(cli.socket.clone()),
            };
            start_workers()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(source, !args.no_pin))
        }
        command => command.run_client(&socket, cli.socket.clone()),
    }
}

/// Most worker threads for the daemon's large list work (parsing, sorting, the kernel's batch
/// inserts of a start-up or an import): more add little to a million prefixes.
const MAX_WORKERS: usize = 8;

/// The daemon's worker pool (rayon's), made before any other thread, with one malloc arena
/// for every thread: with an arena each, the workers kept their share of a million prefixes as
/// freed memory (RSS twice as large after a start-up or an import). Their parsing and sorting
/// allocate little; the contention costs less than that memory.
fn start_workers() -> anyhow::Result<()> {
    #[cfg(target_env = "gnu")]
    // SAFETY: a plain setting, made before any other thread of the process exists (mallopt is
    // not safe beside other threads).
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } == 0 {
        tracing::warn!("could not limit malloc to one arena: memory may stay with idle threads");
    }
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MAX_WORKERS);
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("moat-worker-{i}"))
        .build_global()
        .context("starting the worker threads")
}
