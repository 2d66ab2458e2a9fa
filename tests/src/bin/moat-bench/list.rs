//! The benchmark's blocklist: a realistic mix, generated the same way every time, so that every
//! contender gets the same list and the scenarios can name entries deep in it.
//!
//! 60 % IPv4 hosts (/32, from 11.0.0.0), 25 % IPv4 networks /16–/24 (from 64.0.0.0, some
//! nested in others), 15 % IPv6 /32–/128 (under 2a00::/16). None covers the lab's addresses.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

pub struct PrefixList {
    pub path: PathBuf,
    pub count: usize,
}

enum Entry {
    Host(Ipv4Addr),
    Network(Ipv4Addr, u32),
    V6(Ipv6Addr, u32),
}

fn entry(i: usize) -> Entry {
    let n = u32::try_from(i).expect("fits");
    match i % 20 {
        0..=11 => Entry::Host(Ipv4Addr::from(0x0b00_0000 + n)),
        12..=16 => {
            let len = 16 + (n % 9);
            let net = (0x4000_0000u32 + (n << 8)) & (u32::MAX << (32 - len));
            Entry::Network(Ipv4Addr::from(net), len)
        }
        _ => {
            let len = [32u32, 48, 56, 64, 128][i % 5];
            let addr = (0x2a00_u128 << 112) | (u128::from(n) << (128 - len));
            Entry::V6(Ipv6Addr::from(addr), len)
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

    /// The last IPv4 host of the list.
    pub fn deep_v4_host(&self) -> Ipv4Addr {
        self.v4_hosts().last().expect("the list holds IPv4 hosts")
    }

    /// An address inside the last listed IPv4 network.
    pub fn v4_network_member(&self) -> Ipv4Addr {
        let (net, _) = self.v4_networks().last().expect("the list holds networks");
        Ipv4Addr::from(u32::from(net) | 1)
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
