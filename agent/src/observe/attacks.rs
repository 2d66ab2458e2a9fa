//! Attacks on protected destinations: from each entry's counters, read once a second, whether
//! its traffic is over the limit, for how long, and so whether it is under attack; from the
//! program's samples of its traffic, the baseline before an attack, the attack's own packets,
//! how spread their sources are, and the attack's fingerprint. The daemon acts on what this
//! reports ([`Change`]): logs, and installs or removes fingerprints.

use std::{
    collections::{HashSet, VecDeque},
    net::IpAddr,
    time::{Instant, SystemTime},
};

use agent_common::{protect::Fingerprint, stats::Reason};

use super::fingerprint::{self, Attributes, Described, Judged, NoFingerprint};
use crate::{
    config::{Protected, protect::Fingerprints},
    program::counters::ProtectedCounts,
};

/// Samples kept per entry: of its usual traffic (the baseline: at most
/// [`BASELINE_SAMPLES_PER_SECOND`] of each second, so that it spans a minute or more), and of
/// an attack.
const BASELINE_SAMPLES: usize = 6000;
const BASELINE_SAMPLES_PER_SECOND: usize = 100;
const ATTACK_SAMPLES: usize = 2000;
/// The ticks come about a second apart, give or take the timer's jitter: a duration within
/// this of its mark counts as reached.
const TICK_JITTER: std::time::Duration = std::time::Duration::from_millis(200);
/// Distinct sources counted per attack; past this the count says "at least".
const MAX_DISTINCT_SOURCES: usize = 65_536;
/// Ended attacks `moat attacks` remembers.
const RECENT_ATTACKS: usize = 64;

/// A sample of a protected entry's traffic, as the event reader hands it over.
#[derive(Clone, Debug)]
pub struct EntrySample {
    pub entry: u32,
    /// What the entry made of the packet: `no_match` (conformed), `dst_limit`, `fingerprint`.
    pub reason: Reason,
    pub source: IpAddr,
    /// `None`: a frame the agent could not read.
    pub attributes: Option<Attributes>,
}

/// Samples on their way from the event reader to the watch. Bounded: past
/// [`SampleInbox::CAPACITY`] between two ticks the newest are left out (the program samples
/// each entry at most 500 times a second per CPU).
#[derive(Debug, Default)]
pub struct SampleInbox {
    samples: Vec<EntrySample>,
}

impl SampleInbox {
    /// A second's samples of 16 busy entries on 8 CPUs (500 per entry and CPU).
    pub const CAPACITY: usize = 65_536;

    pub fn push(&mut self, sample: EntrySample) {
        if self.samples.len() < Self::CAPACITY {
            self.samples.push(sample);
        }
    }

    pub fn take(&mut self) -> Vec<EntrySample> {
        std::mem::take(&mut self.samples)
    }
}

/// One attack, running or ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Attack {
    pub protect: String,
    pub destination: String,
    pub protocol: String,
    pub started: SystemTime,
    pub ended: Option<SystemTime>,
    /// The highest rate of the traffic to the destination in any second of the attack.
    pub peak_pps: u64,
    pub peak_bps: u64,
    /// Packets dropped (or, in monitor mode, that would have been) over the limit and by the
    /// fingerprint.
    pub dropped_dst_limit: u64,
    pub dropped_fingerprint: u64,
    /// The fingerprint in force, as `src_port=… length=…`, and when it was installed.
    pub fingerprint: Option<String>,
    pub fingerprint_installed: Option<SystemTime>,
    /// Why no fingerprint is in force, when fingerprints are on and none is.
    pub no_fingerprint: Option<String>,
    /// Samples of the attack and their distinct sources.
    pub sources_sampled: u64,
    pub distinct_sources: u64,
}

