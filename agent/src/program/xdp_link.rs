//! What the kernel says of an XDP link: its id, the program in it and the interface it is
//! attached to. The truth about an attachment is the link's, not a pin's file name: a pin can be
//! deleted, and an interface renamed, while the link goes on.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya::programs::links::FdLink;
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info};

/// An XDP link, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpLinkInfo {
    pub link_id: u32,
    pub program_id: u32,
    /// 0 once the interface is gone (the link is then defunct).
    pub if_index: u32,
}

/// Reads the link's description. aya's `LinkInfo` leaves out the interface, which is the point
/// here: the link is opened again by its id and asked with `BPF_OBJ_GET_INFO_BY_FD`.
pub fn info(link: &FdLink) -> io::Result<XdpLinkInfo> {
    let link_id = link.info().map_err(io::Error::other)?.id();
    let fd = open_by_id(link_id)?;
    // SAFETY: both are plain C data for which all zeroes is a valid value.
    let (mut info, mut attr): (bpf_link_info, bpf_attr) = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    attr.info.info = (&raw mut info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(XdpLinkInfo {
        link_id: info.id,
        program_id: info.prog_id,
        // SAFETY: the kernel fills the `xdp` member for an XDP link, the only kind asked about;
        // for any other it is zeroes, read as "no interface".
        if_index: unsafe { info.__bindgen_anon_1.xdp.ifindex },
    })
}

fn open_by_id(link_id: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain C data for which all zeroes is a valid value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_6.__bindgen_anon_1.link_id = link_id;
    let fd = bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bpf(command: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: a valid command with an attribute of the size given, whose pointers (if any)
    // point at buffers the caller owns of the lengths it states.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}
