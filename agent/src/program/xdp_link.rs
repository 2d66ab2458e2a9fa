//! What the kernel says of an XDP link: its id, the program in it and the interface it is
//! attached to. The truth about an attachment is the link's, not a pin's file name: a pin can be
//! deleted, and an interface renamed, while the link goes on.

use std::io;

use aya::programs::links::FdLink;

/// An XDP link, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpLinkInfo {
    pub link_id: u32,
    pub program_id: u32,
    /// 0 once the interface is gone (the link is then defunct).
    pub if_index: u32,
}

/// Reads the link's description. aya's `LinkInfo` leaves out the interface, which is the point
/// here; the kernel prints it in the link's fdinfo, which needs no capability (opening the link
/// again by id to ask `BPF_OBJ_GET_INFO_BY_FD` would need CAP_SYS_ADMIN, which the service does
/// not have).
pub fn info(link: &FdLink) -> io::Result<XdpLinkInfo> {
    let info = link.info().map_err(io::Error::other)?;
    let link_id = info.id();
    Ok(XdpLinkInfo {
        link_id,
        program_id: info.program_id(),
        if_index: fdinfo_if_index(link_id)?,
    })
}

/// The `ifindex` the kernel shows for XDP link `link_id` in this process's fdinfo: every fd of
/// the process is looked at (one of them is the link's), and an fd closed meanwhile is skipped.
fn fdinfo_if_index(link_id: u32) -> io::Result<u32> {
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if field(&text, "link_id") == Some(link_id) {
            return field(&text, "ifindex").ok_or_else(|| {
                io::Error::other(format!("link {link_id} shows no ifindex: not an XDP link"))
            });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no fd of this process holds link {link_id}"),
    ))
}

/// The number after `name:` in an fdinfo text (`link_id:\t42`).
fn field(fdinfo: &str, name: &str) -> Option<u32> {
    fdinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn fdinfo_fields_are_read_by_name() {
        let text = "pos:\t0\nflags:\t02000002\nlink_type:\txdp\nlink_id:\t17\nprog_tag:\tab\nprog_id:\t40\nifindex:\t3\n";
        assert_eq!(field(text, "link_id"), Some(17));
        assert_eq!(field(text, "ifindex"), Some(3));
        assert_eq!(field(text, "prog_id"), Some(40));
        assert_eq!(field(text, "link_type"), None, "not a number");
        assert_eq!(field(text, "id"), None, "names match whole");
    }
}
