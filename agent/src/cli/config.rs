//! `moat config check`: validate a configuration file without a daemon.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;

use crate::{
    config::{Config, Overrides},
    program::live,
};

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file without a daemon; errors name file:line:col.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

pub fn check(file: &Path) -> anyhow::Result<()> {
    let config = Config::from_file(file)?;
    let resolved = config.resolve(&Overrides::default())?;
    live::check(&resolved.policy).with_context(|| file.display().to_string())?;
    let policy = &resolved.policy;
    println!(
        "{}: OK ({} interfaces, {} allowlist and {} blocklist entries, {} rules, rate limit {})",
        file.display(),
        resolved.interfaces.len(),
        policy.allowlist.len(),
        policy.blocklist.len(),
        policy.rules.len(),
        if policy.rate_limit.is_on() {
            "on"
        } else {
            "off"
        }
    );
    if let Some(written) = policy.rate_limit.burst_raised_from {
        println!(
            "note: rate_limit: burst_packets = {written} is under one tick of the program's clock \
             (10 ms of pps); moat raises it to {}",
            policy.rate_limit.burst_packets
        );
    }
    Ok(())
}
