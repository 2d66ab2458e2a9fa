//! `moat run`'s arguments: what the command line overrides in the configuration.

use std::path::PathBuf;

use crate::config::{Overrides, XdpMode};

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
