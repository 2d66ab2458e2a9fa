//! `moat top`: who is sending what. Dropped packets per source are estimated from the program's
//! samples (each stands for its sampling interval's worth of packets); passed packets per
//! source are counted exactly by the rate limiter. The daemon keeps the last few readings and
//! turns two of them into rates, so that any client gets rates from a single request.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    net::IpAddr,
    time::{Duration, Instant},
};

use agent_common::stats::{Counter, Reason};

use crate::{
    control::protocol::{TopRow, TopView},
    program::events::Sample,
};

/// Sources the drop tally follows; when full, the half with the fewest packets is forgotten,
/// so that a flood from random addresses costs bounded memory and amortised constant time.
pub const MAX_TALLY_SOURCES: usize = 16_384;
/// Readings kept to compute rates from.
const READINGS_KEPT: usize = 3;

/// Estimated dropped packets and bytes per (source, reason) since the daemon started.
#[derive(Debug, Default)]
pub struct DropTally {
    counts: HashMap<(IpAddr, Reason), Counter>,
}

impl DropTally {
    pub fn add(&mut self, sample: &Sample) {
        let key = (sample.source, sample.reason);
        if self.counts.len() >= MAX_TALLY_SOURCES && !self.counts.contains_key(&key) {
            self.forget_smaller_half();
        }
        let weight = u64::from(sample.weight);
        let counter = self.counts.entry(key).or_default();
        *counter = counter.plus(Counter {
            packets: weight,
            bytes: weight * u64::from(sample.frame_len),
        });
    }

    fn forget_smaller_half(&mut self) {
        let mut packets: Vec<u64> = self.counts.values().map(|c| c.packets).collect();
        let middle = packets.len() / 2;
        let (_, median, _) = packets.select_nth_unstable(middle);
        let median = *median;
        self.counts.retain(|_, c| c.packets > median);
    }

    pub fn counts(&self) -> HashMap<(IpAddr, Reason), Counter> {
        self.counts.clone()
    }
}

/// Cumulative counts at one moment.
#[derive(Debug)]
pub struct Reading {
    pub at: Instant,
    /// Estimated from samples.
    pub dropped: HashMap<(IpAddr, Reason), Counter>,
    /// From the rate limiter; keys are the limiter's sources as printed (address or prefix).
    pub passed: HashMap<String, Counter>,
    /// All dropped (or would-be dropped) and all passed packets, from the counters.
    pub dropped_total: Counter,
    pub passed_total: Counter,
}

/// The last few readings.
#[derive(Debug, Default)]
pub struct TopHistory {
    readings: VecDeque<Reading>,
}

/// What a view says besides the rates.
pub struct ViewOptions {
    pub interval: Duration,
    pub limit: usize,
    pub passed_by_source: bool,
    pub sample_every: u32,
}

impl TopHistory {
    /// Rates between `current` and the newest reading at least half an interval older (the
    /// oldest kept, else); all zero with `interval_ms` 0 when there is none yet.
    pub fn view(&mut self, current: Reading, options: &ViewOptions) -> TopView {
        let base = self
            .readings
            .iter()
            .rev()
            .find(|r| current.at.duration_since(r.at) >= options.interval / 2)
            .or_else(|| self.readings.front());
        let view = match base {
            None => TopView {
                interval_ms: 0,
                dropped_packets_per_second: 0,
                passed_packets_per_second: 0,
                dropped: Vec::new(),
                passed: Vec::new(),
                passed_by_source: options.passed_by_source,
                sample_every: options.sample_every,
                protected: Vec::new(),
                verified_sources: None,
            },
            Some(base) => {
                let elapsed = current
                    .at
                    .duration_since(base.at)
                    .max(Duration::from_millis(1));
                let per_second = |packets: u64| (packets as f64 / elapsed.as_secs_f64()).round();
                let dropped = top_rates(&current.dropped, &base.dropped, elapsed, options.limit)
                    .into_iter()
                    .map(|((source, reason), (pps, bps))| TopRow {
                        source: source.to_string(),
                        reason: reason.name().into(),
                        packets_per_second: pps,
                        bits_per_second: bps,
                    })
                    .collect();
                let passed = top_rates(&current.passed, &base.passed, elapsed, options.limit)
                    .into_iter()
                    .map(|(source, (pps, bps))| TopRow {
                        source,
                        reason: Reason::NoMatch.name().into(),
                        packets_per_second: pps,
                        bits_per_second: bps,
                    })
                    .collect();
                TopView {
                    interval_ms: elapsed.as_millis() as u64,
                    dropped_packets_per_second: per_second(
                        delta(current.dropped_total, base.dropped_total).packets,
                    ) as u64,
                    passed_packets_per_second: per_second(
                        delta(current.passed_total, base.passed_total).packets,
                    ) as u64,
                    dropped,
                    passed,
                    passed_by_source: options.passed_by_source,
                    sample_every: options.sample_every,
                    protected: Vec::new(),
                    verified_sources: None,
                }
            }
        };
        self.readings.push_back(current);
        while self.readings.len() > READINGS_KEPT {
            self.readings.pop_front();
        }
        view
    }
}

