//! Names and capacities of the program and its maps: the one place both sides read them from.

/// The XDP program's function name in the object file.
pub const PROGRAM: &str = "moat";

/// IPv4 source blocklist, an LPM trie keyed by [`crate::lists::Ipv4Key`].
pub const BLOCKLIST_V4: &str = "BLOCKLIST_V4";
/// IPv6 source blocklist, an LPM trie keyed by [`crate::lists::Ipv6Key`].
pub const BLOCKLIST_V6: &str = "BLOCKLIST_V6";
/// Per-CPU packet and byte counters, indexed by [`crate::stats::index`].
pub const STATS: &str = "STATS";
/// Interface index → counter slot, filled by the agent as it attaches.
pub const INTERFACE_SLOTS: &str = "INTERFACE_SLOTS";

/// Default capacity of each blocklist trie. The agent resizes the map before load
/// (`EbpfLoader::set_max_entries`) to fit the configured lists.
pub const BLOCKLIST_DEFAULT_CAPACITY: u32 = 65_536;

/// How many interfaces one agent attaches to at most. Slot 0 is reserved for packets from an
/// interface the agent did not register, so counters never lose a packet.
pub const MAX_INTERFACES: u32 = 64;
