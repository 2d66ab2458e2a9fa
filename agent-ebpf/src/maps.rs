//! The program's maps, named and sized by agent-common.

use agent_common::{
    lists::{LIST_HITS_LEN, ListEntry, V4_TABLE_LEN, V4PrefixKey, V6PrefixKey},
    maps::{
        BANS_DEFAULT_CAPACITY, EVENTS_BYTES, LONG_PREFIXES_DEFAULT_CAPACITY, MAX_IF_INDEX,
        RATE_LIMITS_DEFAULT_CAPACITY,
    },
    rate_limit::{Ban, RateState, SourceKey},
    rules::{MAX_RULES, PORT_TABLE_LEN, PROTOCOL_TABLE_LEN, RuleMask, TCP_FLAGS_TABLE_LEN},
    settings::Settings,
    stats::{Counter, STATS_LEN},
};
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "ALLOW_V4_TABLE")]
pub static ALLOW_V4_TABLE: Array<u64> = Array::with_max_entries(V4_TABLE_LEN, BPF_F_MMAPABLE);
#[map(name = "ALLOW_V4_LONG")]
pub static ALLOW_V4_LONG: HashMap<V4PrefixKey, ListEntry> =
    HashMap::with_max_entries(LONG_PREFIXES_DEFAULT_CAPACITY, 0);
#[map(name = "ALLOW_V6")]
pub static ALLOW_V6: HashMap<V6PrefixKey, ListEntry> =
    HashMap::with_max_entries(LONG_PREFIXES_DEFAULT_CAPACITY, 0);

#[map(name = "BLOCK_V4_TABLE")]
pub static BLOCK_V4_TABLE: Array<u64> = Array::with_max_entries(V4_TABLE_LEN, BPF_F_MMAPABLE);
#[map(name = "BLOCK_V4_LONG")]
pub static BLOCK_V4_LONG: HashMap<V4PrefixKey, ListEntry> =
    HashMap::with_max_entries(LONG_PREFIXES_DEFAULT_CAPACITY, 0);
#[map(name = "BLOCK_V6")]
pub static BLOCK_V6: HashMap<V6PrefixKey, ListEntry> =
    HashMap::with_max_entries(LONG_PREFIXES_DEFAULT_CAPACITY, 0);

#[map(name = "BANS")]
pub static BANS: LruHashMap<SourceKey, Ban> =
    LruHashMap::with_max_entries(BANS_DEFAULT_CAPACITY, 0);
#[map(name = "RATE_LIMITS")]
pub static RATE_LIMITS: LruHashMap<SourceKey, RateState> =
    LruHashMap::with_max_entries(RATE_LIMITS_DEFAULT_CAPACITY, 0);

#[map(name = "RULES_PROTO")]
pub static RULES_BY_PROTOCOL: Array<RuleMask> = Array::with_max_entries(PROTOCOL_TABLE_LEN, 0);
#[map(name = "RULES_SRC_PORT")]
pub static RULES_BY_SRC_PORT: Array<RuleMask> =
    Array::with_max_entries(PORT_TABLE_LEN, BPF_F_MMAPABLE);
#[map(name = "RULES_DST_PORT")]
pub static RULES_BY_DST_PORT: Array<RuleMask> =
    Array::with_max_entries(PORT_TABLE_LEN, BPF_F_MMAPABLE);
#[map(name = "RULES_TCP_FLAGS")]
pub static RULES_BY_TCP_FLAGS: Array<RuleMask> = Array::with_max_entries(TCP_FLAGS_TABLE_LEN, 0);
#[map(name = "RULE_ACTIONS")]
pub static RULE_ACTIONS: Array<u32> = Array::with_max_entries(MAX_RULES, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_LEN, 0);
#[map(name = "RULE_HITS")]
pub static RULE_HITS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_RULES, 0);
#[map(name = "LIST_HITS")]
pub static LIST_HITS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(LIST_HITS_LEN, 0);
#[map(name = "INTERFACE_SLOTS")]
pub static INTERFACE_SLOTS: Array<u32> = Array::with_max_entries(MAX_IF_INDEX, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
#[map(name = "EVENTS_LOST")]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
