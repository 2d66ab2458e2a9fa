//! The interfaces the daemon protects: names resolved to indexes before anything is loaded,
//! then the program attached to each, or swapped into the link a daemon before pinned.

use std::ffi::CString;

use anyhow::anyhow;
use aya::{Ebpf, programs::links::FdLink};
use tracing::info;

use crate::{
    config::{Config, XdpMode},
    program::{
        loader,
        pins::{self, HeldLink, LinkMode, PinDir},
        xdp_link,
    },
};

/// An interface being protected.
pub struct Interface {
    pub name: String,
    pub if_index: u32,
    pub mode: LinkMode,
    pub link: Attachment,
}

/// How the program is attached to an interface. Either way the daemon holds the link's fd while
/// it runs, so that nothing but the daemon can detach it meanwhile.
pub enum Attachment {
    /// Attached by this process and detached on exit (`--no-pin`).
    Owned(FdLink),
    /// Pinned, so that it outlives the daemon.
    Pinned(HeldLink),
}

/// What the kernel says of an interface's attachment.
pub struct KernelView {
    pub link_id: Option<u32>,
    /// The link is attached to the interface, with `program_id` in it.
    pub attached: bool,
    /// The pin holds this link.
    pub pinned: bool,
}

impl Interface {
    /// The attachment as the kernel sees it (not as the pin's file name says).
    pub fn kernel_view(&self, program_id: Option<u32>) -> KernelView {
        let (info, pinned) = match &self.link {
            Attachment::Owned(link) => (xdp_link::info(link).ok(), false),
            Attachment::Pinned(held) => match held.inspect() {
                Ok((info, pinned)) => (Some(info), pinned),
                Err(_) => (None, false),
            },
        };
        KernelView {
            link_id: info.map(|i| i.link_id),
            attached: info
                .is_some_and(|i| i.if_index == self.if_index && Some(i.program_id) == program_id),
            pinned,
        }
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
            && let Some(held) = pins::adopt(pins, program, name, *if_index, mode)?
        {
            info!(
                interface = name,
                mode = held.mode.name(),
                "took over the pinned link: the new program replaced the old in one step"
            );
            interfaces.push(Interface {
                name: name.clone(),
                if_index: *if_index,
                mode: held.mode,
                link: Attachment::Pinned(held),
            });
            continue;
        }
        // On error, `ebpf` is dropped by the caller and detaches what was attached so far.
        let attachment = loader::attach(program, name, *if_index, mode)?;
        let link = match pins {
            Some(pins) => Attachment::Pinned(pins::pin_link(
                pins,
                program,
                attachment.link,
                name,
                attachment.mode,
            )?),
            None => {
                let link = program.take_link(attachment.link)?;
                Attachment::Owned(FdLink::try_from(link).map_err(|_| {
                    anyhow!("{name}: the kernel attached XDP without a BPF link (before 5.9)")
                })?)
            }
        };
        info!(
            interface = name,
            if_index,
            mode = attachment.mode.name(),
            pinned = matches!(link, Attachment::Pinned(_)),
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
