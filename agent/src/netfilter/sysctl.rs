//! The sysctls netfilter's synproxy needs in the network namespace moat runs in (each is per
//! namespace): timestamps on (synproxy keeps the client's window scale and SACK-permitted in
//! its timestamp cookie), and conntrack's loose pickup off (else conntrack adopts the final
//! ACK as an established flow, and synproxy never sees it). The values found before are saved
//! once, with the namespace they belong to, so that a restart never saves moat's own values
//! as the host's; they are put back only where moat's value is still in place (an operator's
//! later change stays).

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use tracing::warn;

/// A sysctl synproxy needs: its path under /proc/sys, the value moat sets, the values that
/// already do, and what its absence means.
struct Required {
    name: &'static str,
    value: &'static str,
    accepted: &'static [&'static str],
    missing: &'static str,
}

const REQUIRED: [Required; 2] = [
    Required {
        name: "net/ipv4/tcp_timestamps",
        value: "1",
        // 2: timestamps without random offsets, on all the same.
        accepted: &["1", "2"],
        missing: "TCP timestamps",
    },
    Required {
        name: "net/netfilter/nf_conntrack_tcp_loose",
        value: "0",
        accepted: &["0"],
        missing: "connection tracking (nf_conntrack)",
    },
];
/// The saved values, in the state directory.
pub const SAVED_FILE: &str = "syn-proxy-sysctls.json";
const PROC_SYS: &str = "/proc/sys";
const OWN_NETNS: &str = "/proc/self/ns/net";

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
    #[error(
        "{path} holds the sysctls of another network namespace (inode {saved}, this one {own}): \
         run moat down in the namespace moat ran in"
    )]
    OtherNamespace { path: PathBuf, saved: u64, own: u64 },
}

/// What is saved: the namespace, and each sysctl's value before moat set it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    netns: u64,
    values: BTreeMap<String, String>,
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

fn own_netns() -> Result<u64, SysctlError> {
    std::fs::metadata(OWN_NETNS)
        .map(|m| m.ino())
        .map_err(io("read", Path::new(OWN_NETNS)))
}

/// Writes `bytes` to `path` through a temporary file, synced before and after the rename: a
/// crash leaves the old file or the new one, never an empty one.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Whether moat saved values in `state_dir` (and so has some to put back).
pub fn saved(state_dir: &Path) -> bool {
    state_dir.join(SAVED_FILE).exists()
}

/// Sets the required values, first saving the ones found (unless a saved set exists already:
/// then those found are moat's own).
pub fn apply(state_dir: &Path) -> Result<(), SysctlError> {
    let mut found = BTreeMap::new();
    for required in &REQUIRED {
        let path = sysctl_path(required.name);
        let value = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SysctlError::Missing {
                name: required.name.replace('/', "."),
                what: required.missing,
            },
            _ => SysctlError::Io {
                action: "read",
                path: path.clone(),
                source: e,
            },
        })?;
        found.insert(required.name.to_string(), value.trim().to_string());
    }
    let saved = state_dir.join(SAVED_FILE);
    if !saved.exists() {
        let record = Saved {
            netns: own_netns()?,
            values: found.clone(),
        };
        let text = serde_json::to_vec_pretty(&record).map_err(|e| SysctlError::Io {
            action: "encode",
            path: saved.clone(),
            source: e.into(),
        })?;
        write_durably(&saved, &text).map_err(io("write", &saved))?;
    }
    for required in &REQUIRED {
        let current = found.get(required.name).map(String::as_str);
        if !current.is_some_and(|v| required.accepted.contains(&v)) {
            let path = sysctl_path(required.name);
            std::fs::write(&path, required.value).map_err(io("write", &path))?;
        }
    }
    Ok(())
}

/// Puts the saved values back where moat's are still in place, and forgets them; returns
/// whether there were any. A damaged file is reported in the log and dropped: nothing in it
/// can be trusted to write back.
pub fn restore(state_dir: &Path) -> Result<bool, SysctlError> {
    let path = state_dir.join(SAVED_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("read", &path)(e)),
    };
    match serde_json::from_slice::<Saved>(&text) {
        Ok(saved) => {
            let own = own_netns()?;
            if saved.netns != own {
                return Err(SysctlError::OtherNamespace {
                    path,
                    saved: saved.netns,
                    own,
                });
            }
            for required in &REQUIRED {
                let Some(value) = saved.values.get(required.name) else {
                    continue;
                };
                let sysctl = sysctl_path(required.name);
                // Gone (conntrack unloaded), or changed since by someone else: left as it is.
                let current = std::fs::read_to_string(&sysctl).ok();
                if current.as_deref().map(str::trim) == Some(required.value) {
                    std::fs::write(&sysctl, value).map_err(io("write", &sysctl))?;
                }
            }
        }
        Err(e) => warn!(
            file = %path.display(),
            error = %e,
            "the saved sysctls are damaged; they are not put back"
        ),
    }
    std::fs::remove_file(&path).map_err(io("remove", &path))?;
    Ok(true)
}
