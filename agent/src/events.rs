//! Reading the program's events: bans are logged once each; samples of dropped packets are
//! logged at a bounded rate, so that a flood cannot flood the journal, and every sample is
//! handed to `moat top` (the drop tally) and to running captures.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use agent_common::{
    events::{EVENT_BAN, EVENT_SAMPLE, Event},
    maps::EVENTS,
    stats::{Action, Reason},
};
use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{broadcast, mpsc},
};
use tracing::{info, warn};

use crate::{bans::monotonic_now_ns, top::DropTally};

/// At most this many sample lines per second; the rest are counted and summarised.
const SAMPLE_LINES_PER_SECOND: u32 = 10;

/// A sampled packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Wall-clock time the program saw the packet.
    pub time: SystemTime,
    pub source: IpAddr,
    pub action: Action,
    pub reason: Reason,
    pub if_index: u32,
    /// How many packets this sample stands for.
    pub weight: u32,
    pub frame_len: u32,
    /// The start of the frame (at most `agent_common::events::SAMPLE_BYTES`).
    pub data: Vec<u8>,
}

/// A decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    Ban {
        source: IpAddr,
        /// How long the ban lasts from the event's time.
        ttl: Duration,
    },
    Sample(Sample),
}

/// Where samples go besides the log.
#[derive(Clone)]
pub struct SampleSinks {
    /// Running captures subscribe here.
    pub captures: broadcast::Sender<Arc<Sample>>,
    /// Dropped packets per source, for `moat top`.
    pub drops: Arc<Mutex<DropTally>>,
    /// New bans with their length, so that the daemon saves them and logs their expiry.
    pub bans: mpsc::Sender<(IpAddr, Duration)>,
}

/// Decodes one ring buffer record; `None` for a record of the wrong size, kind, family, action
/// or reason. `now` is (monotonic ns, wall clock) at about the same moment.
pub fn decode(record: &[u8], now: (u64, SystemTime)) -> Option<Decoded> {
    if record.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the record holds at least one Event; read_unaligned copes with any alignment.
    let event: Event = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let source = crate::bans::address_of(event.family, event.source)?;
    match event.kind {
        EVENT_BAN => Some(Decoded::Ban {
            source,
            ttl: Duration::from_nanos(event.expires_at.saturating_sub(event.timestamp)),
        }),
        EVENT_SAMPLE => {
            let captured = (event.captured_len as usize).min(event.data.len());
            let age = Duration::from_nanos(now.0.saturating_sub(event.timestamp));
            Some(Decoded::Sample(Sample {
                time: now.1.checked_sub(age).unwrap_or(now.1),
                source,
                action: Action::ALL.get(event.action as usize).copied()?,
                reason: Reason::from_u32(event.reason)?,
                if_index: event.if_index,
                weight: event.weight.max(1),
                frame_len: event.frame_len,
                data: event.data[..captured].to_vec(),
            }))
        }
        _ => None,
    }
}

/// Takes the ring buffer out of `ebpf` and handles its events until the task is dropped.
pub fn spawn_reader(
    ebpf: &mut Ebpf,
    sinks: SampleSinks,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let map = ebpf
        .take_map(EVENTS)
        .ok_or_else(|| anyhow!("map {EVENTS} is missing from the XDP object"))?;
    let ring = RingBuf::try_from(map).with_context(|| format!("opening {EVENTS}"))?;
    // SAFETY: the RingBuf owns its fd for as long as the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("polling {EVENTS}: {e}"))?;
    Ok(tokio::spawn(async move {
        let mut limiter = LineLimiter::default();
        // The summary of held-back lines is due even when the flood stops.
        let mut summary = tokio::time::interval(Duration::from_secs(1));
        loop {
            let ready = tokio::select! {
                ready = ring.readable_mut() => ready,
                _ = summary.tick() => {
                    limiter.roll(Instant::now());
                    continue;
                }
            };
            let mut guard = match ready {
                Ok(guard) => guard,
                Err(e) => {
                    warn!(error = %e, "event reader stopped");
                    return;
                }
            };
            drain(guard.get_inner_mut(), &mut limiter, &sinks);
            guard.clear_ready();
        }
    }))
}

