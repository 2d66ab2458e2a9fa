//! What moat leaves on bpffs so that protection outlives the daemon: each XDP link and every
//! map, pinned under one directory (`bpffs`, default `/sys/fs/bpf/moat`):
//!
//! ```text
//! <bpffs>/links/<native|generic>/<interface>   the XDP link (the program stays attached)
//! <bpffs>/maps/v<N>/<MAP>                      the maps the attached program uses, by layout
//! ```
//!
//! A new daemon loads its program, fills its own maps, and swaps the program inside each pinned
//! link with one `bpf_link_update`: packets go from the old program to the new with no moment
//! in between. `moat down` removes the pins, and with them the attachments.

use std::{
    ffi::CString,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use agent_common::maps::PINNED_LAYOUT_VERSION;
use aya::{
    maps::{Map, MapData},
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use tracing::{info, warn};

use super::xdp_link::{self, XdpLinkInfo};
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
    #[error(
        "{path} is owned by uid {uid}, not root: moat pins only into directories no other user \
         controls (remove it, or let moat create it)"
    )]
    NotOwned { path: PathBuf, uid: u32 },
    #[error("{path} is not a directory (a symlink is not followed)")]
    NotADirectory { path: PathBuf },
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

    /// Every layout's maps.
    fn all_maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// This layout's maps (see `agent_common::maps::PINNED_LAYOUT_VERSION`).
    fn maps(&self) -> PathBuf {
        self.all_maps().join(format!("v{PINNED_LAYOUT_VERSION}"))
    }

    pub fn link_path(&self, interface: &str, mode: LinkMode) -> PathBuf {
        self.links(mode).join(interface)
    }

    pub fn map_path(&self, map: &str) -> PathBuf {
        self.maps().join(map)
    }

    /// Makes sure the directory exists on bpffs, mounting bpffs (mode 0700) on the directory's
    /// parent (normally `/sys/fs/bpf`) when nothing is mounted there. Every directory of the pin
    /// tree is root's and 0700: one owned by another user is refused (whoever controls it could
    /// delete a pin and detach moat), and one of root's with looser modes is tightened.
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
            info!(path = %parent.display(), "mounted bpffs (mode 0700)");
        }
        for dir in [
            self.root.clone(),
            self.root.join("links"),
            self.links(LinkMode::Native),
            self.links(LinkMode::Generic),
            self.all_maps(),
            self.maps(),
        ] {
            private_dir(&dir)?;
        }
        Ok(())
    }

    /// Whether maps of another layout are pinned (an older or newer moat's).
    pub fn other_layouts(&self) -> Vec<String> {
        let current = self.maps();
        std::fs::read_dir(self.all_maps())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path() != current)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Removes the maps of other layouts: once this layout's are pinned, nothing reads them.
    pub fn remove_other_layouts(&self) -> Result<(), PinError> {
        let current = self.maps();
        let Ok(entries) = std::fs::read_dir(self.all_maps()) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path != current {
                remove_tree(&path)?;
            }
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
        remove_tree(&self.all_maps())?;
        for dir in [
            self.links(LinkMode::Native),
            self.links(LinkMode::Generic),
            self.root.join("links"),
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

/// Removes pins and directories below `path`, and `path` (symlinks are removed, not followed).
fn remove_tree(path: &Path) -> Result<(), PinError> {
    let found = match std::fs::symlink_metadata(path) {
        Ok(found) => found,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    };
    if !found.file_type().is_dir() {
        return remove_if_present(path);
    }
    for entry in std::fs::read_dir(path).map_err(io(path))?.flatten() {
        remove_tree(&entry.path())?;
    }
    std::fs::remove_dir(path).map_err(io(path))
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

/// Creates `dir` (mode 0700) or checks the one there: a directory, not a symlink, root's.
fn private_dir(dir: &Path) -> Result<(), PinError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(dir)(e)),
    }
    let found = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if !found.file_type().is_dir() {
        return Err(PinError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    if found.uid() != 0 {
        return Err(PinError::NotOwned {
            path: dir.to_path_buf(),
            uid: found.uid(),
        });
    }
    if found.mode() & 0o7777 != 0o700 {
        warn!(
            path = %dir.display(),
            mode = format!("{:o}", found.mode() & 0o7777),
            "tightening the pin directory to 0700"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
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
            // The kernel's default is 1777: any user could remove moat's pins.
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io(target)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A link this process holds (its fd, for as long as the daemon runs) and has pinned (so that
/// it outlives the daemon): deleting the pin does not detach moat while it runs.
#[derive(Debug)]
pub struct HeldLink {
    pub mode: LinkMode,
    pub path: PathBuf,
    pub link: FdLink,
}

impl HeldLink {
    /// What the kernel says of the link, and whether the pin still holds this very link.
    pub fn inspect(&self) -> Result<(XdpLinkInfo, bool), std::io::Error> {
        let info = xdp_link::info(&self.link)?;
        let pinned = PinnedLink::from_pin(&self.path)
            .ok()
            .map(FdLink::from)
            .and_then(|pinned| xdp_link::info(&pinned).ok())
            .is_some_and(|pinned| pinned.link_id == info.link_id);
        Ok((info, pinned))
    }

    /// Pins the link again where its pin should be, when that pin is gone or holds another
    /// link; returns whether it had to.
    pub fn restore_pin(self, interface: &str) -> Result<bool, PinError> {
        if self.inspect().is_ok_and(|(_, pinned)| pinned) {
            return Ok(false);
        }
        pin_at(self.link, &self.path, interface, self.mode)?;
        Ok(true)
    }
}

/// Puts `program` into the pinned link attached to `if_index` (`interface`), when one serves
/// `wanted`, with one atomic update. The kernel's word on which interface a link is attached to
/// decides, not the pin's file name: a link pinned under another name (the interface was
/// renamed) is re-pinned under this one. `None`: the caller attaches anew.
pub fn adopt(
    dir: &PinDir,
    program: &mut Xdp,
    interface: &str,
    if_index: u32,
    wanted: XdpMode,
) -> Result<Option<HeldLink>, PinError> {
    for pinned in dir.pinned_links() {
        let link = match PinnedLink::from_pin(&pinned.path) {
            Ok(link) => FdLink::from(link),
            Err(source) => {
                let e = PinError::Link {
                    path: pinned.path.clone(),
                    source,
                };
                warn!(error = %crate::error_chain(&e), "an unusable pin; removing it");
                remove_if_present(&pinned.path)?;
                continue;
            }
        };
        let info = match xdp_link::info(&link) {
            Ok(info) if info.if_index == if_index => info,
            // Another interface's link (or a defunct one): not this interface's business.
            _ => continue,
        };
        if pinned.interface != interface {
            warn!(
                interface,
                pinned_as = pinned.interface,
                link_id = info.link_id,
                "the link pinned under another name is attached to this interface (renamed?)"
            );
        }
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
        let xdp = XdpLink::try_from(link).map_err(|_| PinError::NotXdp {
            path: pinned.path.clone(),
        })?;
        let held = program
            .attach_to_link(xdp)
            .and_then(|id| program.take_link(id))
            .map_err(take_failed(interface));
        let xdp = match held {
            Ok(xdp) => xdp,
            Err(e) => {
                warn!(
                    interface,
                    error = %crate::error_chain(&e),
                    "the pinned link cannot be updated; attaching anew"
                );
                remove_if_present(&pinned.path)?;
                continue;
            }
        };
        let path = dir.link_path(interface, pinned.mode);
        let link = FdLink::try_from(xdp).map_err(|_| PinError::NotXdp { path: path.clone() })?;
        if pinned.path == path {
            return Ok(Some(HeldLink {
                mode: pinned.mode,
                path,
                link,
            }));
        }
        let held = pin_at(link, &path, interface, pinned.mode)?;
        remove_if_present(&pinned.path)?;
        return Ok(Some(held));
    }
    Ok(None)
}

/// Pins the link `link_id` of `program` (just attached to `interface`), so that it outlives
/// this process, and keeps its fd.
pub fn pin_link(
    dir: &PinDir,
    program: &mut Xdp,
    link_id: aya::programs::xdp::XdpLinkId,
    interface: &str,
    mode: LinkMode,
) -> Result<HeldLink, PinError> {
    let link = program.take_link(link_id).map_err(take_failed(interface))?;
    let path = dir.link_path(interface, mode);
    let link = FdLink::try_from(link).map_err(|_| PinError::NotXdp { path: path.clone() })?;
    pin_at(link, &path, interface, mode)
}

fn pin_at(
    link: FdLink,
    path: &Path,
    interface: &str,
    mode: LinkMode,
) -> Result<HeldLink, PinError> {
    remove_if_present(path)?;
    let pinned = link.pin(path).map_err(|source| PinError::Pin {
        what: format!("the XDP link of {interface}"),
        path: path.to_path_buf(),
        source,
    })?;
    Ok(HeldLink {
        mode,
        path: path.to_path_buf(),
        link: FdLink::from(pinned),
    })
}
