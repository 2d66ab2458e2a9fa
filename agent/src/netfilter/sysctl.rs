//! The sysctls netfilter's synproxy needs in the network namespace moat runs in (each is per
//! namespace): timestamps on (synproxy keeps the client's window scale and SACK-permitted in
//! its timestamp cookie), and conntrack's loose pickup off (else conntrack adopts the final
//! ACK as an established flow, and synproxy never sees it). The values found before are saved
//! once, so that a restart never saves moat's own values as the host's.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// Each sysctl (its path under /proc/sys) and the value synproxy needs.
pub const REQUIRED: [(&str, &str); 2] = [
    ("net/ipv4/tcp_timestamps", "1"),
    ("net/netfilter/nf_conntrack_tcp_loose", "0"),
];
/// The saved values, in the state directory.
pub const SAVED_FILE: &str = "syn-proxy-sysctls.json";
const PROC_SYS: &str = "/proc/sys";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("{name} does not exist: the kernel lacks {what} (needed by [syn_proxy])")]
    Missing { name: String, what: &'static str },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not moat's saved sysctls: {source}")]
    Saved {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SysctlError {
    let path = path.to_path_buf();
    move |source| SysctlError::Io {
        action,
        path,
        source,
    }
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new(PROC_SYS).join(name)
}

/// Sets the required values, first saving the ones found (unless a saved set exists already:
/// then those found are moat's own).
pub fn apply(state_dir: &Path) -> Result<(), SysctlError> {
    let mut found = BTreeMap::new();
    for (name, _) in REQUIRED {
        let path = sysctl_path(name);
        let value = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SysctlError::Missing {
                name: name.replace('/', "."),
                what: if name.contains("netfilter") {
                    "connection tracking (nf_conntrack)"
                } else {
                    "TCP timestamps"
                },
            },
            _ => SysctlError::Io {
                action: "read",
                path: path.clone(),
                source: e,
            },
        })?;
        found.insert(name.to_string(), value.trim().to_string());
    }
    let saved = state_dir.join(SAVED_FILE);
    if !saved.exists() {
        let text = serde_json::to_string_pretty(&found).unwrap_or_default();
        let temporary = state_dir.join(format!("{SAVED_FILE}.tmp"));
        std::fs::write(&temporary, text).map_err(io("write", &temporary))?;
        std::fs::rename(&temporary, &saved).map_err(io("rename", &saved))?;
    }
    for (name, value) in REQUIRED {
        if found.get(name).map(String::as_str) != Some(value) {
            let path = sysctl_path(name);
            std::fs::write(&path, value).map_err(io("write", &path))?;
        }
    }
    Ok(())
}

/// Puts the saved values back and forgets them; returns whether there were any.
pub fn restore(state_dir: &Path) -> Result<bool, SysctlError> {
    let saved = state_dir.join(SAVED_FILE);
    let text = match std::fs::read_to_string(&saved) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("read", &saved)(e)),
    };
    let values: BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(|source| SysctlError::Saved {
            path: saved.clone(),
            source,
        })?;
    // Only the sysctls moat sets, whatever the file says.
    for (name, _) in REQUIRED {
        if let Some(value) = values.get(name) {
            let path = sysctl_path(name);
            // Gone (conntrack unloaded): nothing to put back.
            if path.exists() {
                std::fs::write(&path, value).map_err(io("write", &path))?;
            }
        }
    }
    std::fs::remove_file(&saved).map_err(io("remove", &saved))?;
    Ok(true)
}
