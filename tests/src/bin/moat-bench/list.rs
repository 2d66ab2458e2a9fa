//! The benchmark's blocklist: a realistic mix, generated the same way every time, so that every
//! contender gets the same list and the scenarios can name entries deep in it.
//!
//! 60 % IPv4 hosts (/32) and 25 % IPv4 networks (mostly /24s, down to /16), each scattered over
//! the whole unicast space as a feed's are (not packed into a few /24s, which would keep every
//! lookup in a few cache lines); 15 % IPv6 prefixes of sixteen lengths from /32 to /128,
//! scattered under 2a00::/12. None covers the lab's addresses.

use std::{
    collections::HashSet,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

pub struct PrefixList {
    pub path: PathBuf,
    pub count: usize,
}

/// A set of /24s: one bit each.
struct Slash24s(Vec<u64>);

impl Slash24s {
    fn contains(&self, slash24: u32) -> bool {
        self.0[slash24 as usize / 64] & 1 << (slash24 % 64) != 0
    }
}

enum Entry {
    Host(Ipv4Addr),
    Network(Ipv4Addr, u32),
    V6(Ipv6Addr, u32),
}

/// The IPv6 prefix lengths of the list (as many as one list may hold).
const V6_LENGTHS: [u32; 16] = [
    32, 36, 40, 44, 48, 52, 56, 60, 64, 72, 80, 96, 112, 120, 124, 128,
];

/// A bijection of u32 (murmur3's finaliser): consecutive inputs land all over the space, and
/// distinct inputs never collide.
fn scatter(n: u32) -> u32 {
    let mut x = n ^ 0x5bd1_e995;
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

/// Whether the IPv4 network `net`/`len` may be listed: outside 0/8, 10/8, 127/8 and 224/3, and
/// clear of the lab's and the benchmark's own addresses (the documentation /24s).
fn listable(net: u32, len: u32) -> bool {
    let first = net >> 24;
    let reserved = matches!(first, 0 | 10 | 127) || first >= 224;
    // Compared at /24 at most: a host inside a lab /24 overlaps it as a network covering it.
    let mask = u32::MAX << (32 - len.min(24));
    let lab = [0xc000_0200u32, 0xc633_6400, 0xcb00_7100]; // 192.0.2/24, 198.51.100/24, 203.0.113/24
    !reserved && !lab.iter().any(|&addr| addr & mask == net & mask)
}

/// The `len`-bit network of the list's `n`th scattered pick from `seed`, listable.
fn scattered(n: u32, len: u32, seed: u32) -> u32 {
    (0..)
        .map(|retry: u32| {
            scatter(n.wrapping_add(seed) ^ retry.wrapping_mul(0x9e37_79b9))
                & (u32::MAX << (32 - len))
        })
        .find(|&net| listable(net, len))
        .unwrap_or_default()
}

fn entry(i: usize) -> Entry {
    let n = u32::try_from(i).expect("fits");
    match i % 20 {
        0..=11 => Entry::Host(Ipv4Addr::from(scattered(n, 32, 0))),
        12..=16 => {
            // Mostly /24s, as in FireHOL's level 1; a few shorter networks.
            let len = match (n / 20) % 20 {
                0..=11 => 24,
                12..=14 => 23,
                15..=16 => 22,
                17 => 21,
                18 => 20,
                _ => 16 + (n / 400) % 4,
            };
            Entry::Network(Ipv4Addr::from(scattered(n, len, 0x1234_5678)), len)
        }
        _ => {
            let len = V6_LENGTHS[(n / 20) as usize % V6_LENGTHS.len()];
            let random = [n, !n, n ^ 0xabcd_ef01, !n ^ 0x1234_5678]
                .into_iter()
                .fold(0u128, |bits, word| bits << 32 | u128::from(scatter(word)));
            // Under 2a00::/12, host bits zero.
            let addr = 0x2a0_u128 << 116 | random >> 12;
            Entry::V6(
                Ipv6Addr::from(addr & !(u128::MAX.checked_shr(len).unwrap_or(0))),
                len,
            )
        }
    }
}

impl PrefixList {
    /// Writes `count` entries to `path` in FireHOL/Spamhaus format.
    pub fn write(path: &Path, count: usize) -> Self {
        let mut text = String::with_capacity(count * 22);
        for i in 0..count {
            let _ = match entry(i) {
                Entry::Host(host) => writeln!(text, "{host}"),
                Entry::Network(net, len) => writeln!(text, "{net}/{len}"),
                Entry::V6(addr, len) => writeln!(text, "{addr}/{len}"),
            };
        }
        std::fs::write(path, text).expect("write the list file");
        Self {
            path: path.to_path_buf(),
            count,
        }
    }

    /// The IPv4 hosts, in list order.
    pub fn v4_hosts(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (0..self.count).filter_map(|i| match entry(i) {
            Entry::Host(host) => Some(host),
            _ => None,
        })
    }

    /// The IPv4 networks, in list order.
    pub fn v4_networks(&self) -> impl Iterator<Item = (Ipv4Addr, u32)> + '_ {
        (0..self.count).filter_map(|i| match entry(i) {
            Entry::Network(net, len) => Some((net, len)),
            _ => None,
        })
    }

    /// The last IPv4 host of the list that no listed network covers (so that finding it takes
    /// the long-prefix table, not the /24 table).
    pub fn deep_v4_host(&self) -> Ipv4Addr {
        let covered = self.covered_slash24s();
        let hosts: Vec<Ipv4Addr> = self.v4_hosts().collect();
        *hosts
            .iter()
            .rev()
            .find(|host| !covered.contains(u32::from(**host) >> 8))
            .expect("the list holds IPv4 hosts outside its networks")
    }

    /// The /24s the list's networks cover.
    fn covered_slash24s(&self) -> Slash24s {
        let mut covered = Slash24s(vec![0u64; 1 << 18]);
        for (net, len) in self.v4_networks() {
            let first = u32::from(net) >> 8;
            for slash24 in first..first + (1 << (24 - len)) {
                covered.0[slash24 as usize / 64] |= 1 << (slash24 % 64);
            }
        }
        covered
    }

    /// An address inside the last listed IPv4 network.
    pub fn v4_network_member(&self) -> Ipv4Addr {
        let (net, _) = self.v4_networks().last().expect("the list holds networks");
        Ipv4Addr::from(u32::from(net) | 1)
    }

    /// Up to `count` IPv4 addresses scattered over the unicast space that no entry covers: the
    /// sources of the cold-cache pass scenario.
    pub fn unlisted_v4(&self, count: usize) -> Vec<Ipv4Addr> {
        let hosts: HashSet<u32> = self.v4_hosts().map(u32::from).collect();
        let covered = self.covered_slash24s();
        (0..u32::MAX)
            .map(|i| scatter(i ^ 0x0bad_cafe))
            .filter(|&addr| listable(addr, 32))
            .filter(|addr| !covered.contains(addr >> 8))
            .filter(|addr| !hosts.contains(addr))
            .take(count)
            .map(Ipv4Addr::from)
            .collect()
    }

    /// The last IPv6 /128 of the list.
    pub fn v6_host(&self) -> Ipv6Addr {
        (0..self.count)
            .rev()
            .find_map(|i| match entry(i) {
                Entry::V6(addr, 128) => Some(addr),
                _ => None,
            })
            .expect("the list holds IPv6 hosts")
    }
}
