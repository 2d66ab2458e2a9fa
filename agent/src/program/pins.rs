//! What moat leaves on bpffs so that protection outlives the daemon: each XDP link and every
//! map, pinned under one directory (`bpffs`, default `/sys/fs/bpf/moat`):
//!
//! ```text
//! <bpffs>/links/<native|generic>/<interface>   the XDP link (the program stays attached)
//! <bpffs>/maps/<MAP>                           the maps the attached program uses
//! ```
//!
//! A new daemon loads its program, fills its own maps, and swaps the program inside each pinned
//! link with one `bpf_link_update`: packets go from the old program to the new with no moment
//! in between. `moat down` removes the pins, and with them the attachments.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData},
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use tracing::{info, warn};

use crate::config::XdpMode;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} is not on a bpffs mount and no mount point was found for one; mount one with \
         `mount -t bpf bpf DIR` or set `bpffs` to a directory under one"
    )]
    NoBpffs(PathBuf),
    #[error("pinning {what} at {path} failed")]
    Pin {
        what: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the link pinned at {path} is not usable")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("{path} holds a link that is not an XDP link")]
    NotXdp { path: PathBuf },
    #[error("taking the link of {interface} from the program failed")]
    Take {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The attach mode a pinned link was made with (a link cannot change it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    Native,
    Generic,
}

impl LinkMode {
    pub const ALL: [Self; 2] = [Self::Native, Self::Generic];

    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether a link of this mode serves a configuration asking for `wanted`.
    pub fn satisfies(self, wanted: XdpMode) -> bool {
        matches!(
            (self, wanted),
            (_, XdpMode::Auto)
                | (Self::Native, XdpMode::Native)
                | (Self::Generic, XdpMode::Generic)
        )
    }
}

/// The pin directory of one deployment.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

/// A link found pinned.
#[derive(Debug)]
pub struct PinnedXdp {
    pub interface: String,
    pub mode: LinkMode,
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn links(&self, mode: LinkMode) -> PathBuf {
        self.root.join("links").join(mode.name())
    }

    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn link_path(&self, interface: &str, mode: LinkMode) -> PathBuf {
        self.links(mode).join(interface)
    }

    pub fn map_path(&self, map: &str) -> PathBuf {
        self.maps().join(map)
    }

    /// Makes sure the directory exists on bpffs, mounting bpffs on the directory's parent
    /// (normally `/sys/fs/bpf`) when nothing is mounted there.
    pub fn prepare(&self) -> Result<(), PinError> {
        let mut existing = self.root.as_path();
        while !existing.exists() {
            existing = existing
                .parent()
                .ok_or_else(|| PinError::NoBpffs(self.root.clone()))?;
        }
        if !is_bpffs(existing)? {
            // Mount only on the standard place or on the pin directory's own parent, never
            // over an arbitrary directory of the host.
            let parent = self.root.parent().unwrap_or(existing);
            if existing != parent || !parent.is_dir() {
                return Err(PinError::NoBpffs(self.root.clone()));
            }
            mount_bpffs(parent)?;
            info!(path = %parent.display(), "mounted bpffs");
        }
        for dir in [
            self.links(LinkMode::Native),
            self.links(LinkMode::Generic),
            self.maps(),
        ] {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(())
    }

    /// The links pinned here, in any mode.
    pub fn pinned_links(&self) -> Vec<PinnedXdp> {
        let mut found = Vec::new();
        for mode in LinkMode::ALL {
            let dir = self.links(mode);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Some(interface) = entry.file_name().to_str() {
                    found.push(PinnedXdp {
                        interface: interface.to_string(),
                        mode,
                        path: entry.path(),
                    });
                }
            }
        }
        found
    }

    /// The pinned map `name`, if any.
    pub fn open_map(&self, name: &str) -> Option<Map> {
        let data = MapData::from_pin(self.map_path(name)).ok()?;
        Map::from_map_data(data).ok()
    }

    /// Pins map `name`, replacing what an earlier program pinned there.
    pub fn pin_map(&self, name: &str, map: &MapData) -> Result<(), PinError> {
        let path = self.map_path(name);
        remove_if_present(&path)?;
        map.pin(&path).map_err(|source| PinError::Pin {
            what: format!("map {name}"),
            path: path.clone(),
            source,
        })
    }

    /// Removes every pin and the directories; returns the interfaces whose links were removed
    /// (the kernel detaches a link when its last pin and fd go).
    pub fn remove_all(&self) -> Result<Vec<String>, PinError> {
        let links = self.pinned_links();
        for link in &links {
            remove_if_present(&link.path)?;
        }
        if let Ok(entries) = std::fs::read_dir(self.maps()) {
            for entry in entries.flatten() {
                remove_if_present(&entry.path())?;
            }
        }
        for dir in [
            self.links(LinkMode::Native),
            self.links(LinkMode::Generic),
            self.root.join("links"),
            self.maps(),
            self.root.clone(),
        ] {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&dir)(e)),
            }
        }
        Ok(links.into_iter().map(|l| l.interface).collect())
    }
}

