//! What the daemon does for each control request. Every change is validated whole before any
//! map is touched; a refused request changes nothing.

use std::{
    cmp::Reverse,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use agent_common::{
    lists::SOURCE_CLI,
    maps,
    rate_limit::{Ban, RateState, SourceKey},
    stats::{Action, Counter},
};
use ipnet::IpNet;
use tracing::{info, warn};

use super::{Daemon, interface_name};
use crate::{
    bans,
    config::{Cidr, Mode},
    control::protocol::{
        ChangeView, CounterView, EntryView, InterfaceView, ListName, MapFill, Reply, Request,
        Response, StatusView,
    },
    lists::ListChange,
    live::{ListKind, PolicyChange},
    map_access, metrics,
    state::{DynamicEntry, SavedBan, format_time},
    stats::Snapshot,
    top::{Reading, ViewOptions},
};

/// Bounds of `moat top`'s interval and rows.
const MIN_TOP_INTERVAL_MS: u64 = 100;
const MAX_TOP_INTERVAL_MS: u64 = 3_600_000;
const MAX_TOP_ROWS: u32 = 1000;
/// Longest comment kept with an entry.
const MAX_COMMENT_BYTES: usize = 256;
/// Longest TTL accepted: ten years.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl From<ListName> for ListKind {
    fn from(name: ListName) -> Self {
        match name {
            ListName::Allowlist => ListKind::Allow,
            ListName::Blocklist => ListKind::Block,
        }
    }
}

/// A rate limiter source as `moat top` prints it: the address, or the prefix it stands for.
fn source_name(address: IpAddr, (v4_prefix, v6_prefix): (u8, u8)) -> String {
    let (prefix, full) = match address {
        IpAddr::V4(_) => (v4_prefix, 32),
        IpAddr::V6(_) => (v6_prefix, 128),
    };
    if prefix >= full {
        address.to_string()
    } else {
        format!("{address}/{prefix}")
    }
}

/// Parses every CIDR of a request, or says which one is wrong.
fn parse_cidrs(texts: &[String]) -> Result<Vec<Cidr>, String> {
    if texts.is_empty() {
        return Err("no CIDR given".into());
    }
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse()
                .map_err(|e| format!("entry {} of {}: {e}", i + 1, texts.len()))
        })
        .collect()
}

fn change_for(kind: ListKind, change: ListChange) -> PolicyChange {
    match kind {
        ListKind::Allow => PolicyChange {
            allowlist: change,
            ..PolicyChange::default()
        },
        ListKind::Block => PolicyChange {
            blocklist: change,
            ..PolicyChange::default()
        },
    }
}

