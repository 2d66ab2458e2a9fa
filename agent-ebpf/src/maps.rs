//! The program's maps, sized by agent-common. Each static's identifier is its map's name (aya's
//! `#[map]` takes the name from it); `agent_common::maps` spells the same names for user space,
//! and the agent refuses to load an object whose maps are not exactly the ones it resolves (a
//! test checks the two sets are equal).

use agent_common::{
    clock::JiffiesClock,
    events::CaptureSettings,
    lists::{
        LIST_HITS_LEN, PrefixEntry, V4_LONG_BUCKET_SLOTS, V4_TABLE_LEN, V4LongBucket, V4PrefixKey,
        V6_GATE_WORDS, V6PrefixKey,
    },
    maps::{
        BANS_DEFAULT_CAPACITY, EVENTS_BYTES, GENERATIONS, LONG_PREFIXES_DEFAULT_CAPACITY,
        MAX_IF_INDEX, RATE_LIMITS_DEFAULT_CAPACITY, V4_LONG_STASH_SHARE, VERIFIED_DEFAULT_CAPACITY,
    },
    protect::{
        Fingerprint, MAX_PROTECTED, PROTECT_HITS_LEN, PROTECT_PORT_TABLE_LEN, ProtectBucket,
        ProtectLimit, ProtectMask, SamplePacing,
    },
    rate_limit::{Ban, RateSlot, RateTable, SourceKey},
    rules::{
        LENGTH_TABLE_LEN, MAX_RULES, PAYLOAD_COLUMNS, PAYLOAD_TABLE_LEN, PORT_TABLE_LEN,
        PROTOCOL_TABLE_LEN, PayloadColumn, PayloadKey, RuleMask, TCP_FLAGS_TABLE_LEN,
        TTL_TABLE_LEN,
    },
    settings::Settings,
    stats::{Counter, STATS_LEN},
    syn_proxy::{SynProxySettings, SynScratch},
};
use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};

use crate::packet::Packet;

#[map]
pub static ACTIVE_GEN: Array<u32> = Array::with_max_entries(1, 0);
#[map]
pub static CLOCK: Array<JiffiesClock> = Array::with_max_entries(1, 0);

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(GENERATIONS as u32, 0);

/// Prefixes the /24 tables cannot hold, for both lists and both generations (see
/// `agent_common::lists`): the IPv4 table the agent writes through a mapping, and its stash.
#[map]
pub static V4_LONG: Array<V4LongBucket> = Array::with_max_entries(
    LONG_PREFIXES_DEFAULT_CAPACITY / V4_LONG_BUCKET_SLOTS as u32,
    BPF_F_MMAPABLE,
);
#[map]
pub static V4_LONG_STASH: HashMap<V4PrefixKey, PrefixEntry> = HashMap::with_max_entries(
    LONG_PREFIXES_DEFAULT_CAPACITY / V4_LONG_STASH_SHARE,
    BPF_F_NO_PREALLOC,
);
/// How many buckets `V4_LONG` has: set by the agent at load, with the map's size, and read-only
/// for the program (the verifier knows its value).
#[unsafe(no_mangle)]
pub static V4_LONG_BUCKETS: Global<u32> =
    Global::new(LONG_PREFIXES_DEFAULT_CAPACITY / V4_LONG_BUCKET_SLOTS as u32);
#[map]
pub static V6_PREFIXES: HashMap<V6PrefixKey, PrefixEntry> =
    HashMap::with_max_entries(LONG_PREFIXES_DEFAULT_CAPACITY, BPF_F_NO_PREALLOC);