/// What the daemon is to do, and log, after a tick.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Started {
        entry: u32,
        attack: Attack,
    },
    /// Install this fingerprint on the entry (it matches this much of the attack and of the
    /// baseline).
    Fingerprint {
        entry: u32,
        judged: Judged,
    },
    /// No fingerprint (said once per attack).
    NoFingerprint {
        entry: u32,
        why: String,
    },
    /// The attack ended: remove the entry's fingerprint, if it had one in force
    /// (`remove_fingerprint`; a reload removes the changed entries' fingerprints itself).
    Ended {
        entry: u32,
        attack: Attack,
        remove_fingerprint: bool,
    },
}

/// The state of one protected entry.
struct Watched {
    protect: Protected,
    fingerprints: Fingerprints,
    last: Option<(Instant, ProtectedCounts)>,
    /// The start of the current run of seconds over the limit, and the packets over it and
    /// the peak rates since (the attack's, should the run become one).
    over_since: Option<Instant>,
    streak_over: u64,
    streak_peak: (u64, u64),
    /// During an attack, the start of the current run of seconds under the limit.
    under_since: Option<Instant>,
    attack: Option<Attack>,
    attacks_total: u64,
    /// The last rates seen: packets and bits per second, and packets dropped per second.
    rate: (u64, u64, u64),
    baseline: VecDeque<Attributes>,
    /// Conforming samples since the last tick, and those of the second before: the
    /// baseline's only once the second after theirs is under the limit too (a flood's first
    /// moments conform, within the burst, and are no baseline).
    pending_baseline: Vec<Attributes>,
    probation_baseline: Vec<Attributes>,
    attack_samples: VecDeque<Attributes>,
    sources: HashSet<IpAddr>,
    sources_sampled: u64,
    fingerprint: Option<Fingerprint>,
    no_fingerprint_said: bool,
}

impl Watched {
    fn new(protect: Protected) -> Self {
        Self {
            fingerprints: protect.fingerprints,
            protect,
            last: None,
            over_since: None,
            streak_over: 0,
            streak_peak: (0, 0),
            under_since: None,
            attack: None,
            attacks_total: 0,
            rate: (0, 0, 0),
            baseline: VecDeque::new(),
            pending_baseline: Vec::new(),
            probation_baseline: Vec::new(),
            attack_samples: VecDeque::new(),
            sources: HashSet::new(),
            sources_sampled: 0,
            fingerprint: None,
            no_fingerprint_said: false,
        }
    }

    /// Forgets what the last run over the limit taught (it ended without an attack).
    fn clear_attack_samples(&mut self) {
        self.streak_over = 0;
        self.streak_peak = (0, 0);
        self.attack_samples.clear();
        self.sources.clear();
        self.sources_sampled = 0;
    }
}

/// A protected entry as `moat attacks` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct EntryState {
    pub protect: String,
    pub destination: String,
    pub protocol: String,
    pub pps_limit: u64,
    pub bps_limit: u64,
    /// The traffic to it in the last second, and what of it was dropped.
    pub pps: u64,
    pub bps: u64,
    pub dropped_pps: u64,
    pub under_attack: bool,
    pub attacks_total: u64,
}

/// Every protected entry's state and the recent attacks.
pub struct AttackWatch {
    entries: Vec<Watched>,
    recent: VecDeque<Attack>,
}

