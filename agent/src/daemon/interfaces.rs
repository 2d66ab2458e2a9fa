//! The interfaces the daemon protects: names resolved to indexes before anything is loaded,
//! then the program attached to each, or swapped into the link a daemon before pinned.

use std::ffi::CString;

use anyhow::anyhow;
use aya::{Ebpf, programs::xdp::XdpLinkId};
use tracing::info;

use crate::{
    config::{Config, XdpMode},
    program::{
        loader,
        pins::{self, LinkMode, PinDir},
    },
};

/// An interface being protected.
pub struct Interface {
    pub name: String,
    pub if_index: u32,
    pub mode: LinkMode,
    /// `Some`: attached by this process and detached on exit (`--no-pin`); `None`: the link is
    /// pinned and outlives the daemon.
    pub link: Option<XdpLinkId>,
}

impl Interface {
    /// Whether the link is pinned (it outlives the daemon).
    pub fn pinned(&self) -> bool {
        self.link.is_none()
    }
}

/// (name, ifindex) of each interface; an error names the config line of one that does not
/// exist.
pub fn resolve(config: &Config, names: &[String]) -> anyhow::Result<Vec<(String, u32)>> {
    names
        .iter()
        .map(|name| {
            let c_name = CString::new(name.as_str())
                .map_err(|_| anyhow!("interface name {name:?} contains NUL"))?;
            // SAFETY: c_name is a valid NUL-terminated string.
            let if_index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
            if if_index == 0 {
                let location = config
                    .locate_interface(name)
                    .map(|l| format!("{l}: "))
                    .unwrap_or_default();
                return Err(anyhow!("{location}interface {name:?} does not exist"));
            }
            Ok((name.clone(), if_index))
        })
        .collect()
}

/// Attaches to every interface, or takes over the link pinned for it; with `pins`, new links
/// are pinned.
pub fn attach_all(
    ebpf: &mut Ebpf,
    resolved: &[(String, u32)],
    mode: XdpMode,
    pins: Option<&PinDir>,
) -> anyhow::Result<Vec<Interface>> {
    let program = loader::program(ebpf)?;
    let mut interfaces = Vec::with_capacity(resolved.len());
    for (name, if_index) in resolved {
        if let Some(pins) = pins
            && let Some(link_mode) = pins::adopt(pins, program, name, mode)?
        {
            info!(
                interface = name,
                mode = link_mode.name(),
                "took over the pinned link: the new program replaced the old in one step"
            );
            interfaces.push(Interface {
                name: name.clone(),
                if_index: *if_index,
                mode: link_mode,
                link: None,
            });
            continue;
        }
        // On error, `ebpf` is dropped by the caller and detaches what was attached so far.
        let attachment = loader::attach(program, name, *if_index, mode)?;
        let link = match pins {
            Some(pins) => {
                pins::pin_link(pins, program, attachment.link, name, attachment.mode)?;
                None
            }
            None => Some(attachment.link),
        };
        info!(
            interface = name,
            if_index,
            mode = attachment.mode.name(),
            pinned = link.is_none(),
            "attached"
        );
        interfaces.push(Interface {
            name: name.clone(),
            if_index: *if_index,
            mode: attachment.mode,
            link,
        });
    }
    Ok(interfaces)
}

/// The name of the interface a counter row's ifindex belongs to.
pub fn interface_name(interfaces: &[Interface], if_index: Option<u32>) -> String {
    if_index
        .and_then(|i| interfaces.iter().find(|f| f.if_index == i))
        .map_or_else(|| "(unregistered)".to_string(), |f| f.name.clone())
}
