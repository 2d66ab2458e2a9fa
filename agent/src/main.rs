use std::process::ExitCode;

use clap::Parser as _;
use moat::{
    cli::{Cli, Command},
    daemon, logging,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log_level);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let source = daemon::ConfigSource {
                path: args.config.clone(),
                overrides: args.overrides(),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(source))
        }
    }
}
