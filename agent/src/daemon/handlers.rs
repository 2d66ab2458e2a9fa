//! What the daemon does for each control request, and the list changes: add, delete, show,
//! expire. Every change is validated whole before any map is touched; a refused request
//! changes nothing.

use std::{
    cmp::Reverse,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use agent_common::lists::SOURCE_CLI;
use ipnet::IpNet;
use rayon::{
    iter::IntoParallelRefIterator as _, iter::ParallelIterator as _, slice::ParallelSliceMut as _,
};
use tracing::{error, info, warn};

use super::{
    Daemon,
    journal::Record,
    state::{DynamicEntry, format_time},
};
use crate::{
    config::{Cidr, ListKind, MAX_COMMENT_BYTES, MAX_ENTRY_TTL, Share},
    control::protocol::{ChangeView, Cidrs, EntryView, Reply, Request, Response},
    fleet::{Change, FleetKey, FleetRecord},
    program::{
        limiter::ActiveBan,
        lists::ListChange,
        live::{PolicyChange, SIDE_BY_SIDE_FROM},
    },
};

/// Expiries of one list at one moment up to this many are logged one line each; more (an
/// import with a TTL ending) are logged as one line, as the request that added them was.
const EXPIRIES_LOGGED_EACH: usize = 8;

/// The CIDRs of a request (parsed as it was decoded); at least one.
fn given(cidrs: Cidrs) -> Result<Vec<Cidr>, String> {
    if cidrs.0.is_empty() {
        return Err("no CIDR given".into());
    }
    Ok(cidrs.0)
}

impl Daemon {
    pub(super) fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::ListAdd {
                list,
                cidrs,
                ttl_seconds,
                comment,
            } => self.list_add(list, cidrs, ttl_seconds, comment),
            Request::ListDel { list, cidrs } => self.list_del(list, cidrs),
            Request::ListShow { list } => Ok(self.list_show(list)),
            Request::Stats => self.stats(),
            Request::Status => Ok(self.status()),
            Request::Top { interval_ms, limit } => self.top(interval_ms, limit),
            Request::Attacks => self.attacks_report(),
            // The socket server streams captures itself.
            Request::Capture { .. } => Err("a capture needs a connection of its own".into()),
            Request::Reload => self
                .reload("moat reload")
                .map(|needs_restart| Reply::Reloaded { needs_restart })
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
        cidrs: Cidrs,
        ttl_seconds: Option<u64>,
        comment: Option<String>,
    ) -> Result<Reply, String> {
        let mut cidrs = given(cidrs)?;
        // In order, each once: the entries are merged into the lists in one pass.
        cidrs.par_sort_unstable_by_key(Cidr::sort_key);
        cidrs.dedup();
        let ttl = match (kind, ttl_seconds) {
            (_, None) => None,
            (ListKind::Allow, Some(_)) => return Err("allowlist entries take no ttl".into()),
            (ListKind::Block, Some(0)) => return Err("ttl must be at least one second".into()),
            (ListKind::Block, Some(secs)) if Duration::from_secs(secs) > MAX_ENTRY_TTL => {
                return Err(format!(
                    "ttl of {secs} s is longer than {}",
                    humantime::format_duration(MAX_ENTRY_TTL)
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
        // An import's work is spread over the worker threads; a few entries' stays here.
        let large = cidrs.len() >= SIDE_BY_SIDE_FROM;
        let held: Vec<Option<u32>> = if large {
            (cidrs.par_iter())
                .map(|cidr| entries.get(cidr).copied())
                .collect()
        } else {
            cidrs
                .iter()
                .map(|cidr| entries.get(cidr).copied())
                .collect()
        };
        for (cidr, source) in cidrs.iter().zip(held) {
            match source {
                None => change.upserts.push((*cidr, SOURCE_CLI)),
                Some(source) if source != SOURCE_CLI => in_config += 1,
                Some(_) => {}
            }
        }
        change.upserts.sort();
        change.upserts.dedup();

        let expires_at = ttl.map(|ttl| SystemTime::now() + ttl);
        let shared_comment: Option<Arc<str>> = comment.as_deref().map(Into::into);
        // Shared whole or not at all: the entries are the fleet's once handed over.
        let fleet = self
            .fleet
            .as_ref()
            .filter(|fleet| fleet.settings.shares(Share::Cli));
        let origin = match fleet {
            Some(fleet) if fleet.has_room(cidrs.len()) => Some(fleet.origin()),
            Some(fleet) => {
                view.notes.push(fleet.no_room_note(cidrs.len()));
                None
            }
            None => None,
        };
        let record = Record::add(
            kind,
            &cidrs,
            expires_at,
            comment.as_deref(),
            origin.as_deref(),
        );
        // The journal's line is encoded while the maps are written (for an import, tens of
        // milliseconds each); it is written only once the change is in force.
        let live = &mut self.live;
        let change = PolicyChange::of_list(kind, change);
        let (applied, line) = if large {
            rayon::join(|| live.apply(change), || record.line())
        } else {
            (live.apply(change), record.line())
        };
        drop(record);
        applied.map_err(|e| crate::error_chain(&e))?;

        let entry = DynamicEntry {
            expires_at,
            comment: shared_comment,
            origin: origin.clone(),
        };
        let updated = Arc::make_mut(&mut self.dynamic).insert_all(kind, &cidrs, entry);
        view.updated = updated as u64;
        view.added = (cidrs.len() - updated) as u64;
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
        view.not_persisted = self.persist(line);
        if let (Some(origin), Some(fleet)) = (origin, self.fleet.as_mut()) {
            let changes: Vec<Change> = cidrs
                .iter()
                .map(|cidr| {
                    let record = FleetRecord {
                        expires_at,
                        comment: comment.clone(),
                        origin: origin.to_string(),
                    };
                    Change::Put(
                        FleetKey {
                            list: kind,
                            cidr: *cidr,
                        },
                        record,
                    )
                })
                .collect();
            // The room was checked before the entries were tagged as the fleet's.
            view.notes
                .push(fleet.hand_over(changes).unwrap_or_else(|note| note));
        }
        self.state_changed();
        Ok(Reply::Changed(view))
    }

    fn list_del(&mut self, kind: ListKind, cidrs: Cidrs) -> Result<Reply, String> {
        let cidrs = given(cidrs)?;
        let entries = self.live.entries(kind);
        let mut change = ListChange::default();
        let mut unban = Vec::new();
        // Bans lifted along with a fleet entry that shared them (one entry, counted once).
        let mut unban_with_entry = Vec::new();
        // Bans lifted that were no entry here: shared with the fleet, they are its entries.
        let mut lifted_bans = Vec::new();
        let mut kept_by_config = 0;
        for cidr in &cidrs {
            let source = entries.get(cidr).copied();
            if self.dynamic.contains(kind, cidr) {
                match source {
                    Some(SOURCE_CLI) => change.removals.push(*cidr),
                    _ => kept_by_config += 1,
                }
                // A ban shared with the fleet is also a fleet entry: both go.
                if let Some(source) = (kind == ListKind::Block)
                    .then(|| self.banned_source(cidr))
                    .flatten()
                {
                    unban.push(source);
                    unban_with_entry.push(source);
                }
            } else if source.is_some() {
                return Err(format!(
                    "{cidr} comes from the configuration; edit it and reload to remove the entry"
                ));
            } else if let Some(source) = (kind == ListKind::Block)
                .then(|| self.banned_source(cidr))
                .flatten()
            {
                unban.push(source);
                lifted_bans.push(*cidr);
            } else {
                return Err(format!("{cidr} is not in the {}", kind.name()));
            }
        }
        change.removals.sort();
        change.removals.dedup();
        self.live
            .apply(PolicyChange::of_list(kind, change))
            .map_err(|e| crate::error_chain(&e))?;
        let mut view = ChangeView::default();
        // A fleet entry deleted here is deleted from the fleet.
        let mut fleet_deletes = Vec::new();
        for cidr in &cidrs {
            if let Some(removed) = Arc::make_mut(&mut self.dynamic).remove(kind, cidr) {
                view.removed += 1;
                if removed.origin.is_some() {
                    fleet_deletes.push(Change::Delete(FleetKey {
                        list: kind,
                        cidr: *cidr,
                    }));
                }
            }
        }
        if let Some(fleet) = self.fleet.as_ref()
            && fleet.settings.shares(Share::Bans)
        {
            fleet_deletes.extend(lifted_bans.iter().map(|cidr| {
                Change::Delete(FleetKey {
                    list: kind,
                    cidr: *cidr,
                })
            }));
        }
        if let Some(fleet) = self.fleet.as_mut()
            && !fleet_deletes.is_empty()
        {
            view.notes
                .push(fleet.hand_over(fleet_deletes).unwrap_or_else(|note| note));
        }
        if !unban.is_empty() {
            for source in &unban {
                if let Err(e) = self.limiter.lift(*source) {
                    warn!(source = %source, error = %crate::error_chain(&e), "could not lift the ban");
                    continue;
                }
                self.lifted.push((std::time::Instant::now(), *source));
                if !unban_with_entry.contains(source) {
                    view.removed += 1;
                }
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
        view.not_persisted = self.persist(Record::del(kind, &cidrs).line());
        self.state_changed();
        Ok(Reply::Changed(view))
    }

    /// Appends a change's journal line ([`Record::line`]); `Some(why)` when it could not be
    /// (the change is in force, but lost at a restart unless a later save succeeds).
    fn persist(&mut self, line: serde_json::Result<Vec<u8>>) -> Option<String> {
        let error = self.store.record_line(line).err()?;
        let why = crate::error_chain(&error);
        error!(error = %why, "a change is in force but not saved");
        self.persistence.failed(why.clone());
        Some(why)
    }

    /// Lifts the ban `cidr` names, if there is one (a fleet entry that shared it was deleted).
    pub(super) fn lift_ban_of(&mut self, cidr: &Cidr) {
        let Some(source) = self.banned_source(cidr) else {
            return;
        };
        match self.limiter.lift(source) {
            Ok(()) => {
                self.lifted.push((std::time::Instant::now(), source));
                self.ban_expiries.retain(|Reverse((_, s))| *s != source);
                info!(source = %source, cause = "fleet", "unbanned");
            }
            Err(e) => {
                warn!(source = %source, error = %crate::error_chain(&e), "could not lift the ban");
            }
        }
    }

    /// The source whose ban `cidr` names (a source cut to the limiter's prefix), if it is banned
    /// now: one lookup, not a walk of the ban map.
    fn banned_source(&self, cidr: &Cidr) -> Option<IpAddr> {
        let rate = &self.live.policy().rate_limit;
        let net = cidr.net();
        let prefix = if net.addr().is_ipv4() {
            rate.ipv4_prefix
        } else {
            rate.ipv6_prefix
        };
        (net.prefix_len() == prefix && self.limiter.is_banned(net.network())).then(|| net.network())
    }

    /// Bans in force (as the latest walk of the ban map found them), each with the CIDR it
    /// covers (its source cut to the limiter's prefix).
    fn bans_in_force(&mut self) -> Vec<(Cidr, ActiveBan)> {
        let rate = self.live.policy().rate_limit;
        self.bans_in_force_now()
            .into_iter()
            .filter_map(|ban| {
                let net = IpNet::new(ban.source, rate.prefix_of(ban.source)).ok()?;
                Some((Cidr::from(net), ban))
            })
            .collect()
    }

    fn list_show(&mut self, kind: ListKind) -> Reply {
        let entries = self.live.entries(kind);
        let mut views: Vec<EntryView> = entries
            .iter()
            .map(|(cidr, &source)| {
                let added = self.dynamic.get(kind, &cidr);
                let origin = added.and_then(|e| e.origin.as_deref().map(str::to_string));
                EntryView {
                    cidr: cidr.to_string(),
                    expires_at: added
                        .filter(|_| source == SOURCE_CLI)
                        .and_then(|e| e.expires_at)
                        .map(format_time),
                    comment: added.and_then(|e| e.comment.as_deref().map(str::to_string)),
                    source: match (source, &origin) {
                        (SOURCE_CLI, Some(_)) => "fleet",
                        (SOURCE_CLI, None) => "cli",
                        _ => "config",
                    }
                    .to_string(),
                    origin,
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
                    origin: None,
                });
            }
        }
        Reply::Entries { entries: views }
    }

    /// Logs the bans whose time has come; one renewed meanwhile (banned again) stays quiet.
    fn expire_bans(&mut self, now: SystemTime) {
        let mut ended = false;
        while let Some(Reverse((at, source))) = self.ban_expiries.peek().copied() {
            if at > now {
                break;
            }
            self.ban_expiries.pop();
            if !self.limiter.is_banned(source) {
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
            if let Err(e) = self.live.apply(PolicyChange::of_list(kind, change)) {
                warn!(error = %crate::error_chain(&e), "expired entries could not be removed; retrying");
                continue;
            }
            for cidr in &expired {
                Arc::make_mut(&mut self.dynamic).remove(kind, cidr);
            }
            if expired.len() <= EXPIRIES_LOGGED_EACH {
                for cidr in &expired {
                    info!(list = kind.name(), cidr = %cidr, cause = "ttl", "list entry expired");
                }
            } else {
                info!(
                    list = kind.name(),
                    removed = expired.len(),
                    cause = "ttl",
                    first = %expired[0],
                    "list entries expired"
                );
            }
            self.state_changed();
        }
    }
}
