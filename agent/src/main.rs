//! `moat`: parses the command line and dispatches, to the daemon (`moat run`) or to a client
//! command; every refusal is one line.

use std::process::ExitCode;

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
            // One malloc arena for every thread: the threads that parse, sort and insert a
            // million prefixes would each keep an arena of freed memory the size of their share
            // (RSS twice as large after a start-up or an import); they seldom allocate at once.
            // SAFETY: a plain setting, before any other thread of the daemon exists.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(source, !args.no_pin))
        }
        command => command.run_client(&socket, cli.socket.clone()),
    }
}
