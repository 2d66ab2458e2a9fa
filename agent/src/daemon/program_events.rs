//! What the daemon does with each event of the program: a ban is logged once and queued for
//! saving and for its expiry; a sample of a dropped packet is logged at a bounded rate (so that
//! a flood cannot flood the journal) and tallied for `moat top`; every sample goes to running
//! captures; a sample of a protected destination's traffic goes to the attack watch.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_common::stats::Action;
use tokio::sync::{broadcast, mpsc};
use tracing::info;

use crate::{
    observe::{
        attacks::{EntrySample, SampleInbox},
        fingerprint::Attributes,
        top::DropTally,
    },
    program::events::{Decoded, EventHandler, Sample},
};

/// At most this many sample lines, and this many ban lines, per second; the rest are counted and
/// summarised.
const SAMPLE_LINES_PER_SECOND: u32 = 10;
const BAN_LINES_PER_SECOND: u32 = 10;

/// Where events go.
pub struct EventSinks {
    /// Running captures subscribe here.
    pub captures: broadcast::Sender<Arc<Sample>>,
    /// Dropped packets per source, for `moat top`.
    pub drops: Arc<Mutex<DropTally>>,
    /// New bans with their length, so that the daemon saves them and logs their expiry.
    pub bans: mpsc::Sender<(IpAddr, Duration)>,
    /// Log lines of samples.
    pub sample_lines: LineLimiter,
    /// Log lines of bans: a flood of spoofed sources can ban thousands a second.
    pub ban_lines: LineLimiter,
    /// Samples of protected destinations' traffic, for the attack watch.
    pub attack_samples: Arc<Mutex<SampleInbox>>,
    /// Interfaces whose frames start with the IP header (their samples are read so).
    pub ip_first: HashSet<u32>,
}

impl EventSinks {
    pub fn new(
        captures: broadcast::Sender<Arc<Sample>>,
        drops: Arc<Mutex<DropTally>>,
        bans: mpsc::Sender<(IpAddr, Duration)>,
        attack_samples: Arc<Mutex<SampleInbox>>,
        ip_first: HashSet<u32>,
    ) -> Self {
        Self {
            captures,
            drops,
            bans,
            attack_samples,
            ip_first,
            sample_lines: LineLimiter::new("dropped packet samples", SAMPLE_LINES_PER_SECOND),
            ban_lines: LineLimiter::new("bans", BAN_LINES_PER_SECOND),
        }
    }
}

impl EventHandler for EventSinks {
    fn event(&mut self, event: Decoded) {
        match event {
            Decoded::Ban { source, ttl } => {
                if self.ban_lines.allow() {
                    info!(source = %source, ttl = %humantime::format_duration(ttl), cause = "rate_limit", "banned");
                }
                // Bounded: a full queue only delays the save to the next periodic one (and the
                // ban's expiry goes unlogged).
                let _ = self.bans.try_send((source, ttl));
            }
            Decoded::Sample(sample) => {
                if sample.action != Action::Pass {
                    if let Ok(mut drops) = self.drops.lock() {
                        drops.add(&sample);
                    }
                    if self.sample_lines.allow() {
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
                if self.captures.receiver_count() > 0 {
                    // No receiver keeping up is not an error: each capture counts what it missed.
                    let _ = self.captures.send(Arc::new(sample));
                }
            }
            Decoded::Protected(sample) => {
                let attributes =
                    Attributes::of_frame(&sample.data, self.ip_first.contains(&sample.if_index))
                        .map(|attributes| Attributes {
                            weight: sample.weight,
                            ..attributes
                        });
                if let Ok(mut inbox) = self.attack_samples.lock() {
                    inbox.push(EntrySample {
                        entry: sample.detail,
                        reason: sample.reason,
                        source: sample.source,
                        attributes,
                    });
                }
            }
        }
    }

    /// The summary of held-back lines is due even when the flood stops.
    fn tick(&mut self) {
        let now = Instant::now();
        self.sample_lines.roll(now);
        self.ban_lines.roll(now);
    }
}

/// Lets through at most `per_second` lines a second and reports what it held back.
pub struct LineLimiter {
    /// What the lines are about, for the summary.
    what: &'static str,
    per_second: u32,
    window: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl LineLimiter {
    pub fn new(what: &'static str, per_second: u32) -> Self {
        Self {
            what,
            per_second,
            window: None,
            lines: 0,
            suppressed: 0,
        }
    }

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
                "{} not logged (rate limit on log lines)", self.what
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
        if self.lines < self.per_second {
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

    #[test]
    fn a_burst_of_bans_gets_a_bounded_number_of_lines() {
        let (captures, _) = broadcast::channel(1);
        let (bans, mut queued) = mpsc::channel(4);
        let mut sinks = EventSinks::new(
            captures,
            Arc::default(),
            bans,
            Arc::default(),
            HashSet::new(),
        );
        for i in 0..1000u32 {
            let source = IpAddr::from(i.to_be_bytes());
            sinks.event(Decoded::Ban {
                source,
                ttl: Duration::from_secs(60),
            });
        }
        assert_eq!(sinks.ban_lines.lines, BAN_LINES_PER_SECOND);
        assert_eq!(
            sinks.ban_lines.suppressed,
            1000 - u64::from(BAN_LINES_PER_SECOND)
        );
        // The queue to the daemon is bounded too: the rest wait for the periodic save.
        let mut delivered = 0;
        while queued.try_recv().is_ok() {
            delivered += 1;
        }
        assert_eq!(delivered, 4);
    }
}
