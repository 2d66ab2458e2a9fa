//! What `[syn_proxy]` needs of the host besides the XDP program: netfilter's `synproxy`, which
//! checks the cookie of a handshake's final ACK and opens the connection to the listener (an
//! nftables table of moat's own, [`ruleset`]), and the sysctls the kernel's reference setup
//! sets ([`sysctl`]), their previous values saved in the state directory to be put back.
//!
//! Installed before the program is attached (a SYN-ACK must never go out with nobody to check
//! its cookie), replaced whole on a reload, and removed with the program: on `moat down`, on a
//! reload without `[syn_proxy]`, and when an unpinned daemon stops.

pub mod ruleset;
pub mod sysctl;

use std::path::Path;

use tracing::info;

use crate::config::syn_proxy::SynProxy;

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error(transparent)]
    Ruleset(#[from] ruleset::RulesetError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
}

/// Puts the host in the state `syn_proxy` asks for: its table and sysctls, or none of them.
pub fn sync(syn_proxy: Option<&SynProxy>, state_dir: &Path) -> Result<(), NetfilterError> {
    match syn_proxy {
        Some(proxy) => {
            ruleset::install(proxy)?;
            // After the table: the conntrack sysctl exists once the table's `ct` rules have
            // loaded conntrack.
            sysctl::apply(state_dir)?;
            info!(
                table = ruleset::TABLE,
                "netfilter synproxy in place behind the XDP SYN cookies"
            );
            Ok(())
        }
        None => remove(state_dir),
    }
}

/// Removes moat's table and puts the saved sysctls back; nothing to remove is not an error.
pub fn remove(state_dir: &Path) -> Result<(), NetfilterError> {
    let removed = ruleset::remove()?;
    let restored = sysctl::restore(state_dir)?;
    if removed || restored {
        info!(
            table = ruleset::TABLE,
            "netfilter synproxy removed, sysctls restored"
        );
    }
    Ok(())
}
