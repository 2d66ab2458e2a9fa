//! The lab: a `protected` namespace (where moat runs) and an `outside` namespace (where traffic
//! comes from), joined by a veth pair. All addresses are documentation ranges (RFC 5737, RFC
//! 3849) and exist only inside the two namespaces.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::netns::{NETNS_DIR, Netns};

/// The protected host's addresses.
pub const PROTECTED_V4: &str = "203.0.113.1";
pub const PROTECTED_V6: &str = "2001:db8:1::1";
/// A second address of the protected host: a destination that a test protects no entry for.
pub const PROTECTED_OTHER_V4: &str = "203.0.113.3";
/// A legitimate client on the outside.
pub const LEGIT_V4: &str = "203.0.113.2";
pub const LEGIT_V6: &str = "2001:db8:1::2";
/// An attacker on the outside, and the blocklist entries that cover it.
pub const ATTACKER_V4: &str = "198.51.100.7";
pub const ATTACKER_V6: &str = "2001:db8:bad::7";
pub const ATTACKER_NET_V4: &str = "198.51.100.0/24";
pub const ATTACKER_NET_V6: &str = "2001:db8:bad::/48";

/// Every name a lab creates starts with this, followed by the creating process's id.
pub(crate) const PREFIX: &str = "moatlab";

/// Which end of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Where moat runs: the host under attack.
    Protected,
    /// Where clients and attackers send from.
    Outside,
}

/// Two namespaces joined by a veth pair, with addresses, routes and static neighbours set up so
/// that the only packets crossing the link are the ones a test sends (plus the kernel's own
/// IPv6 link-local chatter).
pub struct Lab {
    // Dropped in declaration order: the namespaces go, and the veth pair with them.
    protected: Netns,
    outside: Netns,
    protected_if: String,
    outside_if: String,
    dir: PathBuf,
}

impl Lab {
    /// Creates a lab with names no other lab (in this or another process) uses.
    pub fn new() -> Self {
        require_root();
        sweep_stale_labs();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id());
        // Interface names are at most 15 bytes: "ml" + pid (≤ 7) + n + side letter.
        let protected_if = format!("ml{id}p");
        let outside_if = format!("ml{id}o");
        assert!(
            protected_if.len() <= 15,
            "interface name {protected_if} too long"
        );

