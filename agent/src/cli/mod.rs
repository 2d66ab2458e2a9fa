//! The command line: clap's definitions, one file per command group, each with the commands
//! it runs and how it renders their replies. Every command but `run`, `config check`, `down`,
//! `completions` and `manpages` is a client of the daemon's control socket.

mod attacks;
mod capture;
mod config;
mod docs;
mod down;
mod lists;
mod run;
mod stats;
mod status;
mod top;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

pub use self::{
    capture::{CaptureArgs, PcapOutput},
    config::ConfigCommand,
    down::DownArgs,
    lists::{AllowCommand, BlockCommand},
    run::RunArgs,
    stats::StatsArgs,
    top::{TopArgs, render as render_top},
};
use crate::{config::DEFAULT_SOCKET, control::protocol::Reply, logging::LogFormat};

/// moat drops attack traffic in XDP, before the kernel allocates anything for it.
#[derive(Debug, Parser)]
#[command(name = "moat", version, propagate_version = true)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); the MOAT_LOG environment variable overrides it.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    /// Log format: human lines, JSON lines, or auto (JSON under systemd's journal).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,

    /// The daemon's control socket [default: the config's `socket`, else /run/moat/moat.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The socket a client command talks to.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it (or take over the pinned one), fill its maps, and serve
    /// the control socket until SIGINT or SIGTERM; the pinned program keeps enforcing after.
    Run(RunArgs),
    /// Change or show the blocklist of the running daemon.
    Block {
        #[command(subcommand)]
        command: BlockCommand,
    },
    /// Change or show the allowlist of the running daemon.
    Allow {
        #[command(subcommand)]
        command: AllowCommand,
    },
    /// Packet and byte counters per interface, action and reason.
    Stats(StatsArgs),
    /// Interfaces, XDP mode, program, map fill, uptime and version of the running daemon.
    Status {
        /// Print JSON (the format is documented in README).
        #[arg(long)]
        json: bool,
    },
    /// Make the running daemon re-read its configuration file (as SIGHUP does).
    Reload,
    /// The top sources by dropped and by passed packets per second, live like `top`.
    Top(TopArgs),
    /// The protected destinations ([[protect]]), their traffic, and the running and recent
    /// attacks on them with their fingerprints.
    Attacks {
        /// Print JSON (the format is documented in README).
        #[arg(long)]
        json: bool,
    },
    /// Write sampled dropped (or passed) frames to a pcap file that tcpdump and wireshark read.
    Capture(CaptureArgs),
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Detach moat from every interface and remove its pins (the daemon must be stopped).
    Down(DownArgs),
    /// Print the completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages into a directory (the Debian package ships them).
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

impl Command {
    /// Runs a client command (every command but `run`, which the caller starts itself).
    pub fn run_client(
        self,
        socket: &std::path::Path,
        socket_flag: Option<PathBuf>,
    ) -> anyhow::Result<()> {
        match self {
            Self::Run(_) => anyhow::bail!("`moat run` is the daemon, not a client command"),
            Self::Block { command } => lists::block(socket, command),
            Self::Allow { command } => lists::allow(socket, command),
            Self::Stats(args) => stats::stats(socket, args),
            Self::Status { json } => status::status(socket, json),
            Self::Reload => status::reload(socket),
            Self::Top(args) => top::top(socket, &args),
            Self::Attacks { json } => attacks::attacks(socket, json),
            Self::Capture(args) => capture::capture(socket, args),
            Self::Config {
                command: ConfigCommand::Check { file },
            } => config::check(&file),
            Self::Down(args) => down::down(socket_flag, args),
            Self::Completions { shell } => docs::completions(shell),
            Self::Manpages { dir } => docs::manpages(&dir),
        }
    }
}

/// A `--ttl` or `--interval`: a duration of at least a second.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if ttl < Duration::from_secs(1) {
        return Err(format!("{text:?}: a ttl is at least 1s"));
    }
    Ok(ttl)
}

fn unexpected(reply: Reply) -> anyhow::Error {
    anyhow::anyhow!("the daemon answered with an unexpected reply: {reply:?}")
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string(value).context("encoding JSON")?;
    println!("{text}");
    Ok(())
}
