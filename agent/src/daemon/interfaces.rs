//! The interfaces the daemon protects: names resolved to indexes before anything is loaded,
//! then the program attached to each, or swapped into the link a daemon before pinned.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _},
};

use anyhow::{Context as _, anyhow};
use aya::{Ebpf, programs::links::FdLink};
use tracing::info;

use crate::{
    config::{Config, XdpMode},
    program::{
        counters::Framing,
        loader,
        pins::{self, HeldLink, LinkMode, PinDir},
        xdp_link,
    },
};

/// An interface being protected.
pub struct Interface {
    pub name: String,
    pub if_index: u32,
    pub framing: Framing,
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

/// An interface to protect, as found on the host.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub if_index: u32,
    pub framing: Framing,
}

/// Link types whose frames start with an Ethernet header (`linux/if_arp.h`).
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
/// Link types whose frames start with the IP header: no header (tun, WireGuard), PPP, raw IP,
/// IPIP, IPv6-in-IPv6, SIT, GRE, IPv6 GRE.
const ARPHRD_IP_FIRST: [u16; 8] = [0xfffe, 512, 519, 768, 769, 776, 778, 823];

/// Each interface's index and framing; an error names the config line of one that does not
/// exist, or whose link type moat cannot parse.
pub fn resolve(config: &Config, names: &[String]) -> anyhow::Result<Vec<Target>> {
    names
        .iter()
        .map(|name| {
            let location = || {
                config
                    .locate_interface(name)
                    .map(|l| format!("{l}: "))
                    .unwrap_or_default()
            };
            let c_name = CString::new(name.as_str())
                .map_err(|_| anyhow!("interface name {name:?} contains NUL"))?;
            // SAFETY: c_name is a valid NUL-terminated string.
            let if_index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
            if if_index == 0 {
                return Err(anyhow!("{}interface {name:?} does not exist", location()));
            }
            let framing = match link_type(&c_name)? {
                ARPHRD_ETHER | ARPHRD_LOOPBACK => Framing::Ethernet,
                kind if ARPHRD_IP_FIRST.contains(&kind) => Framing::Ip,
                kind => {
                    return Err(anyhow!(
                        "{}interface {name:?} has link type {kind}, whose frames moat cannot \
                         parse (it protects Ethernet interfaces and IP-only ones: tun, \
                         WireGuard, PPP, IPIP, GRE)",
                        location()
                    ));
                }
            };
            Ok(Target {
                name: name.clone(),
                if_index,
                framing,
            })
        })
        .collect()
}

/// The interface's link type (`ARPHRD_*`), asked of the kernel in this network namespace.
fn link_type(name: &std::ffi::CStr) -> anyhow::Result<u16> {
    // SAFETY: a plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a socket to ask the link type");
    }
    // SAFETY: a new fd that nothing else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain C data for which all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.to_bytes();
    if bytes.len() >= request.ifr_name.len() {
        return Err(anyhow!("interface name {name:?} is too long"));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own; the fd is a socket.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("asking the link type of {name:?}"));
    }
    // SAFETY: the kernel filled the hardware address member.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Attaches to every interface, or takes over the link pinned for it; with `pins`, new links
/// are pinned.
pub fn attach_all(
    ebpf: &mut Ebpf,
    resolved: &[Target],
    mode: XdpMode,
    pins: Option<&PinDir>,
) -> anyhow::Result<Vec<Interface>> {
    let program = loader::program(ebpf)?;
    let mut interfaces = Vec::with_capacity(resolved.len());
    for Target {
        name,
        if_index,
        framing,
    } in resolved
    {
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
                framing: *framing,
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
            framing: *framing,
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
