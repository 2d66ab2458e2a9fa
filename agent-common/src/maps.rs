//! Names and capacities of the program and its maps: the one place both sides read them from.

/// The layout of the maps moat pins: bump it whenever a map's key, value or meaning changes, so
/// that a new daemon never reads an older daemon's pinned map as its own (it restores from its
/// state directory instead). Version 1 pinned maps straight under `maps/`.
pub const PINNED_LAYOUT_VERSION: u32 = 10;

/// The XDP program's function name in the object file.
pub const PROGRAM: &str = "moat";
/// The program that reads both clocks at once, run by the agent at load to set `CLOCK`.
pub const CLOCK_PROGRAM: &str = "moat_clock";

/// The program's clock ([`crate::clock::JiffiesClock`], one slot).
pub const CLOCK: &str = "CLOCK";

/// The policy (settings, lists, rules) exists twice: the agent rewrites the generation not in
/// force, then switches `ACTIVE_GENERATION` with one write, so packets see a change whole or
/// not at all.
pub const GENERATIONS: usize = 2;
/// A one-slot array holding the generation in force (0 or 1).
pub const ACTIVE_GENERATION: &str = "ACTIVE_GEN";

/// Runtime settings: [`crate::settings::Settings`], one slot per generation.
pub const SETTINGS: &str = "SETTINGS";

/// Per generation: the IPv4 /24 table of both lists. See [`crate::lists`] for the layout.
pub const V4_TABLE: [&str; GENERATIONS] = ["V4_TAB_0", "V4_TAB_1"];
/// IPv4 prefixes longer than /24 and IPv6 prefixes, each stored once for both lists and both
/// generations ([`crate::lists::PrefixEntry`]): the IPv4 table of buckets
/// ([`crate::lists::V4LongBucket`]), its stash (a hash of the prefixes whose two buckets were
/// full), and the IPv6 hash.
pub const V4_LONG: &str = "V4_LONG";
pub const V4_LONG_STASH: &str = "V4_LONG_STASH";
pub const V6_PREFIXES: &str = "V6_PREFIXES";
/// The program's read-only global holding how many buckets `V4_LONG` has (set at load, like
/// the map's size).
pub const V4_LONG_BUCKETS: &str = "V4_LONG_BUCKETS";

/// The IPv6 gate ([`crate::lists::V6_GATE_WORDS`]): shared by both lists and generations.
pub const V6_GATE: &str = "V6_GATE";

/// Dynamic bans with their expiry, keyed like the rate limiter ([`crate::rate_limit`]).
pub const BANS: &str = "BANS";
/// Per-source rate limiter state: an mmapable array of [`crate::rate_limit::RateSlot`]s, two
/// candidate slots per source, so a flood of new sources displaces the least active.
pub const RATE_LIMITS: &str = "RATE_LIMITS";
/// The per-source table's seed and size ([`crate::rate_limit::RateTable`]).
pub const RATE_TABLE: &str = "RATE_TABLE";

/// Rule tables ([`crate::rules`]), per generation.
pub const RULES_BY_PROTOCOL: [&str; GENERATIONS] = ["RULES_PROTO_0", "RULES_PROTO_1"];
pub const RULES_BY_SRC_PORT: [&str; GENERATIONS] = ["RULES_SPORT_0", "RULES_SPORT_1"];
pub const RULES_BY_DST_PORT: [&str; GENERATIONS] = ["RULES_DPORT_0", "RULES_DPORT_1"];
pub const RULES_BY_TCP_FLAGS: [&str; GENERATIONS] = ["RULES_FLAGS_0", "RULES_FLAGS_1"];
pub const RULE_ACTIONS: [&str; GENERATIONS] = ["RULE_ACTIONS_0", "RULE_ACTIONS_1"];
pub const RULES_BY_TTL: [&str; GENERATIONS] = ["RULES_TTL_0", "RULES_TTL_1"];
pub const RULES_BY_LENGTH: [&str; GENERATIONS] = ["RULES_LEN_0", "RULES_LEN_1"];
/// Payload columns ([`crate::rules::PayloadColumn`]) and the hash of the bytes read at them.
pub const RULES_PAYLOAD_COLUMNS: [&str; GENERATIONS] = ["RULES_PCOL_0", "RULES_PCOL_1"];
pub const RULES_BY_PAYLOAD: [&str; GENERATIONS] = ["RULES_PAYLOAD_0", "RULES_PAYLOAD_1"];

