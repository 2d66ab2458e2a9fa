//! What `[syn_proxy]` needs of the host besides the XDP program: netfilter's `synproxy`, which
//! checks the cookie of a handshake's final ACK and opens the connection to the listener (an
//! nftables table of moat's own, [`ruleset`]), and the sysctls the kernel's reference setup
//! sets ([`sysctl`]), their previous values saved in the state directory to be put back.
//!
//! Installed before the program is attached (a SYN-ACK must never go out with nobody to check
//! its cookie), replaced whole on a reload, and removed with the program: on `moat down`, on a
//! reload without `[syn_proxy]`, and when an unpinned daemon stops. A marker in the state
//! directory records that moat installed something, so that a host that never used the SYN
//! proxy is never touched (not even `nft` is run).

pub mod ruleset;
pub mod sysctl;

use std::path::{Path, PathBuf};

use tracing::info;

use crate::config::syn_proxy::SynProxy;

/// In the state directory while moat's table may be installed.
pub const MARKER: &str = "syn-proxy-installed";

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error(transparent)]
    Ruleset(#[from] ruleset::RulesetError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error("cannot {action} {path}: {source}")]
    Marker {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Puts the host in the state `syn_proxy` asks for: its table and sysctls, or none of them.
/// A failure leaves none of them.
pub fn sync(syn_proxy: Option<&SynProxy>, state_dir: &Path) -> Result<(), NetfilterError> {
    let Some(proxy) = syn_proxy else {
        return remove(state_dir);
    };
    let marker = state_dir.join(MARKER);
    sysctl::write_durably(&marker, b"").map_err(|source| NetfilterError::Marker {
        action: "write",
        path: marker.clone(),
        source,
    })?;
    // The table first: the conntrack sysctl exists once its `ct` rules have loaded conntrack.
    let installed = ruleset::install(proxy)
        .map_err(NetfilterError::from)
        .and_then(|()| sysctl::apply(state_dir).map_err(NetfilterError::from));
    if let Err(e) = installed {
        // Nothing half done: the table and the sysctls go back as they were.
        let _ = remove(state_dir);
        return Err(e);
    }
    info!(
        table = ruleset::TABLE,
        "netfilter synproxy in place behind the XDP SYN cookies"
    );
    Ok(())
}

/// Removes moat's table and puts the saved sysctls back; nothing is done (and `nft` is not
/// run) unless moat installed them.
pub fn remove(state_dir: &Path) -> Result<(), NetfilterError> {
    let marker = state_dir.join(MARKER);
    let saved = sysctl::saved(state_dir);
    if !marker.exists() && !saved {
        return Ok(());
    }
    ruleset::remove()?;
    sysctl::restore(state_dir)?;
    match std::fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NetfilterError::Marker {
                action: "remove",
                path: marker,
                source,
            });
        }
    }
    info!(
        table = ruleset::TABLE,
        "netfilter synproxy removed, sysctls restored"
    );
    Ok(())
}
