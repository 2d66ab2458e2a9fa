//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Overrides, XdpMode};

/// moat drops attack traffic in XDP, before the kernel allocates anything for it.
#[derive(Debug, Parser)]
#[command(name = "moat", version, propagate_version = true)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); the MOAT_LOG environment variable overrides it.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it to the interfaces, fill the blocklist, and enforce until
    /// SIGINT or SIGTERM, then detach.
    Run(RunArgs),
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
}

impl RunArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            interfaces: self.interfaces.clone(),
            block: self.block.clone(),
            xdp_mode: self.xdp_mode,
        }
    }
}
