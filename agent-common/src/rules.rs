//! Stateless rules, compiled by the agent into lookup tables (bit-vector classification): for
//! each field value, the set of rules that value satisfies. A packet's matching rules are the
//! intersection of the table entries of its fields (protocol, ports, TCP flags, and when some
//! rule names them TTL, IP length and payload bytes), so the cost does not grow with the number
//! of rules; the first rule in config order (lowest bit) wins.
//!
//! Payload bytes are looked up by column: each distinct (offset, length) the rules use is one
//! column ([`PayloadColumn`]), read once per packet and looked up in one hash
//! ([`PayloadKey`] → the rules those bytes satisfy); the rules that do not use a column
//! match whatever it holds.

use crate::{bitset::BitSet, pod};

/// Rules one configuration may hold.
pub const MAX_RULES: u32 = 128;

/// A set of rules: bit `i` is rule `i`.
pub type RuleMask = BitSet<{ (MAX_RULES / 64) as usize }>;

/// Table sizes: one entry per protocol number, per port plus one for "no port" (packets without
/// a transport header, or protocols without ports), per TCP flags byte plus one for "not TCP".
pub const PROTOCOL_TABLE_LEN: u32 = 256;
pub const PORT_TABLE_LEN: u32 = 65_537;
pub const NO_PORT: u32 = 65_536;
pub const TCP_FLAGS_TABLE_LEN: u32 = 257;
pub const NOT_TCP: u32 = 256;

/// One entry per TTL (hop limit) and per IP total length (IPv6: payload length + 40).
pub const TTL_TABLE_LEN: u32 = 256;
pub const LENGTH_TABLE_LEN: u32 = 65_536;

/// `Settings::rule_fields` bits: the optional fields some rule names; the program reads and
/// looks up only those.
pub const RULE_FIELD_TTL: u32 = 1 << 0;
pub const RULE_FIELD_LENGTH: u32 = 1 << 1;
pub const RULE_FIELD_PAYLOAD: u32 = 1 << 2;

/// The most payload bytes a rule matches.
pub const PAYLOAD_MAX: usize = 8;
/// The furthest into the transport payload a rule's bytes may start: a jumbo frame's size.
pub const PAYLOAD_OFFSET_MAX: u16 = 9000;
/// Distinct (offset, length) pairs one configuration's rules may match payload at: the program
/// reads each once per packet.
pub const PAYLOAD_COLUMNS: u32 = 4;
/// Entries of a generation's payload hash: one per rule at most.
pub const PAYLOAD_TABLE_LEN: u32 = MAX_RULES;

/// One payload column (`RULES_PCOL_*`, [`PAYLOAD_COLUMNS`] slots, used from the first): where
/// its bytes are, and the rules that do not look at them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadColumn {
    /// From the start of the transport payload (after the TCP or UDP header; for other
    /// protocols, the transport header itself).
    pub offset: u16,
    /// 1..=[`PAYLOAD_MAX`]; 0: this slot and those after it are unused.
    pub len: u16,
    pub _pad: u32,
    /// The rules that match whatever the column holds.
    pub others: RuleMask,
}

/// A key of the payload hash (`RULES_PAYLOAD_*`): a column and the bytes read there, the bytes
/// past the column's length zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PayloadKey {
    pub column: u32,
    pub bytes: [u8; PAYLOAD_MAX],
}

/// `RULE_ACTIONS` values.
pub const RULE_DROP: u32 = 0;
pub const RULE_PASS: u32 = 1;

pod!(RuleMask, PayloadColumn, PayloadKey);
