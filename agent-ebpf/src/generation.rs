//! The two generations of the policy's /24 table, rule tables and protect tables (the prefix
//! hashes are shared, each entry saying which generation holds it); `ACTIVE_GEN` says which one
//! is in force (see `agent_common::maps::GENERATIONS`). The lists' stages are compiled once per
//! generation, each copy loading its own maps directly; the rules and protect stages, global
//! functions (see `subprograms`), pick their generation's maps by its index.

use agent_common::{
    lists::{LIST_ALLOW, LIST_BLOCK, prefix_slot, table_shift},
    protect::{ProtectLimit, ProtectMask},
    rules::{PayloadColumn, PayloadKey, RuleMask},
};
use aya_ebpf::maps::{Array, HashMap, LpmTrie};

use crate::{lists::CidrMaps, maps::*, protect::ProtectMaps, rules::RuleMaps};

/// One generation, as the inlined stages see it: its index, allowlist and blocklist.
pub trait Generation {
    /// Its index (the stage functions take it as an argument, see `subprograms`).
    const ID: u32;
    type Allow: CidrMaps;
    type Block: CidrMaps;
}

macro_rules! cidr_maps {
    ($name:ident: $table:ident, $generation:expr, $list:expr) => {
        pub struct $name;
        impl CidrMaps for $name {
            const SLOT: usize = prefix_slot($generation, $list);
            const TABLE_SHIFT: u32 = table_shift($list);
            #[inline(always)]
            fn v4_table() -> &'static Array<u64> {
                &$table
            }
        }
    };
}

macro_rules! rule_maps {
    ($name:ident: $proto:ident, $sport:ident, $dport:ident, $flags:ident, $ttl:ident,
     $length:ident, $pcol:ident, $payload:ident, $actions:ident) => {
        pub struct $name;
        impl RuleMaps for $name {
            #[inline(always)]
            fn by_protocol() -> &'static Array<RuleMask> {
                &$proto
            }
            #[inline(always)]
            fn by_src_port() -> &'static Array<RuleMask> {
                &$sport
            }
            #[inline(always)]
            fn by_dst_port() -> &'static Array<RuleMask> {
                &$dport
            }
            #[inline(always)]
            fn by_tcp_flags() -> &'static Array<RuleMask> {
                &$flags
            }
            #[inline(always)]
            fn by_ttl() -> &'static Array<RuleMask> {
                &$ttl
            }
            #[inline(always)]
            fn by_length() -> &'static Array<RuleMask> {
                &$length
            }
            #[inline(always)]
            fn payload_columns() -> &'static Array<PayloadColumn> {
                &$pcol
            }
            #[inline(always)]
            fn by_payload() -> &'static HashMap<PayloadKey, RuleMask> {
                &$payload
            }
            #[inline(always)]
            fn actions() -> &'static Array<u32> {
                &$actions
            }
        }
    };
}

macro_rules! protect_maps {
    ($name:ident: $v4:ident, $v6:ident, $proto:ident, $dport:ident, $limits:ident) => {
        pub struct $name;
        impl ProtectMaps for $name {
            #[inline(always)]
            fn by_v4() -> &'static LpmTrie<[u8; 4], ProtectMask> {
                &$v4
            }
            #[inline(always)]
            fn by_v6() -> &'static LpmTrie<[u8; 16], ProtectMask> {
                &$v6
            }
            #[inline(always)]
            fn by_protocol() -> &'static Array<ProtectMask> {
                &$proto
            }
            #[inline(always)]
            fn by_dst_port() -> &'static Array<ProtectMask> {
                &$dport
            }
            #[inline(always)]
            fn limits() -> &'static Array<ProtectLimit> {
                &$limits
            }
        }
    };
}

cidr_maps!(Allow0: V4_TAB_0, 0, LIST_ALLOW);
cidr_maps!(Block0: V4_TAB_0, 0, LIST_BLOCK);
rule_maps!(Rules0: RULES_PROTO_0, RULES_SPORT_0, RULES_DPORT_0, RULES_FLAGS_0, RULES_TTL_0,
    RULES_LEN_0, RULES_PCOL_0, RULES_PAYLOAD_0, RULE_ACTIONS_0);
protect_maps!(Protect0: PROT_DST4_0, PROT_DST6_0, PROT_PROTO_0, PROT_DPORT_0, PROT_LIMITS_0);
cidr_maps!(Allow1: V4_TAB_1, 1, LIST_ALLOW);
cidr_maps!(Block1: V4_TAB_1, 1, LIST_BLOCK);
rule_maps!(Rules1: RULES_PROTO_1, RULES_SPORT_1, RULES_DPORT_1, RULES_FLAGS_1, RULES_TTL_1,
    RULES_LEN_1, RULES_PCOL_1, RULES_PAYLOAD_1, RULE_ACTIONS_1);
protect_maps!(Protect1: PROT_DST4_1, PROT_DST6_1, PROT_PROTO_1, PROT_DPORT_1, PROT_LIMITS_1);

pub struct Generation0;
impl Generation for Generation0 {
    const ID: u32 = 0;
    type Allow = Allow0;
    type Block = Block0;
}

pub struct Generation1;
impl Generation for Generation1 {
    const ID: u32 = 1;
    type Allow = Allow1;
    type Block = Block1;
}

/// The generation in force (0 or 1).
#[inline(always)]
pub fn active() -> u32 {
    ACTIVE_GEN.get(0).copied().unwrap_or(0)
}
