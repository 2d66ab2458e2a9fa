//! The daemon's reports: counters (`moat stats`), its state (`moat status`), the top sources
//! (`moat top`) and the Prometheus metrics.

use std::{net::IpAddr, time::Duration};

use agent_common::stats::{Action, Counter};
use tracing::warn;

use super::{Daemon, interfaces::interface_name};
use crate::{
    config::{ListKind, Mode},
    control::protocol::{CounterView, InterfaceView, MapFill, Reply, StatusView, TopProtected},
    observe::{
        metrics,
        top::{Reading, ViewOptions},
    },
    program::{capacities::PrefixCounts, counters::Framing, loader},
};

/// Bounds of `moat top`'s interval and rows.
const MIN_TOP_INTERVAL_MS: u64 = 100;
const MAX_TOP_INTERVAL_MS: u64 = 3_600_000;
const MAX_TOP_ROWS: u32 = 1000;

/// A rate limiter source as `moat top` prints it: the address, or the prefix it stands for.
fn source_name(address: IpAddr, prefix: u8) -> String {
    let full = if address.is_ipv4() { 32 } else { 128 };
    if prefix >= full {
        address.to_string()
    } else {
        format!("{address}/{prefix}")
    }
}

impl Daemon {
    /// The kernel's information about the running program.
    fn program_info(&mut self) -> Option<aya::programs::ProgramInfo> {
        loader::program(&mut self.ebpf)
            .ok()
            .and_then(|p| p.info().ok())
    }

    pub(super) fn stats(&self) -> Result<Reply, String> {
        let snapshot = self
            .counters
            .snapshot()
            .map_err(|e| crate::error_chain(&e))?;
        let counters = snapshot
            .rows
            .iter()
            .map(|row| CounterView {
                interface: interface_name(&self.interfaces, row.if_index),
                action: row.action.name().into(),
                reason: row.reason.name().into(),
                packets: row.counter.packets,
                bytes: row.counter.bytes,
            })
            .collect();
        Ok(Reply::Stats { counters })
    }