impl AttackWatch {
    pub fn new(protect: &[Protected]) -> Self {
        Self {
            entries: protect.iter().cloned().map(Watched::new).collect(),
            recent: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes a new configuration. Entries are matched by name: one that still watches the
    /// same traffic (destination, protocol, ports) keeps its baseline, its attack and its
    /// count of attacks, whatever else changed; its fingerprint, removed by the reload, is
    /// looked for again. One that watches other traffic, or is gone, ends its attack here
    /// (returned, to be logged).
    pub fn reconfigure(&mut self, protect: &[Protected], wall: SystemTime) -> Vec<Change> {
        let mut old: Vec<Option<Watched>> = self.entries.drain(..).map(Some).collect();
        let mut changes = Vec::new();
        for (index, entry) in protect.iter().enumerate() {
            let found = old
                .iter()
                .position(|w| w.as_ref().is_some_and(|w| w.protect.name == entry.name));
            let Some(mut watched) = found.and_then(|at| old[at].take()) else {
                self.entries.push(Watched::new(entry.clone()));
                continue;
            };
            let at = found.unwrap_or(index);
            let same_traffic = watched.protect.destination == entry.destination
                && watched.protect.protocol == entry.protocol
                && watched.protect.dst_ports == entry.dst_ports;
            if !same_traffic {
                if let Some(ended) = self.end(&mut watched, wall) {
                    changes.push(Change::Ended {
                        entry: at as u32,
                        attack: ended,
                        remove_fingerprint: false,
                    });
                }
                watched.baseline.clear();
            }
            if at != index || watched.protect != *entry {
                // Its counters restart (or are another index's): the next tick only reads.
                watched.last = None;
                watched.fingerprint = None;
            }
            watched.fingerprints = entry.fingerprints;
            watched.protect = entry.clone();
            self.entries.push(watched);
        }
        for (index, watched) in old.into_iter().enumerate() {
            if let Some(mut watched) = watched
                && let Some(ended) = self.end(&mut watched, wall)
            {
                changes.push(Change::Ended {
                    entry: index as u32,
                    attack: ended,
                    remove_fingerprint: false,
                });
            }
        }
        changes
    }

    /// Ends `watched`'s attack, if any, and remembers it.
    fn end(&mut self, watched: &mut Watched, wall: SystemTime) -> Option<Attack> {
        let mut attack = watched.attack.take()?;
        attack.ended = Some(wall);
        watched.under_since = None;
        watched.over_since = None;
        watched.fingerprint = None;
        watched.clear_attack_samples();
        self.remember(attack.clone());
        Some(attack)
    }

    /// The daemon could not install the fingerprint `tick` reported for `entry`: none is in
    /// force, and the next tick looks again.
    pub fn fingerprint_failed(&mut self, entry: u32) {
        if let Some(watched) = self.entries.get_mut(entry as usize) {
            watched.fingerprint = None;
            if let Some(attack) = &mut watched.attack {
                attack.fingerprint = None;
                attack.fingerprint_installed = None;
            }
        }
    }

    /// Before a configuration that changes some entries is put in force (their fingerprints
    /// are removed first): those entries have no fingerprint in force any more, so one is
    /// looked for again should the reload fail and their attack go on.
    pub fn forget_fingerprints_of_changed(&mut self, protect: &[Protected]) {
        for (index, watched) in self.entries.iter_mut().enumerate() {
            if protect.get(index) != Some(&watched.protect) {
                watched.fingerprint = None;
            }
        }
    }

    /// Takes a sample of an entry's traffic.
    pub fn sample(&mut self, sample: EntrySample) {
        let Some(watched) = self.entries.get_mut(sample.entry as usize) else {
            return;
        };
        let in_attack = watched.attack.is_some() || watched.over_since.is_some();
        match sample.reason {
            Reason::DstLimit | Reason::Fingerprint => {
                watched.sources_sampled += 1;
                if watched.sources.len() < MAX_DISTINCT_SOURCES {
                    watched.sources.insert(sample.source);
                }
                // What the fingerprint already drops is not what is left to find one for.
                if sample.reason == Reason::DstLimit
                    && let Some(attributes) = sample.attributes
                {
                    if watched.attack_samples.len() == ATTACK_SAMPLES {
                        watched.attack_samples.pop_front();
                    }
                    watched.attack_samples.push_back(attributes);
                }
            }
            // Conforming traffic is the baseline only while no attack is near: during one it
            // is the attack's share of the bucket as much as anyone's.
            _ if !in_attack => {
                if let Some(attributes) = sample.attributes
                    && watched.pending_baseline.len() < BASELINE_SAMPLES
                {
                    watched.pending_baseline.push(attributes);
                }
            }
            _ => {}
        }
    }

    /// Judges each entry by its counters now (`counts[i]` for entry `i`).
    pub fn tick(
        &mut self,
        now: Instant,
        wall: SystemTime,
        counts: &[ProtectedCounts],
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut ended = Vec::new();
        for (index, (watched, counts)) in self.entries.iter_mut().zip(counts).enumerate() {
            let entry = index as u32;
            let Some((then, before)) = watched.last.replace((now, *counts)) else {
                continue;
            };
            let elapsed = now.saturating_duration_since(then).as_secs_f64();
            if elapsed <= 0.0 {
                continue;
            }
            let delta = |after: u64, before: u64| after.saturating_sub(before);
            let arrived = counts.arrived();
            let before_arrived = before.arrived();
            let pps = (delta(arrived.packets, before_arrived.packets) as f64 / elapsed) as u64;
            let bps = (delta(arrived.bytes, before_arrived.bytes) as f64 * 8.0 / elapsed) as u64;
            let over = delta(counts.over.packets, before.over.packets);
            let fingerprinted = delta(counts.fingerprint.packets, before.fingerprint.packets);
            watched.rate = (pps, bps, ((over + fingerprinted) as f64 / elapsed) as u64);
            // Over the limit: some traffic was over it, or (with a fingerprint dropping the
            // attack before the bucket) more arrived than the limit allows.
            let limit = &watched.protect;
            // (A few packets over it in a second, under 1 % of them, are a burst's edge or
            // CPUs racing on the bucket, not an attack.)
            let arrived_packets = delta(arrived.packets, before_arrived.packets);
            let over_limit = over * 100 > arrived_packets
                || (limit.pps != 0 && pps > limit.pps)
                || (limit.bps != 0 && bps > limit.bps);
            let pending = std::mem::take(&mut watched.pending_baseline);
            let probation = std::mem::take(&mut watched.probation_baseline);
            if !over_limit && watched.attack.is_none() && watched.over_since.is_none() {
                // The second before this one was under the limit, and so is this one. Its
                // first samples, in a row: every n-th would alias with traffic that repeats.
                for attributes in probation.into_iter().take(BASELINE_SAMPLES_PER_SECOND) {
                    if watched.baseline.len() == BASELINE_SAMPLES {
                        watched.baseline.pop_front();
                    }
                    watched.baseline.push_back(attributes);
                }
                watched.probation_baseline = pending;
            }

            if let Some(attack) = &mut watched.attack {
                attack.peak_pps = attack.peak_pps.max(pps);
                attack.peak_bps = attack.peak_bps.max(bps);
                attack.dropped_dst_limit += over;
                attack.dropped_fingerprint += fingerprinted;
                attack.sources_sampled = watched.sources_sampled;
                attack.distinct_sources = watched.sources.len() as u64;
                if over_limit {
                    watched.under_since = None;
                } else if now.saturating_duration_since(*watched.under_since.get_or_insert(then))
                    + TICK_JITTER
                    >= limit.attack_end_after
                {
                    let mut attack = watched.attack.take().unwrap_or_else(|| unreachable!());
                    attack.ended = Some(wall);
                    let remove_fingerprint = watched.fingerprint.is_some();
                    watched.under_since = None;
                    watched.over_since = None;
                    watched.fingerprint = None;
                    watched.clear_attack_samples();
                    ended.push(attack.clone());
                    changes.push(Change::Ended {
                        entry,
                        attack,
                        remove_fingerprint,
                    });
                    continue;
                }
            } else if over_limit {
                let since = *watched.over_since.get_or_insert(then);
                watched.streak_over += over;
                watched.streak_peak = (
                    watched.streak_peak.0.max(pps),
                    watched.streak_peak.1.max(bps),
                );
                if now.saturating_duration_since(since) + TICK_JITTER >= limit.attack_after {
                    let attack = Attack {
                        protect: limit.name.clone(),
                        destination: limit.destination.to_string(),
                        protocol: limit.protocol.name().into(),
                        started: wall - now.saturating_duration_since(since),
                        ended: None,
                        peak_pps: watched.streak_peak.0,
                        peak_bps: watched.streak_peak.1,
                        dropped_dst_limit: watched.streak_over,
                        dropped_fingerprint: 0,
                        fingerprint: None,
                        fingerprint_installed: None,
                        no_fingerprint: None,
                        sources_sampled: watched.sources_sampled,
                        distinct_sources: watched.sources.len() as u64,
                    };
                    watched.attacks_total += 1;
                    watched.no_fingerprint_said = false;
                    watched.attack = Some(attack.clone());
                    changes.push(Change::Started { entry, attack });
                }
            } else {
                watched.over_since = None;
                watched.clear_attack_samples();
            }
            if watched.attack.is_some()
                && watched.fingerprint.is_none()
                && watched.fingerprints == Fingerprints::Auto
            {
                let attack: Vec<Attributes> = watched.attack_samples.iter().copied().collect();
                let baseline: Vec<Attributes> = watched.baseline.iter().copied().collect();
                match fingerprint::find(&attack, &baseline) {
                    Ok(judged) => {
                        watched.fingerprint = Some(judged.print);
                        if let Some(attack) = &mut watched.attack {
                            attack.fingerprint = Some(Described(&judged.print).to_string());
                            attack.fingerprint_installed = Some(wall);
                            attack.no_fingerprint = None;
                        }
                        changes.push(Change::Fingerprint { entry, judged });
                    }
                    Err(why) => {
                        if let Some(attack) = &mut watched.attack {
                            attack.no_fingerprint = Some(why.to_string());
                        }
                        // Too few samples yet is not worth a line: more come every second.
                        let worth_a_line = !matches!(why, NoFingerprint::TooFewAttackSamples(_));
                        if worth_a_line && !watched.no_fingerprint_said {
                            watched.no_fingerprint_said = true;
                            changes.push(Change::NoFingerprint {
                                entry,
                                why: why.to_string(),
                            });
                        }
                    }
                }
            }
        }
        for attack in ended {
            self.remember(attack);
        }
        changes
    }

    fn remember(&mut self, attack: Attack) {
        if self.recent.len() == RECENT_ATTACKS {
            self.recent.pop_front();
        }
        self.recent.push_back(attack);
    }

    /// Every entry's state now.
    pub fn entries(&self) -> Vec<EntryState> {
        self.entries
            .iter()
            .map(|w| EntryState {
                protect: w.protect.name.clone(),
                destination: w.protect.destination.to_string(),
                protocol: w.protect.protocol.name().into(),
                pps_limit: w.protect.pps,
                bps_limit: w.protect.bps,
                pps: w.rate.0,
                bps: w.rate.1,
                dropped_pps: w.rate.2,
                under_attack: w.attack.is_some(),
                attacks_total: w.attacks_total,
            })
            .collect()
    }

    /// Running attacks, then the ended ones, newest first.
    pub fn attacks(&self) -> Vec<Attack> {
        let running = self.entries.iter().filter_map(|w| w.attack.clone());
        running.chain(self.recent.iter().rev().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use agent_common::{protect::FP_SRC_PORT, stats::Counter};

    use super::*;
    use crate::config::Protocol;

    fn protected(pps: u64) -> Protected {
        Protected {
            name: "dns".into(),
            destination: "203.0.113.53/32".parse().expect("a CIDR"),
            protocol: Protocol::Udp,
            dst_ports: Vec::new(),
            pps,
            bps: 0,
            burst_packets: pps,
            attack_after: Duration::from_secs(2),
            attack_end_after: Duration::from_secs(3),
            fingerprints: Fingerprints::Auto,
        }
    }

    fn counts(conforming: u64, over: u64, fingerprint: u64) -> ProtectedCounts {
        let c = |packets| Counter {
            packets,
            bytes: packets * 100,
        };
        ProtectedCounts {
            conforming: c(conforming),
            over: c(over),
            fingerprint: c(fingerprint),
        }
    }

    fn sample(reason: Reason, src_port: u16, n: u32) -> EntrySample {
        EntrySample {
            entry: 0,
            reason,
            source: IpAddr::from([198, 18, (n >> 8) as u8, n as u8]),
            attributes: Some(Attributes {
                src_port: Some(src_port),
                ttl: 64,
                length: 60 + (n % 7) as u16,
                ..Attributes::default()
            }),
        }
    }

    /// 300 samples of a flood from source port 1900, over the limit.
    fn flood_samples(watch: &mut AttackWatch) {
        for n in 0..300 {
            watch.sample(sample(Reason::DstLimit, 1900, n));
        }
    }

    /// Feeds one second: the entry's counters move by `(conforming, over, fingerprint)`.
    struct Clock {
        start: Instant,
        second: u64,
        totals: (u64, u64, u64),
    }

    impl Clock {
        fn tick(&mut self, watch: &mut AttackWatch, per_second: (u64, u64, u64)) -> Vec<Change> {
            self.second += 1;
            self.totals.0 += per_second.0;
            self.totals.1 += per_second.1;
            self.totals.2 += per_second.2;
            watch.tick(
                self.start + Duration::from_secs(self.second),
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + self.second),
                &[counts(self.totals.0, self.totals.1, self.totals.2)],
            )
        }
    }

    #[test]
    fn an_attack_starts_after_attack_after_is_fingerprinted_and_ends_after_attack_end_after() {
        let mut watch = AttackWatch::new(&[protected(1000)]);
        let mut clock = Clock {
            start: Instant::now(),
            second: 0,
            totals: (0, 0, 0),
        };
        assert!(
            clock.tick(&mut watch, (0, 0, 0)).is_empty(),
            "the first reading"
        );
        // Usual traffic, under the limit, from ephemeral ports: the baseline.
        for n in 0..200 {
            watch.sample(sample(Reason::NoMatch, 30_000 + n as u16, n));
        }
        // A second's samples join the baseline once the next second is under the limit too.
        assert!(clock.tick(&mut watch, (500, 0, 0)).is_empty());
        assert!(clock.tick(&mut watch, (500, 0, 0)).is_empty());
        // A flood from source port 1900: over the limit for two seconds → an attack. Its
        // first second's conforming packets are no baseline (else the flood's own port would
        // look usual).
        for n in 0..300 {
            watch.sample(sample(Reason::DstLimit, 1900, n));
            watch.sample(sample(Reason::NoMatch, 1900, n));
        }
        assert!(
            clock.tick(&mut watch, (1000, 50_000, 0)).is_empty(),
            "one second over"
        );
        let changes = clock.tick(&mut watch, (1000, 50_000, 0));
        let [
            Change::Started { attack, .. },
            Change::Fingerprint { entry: 0, judged },
        ] = changes.as_slice()
        else {
            panic!("the attack starts and is fingerprinted at once: {changes:?}");
        };
        assert_eq!(attack.peak_pps, 51_000);
        assert_eq!(attack.distinct_sources, 300);
        assert_eq!(
            (judged.print.fields, judged.print.src_port),
            (FP_SRC_PORT, 1900)
        );
        // The fingerprint drops the flood before the bucket: still an attack, as more arrives
        // than the limit allows.
        for _ in 0..5 {
            assert!(clock.tick(&mut watch, (900, 0, 50_000)).is_empty());
        }
        let running = watch.attacks();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].dropped_fingerprint, 250_000);
        assert_eq!(running[0].fingerprint.as_deref(), Some("src_port=1900"));
        assert!(watch.entries()[0].under_attack);
        // Under the limit: ends after attack_end_after (3 s).
        assert!(clock.tick(&mut watch, (500, 0, 0)).is_empty());
        assert!(clock.tick(&mut watch, (500, 0, 0)).is_empty());
        let changes = clock.tick(&mut watch, (500, 0, 0));
        let [Change::Ended { attack, .. }] = changes.as_slice() else {
            panic!("ended: {changes:?}");
        };
        assert!(attack.ended.is_some());
        assert_eq!(
            attack.dropped_dst_limit, 100_000,
            "from the first second over"
        );
        assert!(!watch.entries()[0].under_attack);
        assert_eq!(watch.entries()[0].attacks_total, 1);
        assert_eq!(watch.attacks().len(), 1, "remembered as ended");
    }

    /// A flood's first moments conform (within the burst) and a reload mid-attack keeps the
    /// baseline: neither stops the fingerprint.
    #[test]
    fn the_baseline_keeps_a_floods_first_moments_out_and_outlives_a_reload() {
        let mut watch = AttackWatch::new(&[protected(1000)]);
        let mut clock = Clock {
            start: Instant::now(),
            second: 0,
            totals: (0, 0, 0),
        };
        clock.tick(&mut watch, (0, 0, 0));
        for second in 0..3u16 {
            for n in 0..100u16 {
                watch.sample(sample(Reason::NoMatch, 30_000 + n * 3 + second, n.into()));
            }
            clock.tick(&mut watch, (500, 0, 0));
        }
        // The flood starts: its first packets conform, in a second still under the limit …
        for n in 0..400 {
            watch.sample(sample(Reason::NoMatch, 1900, n));
        }
        assert!(clock.tick(&mut watch, (900, 0, 0)).is_empty());
        // … and the next second is over it: those samples were no baseline.
        flood_samples(&mut watch);
        assert!(clock.tick(&mut watch, (1000, 50_000, 0)).is_empty());
        let changes = clock.tick(&mut watch, (1000, 50_000, 0));
        assert!(
            matches!(
                changes.as_slice(),
                [Change::Started { .. }, Change::Fingerprint { .. }]
            ),
            "{changes:?}"
        );
        // A reload that raises the limit: the fingerprint (removed with the entry's old
        // definition) is found again from the same baseline at the next tick.
        assert!(
            watch
                .reconfigure(&[protected(5000)], SystemTime::UNIX_EPOCH)
                .is_empty()
        );
        assert!(
            clock.tick(&mut watch, (1000, 50_000, 0)).is_empty(),
            "counters re-read"
        );
        flood_samples(&mut watch);
        let changes = clock.tick(&mut watch, (1000, 50_000, 0));
        assert!(
            matches!(changes.as_slice(), [Change::Fingerprint { entry: 0, .. }]),
            "{changes:?}"
        );
        assert_eq!(watch.entries()[0].attacks_total, 1, "the same attack");
    }

    #[test]
    fn a_short_burst_over_the_limit_is_no_attack_and_no_baseline_means_no_fingerprint() {
        let mut watch = AttackWatch::new(&[protected(1000)]);
        let mut clock = Clock {
            start: Instant::now(),
            second: 0,
            totals: (0, 0, 0),
        };
        clock.tick(&mut watch, (0, 0, 0));
        assert!(clock.tick(&mut watch, (1000, 10, 0)).is_empty());
        assert!(
            clock.tick(&mut watch, (300, 0, 0)).is_empty(),
            "one second over, then under"
        );
        assert!(clock.tick(&mut watch, (1000, 10, 0)).is_empty());
        assert!(watch.attacks().is_empty());
        // Now a real one, with no baseline: no fingerprint, said once.
        flood_samples(&mut watch);
        let changes = clock.tick(&mut watch, (1000, 10, 0));
        assert!(
            matches!(
                changes.as_slice(),
                [Change::Started { .. }, Change::NoFingerprint { .. }]
            ),
            "{changes:?}"
        );
        assert!(
            clock.tick(&mut watch, (1000, 10, 0)).is_empty(),
            "said once"
        );
        // A reload that changes the entry's limit keeps its attack, and its count; one that
        // changes its destination ends it.
        let changes = watch.reconfigure(&[protected(2000)], SystemTime::UNIX_EPOCH);
        assert!(changes.is_empty(), "{changes:?}");
        assert!(watch.entries()[0].under_attack);
        let mut moved = protected(2000);
        moved.destination = "203.0.113.54/32".parse().expect("a CIDR");
        let changes = watch.reconfigure(&[moved], SystemTime::UNIX_EPOCH);
        assert!(matches!(
            changes.as_slice(),
            [Change::Ended {
                entry: 0,
                remove_fingerprint: false,
                ..
            }]
        ));
        assert!(!watch.entries()[0].under_attack);
        assert_eq!(watch.entries()[0].attacks_total, 1);
    }
}