/// Protect tables ([`crate::protect`]), per generation: destination prefixes (LPM tries),
/// protocol and destination port → entries, and each entry's limits.
pub const PROTECT_BY_V4: [&str; GENERATIONS] = ["PROT_DST4_0", "PROT_DST4_1"];
pub const PROTECT_BY_V6: [&str; GENERATIONS] = ["PROT_DST6_0", "PROT_DST6_1"];
pub const PROTECT_BY_PROTOCOL: [&str; GENERATIONS] = ["PROT_PROTO_0", "PROT_PROTO_1"];
pub const PROTECT_BY_DST_PORT: [&str; GENERATIONS] = ["PROT_DPORT_0", "PROT_DPORT_1"];
pub const PROTECT_LIMITS: [&str; GENERATIONS] = ["PROT_LIMITS_0", "PROT_LIMITS_1"];
/// Each protected entry's buckets ([`crate::protect::ProtectBucket`]), shared by every CPU.
pub const PROTECT_BUCKETS: &str = "PROT_BUCKETS";
/// Per-CPU counters per protected entry and [`crate::protect::ProtectHit`]
/// ([`crate::protect::protect_hit_index`]).
pub const PROTECT_HITS: &str = "PROT_HITS";
/// Each protected entry's attack fingerprint ([`crate::protect::Fingerprint`]), shared by both
/// generations: it lives as long as the attack, not the configuration.
pub const PROTECT_FINGERPRINTS: &str = "PROT_PRINTS";
/// Per-CPU, per protected entry: the earliest time of the next sample (monotonic ns).
pub const PROTECT_SAMPLE_AT: &str = "PROT_SAMPLE_AT";

/// `[syn_proxy]` ([`crate::syn_proxy::SynProxySettings`]), one slot per generation.
pub const SYN_PROXY: &str = "SYN_PROXY";
/// Sources whose SYN cookie checked out, with the time their verification expires (monotonic
/// ns), keyed like the rate limiter (LRU: a flood of handshakes evicts the oldest).
pub const VERIFIED: &str = "VERIFIED";
/// Default capacity of [`VERIFIED`].
pub const VERIFIED_DEFAULT_CAPACITY: u32 = 65_536;
/// Per-CPU, one slot: the SYN-cookie stage's copies of headers
/// ([`crate::syn_proxy::SynScratch`]).
pub const SYN_SCRATCH: &str = "SYN_SCRATCH";

/// Per-CPU, one slot: the packet the program parsed, for the stages it runs as global
/// functions. Scratch space: the agent never reads or writes it.
pub const PACKET: &str = "PACKET";
/// The program's scratch maps: its working space, which the agent neither owns nor pins.
pub const SCRATCH: [&str; 2] = [PACKET, SYN_SCRATCH];

/// Per-CPU packet and byte counters, indexed by [`crate::stats::index`].
pub const STATS: &str = "STATS";
/// Per-CPU hits per rule.
pub const RULE_HITS: &str = "RULE_HITS";
/// Per-CPU hits per (list, entry source), indexed by [`crate::lists::hit_index`].
pub const LIST_HITS: &str = "LIST_HITS";
/// Interface index → counter slot (an array indexed by ifindex, 0: unregistered), filled by the
/// agent as it attaches. An array rather than a hash: it is read for every packet. A slot may
/// carry [`SLOT_NO_ETHERNET`].
pub const INTERFACE_SLOTS: &str = "INTERFACE_SLOTS";
/// Set in an interface's slot when its frames start with the IP header (tun, WireGuard, PPP,
/// IPIP, GRE: no Ethernet header): the program parses them from the IP header.
pub const SLOT_NO_ETHERNET: u32 = 1 << 31;
/// The counter slot in an interface's slot value.
pub const SLOT_INDEX_MASK: u32 = !SLOT_NO_ETHERNET;
/// Ban events and dropped-packet samples for the agent ([`crate::events::Event`]).
pub const EVENTS: &str = "EVENTS";
/// `moat capture`'s sampling override ([`crate::events::CaptureSettings`], one slot).
pub const CAPTURE: &str = "CAPTURE";
/// Per-CPU count of events the ring buffer had no room for.
pub const EVENTS_LOST: &str = "EVENTS_LOST";

/// Default capacity (in prefixes) of each family's store of longer prefixes; the agent resizes
/// them before load to fit the configured lists plus room for entries added at runtime. The
/// IPv6 hash is not preallocated (`BPF_F_NO_PREALLOC`): capacity costs only its bucket array
/// (16 bytes per entry), entries cost memory when they exist. The IPv4 table costs 8 bytes per
/// prefix of capacity.
pub const LONG_PREFIXES_DEFAULT_CAPACITY: u32 = 16_384;
/// The stash's share of the IPv4 table's capacity (1/8): with two candidate buckets of eight
/// slots, about 4% of the prefixes find both full when the table is full (0.7% at 90%, none at
/// 70%).
pub const V4_LONG_STASH_SHARE: u32 = 8;
/// Default capacity of the ban map and of the rate limiter's table (a power of two).
pub const BANS_DEFAULT_CAPACITY: u32 = 65_536;
pub const RATE_LIMITS_DEFAULT_CAPACITY: u32 = 65_536;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Interface indexes the slot array covers; a higher ifindex is counted as unregistered.
pub const MAX_IF_INDEX: u32 = 4096;

/// How many interfaces one agent attaches to at most. Slot 0 is reserved for packets from an
/// interface the agent did not register, so counters never lose a packet.
pub const MAX_INTERFACES: u32 = 64;