        let protected = Netns::create(&format!("{PREFIX}-{}-{n}-protected", std::process::id()));
        let outside = Netns::create(&format!("{PREFIX}-{}-{n}-outside", std::process::id()));
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bpf"))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let lab = Self {
            protected,
            outside,
            protected_if,
            outside_if,
            dir,
        };
        lab.wire();
        lab
    }

    fn wire(&self) {
        let (p, o) = (&self.protected, &self.outside);
        let (p_if, o_if) = (self.protected_if.as_str(), self.outside_if.as_str());
        // Created inside `outside` and moved, so no name ever appears in the host's namespace.
        o.ip(&[
            "link",
            "add",
            o_if,
            "type",
            "veth",
            "peer",
            "name",
            p_if,
            "netns",
            p.name(),
        ]);
        for (ns, ifname) in [(p, p_if), (o, o_if)] {
            // No router solicitations or DAD probes: fewer packets the test did not send.
            for key in ["accept_ra=0", "dad_transmits=0", "router_solicitations=0"] {
                ns.command("sysctl")
                    .args(["-qw", &format!("net.ipv6.conf.{ifname}.{key}")])
                    .output()
                    .expect("sysctl");
            }
        }
        for (address, prefix) in [
            (PROTECTED_V4, "24"),
            (PROTECTED_OTHER_V4, "24"),
            (PROTECTED_V6, "64"),
        ] {
            p.ip(&[
                "addr",
                "add",
                &format!("{address}/{prefix}"),
                "dev",
                p_if,
                "nodad",
            ]);
        }
        for (address, prefix) in [
            (LEGIT_V4, "24"),
            (LEGIT_V6, "64"),
            (ATTACKER_V4, "24"),
            (ATTACKER_V6, "64"),
        ] {
            o.ip(&[
                "addr",
                "add",
                &format!("{address}/{prefix}"),
                "dev",
                o_if,
                "nodad",
            ]);
        }
        p.ip(&["link", "set", p_if, "up"]);
        o.ip(&["link", "set", o_if, "up"]);
        // Loopback, for the daemon's metrics endpoint inside the namespace.
        p.ip(&["link", "set", "lo", "up"]);
        // The protected side answers the attacker's networks directly on the link.
        p.ip(&["route", "add", ATTACKER_NET_V4, "dev", p_if]);
        p.ip(&["-6", "route", "add", ATTACKER_NET_V6, "dev", p_if]);
        // Static neighbours: no ARP/ND exchange, so a blocked source's neighbour discovery
        // cannot stand in for the packets a test counts.
        let p_mac = self.mac(Side::Protected);
        let o_mac = self.mac(Side::Outside);
        for address in [LEGIT_V4, LEGIT_V6, ATTACKER_V4, ATTACKER_V6] {
            p.ip(&[
                "neigh",
                "replace",
                address,
                "lladdr",
                &o_mac,
                "nud",
                "permanent",
                "dev",
                p_if,
            ]);
        }
        for address in [PROTECTED_V4, PROTECTED_OTHER_V4, PROTECTED_V6] {
            o.ip(&[
                "neigh",
                "replace",
                address,
                "lladdr",
                &p_mac,
                "nud",
                "permanent",
                "dev",
                o_if,
            ]);
        }
    }

    pub fn netns(&self, side: Side) -> &Netns {
        match side {
            Side::Protected => &self.protected,
            Side::Outside => &self.outside,
        }
    }

    pub fn interface(&self, side: Side) -> &str {
        match side {
            Side::Protected => &self.protected_if,
            Side::Outside => &self.outside_if,
        }
    }

    /// A scratch directory for this lab (configs, logs); removed with the lab.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Writes `moat.toml` in the lab's directory: the protected interface, then `body`.
    pub fn write_config(&self, body: &str) -> PathBuf {
        let path = self.dir.join("moat.toml");
        std::fs::write(
            &path,
            format!("interfaces = [\"{}\"]\n{body}", self.protected_if),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// The control socket of the lab's moat.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("moat.sock")
    }

    /// The state directory of the lab's moat.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The lab's pin directory: on a bpffs instance of its own, which moat mounts on
    /// [`Lab::bpffs_mount`] (nothing of the host's /sys/fs/bpf is touched).
    pub fn bpffs(&self) -> PathBuf {
        self.bpffs_mount().join("moat")
    }

    pub fn bpffs_mount(&self) -> PathBuf {
        self.dir.join("bpf")
    }

    /// `ip -j -d link show` of one end, parsed.
    pub fn link(&self, side: Side) -> serde_json::Value {
        let output =
            self.netns(side)
                .ip(&["-j", "-d", "link", "show", "dev", self.interface(side)]);
        let links: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("`ip -j link` printed something that is not JSON: {e}"));
        links
            .get(0)
            .cloned()
            .unwrap_or_else(|| panic!("`ip -j link` listed no {}", self.interface(side)))
    }

    pub fn if_index(&self, side: Side) -> u32 {
        self.link(side)["ifindex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .expect("ifindex in `ip -j link`")
    }

    pub fn mac(&self, side: Side) -> String {
        self.link(side)["address"]
            .as_str()
            .expect("address in `ip -j link`")
            .to_string()
    }

    /// The XDP program attached to one end, as (program id, mode): mode is "native" or
    /// "generic". `None` when nothing is attached.
    pub fn xdp(&self, side: Side) -> Option<(u32, &'static str)> {
        let link = self.link(side);
        let xdp = link.get("xdp")?;
        let mode = match xdp["mode"].as_u64() {
            Some(1) => "native",
            Some(2) => "generic",
            Some(3) => "offload",
            other => panic!("unexpected XDP mode {other:?} in {xdp}"),
        };
        let id = xdp["prog"]["id"]
            .as_u64()
            .expect("xdp.prog.id in `ip -j link`");
        Some((u32::try_from(id).expect("program id fits u32"), mode))
    }

    /// Parses one of the lab's address constants.
    /// An XDP program that passes everything, on the outside end, until the returned link is
    /// dropped: a veth end receives the frames its peer's program sends back (XDP_TX) only
    /// while it runs XDP itself.
    pub fn receive_xdp_tx(&self) -> std::os::fd::OwnedFd {
        use std::os::fd::AsFd as _;
        let program = crate::bpf_syscall::load_xdp_pass();
        let if_index = self.if_index(Side::Outside);
        self.outside
            .enter(|| crate::bpf_syscall::link_xdp(program.as_fd(), if_index))
            .unwrap_or_else(|e| panic!("attaching an XDP_PASS program to the outside end: {e}"))
    }

    /// The counters named in `names`, in order, of group `group` ("Udp", "TcpExt", …) in
    /// `/proc/net/<file>` ("snmp", "netstat") of `side`'s namespace: what `nstat` reads.
    pub fn kernel_counters(&self, side: Side, file: &str, group: &str, names: &[&str]) -> Vec<u64> {
        self.netns(side).enter(|| {
            // thread-self: this thread is the one in the namespace.
            let path = format!("/proc/thread-self/net/{file}");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
            let prefix = format!("{group}:");
            let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
            let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
                panic!("no {group} counters in {path}");
            };
            let header: Vec<&str> = header.split_whitespace().collect();
            let values: Vec<&str> = values.split_whitespace().collect();
            names
                .iter()
                .map(|name| {
                    let at = header
                        .iter()
                        .position(|n| n == name)
                        .unwrap_or_else(|| panic!("no {group} counter {name} in {path}"));
                    values[at]
                        .parse()
                        .unwrap_or_else(|e| panic!("{group} {name} = {:?}: {e}", values[at]))
                })
                .collect()
        })
    }

    pub fn addr(text: &str) -> IpAddr {
        text.parse().expect("lab address constant")
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Removing the pins lets go of the links and maps moat left; then the mount goes.
        let _ = std::fs::remove_dir_all(self.bpffs());
        unmount(&self.bpffs_mount());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn unmount(path: &std::path::Path) {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid path; failure (nothing mounted) is fine.
    unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
}

/// Labs need root (namespaces, veth, XDP). Say so plainly instead of failing somewhere deep.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the lab needs root (network namespaces, veth pairs, XDP); run the tests as root");
    }
}

/// Removes namespaces left by lab processes that no longer exist (a test run killed with
/// SIGKILL never runs its destructors).
fn sweep_stale_labs() {
    for entry in std::fs::read_dir(NETNS_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if owner_is_gone(PREFIX, &name) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .output();
        }
    }
    // Scratch directories, with the pins and bpffs mounts a killed run left in them.
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if owner_is_gone(PREFIX, &entry.file_name().to_string_lossy()) {
            let mount = entry.path().join("bpf");
            let _ = std::fs::remove_dir_all(mount.join("moat"));
            unmount(&mount);
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether `name` is one a test made (`<prefix>-<pid>[-…]`, as labs and containers name what
/// they create) and the process that made it no longer exists.
pub(crate) fn owner_is_gone(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}
