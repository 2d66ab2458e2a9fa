//! The program's maps, named and sized by agent-common.

use agent_common::{
    lists::{Ipv4Key, Ipv6Key, ListEntry},
    maps::{BLOCKLIST_DEFAULT_CAPACITY, MAX_INTERFACES},
    stats::{Counter, STATS_LEN},
};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};

#[map(name = "BLOCKLIST_V4")]
static BLOCKLIST_V4: LpmTrie<Ipv4Key, ListEntry> =
    LpmTrie::with_max_entries(BLOCKLIST_DEFAULT_CAPACITY, 0);

#[map(name = "BLOCKLIST_V6")]
static BLOCKLIST_V6: LpmTrie<Ipv6Key, ListEntry> =
    LpmTrie::with_max_entries(BLOCKLIST_DEFAULT_CAPACITY, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[map(name = "INTERFACE_SLOTS")]
pub static INTERFACE_SLOTS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_INTERFACES, 0);

#[inline(always)]
pub fn blocklist_v4_contains(addr: Ipv4Key) -> bool {
    BLOCKLIST_V4.get(Key::new(32, addr)).is_some()
}

#[inline(always)]
pub fn blocklist_v6_contains(addr: Ipv6Key) -> bool {
    BLOCKLIST_V6.get(Key::new(128, addr)).is_some()
}
