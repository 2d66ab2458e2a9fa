//! The daemon's side of the attack watch: once a second, the protected entries' counters and
//! samples go to the watch, and what it reports is logged and enforced (fingerprints installed
//! and removed).

use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::Daemon;
use crate::{
    config::Protected,
    control::protocol::{AttackView, AttacksView, ProtectedView, Reply},
    observe::{
        attacks::{Attack, Change},
        fingerprint::Described,
    },
};

/// How often the protected entries' counters are read.
pub const TICK: Duration = Duration::from_secs(1);

impl Daemon {
    /// Reads the protected entries' counters and samples, and acts on what the watch makes of
    /// them.
    pub(super) fn watch_attacks(&mut self) {
        if self.attacks.is_empty() {
            return;
        }
        let samples = match self.attack_samples.lock() {
            Ok(mut inbox) => inbox.take(),
            Err(_) => Vec::new(),
        };
        for sample in samples {
            self.attacks.sample(sample);
        }
        let counts = match self.counters.protected(self.attacks.len()) {
            Ok(counts) => counts,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "could not read the protected destinations' counters");
                return;
            }
        };
        let changes = self
            .attacks
            .tick(Instant::now(), SystemTime::now(), &counts);
        self.apply_attack_changes(changes);
    }

    fn apply_attack_changes(&mut self, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Started { attack, .. } => info!(
                    protect = attack.protect,
                    destination = attack.destination,
                    protocol = attack.protocol,
                    pps = attack.peak_pps,
                    bps = attack.peak_bps,
                    sources_sampled = attack.sources_sampled,
                    distinct_sources = attack.distinct_sources,
                    "attack started"
                ),
                Change::Fingerprint { entry, judged } => {
                    let protect = self.protect_name(entry);
                    let fingerprint = Described(&judged.print).to_string();
                    match self.fingerprints.install(entry, &judged.print) {
                        Ok(()) => info!(
                            protect,
                            fingerprint,
                            attack_coverage = format!("{:.1}%", judged.attack_coverage * 100.0),
                            baseline_coverage = format!("{:.1}%", judged.baseline_coverage * 100.0),
                            "attack fingerprint installed: its packets are dropped as `fingerprint`"
                        ),
                        Err(e) => {
                            warn!(
                                protect,
                                fingerprint,
                                error = %crate::error_chain(&e),
                                "could not install the attack fingerprint; the aggregate limit acts alone (retried next second)"
                            );
                            self.attacks.fingerprint_failed(entry);
                        }
                    }
                }
                Change::NoFingerprint { entry, why } => info!(
                    protect = self.protect_name(entry),
                    why, "no attack fingerprint; the aggregate limit acts alone"
                ),
                Change::Ended {
                    entry,
                    attack,
                    remove_fingerprint,
                } => {
                    if remove_fingerprint && let Err(e) = self.fingerprints.remove(entry) {
                        warn!(protect = attack.protect, error = %crate::error_chain(&e), "could not remove the attack fingerprint");
                    }
                    log_ended(&attack);
                }
            }
        }
    }

    /// At stop: a fingerprint lives as long as its attack, which no one watches once the daemon
    /// is gone (the pinned program keeps enforcing the rest).
    pub(super) fn remove_all_fingerprints(&mut self) {
        if let Err(e) = self.fingerprints.clear() {
            warn!(error = %crate::error_chain(&e), "could not remove the attack fingerprints");
        }
    }

    fn protect_name(&self, entry: u32) -> String {
        self.live
            .policy()
            .protect
            .get(entry as usize)
            .map_or_else(String::new, |p| p.name.clone())
    }

    /// Before `new` is put in force: removes the fingerprints of the entries it changes (an
    /// entry must not meet the fingerprint of the one it replaces) and restarts their
    /// counters (nor inherit its counts).
    pub(super) fn forget_changed_entries(&mut self, new: &[Protected]) {
        let old = &self.live.policy().protect;
        let changed: Vec<u32> = (0..old.len().max(new.len()))
            .filter(|&i| new.get(i) != old.get(i))
            .map(|i| i as u32)
            .collect();
        for &entry in &changed {
            if let Err(e) = self.fingerprints.remove(entry) {
                warn!(entry, error = %crate::error_chain(&e), "could not remove an attack fingerprint");
            }
        }
        if let Err(e) = self.counters.reset_protected(changed) {
            warn!(error = %crate::error_chain(&e), "could not restart the changed protected entries' counters");
        }
        self.attacks.forget_fingerprints_of_changed(new);
    }

    /// Takes the configuration in force: attacks on changed or removed entries end.
    pub(super) fn reconfigure_attacks(&mut self, protect: &[Protected]) {
        let changes = self.attacks.reconfigure(protect, SystemTime::now());
        self.apply_attack_changes(changes);
    }
}

impl Daemon {
    /// `moat attacks`: the protected entries and the running and recent attacks.
    pub(super) fn attacks_report(&self) -> Result<Reply, String> {
        let counts = self
            .counters
            .protected(self.attacks.len())
            .map_err(|e| crate::error_chain(&e))?;
        let protected = self
            .attacks
            .entries()
            .into_iter()
            .zip(counts)
            .map(|(entry, counts)| ProtectedView {
                protect: entry.protect,
                destination: entry.destination,
                protocol: entry.protocol,
                pps_limit: (entry.pps_limit != 0).then_some(entry.pps_limit),
                bps_limit: (entry.bps_limit != 0).then_some(entry.bps_limit),
                pps: entry.pps,
                bps: entry.bps,
                under_attack: entry.under_attack,
                attacks_total: entry.attacks_total,
                conforming_packets: counts.conforming.packets,
                over_packets: counts.over.packets,
                fingerprint_packets: counts.fingerprint.packets,
            })
            .collect();
        // Milliseconds: how long a fingerprint took is a matter of fractions of a second.
        let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        let attacks = self
            .attacks
            .attacks()
            .into_iter()
            .map(|a| AttackView {
                dropped: [
                    ("dst_limit".to_string(), a.dropped_dst_limit),
                    ("fingerprint".to_string(), a.dropped_fingerprint),
                ]
                .into(),
                started: time(a.started),
                ended: a.ended.map(time),
                fingerprint_installed: a.fingerprint_installed.map(time),
                protect: a.protect,
                destination: a.destination,
                protocol: a.protocol,
                peak_pps: a.peak_pps,
                peak_bps: a.peak_bps,
                fingerprint: a.fingerprint,
                no_fingerprint: a.no_fingerprint,
                sources_sampled: a.sources_sampled,
                distinct_sources: a.distinct_sources,
            })
            .collect();
        Ok(Reply::Attacks(AttacksView { protected, attacks }))
    }
}

fn log_ended(attack: &Attack) {
    let lasted = attack
        .ended
        .and_then(|end| end.duration_since(attack.started).ok())
        .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string());
    info!(
        protect = attack.protect,
        destination = attack.destination,
        lasted,
        peak_pps = attack.peak_pps,
        peak_bps = attack.peak_bps,
        dropped_dst_limit = attack.dropped_dst_limit,
        dropped_fingerprint = attack.dropped_fingerprint,
        fingerprint = attack.fingerprint.as_deref().unwrap_or("none"),
        "attack ended"
    );
}
