//! Reading the program's events: bans are logged once each; dropped-packet samples are logged
//! at a bounded rate, so that a flood cannot flood the journal.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use agent_common::{
    events::{EVENT_BAN, EVENT_DROP_SAMPLE, Event},
    maps::EVENTS,
    stats::Reason,
};
use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

/// At most this many sample lines per second; the rest are counted and summarised.
const SAMPLE_LINES_PER_SECOND: u32 = 10;

/// A decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    Ban {
        source: IpAddr,
        /// How long the ban lasts from the event's time.
        ttl: Duration,
    },
    DropSample {
        source: IpAddr,
        reason: Option<Reason>,
        if_index: u32,
        frame_len: u32,
        data: Vec<u8>,
    },
}

/// Decodes one ring buffer record; `None` for a record of the wrong size, kind or family.
pub fn decode(record: &[u8]) -> Option<Decoded> {
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
        EVENT_DROP_SAMPLE => {
            let captured = (event.captured_len as usize).min(event.data.len());
            Some(Decoded::DropSample {
                source,
                reason: Reason::from_u32(event.reason),
                if_index: event.if_index,
                frame_len: event.frame_len,
                data: event.data[..captured].to_vec(),
            })
        }
        _ => None,
    }
}

/// Takes the ring buffer out of `ebpf` and logs its events until the task is dropped.
pub fn spawn_reader(ebpf: &mut Ebpf) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let map = ebpf
        .take_map(EVENTS)
        .ok_or_else(|| anyhow!("map {EVENTS} is missing from the XDP object"))?;
    let ring = RingBuf::try_from(map).with_context(|| format!("opening {EVENTS}"))?;
    // SAFETY: the RingBuf owns its fd for as long as the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("polling {EVENTS}: {e}"))?;
    Ok(tokio::spawn(async move {
        let mut limiter = LineLimiter::default();
        loop {
            let mut guard = match ring.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    warn!(error = %e, "event reader stopped");
                    return;
                }
            };
            drain(guard.get_inner_mut(), &mut limiter);
            guard.clear_ready();
        }
    }))
}

fn drain(ring: &mut RingBuf<MapData>, limiter: &mut LineLimiter) {
    while let Some(record) = ring.next() {
        match decode(&record) {
            Some(Decoded::Ban { source, ttl }) => {
                info!(source = %source, ttl = %humantime::format_duration(ttl), cause = "rate_limit", "banned");
            }
            Some(Decoded::DropSample {
                source,
                reason,
                if_index,
                frame_len,
                ..
            }) => {
                if limiter.allow() {
                    info!(
                        source = %source,
                        reason = reason.map_or("unknown", Reason::name),
                        if_index,
                        frame_len,
                        "dropped packet sample"
                    );
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
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let window = *self.window.get_or_insert(now);
        if now.duration_since(window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                info!(
                    suppressed = self.suppressed,
                    "dropped packet samples not logged (rate limit on log lines)"
                );
            }
            self.window = Some(now);
            self.lines = 0;
            self.suppressed = 0;
        }
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
            data: [0; SAMPLE_BYTES],
        };
        assert_eq!(
            decode(&record(&event)),
            Some(Decoded::Ban {
                source: "198.51.100.7".parse().expect("addr"),
                ttl: Duration::from_secs(600)
            })
        );
        event.kind = EVENT_DROP_SAMPLE;
        event.reason = Reason::Blocklist as u32;
        event.family = FAMILY_V6;
        event.source = "2001:db8:bad::7"
            .parse::<std::net::Ipv6Addr>()
            .expect("addr")
            .octets();
        event.frame_len = 98;
        event.captured_len = 98;
        let Some(Decoded::DropSample {
            source,
            reason,
            data,
            ..
        }) = decode(&record(&event))
        else {
            panic!("a sample");
        };
        assert_eq!(source, "2001:db8:bad::7".parse::<IpAddr>().expect("addr"));
        assert_eq!(reason, Some(Reason::Blocklist));
        assert_eq!(data.len(), 98);
    }

    #[test]
    fn short_or_unknown_records_are_refused() {
        assert_eq!(decode(&[0u8; 8]), None);
        let mut bytes = vec![0u8; size_of::<Event>()];
        bytes[0] = 99;
        assert_eq!(decode(&bytes), None);
    }
}
