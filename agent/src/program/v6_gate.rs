//! The IPv6 gate (`V6_GATE`, see `agent_common::lists::V6_GATE_WORDS`): a bit per group of
//! /32s telling the program whether to probe the IPv6 prefix lengths past /32. One gate serves
//! both lists and both generations, so a bit is set before any generation holding a longer
//! prefix under it is switched on, and is never cleared while the program runs: a stale bit
//! costs an unlisted source a few probes, a missing one would let a listed source through.

use agent_common::{
    lists::{V6_GATE_PREFIX, V6_GATE_WORDS, v6_gate_position},
    maps,
};
use ipnet::IpNet;

use super::{
    map_source::{MapAccessError, MapSource, ResolveError},
    mapped_array::MmapArray,
};
use crate::config::Cidr;

pub struct V6Gate {
    words: MmapArray,
}

impl V6Gate {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            words: MmapArray::resolve(source, maps::V6_GATE)?,
        })
    }

    /// Opens the gate for the /32 of every IPv6 prefix longer than /32 among `cidrs`.
    pub fn open_for(
        &mut self,
        cidrs: impl IntoIterator<Item = Cidr>,
    ) -> Result<(), MapAccessError> {
        let positions = positions(cidrs);
        if positions.is_empty() {
            return Ok(());
        }
        self.words
            .write(V6_GATE_WORDS as usize * size_of::<u64>(), |bytes| {
                for (index, bit) in positions {
                    let at = index as usize * size_of::<u64>();
                    let Some(word) = bytes.get_mut(at..at + size_of::<u64>()) else {
                        continue;
                    };
                    let mut value = [0u8; 8];
                    value.copy_from_slice(word);
                    let opened = u64::from_ne_bytes(value) | 1 << bit;
                    word.copy_from_slice(&opened.to_ne_bytes());
                }
            })
    }
}

/// The gate bits of the IPv6 prefixes longer than /32 among `cidrs`.
fn positions(cidrs: impl IntoIterator<Item = Cidr>) -> Vec<(u32, u32)> {
    cidrs
        .into_iter()
        .filter_map(|cidr| match cidr.net() {
            IpNet::V6(net) if u32::from(net.prefix_len()) > V6_GATE_PREFIX => {
                let octets = net.network().octets();
                let first32 = u32::from_be_bytes([octets[0], octets[1], octets[2], octets[3]]);
                Some(v6_gate_position(first32))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("a CIDR")
    }

    #[test]
    fn only_ipv6_prefixes_past_slash_32_need_the_gate() {
        let cidrs = [
            cidr("192.0.2.1/32"),
            cidr("2001:db8::/32"),
            cidr("2001:db8::/29"),
            cidr("2001:db8:1::/48"),
            cidr("2001:db8:ffff::1/128"),
        ];
        let position = v6_gate_position(0x2001_0db8);
        assert_eq!(positions(cidrs), vec![position, position]);
    }
}
