//! The command line.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

use agent_common::stats::Reason;

use crate::{
    config::{DEFAULT_SOCKET, Overrides, XdpMode},
    logging::LogFormat,
};

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
    /// Write sampled dropped (or passed) frames to a pcap file that tcpdump and wireshark read.
    Capture(CaptureArgs),
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Detach moat from every interface and remove its pins (the daemon must be stopped).
    Down(DownArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// TOML configuration file; without it moat runs on its embedded default configuration
    /// (no interfaces, empty lists, xdp_mode = "auto").
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface to protect (repeatable); replaces the config's `interfaces`.
    #[arg(short, long = "iface", value_name = "IF")]
    pub interfaces: Vec<String>,

    /// Source CIDR (or address) to drop (repeatable); added to the config's blocklist.
    #[arg(short, long, value_name = "CIDR")]
    pub block: Vec<String>,

    /// How to attach: native (driver), generic (skb), or auto (native, else generic with a
    /// warning); overrides the config's `xdp_mode`.
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp_mode: Option<XdpMode>,

    /// Where dynamic entries are saved; overrides the config's `state_dir`.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where links and maps are pinned; overrides the config's `bpffs`.
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,

    /// Pin nothing: detach on exit (for throwaway runs).
    #[arg(long)]
    pub no_pin: bool,
}

impl RunArgs {
    pub fn overrides(&self, socket: Option<PathBuf>) -> Overrides {
        Overrides {
            interfaces: self.interfaces.clone(),
            block: self.block.clone(),
            xdp_mode: self.xdp_mode,
            socket,
            state_dir: self.state_dir.clone(),
            bpffs: self.bpffs.clone(),
        }
    }
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if ttl < Duration::from_secs(1) {
        return Err(format!("{text:?}: a ttl is at least 1s"));
    }
    Ok(ttl)
}

#[derive(Debug, Subcommand)]
pub enum BlockCommand {
    /// Drop packets from these sources, now.
    Add {
        #[arg(value_name = "CIDR", required = true)]
        cidrs: Vec<String>,
        /// Remove the entries after this long (e.g. 90s, 10m, 2h).
        #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
        ttl: Option<Duration>,
        /// A note kept with the entries.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Delete entries added at run time (or lift rate-limit bans).
    Del {
        #[arg(value_name = "CIDR", required = true)]
        cidrs: Vec<String>,
    },
    /// Every entry: configuration, run time and rate-limit bans.
    List {
        /// Print JSON (the format is documented in README).
        #[arg(long)]
        json: bool,
    },
    /// Add every entry of a list file (FireHOL/Spamhaus format), all or none.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
        ttl: Option<Duration>,
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AllowCommand {
    /// Always pass packets from these sources.
    Add {
        #[arg(value_name = "CIDR", required = true)]
        cidrs: Vec<String>,
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Delete entries added at run time.
    Del {
        #[arg(value_name = "CIDR", required = true)]
        cidrs: Vec<String>,
    },
    /// Every entry, from the configuration and from run time.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add every entry of a list file, all or none.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Print JSON (the format is documented in README).
    #[arg(long)]
    pub json: bool,
    /// Print again every interval, with rates.
    #[arg(long)]
    pub watch: bool,
    /// The interval of --watch.
    #[arg(long, value_parser = parse_ttl, default_value = "1s", value_name = "DURATION")]
    pub interval: Duration,
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Print one reading as JSON and exit (the format is documented in README).
    #[arg(long)]
    pub json: bool,
    /// How often the screen is redrawn; rates span this long.
    #[arg(long, value_parser = parse_ttl, default_value = "1s", value_name = "DURATION")]
    pub interval: Duration,
    /// Sources shown per table.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rows: u32,
}

#[derive(Debug, clap::Args)]
pub struct CaptureArgs {
    /// Only frames with this reason.
    #[arg(long, value_name = "REASON", value_parser = clap::builder::PossibleValuesParser::new(Reason::ALL.map(Reason::name)))]
    pub reason: Option<String>,
    /// Capture passed frames instead of dropped ones.
    #[arg(long)]
    pub passed: bool,
    /// Stop after this many frames.
    #[arg(short, long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=crate::capture::MAX_CAPTURE_COUNT))]
    pub count: u64,
    /// Sample one in this many packets while capturing (1: every packet; raise it under a
    /// flood, since each sample costs the program a ring buffer write).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub every: u32,
    /// The pcap file to write; `-` writes to standard output (e.g. for `tcpdump -r -`).
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file without a daemon; errors name file:line:col.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// Read `bpffs` (and `socket`) from this configuration.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The pin directory; overrides the config's `bpffs`.
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
}
