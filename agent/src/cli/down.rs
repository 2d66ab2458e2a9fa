//! `moat down`: detach moat from every interface and remove its pins (and what `[syn_proxy]`
//! set up in netfilter), with no daemon running.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::{
    config::{Config, Overrides},
    program::pins::PinDir,
};

#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// Read `bpffs` (and `socket`) from this configuration.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The pin directory; overrides the config's `bpffs`.
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// The state directory (where `[syn_proxy]` saved the sysctls it changed); overrides the
    /// config's `state_dir`.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}
pub fn down(socket: Option<PathBuf>, args: DownArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::embedded(),
    };
    let paths = config.resolve_paths(&Overrides {
        socket,
        bpffs: args.bpffs.clone(),
        state_dir: args.state_dir.clone(),
        ..Overrides::default()
    })?;
    if std::os::unix::net::UnixStream::connect(&paths.socket).is_ok() {
        bail!(
            "a moat daemon is serving {}; stop it first (e.g. systemctl stop moat), then run \
             moat down again",
            paths.socket.display()
        );
    }
    let pins = PinDir::new(&paths.bpffs);
    let detached = pins.remove_all().context("removing the pins")?;
    // After the program: no SYN-ACK of its is left for synproxy to check.
    crate::netfilter::remove(&paths.state_dir)
        .context("removing netfilter's synproxy ([syn_proxy])")?;
    if detached.is_empty() {
        println!("nothing pinned at {}", paths.bpffs.display());
    } else {
        println!(
            "detached from {} and removed {}",
            detached.join(", "),
            paths.bpffs.display()
        );
    }
    Ok(())
}