fn drain(ring: &mut RingBuf<MapData>, limiter: &mut LineLimiter, sinks: &SampleSinks) {
    let now = (monotonic_now_ns(), SystemTime::now());
    while let Some(record) = ring.next() {
        match decode(&record, now) {
            Some(Decoded::Ban { source, ttl }) => {
                info!(source = %source, ttl = %humantime::format_duration(ttl), cause = "rate_limit", "banned");
                // A full queue only delays the save to the next periodic one.
                let _ = sinks.bans.try_send((source, ttl));
            }
            Some(Decoded::Sample(sample)) => {
                if sample.action != Action::Pass {
                    if let Ok(mut drops) = sinks.drops.lock() {
                        drops.add(&sample);
                    }
                    if limiter.allow() {
                        info!(
                            source = %sample.source,
                            action = sample.action.name(),
                            reason = sample.reason.name(),
                            if_index = sample.if_index,
                            frame_len = sample.frame_len,
                            "dropped packet sample"
                        );
                    }
                }
                if sinks.captures.receiver_count() > 0 {
                    // No receiver keeping up is not an error: each capture counts what it missed.
                    let _ = sinks.captures.send(Arc::new(sample));
                }
            }
            None => warn!(len = record.len(), "unreadable event"),
        }
    }
}

/// Lets through at most `SAMPLE_LINES_PER_SECOND` lines a second and reports what it held back.
#[derive(Default)]
struct LineLimiter {
    window: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl LineLimiter {
    /// Starts a new window when the current one is a second old, reporting what it held back.
    fn roll(&mut self, now: Instant) {
        let Some(window) = self.window else {
            return;
        };
        if now.duration_since(window) < Duration::from_secs(1) {
            return;
        }
        if self.suppressed > 0 {
            info!(
                suppressed = self.suppressed,
                "dropped packet samples not logged (rate limit on log lines)"
            );
        }
        self.window = None;
        self.lines = 0;
        self.suppressed = 0;
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.roll(now);
        self.window.get_or_insert(now);
        if self.lines < SAMPLE_LINES_PER_SECOND {
            self.lines += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{
        events::SAMPLE_BYTES,
        rate_limit::{FAMILY_V4, FAMILY_V6},
    };

    fn record(event: &Event) -> Vec<u8> {
        // SAFETY: Event is plain old data.
        unsafe {
            std::slice::from_raw_parts((event as *const Event).cast::<u8>(), size_of::<Event>())
        }
        .to_vec()
    }

    #[test]
    fn bans_and_samples_decode() {
        let mut event = Event {
            kind: EVENT_BAN,
            reason: 0,
            if_index: 3,
            family: FAMILY_V4,
            source: [198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            timestamp: 1_000,
            expires_at: 1_000 + 600_000_000_000,
            frame_len: 0,
            captured_len: 0,
            action: 0,
            weight: 0,
            data: [0; SAMPLE_BYTES],
        };
        let now = (
            1_000_000,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
        );
        assert_eq!(
            decode(&record(&event), now),
            Some(Decoded::Ban {
                source: "198.51.100.7".parse().expect("addr"),
                ttl: Duration::from_secs(600)
            })
        );
        event.kind = EVENT_SAMPLE;
        event.reason = Reason::Blocklist as u32;
        event.action = Action::Drop as u32;
        event.weight = 100;
        event.timestamp = 0;
        event.family = FAMILY_V6;
        event.source = "2001:db8:bad::7"
            .parse::<std::net::Ipv6Addr>()
            .expect("addr")
            .octets();
        event.frame_len = 98;
        event.captured_len = 98;
        let Some(Decoded::Sample(sample)) = decode(&record(&event), now) else {
            panic!("a sample");
        };
        assert_eq!(
            sample.source,
            "2001:db8:bad::7".parse::<IpAddr>().expect("addr")
        );
        assert_eq!(sample.reason, Reason::Blocklist);
        assert_eq!(sample.action, Action::Drop);
        assert_eq!(sample.weight, 100);
        assert_eq!(sample.data.len(), 98);
        // The program's clock read 1 ms before `now`.
        assert_eq!(
            sample.time,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000) - Duration::from_millis(1)
        );
        event.action = 7;
        assert_eq!(decode(&record(&event), now), None, "an unknown action");
    }

    #[test]
    fn short_or_unknown_records_are_refused() {
        let now = (0, SystemTime::UNIX_EPOCH);
        assert_eq!(decode(&[0u8; 8], now), None);
        let mut bytes = vec![0u8; size_of::<Event>()];
        bytes[0] = 99;
        assert_eq!(decode(&bytes, now), None);
    }
}
