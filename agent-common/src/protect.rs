//! Protected destinations: aggregate limits on the traffic to a destination, whatever its
//! sources. The agent compiles the `[[protect]]` entries as it compiles rules (see
//! [`crate::rules`]): per destination prefix, protocol and destination port, the set of entries
//! that value satisfies. A packet's entry is the first of the intersection of three lookups, so
//! the cost does not grow with the number of entries. Each entry's bucket (GCRA, as
//! [`crate::rate_limit`]) is one value shared by every CPU and updated by compare-and-swap.

use crate::{bitset::BitSet, pod};

/// Protected entries one configuration may hold.
pub const MAX_PROTECTED: u32 = 256;

/// A set of protected entries: bit `i` is entry `i` in config order.
pub type ProtectMask = BitSet<{ (MAX_PROTECTED / 64) as usize }>;

/// The destination-port table of the protect stage: one entry per port, [`crate::rules::NO_PORT`]
/// for packets without ports (other protocols), and [`PROTECT_FRAGMENT`] for later fragments
/// (no ports read, but TCP or UDP traffic to the destination all the same: charged to the
/// entries of their protocol, port-bound or not).
pub const PROTECT_PORT_TABLE_LEN: u32 = crate::rules::PORT_TABLE_LEN + 1;
pub const PROTECT_FRAGMENT: u32 = crate::rules::PORT_TABLE_LEN;

/// An entry's limits, in the units of [`crate::settings::RateSettings`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectLimit {
    /// Nanoseconds per packet at the packet limit; 0: no packet limit.
    pub ns_per_packet: u64,
    /// Picoseconds per byte at the bit limit; 0: no bit limit.
    pub ps_per_byte: u64,
    /// How far ahead of now the packet bucket's TAT may run.
    pub packets_burst_ns: u64,
    /// The same for the bit bucket (one second's worth of bits).
    pub bits_burst_ns: u64,
}

/// An entry's buckets, shared by every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectBucket {
    pub packets_tat: u64,
    pub bits_tat: u64,
}

/// What happened to a packet charged to a protected entry: the kinds `PROTECT_HITS` counts.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtectHit {
    /// Within the entry's limit.
    Conforming = 0,
    /// Over the entry's limit (dropped as `dst_limit`; passed in monitor mode).
    Over = 1,
    /// Matched the entry's attack fingerprint (dropped as `fingerprint`, before the bucket).
    Fingerprint = 2,
}

impl ProtectHit {
    pub const COUNT: u32 = 3;
}

/// `PROTECT_HITS` holds, per entry, a counter per [`ProtectHit`].
pub const PROTECT_HITS_LEN: u32 = MAX_PROTECTED * ProtectHit::COUNT;

/// Index in `PROTECT_HITS` of an entry's counter of one kind.
#[inline(always)]
pub const fn protect_hit_index(entry: u32, hit: ProtectHit) -> u32 {
    entry * ProtectHit::COUNT + hit as u32
}

/// An attack fingerprint: the packet attributes the attack's packets share, found by the agent
/// in samples and installed for the attack's lifetime (`PROT_PRINTS`, one per entry). A packet
/// matches when every attribute in `fields` equals the packet's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// `FP_*` bits: the attributes that take part; 0: no fingerprint.
    pub fields: u32,
    /// Bytes of `payload` that take part (1..=8) when `FP_PAYLOAD` is set.
    pub payload_len: u32,
    pub src_port: u16,
    /// IP total length (IPv6: payload length + 40).
    pub length: u16,
    /// IPv4 identification (never matches IPv6).
    pub ip_id: u16,
    pub tcp_window: u16,
    /// TTL or hop limit.
    pub ttl: u8,
    pub tcp_flags: u8,
    pub _pad: [u8; 2],
    /// The first bytes of the L4 payload (after the TCP or UDP header; after the IP header
    /// for other protocols).
    pub payload: [u8; 8],
}

pub const FP_SRC_PORT: u32 = 1 << 0;
pub const FP_TTL: u32 = 1 << 1;
pub const FP_LENGTH: u32 = 1 << 2;
pub const FP_TCP_FLAGS: u32 = 1 << 3;
pub const FP_TCP_WINDOW: u32 = 1 << 4;
pub const FP_IP_ID: u32 = 1 << 5;
pub const FP_PAYLOAD: u32 = 1 << 6;
/// The longest payload prefix a fingerprint compares.
pub const FP_PAYLOAD_MAX: usize = crate::rules::PAYLOAD_MAX;

/// The program samples the traffic of each protected entry, at most once per this interval
/// per CPU, at random among the packets past it (the agent's baseline and attack samples, for
/// fingerprints).
pub const PROTECT_SAMPLE_INTERVAL_NS: u64 = 2_000_000;

/// The pacing of one entry's samples on one CPU (`PROT_SAMPLE_AT`): each sample carries, as
/// its weight, the packets it stands for, so that a CPU that sees few packets (sampled nearly
/// all) does not outweigh one that sees a flood (sampled one in thousands).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamplePacing {
    /// No sample before this time (monotonic ns).
    pub next_ns: u64,
    /// Packets charged on this CPU since its last sample.
    pub unsampled: u64,
}

pod!(
    ProtectMask,
    ProtectLimit,
    ProtectBucket,
    Fingerprint,
    SamplePacing
);
