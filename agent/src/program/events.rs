//! The program's events (`EVENTS`, a ring buffer): ban events and samples of packets, decoded
//! and handed one by one to a handler the caller supplies, so that this module knows nothing of
//! what is done with them (logs, `moat top`, captures).

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use agent_common::{
    events::{EVENT_BAN, EVENT_PROTECT_SAMPLE, EVENT_SAMPLE, Event},
    maps,
    stats::{Action, Reason},
};
use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

use super::{
    limiter::{address_of, monotonic_now_ns},
    map_source::{MapSource, Named, ResolveError},
};

/// How often [`EventHandler::tick`] is called when no event comes.
const TICK: Duration = Duration::from_secs(1);

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
    /// The list entry source, rule or protected entry that decided.
    pub detail: u32,
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
    /// A sample of a protected entry's traffic (`detail`: the entry); `reason` is what the entry
    /// made of it (`no_match`: conformed, `dst_limit`, `fingerprint`).
    Protected(Sample),
}

/// What is done with each event; runs on the reader's task.
pub trait EventHandler: Send + 'static {
    fn event(&mut self, event: Decoded);
    /// Called about once a second, events or not (e.g. to report what was held back).
    fn tick(&mut self) {}
}

/// The ring buffer; only this module reads it.
pub struct EventRing {
    ring: Named<RingBuf<MapData>>,
}

impl EventRing {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            ring: Named::resolve(source, maps::EVENTS)?,
        })
    }

    /// Hands every event to `handler` until the task is dropped.
    pub fn spawn_reader(
        self,
        mut handler: impl EventHandler,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let name = self.ring.name;
        // SAFETY: the RingBuf owns its fd for as long as the AsyncFd owns the RingBuf.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(self.ring.map, Interest::READABLE) }?;
        Ok(tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            loop {
                let ready = tokio::select! {
                    ready = ring.readable_mut() => ready,
                    _ = tick.tick() => {
                        handler.tick();
                        continue;
                    }
                };
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => {
                        warn!(error = %e, map = name, "event reader stopped");
                        return;
                    }
                };
                let ring = guard.get_inner_mut();
                let now = (monotonic_now_ns(), SystemTime::now());
                while let Some(record) = ring.next() {
                    match decode(&record, now) {
                        Some(event) => handler.event(event),
                        None => warn!(len = record.len(), "unreadable event"),
                    }
                }
                guard.clear_ready();
            }
        }))
    }
}

/// Decodes one ring buffer record; `None` for a record of the wrong size, kind, family, action
/// or reason. `now` is (monotonic ns, wall clock) at about the same moment.
pub fn decode(record: &[u8], now: (u64, SystemTime)) -> Option<Decoded> {
    if record.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the record holds at least one Event; read_unaligned copes with any alignment.
    let event: Event = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let source = address_of(event.family, event.source)?;
    match event.kind {
        EVENT_BAN => Some(Decoded::Ban {
            source,
            ttl: Duration::from_nanos(event.expires_at.saturating_sub(event.timestamp)),
        }),
        EVENT_SAMPLE | EVENT_PROTECT_SAMPLE => {
            let captured = (event.captured_len as usize).min(event.data.len());
            let age = Duration::from_nanos(now.0.saturating_sub(event.timestamp));
            Some(Sample {
                time: now.1.checked_sub(age).unwrap_or(now.1),
                source,
                action: Action::ALL.get(event.action as usize).copied()?,
                reason: Reason::from_u32(event.reason)?,
                if_index: event.if_index,
                weight: event.weight.max(1),
                frame_len: event.frame_len,
                detail: event.detail,
                data: event.data[..captured].to_vec(),
            })
            .map(|sample| {
                if event.kind == EVENT_SAMPLE {
                    Decoded::Sample(sample)
                } else {
                    Decoded::Protected(sample)
                }
            })
        }
        _ => None,
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
            std::slice::from_raw_parts(
                std::ptr::from_ref::<Event>(event).cast::<u8>(),
                size_of::<Event>(),
            )
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
            detail: 0,
            _pad: 0,
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
        event.kind = EVENT_PROTECT_SAMPLE;
        event.reason = Reason::DstLimit as u32;
        event.detail = 3;
        let Some(Decoded::Protected(sample)) = decode(&record(&event), now) else {
            panic!("a protected entry's sample");
        };
        assert_eq!((sample.reason, sample.detail), (Reason::DstLimit, 3));
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