impl Daemon {
    pub(super) fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::ListAdd {
                list,
                cidrs,
                ttl_seconds,
                comment,
            } => self.list_add(list.into(), &cidrs, ttl_seconds, comment),
            Request::ListDel { list, cidrs } => self.list_del(list.into(), &cidrs),
            Request::ListShow { list } => Ok(self.list_show(list.into())),
            Request::Stats => self.stats(),
            Request::Status => Ok(self.status()),
            Request::Top { interval_ms, limit } => self.top(interval_ms, limit),
            // The socket server streams captures itself.
            Request::Capture { .. } => Err("a capture needs a connection of its own".into()),
            Request::Reload => self
                .reload("moat reload")
                .map(|()| Reply::Reloaded)
                .map_err(|e| {
                    let message = format!("reload rejected; the running policy stays: {e:#}");
                    warn!(cause = "moat reload", "{message}");
                    message
                }),
        };
        match result {
            Ok(reply) => Response::Ok(reply),
            Err(message) => Response::Error(message),
        }
    }

    fn list_add(
        &mut self,
        kind: ListKind,
        texts: &[String],
        ttl_seconds: Option<u64>,
        comment: Option<String>,
    ) -> Result<Reply, String> {
        let cidrs = parse_cidrs(texts)?;
        let ttl = match (kind, ttl_seconds) {
            (_, None) => None,
            (ListKind::Allow, Some(_)) => return Err("allowlist entries take no ttl".into()),
            (ListKind::Block, Some(0)) => return Err("ttl must be at least one second".into()),
            (ListKind::Block, Some(secs)) if Duration::from_secs(secs) > MAX_TTL => {
                return Err(format!(
                    "ttl of {secs} s is longer than {}",
                    humantime::format_duration(MAX_TTL)
                ));
            }
            (ListKind::Block, Some(secs)) => Some(Duration::from_secs(secs)),
        };
        if let Some(comment) = &comment
            && (comment.len() > MAX_COMMENT_BYTES || comment.chars().any(char::is_control))
        {
            return Err(format!(
                "a comment is at most {MAX_COMMENT_BYTES} bytes without control characters"
            ));
        }

        let entries = self.live.entries(kind);
        let mut change = ListChange::default();
        let mut view = ChangeView::default();
        let mut in_config = 0u64;
        for cidr in &cidrs {
            match entries.get(cidr) {
                None => change.upserts.push((*cidr, SOURCE_CLI)),
                Some(&source) if source != SOURCE_CLI => in_config += 1,
                Some(_) => {}
            }
        }
        change.upserts.sort();
        change.upserts.dedup();
        self.live
            .apply(&mut self.ebpf, change_for(kind, change.clone()))
            .map_err(|e| crate::error_chain(&e))?;

        let expires_at = ttl.map(|ttl| SystemTime::now() + ttl);
        let shared_comment: Option<std::sync::Arc<str>> = comment.as_deref().map(Into::into);
        for cidr in &cidrs {
            let entry = DynamicEntry {
                expires_at,
                comment: shared_comment.clone(),
            };
            match self.dynamic.insert(kind, *cidr, entry) {
                None => view.added += 1,
                Some(_) => view.updated += 1,
            }
        }
        if in_config > 0 {
            view.notes.push(format!(
                "{in_config} of these entries are also in the configuration, which keeps them \
                 after this entry is deleted or expires"
            ));
        }
        info!(
            list = kind.name(),
            added = view.added,
            updated = view.updated,
            ttl = %ttl.map_or("none".into(), |t| humantime::format_duration(t).to_string()),
            comment = comment.as_deref().unwrap_or(""),
            cause = "cli",
            first = %cidrs[0],
            "list entries added"
        );
        self.state_changed();
        Ok(Reply::Changed(view))
    }

    fn list_del(&mut self, kind: ListKind, texts: &[String]) -> Result<Reply, String> {
        let cidrs = parse_cidrs(texts)?;
        let banned = match kind {
            ListKind::Block => self.bans_in_force(),
            ListKind::Allow => Vec::new(),
        };
        let entries = self.live.entries(kind);
        let dynamic = self.dynamic.list(kind);
        let mut change = ListChange::default();
        let mut unban = Vec::new();
        let mut kept_by_config = 0;
        for cidr in &cidrs {
            let source = entries.get(cidr).copied();
            if dynamic.contains_key(cidr) {
                match source {
                    Some(SOURCE_CLI) => change.removals.push(*cidr),
                    _ => kept_by_config += 1,
                }
            } else if source.is_some() {
                return Err(format!(
                    "{cidr} comes from the configuration; edit it and reload to remove the entry"
                ));
            } else if let Some((_, ban)) = banned.iter().find(|(c, _)| c == cidr) {
                unban.push(ban.source);
            } else {
                return Err(format!("{cidr} is not in the {}", kind.name()));
            }
        }
        change.removals.sort();
        change.removals.dedup();
        self.live
            .apply(&mut self.ebpf, change_for(kind, change))
            .map_err(|e| crate::error_chain(&e))?;
        let mut view = ChangeView::default();
        for cidr in &cidrs {
            if self.dynamic.remove(kind, cidr).is_some() {
                view.removed += 1;
            }
        }
        if !unban.is_empty() {
            let mut map = map_access::hash::<SourceKey, Ban>(&mut self.ebpf, maps::BANS)
                .map_err(|e| crate::error_chain(&e))?;
            for source in &unban {
                // Gone already: it expired or was evicted meanwhile.
                let _ = map.remove(&bans::key_of(*source));
                view.removed += 1;
                info!(source = %source, cause = "cli", "unbanned");
            }
            // Lifted, so their expiry is not news.
            self.ban_expiries
                .retain(|Reverse((_, source))| !unban.contains(source));
        }
        if kept_by_config > 0 {
            view.notes.push(format!(
                "{kept_by_config} of these entries stay: the configuration holds them too"
            ));
        }
        info!(list = kind.name(), removed = view.removed, cause = "cli", first = %cidrs[0], "list entries deleted");
        self.state_changed();
        Ok(Reply::Changed(view))
    }

    /// Bans in force, each with the CIDR it covers (its source cut to the limiter's prefix).
    fn bans_in_force(&mut self) -> Vec<(Cidr, SavedBan)> {
        let rate = &self.live.policy().rate_limit;
        let (v4, v6) = (rate.ipv4_prefix, rate.ipv6_prefix);
        bans::active(&mut self.ebpf)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|ban| {
                let prefix = if ban.source.is_ipv4() { v4 } else { v6 };
                let net = IpNet::new(ban.source, prefix).ok()?;
                Some((Cidr::from(net), ban))
            })
            .collect()
    }

    fn list_show(&mut self, kind: ListKind) -> Reply {
        let dynamic = self.dynamic.list(kind);
        let entries = self.live.entries(kind);
        let mut views: Vec<EntryView> = entries
            .iter()
            .map(|(cidr, &source)| {
                let added = dynamic.get(cidr);
                EntryView {
                    cidr: cidr.to_string(),
                    expires_at: added
                        .filter(|_| source == SOURCE_CLI)
                        .and_then(|e| e.expires_at)
                        .map(format_time),
                    comment: added.and_then(|e| e.comment.as_deref().map(str::to_string)),
                    source: if source == SOURCE_CLI {
                        "cli"
                    } else {
                        "config"
                    }
                    .to_string(),
                }
            })
            .collect();
        if kind == ListKind::Block {
            for (cidr, ban) in self.bans_in_force() {
                views.push(EntryView {
                    cidr: cidr.to_string(),
                    expires_at: Some(format_time(ban.expires_at)),
                    comment: None,
                    source: "rate_limit".into(),
                });
            }
        }
        Reply::Entries { entries: views }
    }

    fn stats(&self) -> Result<Reply, String> {
        let snapshot = Snapshot::of_ebpf(&self.ebpf).map_err(|e| crate::error_chain(&e))?;
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

    fn status(&mut self) -> Reply {
        let info = crate::loader::program(&mut self.ebpf)
            .ok()
            .and_then(|p| p.info().ok());
        let capacities = self.live.capacities();
        let mut fills = Vec::new();
        for kind in [ListKind::Allow, ListKind::Block] {
            let counts = self.live.counts(kind);
            let name = kind.name();
            fills.push(MapFill {
                map: format!("{name} (IPv4 /24 and shorter, in the /24 table)"),
                entries: counts.total() as u64 - counts.v4_long() as u64 - counts.v6() as u64,
                capacity: u64::from(u32::MAX),
            });
            let (v4_capacity, v6_capacity) = match kind {
                ListKind::Allow => (capacities.allow_v4_long, capacities.allow_v6),
                ListKind::Block => (capacities.block_v4_long, capacities.block_v6),
            };
            fills.push(MapFill {
                map: format!("{name} (IPv4 longer than /24)"),
                entries: counts.v4_long() as u64,
                capacity: u64::from(v4_capacity),
            });
            fills.push(MapFill {
                map: format!("{name} (IPv6)"),
                entries: counts.v6() as u64,
                capacity: u64::from(v6_capacity),
            });
        }
        let bans = map_access::hash::<SourceKey, Ban>(&mut self.ebpf, maps::BANS)
            .map(|hash| hash.keys().filter(Result::is_ok).count() as u64)
            .unwrap_or(0);
        let sources = self.rate_limited_sources();
        for (map, entries) in [("bans", bans), ("rate-limited sources", sources)] {
            fills.push(MapFill {
                map: map.into(),
                entries,
                capacity: u64::from(capacities.rate_sources),
            });
        }
        Reply::Status(StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            mode: match self.live.policy().mode {
                Mode::Enforce => "enforce",
                Mode::Monitor => "monitor",
            }
            .into(),
            program_id: info.as_ref().map(|i| i.id()),
            program_tag: info.as_ref().map(|i| format!("{:016x}", i.tag())),
            interfaces: self
                .interfaces
                .iter()
                .map(|i| InterfaceView {
                    name: i.name.clone(),
                    if_index: i.if_index,
                    xdp_mode: i.mode.name().into(),
                    pinned: i.pinned(),
                })
                .collect(),
            maps: fills,
            bpffs: self.pins.as_ref().map(|p| p.root().display().to_string()),
            state_dir: self.store.dir().display().to_string(),
            config: self.source.path.as_ref().map(|p| p.display().to_string()),
        })
    }

    /// Sources the rate limiter tracks now.
    fn rate_limited_sources(&mut self) -> u64 {
        map_access::hash::<SourceKey, RateState>(&mut self.ebpf, maps::RATE_LIMITS)
            .map(|hash| hash.keys().filter(Result::is_ok).count() as u64)
            .unwrap_or(0)
    }

    fn top(&mut self, interval_ms: u64, limit: u32) -> Result<Reply, String> {
        if !(MIN_TOP_INTERVAL_MS..=MAX_TOP_INTERVAL_MS).contains(&interval_ms) {
            return Err(format!(
                "interval_ms must be in {MIN_TOP_INTERVAL_MS}..={MAX_TOP_INTERVAL_MS}"
            ));
        }
        if !(1..=MAX_TOP_ROWS).contains(&limit) {
            return Err(format!("limit must be in 1..={MAX_TOP_ROWS}"));
        }
        let counters = Snapshot::of_ebpf(&self.ebpf).map_err(|e| crate::error_chain(&e))?;
        let (mut dropped_total, mut passed_total) = (Counter::default(), Counter::default());
        for row in &counters.rows {
            match row.action {
                Action::Pass => passed_total = passed_total.plus(row.counter),
                Action::Drop | Action::WouldDrop => dropped_total = dropped_total.plus(row.counter),
            }
        }
        let policy = self.live.policy();
        let rate = &policy.rate_limit;
        let (passed_by_source, sample_every) = (rate.is_on(), policy.sample_every);
        let prefixes = (rate.ipv4_prefix, rate.ipv6_prefix);
        let mut passed = std::collections::HashMap::new();
        if passed_by_source {
            let limiter =
                map_access::hash::<SourceKey, RateState>(&mut self.ebpf, maps::RATE_LIMITS)
                    .map_err(|e| crate::error_chain(&e))?;
            for (key, state) in limiter.iter().filter_map(Result::ok) {
                if state.passed_packets == 0 {
                    continue;
                }
                if let Some(address) = bans::address_of(key.family, key.addr) {
                    let counter = Counter {
                        packets: state.passed_packets,
                        bytes: state.passed_bytes,
                    };
                    passed.insert(source_name(address, prefixes), counter);
                }
            }
        }
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
        Ok(Reply::Top(self.top.view(reading, &options)))
    }

    /// The Prometheus metrics, read now.
    pub(super) fn metrics(&mut self) -> String {
        let counters = match Snapshot::of_ebpf(&self.ebpf) {
            Ok(counters) => counters,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "could not read the counters for metrics");
                return String::new();
            }
        };
        let mut list_entries = Vec::new();
        for kind in [ListKind::Allow, ListKind::Block] {
            let counts = self.live.counts(kind);
            let v6 = counts.v6() as u64;
            let name = kind.name();
            list_entries.push((name, "ipv4", counts.total() as u64 - v6));
            list_entries.push((name, "ipv6", v6));
        }
        let bans_active = bans::active(&mut self.ebpf).map_or(0, |b| b.len() as u64);
        let rate_limited_sources = self.rate_limited_sources();
        let program_tag = crate::loader::program(&mut self.ebpf)
            .ok()
            .and_then(|p| p.info().ok())
            .map(|info| format!("{:016x}", info.tag()));
        let interfaces = &self.interfaces;
        let interface_name = |if_index| interface_name(interfaces, if_index);
        let reading = metrics::Reading {
            counters: &counters,
            interface_name: &interface_name,
            list_entries,
            bans_active,
            rate_limited_sources,
            program_tag,
        };
        metrics::render(&reading).unwrap_or_else(|e| {
            warn!(error = %e, "could not render the metrics");
            String::new()
        })
    }

    /// Logs the bans whose time has come; one renewed meanwhile (banned again) stays quiet.
    fn expire_bans(&mut self, now: SystemTime) {
        let now_ns = bans::monotonic_now_ns();
        let mut ended = false;
        while let Some(Reverse((at, source))) = self.ban_expiries.peek().copied() {
            if at > now {
                break;
            }
            self.ban_expiries.pop();
            let in_force = map_access::hash::<SourceKey, Ban>(&mut self.ebpf, maps::BANS)
                .ok()
                .and_then(|map| map.get(&bans::key_of(source), 0).ok())
                .is_some_and(|ban| ban.expires_at > now_ns);
            if !in_force {
                info!(source = %source, cause = "ttl", "ban expired");
                ended = true;
            }
        }
        if ended {
            self.state_changed();
        }
    }

    /// Removes the entries whose TTL has passed.
    pub(super) fn expire(&mut self, now: SystemTime) {
        self.expire_bans(now);
        for kind in [ListKind::Allow, ListKind::Block] {
            let expired = self.dynamic.expired(kind, now);
            if expired.is_empty() {
                continue;
            }
            let entries = self.live.entries(kind);
            let change = ListChange {
                upserts: Vec::new(),
                removals: expired
                    .iter()
                    .filter(|c| entries.get(c) == Some(&SOURCE_CLI))
                    .copied()
                    .collect(),
            };
            if let Err(e) = self.live.apply(&mut self.ebpf, change_for(kind, change)) {
                warn!(error = %crate::error_chain(&e), "expired entries could not be removed; retrying");
                continue;
            }
            for cidr in &expired {
                self.dynamic.remove(kind, cidr);
                info!(list = kind.name(), cidr = %cidr, cause = "ttl", "list entry expired");
            }
            self.state_changed();
        }
    }
}