/// Declares one generation's /24 table, rule tables and protect tables under the given names.
macro_rules! generation_maps {
    ($v4_table:ident, $proto:ident, $sport:ident, $dport:ident,
     $flags:ident, $actions:ident, $ttl:ident, $length:ident, $pcol:ident, $payload:ident,
     $p_v4:ident, $p_v6:ident, $p_proto:ident, $p_dport:ident,
     $p_limits:ident) => {
        #[map]
        pub static $v4_table: Array<u64> = Array::with_max_entries(V4_TABLE_LEN, BPF_F_MMAPABLE);
        #[map]
        pub static $proto: Array<RuleMask> = Array::with_max_entries(PROTOCOL_TABLE_LEN, 0);
        #[map]
        pub static $sport: Array<RuleMask> =
            Array::with_max_entries(PORT_TABLE_LEN, BPF_F_MMAPABLE);
        #[map]
        pub static $dport: Array<RuleMask> =
            Array::with_max_entries(PORT_TABLE_LEN, BPF_F_MMAPABLE);
        #[map]
        pub static $flags: Array<RuleMask> = Array::with_max_entries(TCP_FLAGS_TABLE_LEN, 0);
        #[map]
        pub static $actions: Array<u32> = Array::with_max_entries(MAX_RULES, 0);
        #[map]
        pub static $ttl: Array<RuleMask> = Array::with_max_entries(TTL_TABLE_LEN, 0);
        #[map]
        pub static $length: Array<RuleMask> =
            Array::with_max_entries(LENGTH_TABLE_LEN, BPF_F_MMAPABLE);
        #[map]
        pub static $pcol: Array<PayloadColumn> = Array::with_max_entries(PAYLOAD_COLUMNS, 0);
        #[map]
        pub static $payload: HashMap<PayloadKey, RuleMask> =
            HashMap::with_max_entries(PAYLOAD_TABLE_LEN, 0);
        #[map]
        pub static $p_v4: LpmTrie<[u8; 4], ProtectMask> =
            LpmTrie::with_max_entries(MAX_PROTECTED, 0);
        #[map]
        pub static $p_v6: LpmTrie<[u8; 16], ProtectMask> =
            LpmTrie::with_max_entries(MAX_PROTECTED, 0);
        #[map]
        pub static $p_proto: Array<ProtectMask> = Array::with_max_entries(PROTOCOL_TABLE_LEN, 0);
        #[map]
        pub static $p_dport: Array<ProtectMask> =
            Array::with_max_entries(PROTECT_PORT_TABLE_LEN, BPF_F_MMAPABLE);
        #[map]
        pub static $p_limits: Array<ProtectLimit> = Array::with_max_entries(MAX_PROTECTED, 0);
    };
}

generation_maps!(
    V4_TAB_0,
    RULES_PROTO_0,
    RULES_SPORT_0,
    RULES_DPORT_0,
    RULES_FLAGS_0,
    RULE_ACTIONS_0,
    RULES_TTL_0,
    RULES_LEN_0,
    RULES_PCOL_0,
    RULES_PAYLOAD_0,
    PROT_DST4_0,
    PROT_DST6_0,
    PROT_PROTO_0,
    PROT_DPORT_0,
    PROT_LIMITS_0
);
generation_maps!(
    V4_TAB_1,
    RULES_PROTO_1,
    RULES_SPORT_1,
    RULES_DPORT_1,
    RULES_FLAGS_1,
    RULE_ACTIONS_1,
    RULES_TTL_1,
    RULES_LEN_1,
    RULES_PCOL_1,
    RULES_PAYLOAD_1,
    PROT_DST4_1,
    PROT_DST6_1,
    PROT_PROTO_1,
    PROT_DPORT_1,
    PROT_LIMITS_1
);

#[map]
pub static V6_GATE: Array<u64> = Array::with_max_entries(V6_GATE_WORDS, BPF_F_MMAPABLE);

#[map]
pub static BANS: LruHashMap<SourceKey, Ban> =
    LruHashMap::with_max_entries(BANS_DEFAULT_CAPACITY, 0);
#[map]
pub static RATE_LIMITS: Array<RateSlot> =
    Array::with_max_entries(RATE_LIMITS_DEFAULT_CAPACITY, BPF_F_MMAPABLE);
#[map]
pub static RATE_TABLE: Array<RateTable> = Array::with_max_entries(1, 0);

#[map]
pub static SYN_PROXY: Array<SynProxySettings> = Array::with_max_entries(GENERATIONS as u32, 0);
/// Verified sources and when their verification expires (see `syn_proxy`).
#[map]
pub static VERIFIED: LruHashMap<SourceKey, u64> =
    LruHashMap::with_max_entries(VERIFIED_DEFAULT_CAPACITY, 0);
#[map]
pub static SYN_SCRATCH: PerCpuArray<SynScratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static PROT_BUCKETS: Array<ProtectBucket> = Array::with_max_entries(MAX_PROTECTED, 0);
#[map]
pub static PROT_HITS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(PROTECT_HITS_LEN, 0);
#[map]
pub static PROT_PRINTS: Array<Fingerprint> = Array::with_max_entries(MAX_PROTECTED, 0);
#[map]
pub static PROT_SAMPLE_AT: PerCpuArray<SamplePacing> =
    PerCpuArray::with_max_entries(MAX_PROTECTED, 0);

/// The parsed packet, handed to the stage functions (see `subprograms`).
#[map]
pub static PACKET: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_LEN, 0);
#[map]
pub static RULE_HITS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_RULES, 0);
#[map]
pub static LIST_HITS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(LIST_HITS_LEN, 0);
#[map]
pub static INTERFACE_SLOTS: Array<u32> = Array::with_max_entries(MAX_IF_INDEX, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
#[map]
pub static CAPTURE: Array<CaptureSettings> = Array::with_max_entries(1, 0);
#[map]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
