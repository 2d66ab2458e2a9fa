//! The clock of bans, rate limits and protected destinations: jiffies, which the verifier turns
//! into one load, made into CLOCK_MONOTONIC nanoseconds at tick resolution. The agent measures
//! how at load ([`ClockSample`]) and writes it ([`JiffiesClock`]); the kernel derives jiffies
//! from the monotonic clock, so the two never drift apart.

use crate::pod;

/// How the program turns jiffies into nanoseconds (the one slot of `CLOCK`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JiffiesClock {
    /// Nanoseconds per jiffy; 0 until the agent measured the clock (the program then reads
    /// `bpf_ktime_get_coarse_ns`).
    pub tick_ns: u64,
    /// What to add to `jiffies × tick_ns` (wrapping) for CLOCK_MONOTONIC.
    pub offset_ns: u64,
}

impl JiffiesClock {
    /// CLOCK_MONOTONIC at the last tick, from `jiffies`.
    #[inline(always)]
    pub const fn now(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }
}

/// Both clocks read at one instant by the `moat_clock` program, written at the start of the
/// frame it is test-run on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockSample {
    pub jiffies: u64,
    pub monotonic_ns: u64,
}

pod!(JiffiesClock, ClockSample);
