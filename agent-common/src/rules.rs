//! Stateless rules, compiled by the agent into lookup tables (bit-vector classification): for
//! each field value, the set of rules that value satisfies. A packet's matching rules are the
//! intersection of the table entries of its fields (protocol, ports, TCP flags, and when some
//! rule names them TTL and IP length), so the cost does not grow with the number
//! of rules; the first rule in config order (lowest bit) wins.

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

/// `RULE_ACTIONS` values.
pub const RULE_DROP: u32 = 0;
pub const RULE_PASS: u32 = 1;

pod!(RuleMask);