/// What was counted between two readings; a counter that went backwards was forgotten and
/// started again (an evicted limiter entry, a pruned tally entry), so all of it is new.
fn delta(current: Counter, base: Counter) -> Counter {
    if current.packets < base.packets || current.bytes < base.bytes {
        current
    } else {
        Counter {
            packets: current.packets - base.packets,
            bytes: current.bytes - base.bytes,
        }
    }
}

/// The `limit` keys with the most packets per second, with their (packets/s, bits/s).
fn top_rates<K: Clone + Eq + Hash + Ord>(
    current: &HashMap<K, Counter>,
    base: &HashMap<K, Counter>,
    elapsed: Duration,
    limit: usize,
) -> Vec<(K, (u64, u64))> {
    let seconds = elapsed.as_secs_f64();
    let mut rates: Vec<(K, (u64, u64))> = current
        .iter()
        .filter_map(|(key, now)| {
            let moved = delta(*now, base.get(key).copied().unwrap_or_default());
            let pps = (moved.packets as f64 / seconds).round() as u64;
            let bps = (moved.bytes as f64 * 8.0 / seconds).round() as u64;
            // Below one packet a second is not what `top` is for.
            (pps > 0).then(|| (key.clone(), (pps, bps)))
        })
        .collect();
    // Ties in a stable order, so that the screen does not flicker.
    rates.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
    rates.truncate(limit);
    rates
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use agent_common::stats::Action;

    use super::*;

    fn sample(source: &str, weight: u32) -> Sample {
        Sample {
            detail: 0,
            time: SystemTime::UNIX_EPOCH,
            source: source.parse().expect("address"),
            action: Action::Drop,
            reason: Reason::Blocklist,
            if_index: 2,
            weight,
            frame_len: 100,
            data: Vec::new(),
        }
    }

    fn reading(at: Instant, tally: &DropTally, passed: &[(&str, u64)]) -> Reading {
        Reading {
            at,
            dropped: tally.counts(),
            passed: passed
                .iter()
                .map(|(s, p)| {
                    (
                        s.to_string(),
                        Counter {
                            packets: *p,
                            bytes: p * 64,
                        },
                    )
                })
                .collect(),
            dropped_total: Counter::default(),
            passed_total: Counter::default(),
        }
    }

    #[test]
    fn rates_come_from_two_readings_and_rank_by_packets() {
        let options = ViewOptions {
            interval: Duration::from_secs(1),
            limit: 2,
            passed_by_source: true,
            sample_every: 100,
        };
        let start = Instant::now();
        let mut tally = DropTally::default();
        let mut history = TopHistory::default();
        let first = history.view(reading(start, &tally, &[("192.0.2.1", 10)]), &options);
        assert_eq!(first.interval_ms, 0);
        assert!(first.dropped.is_empty());

        for _ in 0..3 {
            tally.add(&sample("198.51.100.7", 100));
        }
        tally.add(&sample("198.51.100.8", 100));
        tally.add(&sample("198.51.100.9", 50));
        let later = start + Duration::from_secs(2);
        let view = history.view(
            reading(later, &tally, &[("192.0.2.1", 410), ("192.0.2.2", 2)]),
            &options,
        );
        assert_eq!(view.interval_ms, 2000);
        let dropped: Vec<(&str, u64)> = view
            .dropped
            .iter()
            .map(|r| (r.source.as_str(), r.packets_per_second))
            .collect();
        assert_eq!(dropped, [("198.51.100.7", 150), ("198.51.100.8", 50)]);
        assert_eq!(view.dropped[0].bits_per_second, 150 * 100 * 8);
        assert_eq!(view.passed[0].source, "192.0.2.1");
        assert_eq!(view.passed[0].packets_per_second, 200);
        assert_eq!(view.passed[1].packets_per_second, 1);
    }

    #[test]
    fn a_counter_that_restarted_counts_as_new() {
        let base = Counter {
            packets: 1000,
            bytes: 64_000,
        };
        let restarted = Counter {
            packets: 10,
            bytes: 640,
        };
        assert_eq!(delta(restarted, base), restarted);
    }

    #[test]
    fn the_tally_stays_bounded_and_keeps_the_heavy_sources() {
        let mut tally = DropTally::default();
        for _ in 0..5 {
            tally.add(&sample("203.0.113.1", 1000));
        }
        for i in 0..(MAX_TALLY_SOURCES as u32 * 3) {
            let address = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            tally.add(&sample(&address.to_string(), 1));
        }
        let counts = tally.counts();
        assert!(counts.len() <= MAX_TALLY_SOURCES);
        let heavy = counts
            .get(&("203.0.113.1".parse().expect("address"), Reason::Blocklist))
            .expect("the heavy source is kept");
        assert_eq!(heavy.packets, 5000);
    }
}
