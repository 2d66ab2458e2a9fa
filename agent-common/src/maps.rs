//! Names and capacities of the program and its maps: the one place both sides read them from.

/// The XDP program's function name in the object file.
pub const PROGRAM: &str = "moat";

/// Runtime settings: a one-slot array of [`crate::settings::Settings`].
pub const SETTINGS: &str = "SETTINGS";

/// Per list (allow, block): the IPv4 /24 table, the longer IPv4 prefixes, the IPv6 prefixes.
/// See [`crate::lists`] for the layout.
pub const ALLOW_V4_TABLE: &str = "ALLOW_V4_TABLE";
pub const ALLOW_V4_LONG: &str = "ALLOW_V4_LONG";
pub const ALLOW_V6: &str = "ALLOW_V6";
pub const BLOCK_V4_TABLE: &str = "BLOCK_V4_TABLE";
pub const BLOCK_V4_LONG: &str = "BLOCK_V4_LONG";
pub const BLOCK_V6: &str = "BLOCK_V6";

/// Dynamic bans with their expiry, keyed like the rate limiter ([`crate::rate_limit`]).
pub const BANS: &str = "BANS";
/// Per-source rate limiter state (LRU, so a spoofed flood evicts old sources).
pub const RATE_LIMITS: &str = "RATE_LIMITS";

/// Rule tables ([`crate::rules`]).
pub const RULES_BY_PROTOCOL: &str = "RULES_PROTO";
pub const RULES_BY_SRC_PORT: &str = "RULES_SRC_PORT";
pub const RULES_BY_DST_PORT: &str = "RULES_DST_PORT";
pub const RULES_BY_TCP_FLAGS: &str = "RULES_TCP_FLAGS";
pub const RULE_ACTIONS: &str = "RULE_ACTIONS";

/// Per-CPU packet and byte counters, indexed by [`crate::stats::index`].
pub const STATS: &str = "STATS";
/// Per-CPU hits per rule.
pub const RULE_HITS: &str = "RULE_HITS";
/// Per-CPU hits per (list, entry source), indexed by [`crate::lists::hit_index`].
pub const LIST_HITS: &str = "LIST_HITS";
/// Interface index → counter slot (an array indexed by ifindex, 0: unregistered), filled by the
/// agent as it attaches. An array rather than a hash: it is read for every packet.
pub const INTERFACE_SLOTS: &str = "INTERFACE_SLOTS";
/// Ban events and dropped-packet samples for the agent ([`crate::events::Event`]).
pub const EVENTS: &str = "EVENTS";
/// Per-CPU count of events the ring buffer had no room for.
pub const EVENTS_LOST: &str = "EVENTS_LOST";

/// Default capacity of each hash of longer prefixes; the agent resizes them before load to fit
/// the configured lists.
pub const LONG_PREFIXES_DEFAULT_CAPACITY: u32 = 16_384;
/// Default capacity of the ban map and of the rate limiter's LRU.
pub const BANS_DEFAULT_CAPACITY: u32 = 65_536;
pub const RATE_LIMITS_DEFAULT_CAPACITY: u32 = 65_536;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Interface indexes the slot array covers; a higher ifindex is counted as unregistered.
pub const MAX_IF_INDEX: u32 = 4096;

/// How many interfaces one agent attaches to at most. Slot 0 is reserved for packets from an
/// interface the agent did not register, so counters never lose a packet.
pub const MAX_INTERFACES: u32 = 64;