fn take_failed(interface: &str) -> impl Fn(aya::programs::ProgramError) -> PinError + '_ {
    move |source| PinError::Take {
        interface: interface.to_string(),
        source,
    }
}

fn remove_if_present(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

fn is_bpffs(path: &Path) -> Result<bool, PinError> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io(path)(std::io::Error::other(e)))?;
    // SAFETY: `statfs` is plain C data; all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct we own for statfs to write into.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io(path)(std::io::Error::last_os_error()));
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(target: &Path) -> Result<(), PinError> {
    let c_target = CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|e| io(target)(std::io::Error::other(e)))?;
    // SAFETY: mount(2) with valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io(target)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Puts `program` on the pinned link of `interface` when one serves `wanted`, with one atomic
/// update; otherwise removes stale pins and returns `None` so the caller attaches anew.
pub fn adopt(
    dir: &PinDir,
    program: &mut Xdp,
    interface: &str,
    wanted: XdpMode,
) -> Result<Option<LinkMode>, PinError> {
    for pinned in dir
        .pinned_links()
        .into_iter()
        .filter(|p| p.interface == interface)
    {
        if !pinned.mode.satisfies(wanted) {
            warn!(
                interface,
                pinned = pinned.mode.name(),
                wanted = %wanted,
                "the pinned link has another XDP mode; replacing it (a short gap on this interface)"
            );
            remove_if_present(&pinned.path)?;
            continue;
        }
        let updated = PinnedLink::from_pin(&pinned.path)
            .map_err(|source| PinError::Link {
                path: pinned.path.clone(),
                source,
            })
            .and_then(|link| {
                XdpLink::try_from(FdLink::from(link)).map_err(|_| PinError::NotXdp {
                    path: pinned.path.clone(),
                })
            })
            .and_then(|link| {
                let id = program
                    .attach_to_link(link)
                    .map_err(take_failed(interface))?;
                // The pin keeps the link; the program must not detach it when dropped.
                program.take_link(id).map_err(take_failed(interface))
            });
        match updated {
            Ok(_link) => return Ok(Some(pinned.mode)),
            Err(e) => {
                // E.g. the interface was deleted and re-created: the old link is defunct.
                warn!(
                    interface,
                    error = %crate::error_chain(&e),
                    "the pinned link cannot be updated; attaching anew"
                );
                remove_if_present(&pinned.path)?;
            }
        }
    }
    Ok(None)
}

/// Pins the link `link_id` of `program` (just attached to `interface`), so that it outlives
/// this process.
pub fn pin_link(
    dir: &PinDir,
    program: &mut Xdp,
    link_id: aya::programs::xdp::XdpLinkId,
    interface: &str,
    mode: LinkMode,
) -> Result<(), PinError> {
    let link = program.take_link(link_id).map_err(take_failed(interface))?;
    let path = dir.link_path(interface, mode);
    let fd_link = FdLink::try_from(link).map_err(|_| PinError::NotXdp { path: path.clone() })?;
    remove_if_present(&path)?;
    fd_link.pin(&path).map_err(|source| PinError::Pin {
        what: format!("the XDP link of {interface}"),
        path,
        source,
    })?;
    Ok(())
}
