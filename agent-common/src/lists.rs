//! Keys and values of the CIDR lists.
//!
//! The LPM trie key is `{ prefix_len: u32, data }` with the address in network byte order; aya
//! (`aya::maps::lpm_trie::Key`) and aya-ebpf (`aya_ebpf::maps::lpm_trie::Key`) both provide that
//! wrapper, so only the address part is defined here.

/// IPv4 address bytes as they appear in the packet.
pub type Ipv4Key = [u8; 4];
/// IPv6 address bytes as they appear in the packet.
pub type Ipv6Key = [u8; 16];

/// Where a list entry came from; stored as the entry's value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListEntry {
    /// One of the `SOURCE_*` constants.
    pub source: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ListEntry {}

/// Listed in the configuration file (`cidrs`) or on the command line.
pub const SOURCE_CONFIG: u32 = 0;
