//! Counters: one `Counter` per (interface slot, action, reason), per CPU.

/// Packets and bytes seen under one (interface, action, reason).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

crate::pod!(Counter);

impl Counter {
    pub const fn plus(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// What the program did with a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass = 0,
    Drop = 1,
    /// Monitor mode: the policy said drop, the packet was passed.
    WouldDrop = 2,
    /// Answered from the program (a SYN cookie's SYN-ACK), sent back out with `XDP_TX`.
    Tx = 3,
    /// Monitor mode: the program would have answered; the packet was passed.
    WouldTx = 4,
}

impl Action {
    pub const COUNT: u32 = 5;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Pass,
        Self::Drop,
        Self::WouldDrop,
        Self::Tx,
        Self::WouldTx,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::WouldDrop => "would_drop",
            Self::Tx => "tx",
            Self::WouldTx => "would_tx",
        }
    }
}

/// Why the program decided what it did. New reasons are appended, never renumbered: the index is
/// part of the map layout.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// An IP packet that no list or rule matched.
    NoMatch = 0,
    /// Not IPv4 or IPv6 (ARP, LLDP, …): passed untouched.
    NotIp = 1,
    /// A header moat could not parse (truncated, impossible lengths).
    Malformed = 2,
    /// The source address is in the blocklist.
    Blocklist = 3,
    /// The source address is in the allowlist.
    Allowlist = 4,
    /// The source is banned.
    Ban = 5,
    /// A stateless rule matched.
    Rule = 6,
    /// The source is over its rate limit.
    RateLimit = 7,
    /// The traffic to a protected destination is over that destination's limit (`[[protect]]`).
    DstLimit = 8,
    /// The packet matched the attack fingerprint of its protected destination.
    Fingerprint = 9,
    /// A SYN to a `[syn_proxy]` port, answered with a SYN cookie.
    SynCookie = 10,
}

impl Reason {
    pub const COUNT: u32 = 11;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::NoMatch,
        Self::NotIp,
        Self::Malformed,
        Self::Blocklist,
        Self::Allowlist,
        Self::Ban,
        Self::Rule,
        Self::RateLimit,
        Self::DstLimit,
        Self::Fingerprint,
        Self::SynCookie,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::NoMatch => "no_match",
            Self::NotIp => "not_ip",
            Self::Malformed => "malformed",
            Self::Blocklist => "blocklist",
            Self::Allowlist => "allowlist",
            Self::Ban => "ban",
            Self::Rule => "rule",
            Self::RateLimit => "rate_limit",
            Self::DstLimit => "dst_limit",
            Self::Fingerprint => "fingerprint",
            Self::SynCookie => "syn_cookie",
        }
    }

    pub fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.get(value as usize).copied()
    }
}

/// Counters per interface slot.
pub const PER_INTERFACE: u32 = Action::COUNT * Reason::COUNT;

/// Size of the `STATS` array.
pub const STATS_LEN: u32 = crate::maps::MAX_INTERFACES * PER_INTERFACE;

/// Index of the counter for (interface slot, action, reason) in the `STATS` array.
#[inline(always)]
pub const fn index(slot: u32, action: Action, reason: Reason) -> u32 {
    slot * PER_INTERFACE + action as u32 * Reason::COUNT + reason as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_is_distinct_and_in_bounds() {
        let mut seen = [false; STATS_LEN as usize];
        for slot in 0..crate::maps::MAX_INTERFACES {
            for action in Action::ALL {
                for reason in Reason::ALL {
                    let i = index(slot, action, reason) as usize;
                    assert!(i < STATS_LEN as usize, "index {i} out of bounds");
                    assert!(!seen[i], "index {i} used twice");
                    seen[i] = true;
                }
            }
        }
        assert!(seen.iter().all(|s| *s), "some index is never used");
    }
}