    pub(super) fn status(&mut self) -> Reply {
        let info = self.program_info();
        let capacities = self.live.capacities();
        let mut fills = Vec::new();
        for kind in ListKind::ALL {
            let counts = self.live.counts(kind);
            fills.push(MapFill {
                map: format!("{} (IPv4 /24 and shorter, in the /24 table)", kind.name()),
                entries: counts.total() as u64 - counts.v4_long() as u64 - counts.v6() as u64,
                capacity: u64::from(u32::MAX),
            });
        }
        let prefixes = PrefixCounts::of(&[
            self.live.counts(ListKind::Allow),
            self.live.counts(ListKind::Block),
        ]);
        for (map, entries, capacity) in [
            ("IPv4 longer than /24", prefixes.v4_long, capacities.v4_long),
            ("IPv6", prefixes.v6, capacities.v6),
        ] {
            fills.push(MapFill {
                // A prefix in both lists is one entry: the count is an upper bound.
                map: format!("allowlist and blocklist ({map}; at most)"),
                entries: entries as u64,
                capacity: u64::from(capacity),
            });
        }
        // From the latest walk: the loop never walks a map that a flood can fill.
        let scan = self.limiter_scan();
        let (bans, sources) = (scan.ban_entries, scan.sources);
        for (map, entries, capacity) in [
            ("bans", bans, capacities.rate_sources),
            ("rate-limited sources", sources, capacities.rate_slots()),
        ] {
            fills.push(MapFill {
                map: map.into(),
                entries,
                capacity: u64::from(capacity),
            });
        }
        if self.live.policy().syn_proxy.is_some() {
            fills.push(MapFill {
                map: "verified sources (SYN proxy)".into(),
                entries: scan.verified,
                capacity: u64::from(agent_common::maps::VERIFIED_DEFAULT_CAPACITY),
            });
        }
        Reply::Status(Box::new(StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            mode: match self.live.policy().mode {
                Mode::Enforce => "enforce",
                Mode::Monitor => "monitor",
            }
            .into(),
            program_id: info.as_ref().map(aya::programs::ProgramInfo::id),
            program_tag: info.as_ref().map(|i| format!("{:016x}", i.tag())),
            interfaces: self
                .interfaces
                .iter()
                .map(|i| {
                    let kernel = i.kernel_view(info.as_ref().map(aya::programs::ProgramInfo::id));
                    InterfaceView {
                        name: i.name.clone(),
                        if_index: i.if_index,
                        xdp_mode: i.mode.name().into(),
                        framing: match i.framing {
                            Framing::Ethernet => "ethernet",
                            Framing::Ip => "ip",
                        }
                        .into(),
                        pinned: kernel.pinned,
                        attached: kernel.attached,
                        link_id: kernel.link_id,
                    }
                })
                .collect(),
            maps: fills,
            bpffs: self.pins.as_ref().map(|p| p.root().display().to_string()),
            state_dir: self.store.dir().display().to_string(),
            config: self.source.path.as_ref().map(|p| p.display().to_string()),
            persistence_error: self.persistence.error.clone(),
            fleet: self
                .fleet
                .as_ref()
                .map(|fleet| fleet.view(self.dynamic.fleet_entries())),
        }))
    }

    pub(super) fn top(&mut self, interval_ms: u64, limit: u32) -> Result<Reply, String> {
        if !(MIN_TOP_INTERVAL_MS..=MAX_TOP_INTERVAL_MS).contains(&interval_ms) {
            return Err(format!(
                "interval_ms must be in {MIN_TOP_INTERVAL_MS}..={MAX_TOP_INTERVAL_MS}"
            ));
        }
        if !(1..=MAX_TOP_ROWS).contains(&limit) {
            return Err(format!("limit must be in 1..={MAX_TOP_ROWS}"));
        }
        let counters = self
            .counters
            .snapshot()
            .map_err(|e| crate::error_chain(&e))?;
        let (mut dropped_total, mut passed_total) = (Counter::default(), Counter::default());
        for row in &counters.rows {
            match row.action {
                Action::Pass => passed_total = passed_total.plus(row.counter),
                // A SYN answered with a cookie never reaches the stack either.
                Action::Drop | Action::WouldDrop | Action::Tx | Action::WouldTx => {
                    dropped_total = dropped_total.plus(row.counter)
                }
            }
        }
        let policy = self.live.policy();
        let rate = &policy.rate_limit;
        let (passed_by_source, sample_every) = (rate.is_on(), policy.sample_every);
        let passed = if passed_by_source {
            self.limiter_scan()
                .passed
                .iter()
                .map(|(address, counter)| {
                    (source_name(*address, rate.prefix_of(*address)), *counter)
                })
                .collect()
        } else {
            std::collections::HashMap::new()
        };
        let dropped = self
            .drops
            .lock()
            .map_err(|_| "the drop tally is poisoned".to_string())?
            .counts();
        let reading = Reading {
            at: std::time::Instant::now(),
            dropped,
            passed,
            dropped_total,
            passed_total,
        };
        let options = ViewOptions {
            interval: Duration::from_millis(interval_ms),
            limit: limit as usize,
            passed_by_source,
            sample_every,
        };
        let mut view = self.top.view(reading, &options);
        view.verified_sources = policy
            .syn_proxy
            .is_some()
            .then(|| self.limiter_scan().verified);
        view.protected = self
            .attacks
            .entries()
            .into_iter()
            .map(|entry| TopProtected {
                protect: entry.protect,
                packets_per_second: entry.pps,
                bits_per_second: entry.bps,
                dropped_packets_per_second: entry.dropped_pps,
                under_attack: entry.under_attack,
            })
            .collect();
        Ok(Reply::Top(view))
    }

    /// The Prometheus metrics, read now.
    pub(super) fn metrics(&mut self) -> String {
        let counters = match self.counters.snapshot() {
            Ok(counters) => counters,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "could not read the counters for metrics");
                return String::new();
            }
        };
        let mut list_entries = Vec::new();
        for kind in ListKind::ALL {
            let counts = self.live.counts(kind);
            let v6 = counts.v6() as u64;
            let name = kind.name();
            list_entries.push((name, "ipv4", counts.total() as u64 - v6));
            list_entries.push((name, "ipv6", v6));
        }
        let bans_active = self.bans_in_force_now().len() as u64;
        let scan = self.limiter_scan();
        let (rate_limited_sources, verified_sources) = (scan.sources, scan.verified);
        let program_tag = self
            .program_info()
            .map(|info| format!("{:016x}", info.tag()));
        let interfaces = &self.interfaces;
        let interface_name = |if_index| interface_name(interfaces, if_index);
        let protected = self
            .attacks
            .entries()
            .into_iter()
            .enumerate()
            .map(|(index, entry)| metrics::ProtectedReading {
                name: entry.protect,
                counts: counters.protected(index as u32),
                under_attack: entry.under_attack,
                attacks_total: entry.attacks_total,
            })
            .collect();
        let reading = metrics::Reading {
            counters: &counters,
            protected,
            interface_name: &interface_name,
            list_entries,
            bans_active,
            rate_limited_sources,
            verified_sources,
            program_tag,
            state_saved: self.persistence.error.is_none(),
            state_save_failures: self.persistence.failures,
            fleet: self
                .fleet
                .as_ref()
                .map(|fleet| fleet.reading(self.dynamic.fleet_entries())),
        };
        metrics::render(&reading).unwrap_or_else(|e| {
            warn!(error = %e, "could not render the metrics");
            String::new()
        })
    }
}
