//! The program's clock (`agent_common::clock`): measured at load by test-running `moat_clock`,
//! which reads jiffies and CLOCK_MONOTONIC at one instant, then written to `CLOCK` before the
//! program sees a packet.

use std::{
    io,
    time::{Duration, Instant},
};

use agent_common::{
    clock::{ClockSample, JiffiesClock},
    maps,
};
use aya::{
    maps::{Array, MapData},
    programs::{ProgramError, TestRun as _, TestRunOptions, Xdp},
};

use super::{
    limiter::monotonic_now_ns as monotonic_ns,
    map_source::{MapAccessError, MapSource, Named, ResolveError, named},
};

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("reading the resolution of CLOCK_MONOTONIC_COARSE")]
    Tick(#[source] io::Error),
    #[error("loading the clock program {}", maps::CLOCK_PROGRAM)]
    Load(#[source] ProgramError),
    #[error("test-running the clock program {}", maps::CLOCK_PROGRAM)]
    Run(#[source] ProgramError),
    #[error(
        "the clock program read {read} ns for CLOCK_MONOTONIC, outside the {before}..={after} ns \
         read around it"
    )]
    Implausible { read: u64, before: u64, after: u64 },
    #[error(transparent)]
    Map(#[from] MapAccessError),
}

/// The clock's map; only this module writes it.
pub struct ProgramClock {
    clock: Named<Array<MapData, JiffiesClock>>,
}

impl ProgramClock {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            clock: Named::resolve(source, maps::CLOCK)?,
        })
    }

    /// Measures the clock with `program` (`moat_clock`, loaded here, unloaded after) and writes
    /// it. On an error the map is left as it was: the program keeps the coarse clock's helper.
    pub fn set(&mut self, program: &mut Xdp) -> Result<JiffiesClock, ClockError> {
        let tick_ns = coarse_tick_ns().map_err(ClockError::Tick)?;
        program.load().map_err(ClockError::Load)?;
        let measured = measure(tick_ns, || sample(program));
        // Only the agent runs it, once: it need not stay in the kernel.
        if let Err(e) = program.unload() {
            tracing::debug!(error = %e, "unloading the clock program");
        }
        let clock = measured?;
        self.clock
            .map
            .set(0, clock, 0)
            .map_err(named(self.clock.name))?;
        Ok(clock)
    }
}

/// Nanoseconds per jiffy: the resolution of CLOCK_MONOTONIC_COARSE, which the kernel advances
/// once a tick (`TICK_NSEC`).
fn coarse_tick_ns() -> io::Result<u64> {
    let mut resolution = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes a valid, initialised struct.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut resolution) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let ns = resolution.tv_sec as u64 * 1_000_000_000 + resolution.tv_nsec as u64;
    if ns == 0 {
        return Err(io::Error::other("a resolution of 0 ns"));
    }
    Ok(ns)
}

/// One reading of both clocks, from a test run of `moat_clock`; its CLOCK_MONOTONIC must lie
/// between the agent's own readings before and after the run (a frame the program did not
/// write would read as zeros).
fn sample(program: &Xdp) -> Result<ClockSample, ClockError> {
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    let before = monotonic_ns();
    program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .map_err(ClockError::Run)?;
    let after = monotonic_ns();
    let word = |at: usize| u64::from_ne_bytes(out[at..at + 8].try_into().unwrap_or_default());
    let sample = ClockSample {
        jiffies: word(0),
        monotonic_ns: word(8),
    };
    if !(before..=after).contains(&sample.monotonic_ns) {
        return Err(ClockError::Implausible {
            read: sample.monotonic_ns,
            before,
            after,
        });
    }
    Ok(sample)
}

/// Longest wait for jiffies to move on, in ticks (a tick may be late on a loaded machine).
const WAIT_TICKS: u64 = 3;

/// The clock from readings taken until jiffies move on. Each reading is taken at or after its
/// jiffy's tick, so each offset is the true one or more: the smallest stands, and the first
/// reading after a tick, a little past it, makes it close to the time of the tick (as the
/// coarse clock reads). When no tick comes in time, it is within a tick of it.
fn measure<E>(
    tick_ns: u64,
    mut sample: impl FnMut() -> Result<ClockSample, E>,
) -> Result<JiffiesClock, E> {
    let offset = |s: &ClockSample| s.monotonic_ns.wrapping_sub(s.jiffies.wrapping_mul(tick_ns));
    let first = sample()?;
    let mut smallest = offset(&first);
    let deadline = Instant::now() + Duration::from_nanos(tick_ns.saturating_mul(WAIT_TICKS));
    loop {
        let reading = sample()?;
        // Offsets are differences of two clocks: compared as signed numbers.
        if (offset(&reading) as i64) < smallest as i64 {
            smallest = offset(&reading);
        }
        if reading.jiffies != first.jiffies || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(JiffiesClock {
        tick_ns,
        offset_ns: smallest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel whose jiffies tick every `tick` ns of a monotonic clock that `step` advances per
    /// reading, from `start`.
    fn kernel(
        tick: u64,
        start: u64,
        step: u64,
        jiffies_at_zero: u64,
    ) -> impl FnMut() -> Result<ClockSample, ()> {
        let mut monotonic = start;
        move || {
            monotonic += step;
            Ok(ClockSample {
                jiffies: jiffies_at_zero.wrapping_add(monotonic / tick),
                monotonic_ns: monotonic,
            })
        }
    }

    #[test]
    fn the_clock_reads_the_time_of_the_last_tick() {
        let tick = 4_000_000;
        // Jiffies start 300 s before wrapping 32 bits, as Linux starts them.
        let initial = u64::from(u32::MAX) + 1 - 300 * 250;
        let step = 150_000;
        let clock = measure(tick, kernel(tick, 7_777_123_456, step, initial)).expect("measured");
        for monotonic in [7_800_000_000u64, 7_803_999_999, 90_000_000_000] {
            let jiffies = initial + monotonic / tick;
            let last_tick = monotonic - monotonic % tick;
            let now = clock.now(jiffies);
            // At the tick, give or take the time between two readings.
            assert!(
                now >= last_tick && now - last_tick <= step,
                "{now} for {monotonic}"
            );
        }
    }

    #[test]
    fn without_a_tick_in_time_the_smallest_offset_stands() {
        let tick = 10_000_000;
        // The clock stands still between readings: no tick comes, every reading is the same.
        let clock = measure(tick, kernel(tick, 5_000_000, 0, 0)).expect("measured");
        assert_eq!(clock.offset_ns, 5_000_000);
        assert_eq!(clock.now(0), 5_000_000);
    }
}
