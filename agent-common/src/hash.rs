//! The one hash both sides compute for the tables the agent and the program share.

/// The splitmix64 finaliser: every bit of `z` reaches every bit of the result, in a few
/// multiplies the program can afford per packet.
#[inline(always)]
pub const fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
