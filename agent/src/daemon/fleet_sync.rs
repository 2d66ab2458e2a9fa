//! The daemon's half of the fleet (`fleet::client` is the other): this node's changes handed to
//! the fleet task, and the fleet's entries applied here as runtime entries of the lists, each
//! with the node that published it. A change made here is in force before it is handed over;
//! nothing the fleet does waits on the servers.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, PoisonError},
    time::{Duration, SystemTime},
};

use agent_common::lists::SOURCE_CLI;
use ipnet::IpNet;
use prometheus::{Histogram, HistogramOpts};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Daemon, state::DynamicEntry};
use crate::{
    config::{Cidr, Fleet, ListKind, Share},
    control::protocol::FleetView,
    fleet::{
        Change, FleetEvent, FleetKey, FleetRecord, FleetStatus,
        client::{Outgoing, QUEUE_CAPACITY, SharedStatus},
    },
    program::{lists::ListChange, live::PolicyChange},
};

/// Buckets of `moat_fleet_apply_seconds`: from a LAN's milliseconds to an outage's minutes.
const APPLY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0,
];

/// The fleet as the daemon holds it.
pub struct FleetSync {
    pub settings: Fleet,
    changes: mpsc::Sender<Outgoing>,
    status: SharedStatus,
    /// Changes handed over and not yet settled, per key (how many, and the last): until they
    /// are, what the bucket says of these keys is older than this node's word, and is not
    /// applied. The last of each is the outbox saved with the state.
    pending: HashMap<FleetKey, Pending>,
    /// Message ids: this daemon's start (so that ids never repeat across restarts) and a count.
    id_prefix: String,
    next_id: u64,
    /// From a change's arrival in the bucket to its application here.
    apply_seconds: Histogram,
    last_lag: Option<Duration>,
    /// Fleet entries the maps had no room for.
    refused: u64,
}

impl FleetSync {
    /// The daemon's half; `outbox` (saved by an earlier daemon) is handed over first.
    pub fn new(
        settings: Fleet,
        changes: mpsc::Sender<Outgoing>,
        status: SharedStatus,
        outbox: Vec<Outgoing>,
    ) -> Self {
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "moat_fleet_apply_seconds",
                "Time from a fleet change's arrival in the bucket to its application on this node.",
            )
            .buckets(APPLY_BUCKETS.to_vec()),
        )
        .expect("valid histogram options");
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let mut fleet = Self {
            id_prefix: format!("{}-{:x}", settings.node, started.as_nanos()),
            next_id: 0,
            settings,
            changes,
            status,
            pending: HashMap::new(),
            apply_seconds,
            last_lag: None,
            refused: 0,
        };
        if !outbox.is_empty() {
            info!(
                changes = outbox.len(),
                "publishing the changes an earlier run could not"
            );
        }
        for outgoing in outbox {
            fleet.send(outgoing);
        }
        fleet
    }

    fn send(&mut self, outgoing: Outgoing) {
        let key = outgoing.change.key();
        if self.changes.try_send(outgoing.clone()).is_ok() {
            let pending = self.pending.entry(key).or_insert(Pending {
                count: 0,
                latest: outgoing.clone(),
            });
            pending.count += 1;
            pending.latest = outgoing;
        }
    }

    /// The changes not yet settled (the last of each key), to be saved.
    pub fn outbox(&self) -> Vec<Outgoing> {
        self.pending.values().map(|p| p.latest.clone()).collect()
    }

    fn status(&self) -> FleetStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// This node's name, as its shared entries carry it.
    pub fn origin(&self) -> Arc<str> {
        Arc::from(self.settings.node.as_str())
    }

    /// Whether `count` more changes fit in the queue (a request is shared whole or not at all).
    pub fn has_room(&self, count: usize) -> bool {
        self.changes.capacity() >= count
    }

    /// Hands changes over, all of them or, when the queue has no room for them all, none; the
    /// note for the CLI either way (`Err`: not shared).
    pub fn hand_over(&mut self, changes: Vec<Change>) -> Result<String, String> {
        if !self.has_room(changes.len()) {
            return Err(self.no_room_note(changes.len()));
        }
        for change in changes {
            let id = format!("{}-{}", self.id_prefix, self.next_id);
            self.next_id += 1;
            self.send(Outgoing { change, id });
        }
        Ok(if self.status().connected {
            "fleet: published".into()
        } else {
            "fleet: queued, fleet unreachable (published once it is back)".into()
        })
    }

    /// The note for a request too large for the queue.
    pub fn no_room_note(&self, count: usize) -> String {
        format!(
            "fleet: not shared: {count} changes are more than the fleet's queue has room for \
             ({} of {QUEUE_CAPACITY})",
            self.changes.capacity()
        )
    }

    fn settled(&mut self, key: FleetKey) {
        if let Some(pending) = self.pending.get_mut(&key) {
            pending.count -= 1;
            if pending.count == 0 {
                self.pending.remove(&key);
            }
        }
    }

    fn is_pending(&self, key: &FleetKey) -> bool {
        self.pending.contains_key(key)
    }

    fn observe(&mut self, stored_at: SystemTime) {
        let lag = SystemTime::now()
            .duration_since(stored_at)
            .unwrap_or(Duration::ZERO);
        self.apply_seconds.observe(lag.as_secs_f64());
        self.last_lag = Some(lag);
    }

    pub fn view(&self, entries: u64) -> FleetView {
        let status = self.status();
        FleetView {
            node: self.settings.node.clone(),
            bucket: self.settings.bucket.clone(),
            share: self
                .settings
                .share
                .iter()
                .map(|s| s.name().into())
                .collect(),
            connected: status.connected,
            server: status.server,
            error: status.error,
            last_revision: status.last_revision,
            lag_ms: self.last_lag.map(|l| l.as_millis() as u64),
            queued: self.pending.values().map(|p| u64::from(p.count)).sum(),
            entries,
            publish_failures: status.publish_failures,
            rejected: status.rejected,
            refused: self.refused,
            per_key_ttl: status.server_ttl,
        }
    }

    /// What the metrics show.
    pub fn reading(&self, entries: u64) -> crate::observe::metrics::FleetReading {
        let status = self.status();
        crate::observe::metrics::FleetReading {
            connected: status.connected,
            entries,
            publish_failures: status.publish_failures,
            rejected: status.rejected + self.refused,
            apply_seconds: self.apply_seconds.clone(),
        }
    }
}

/// Changes to one key handed over and not yet settled.
struct Pending {
    count: u32,
    latest: Outgoing,
}

/// A fleet record as a runtime entry.
fn entry_of(record: FleetRecord) -> DynamicEntry {
    DynamicEntry {
        expires_at: record.expires_at,
        comment: record.comment.map(Arc::from),
        origin: Some(Arc::from(record.origin)),
    }
}

impl Daemon {
    /// Applies what the fleet task read, in order: the changes between two snapshots go into
    /// the maps together (one switch of the program's generation for all of them).
    pub(super) fn on_fleet(&mut self, events: Vec<FleetEvent>) {
        let now = SystemTime::now();
        let mut batch: BTreeMap<FleetKey, Option<DynamicEntry>> = BTreeMap::new();
        let mut settled = false;
        for event in events {
            let Some(fleet) = self.fleet.as_mut() else {
                return;
            };
            match event {
                FleetEvent::Settled(key) => {
                    fleet.settled(key);
                    settled = true;
                }
                FleetEvent::Refused(key) => {
                    let node = fleet.origin();
                    if let Some(entry) = self.dynamic.get(key.list, &key.cidr)
                        && entry.origin.as_deref() == Some(&*node)
                    {
                        let local = DynamicEntry {
                            origin: None,
                            ..entry.clone()
                        };
                        Arc::make_mut(&mut self.dynamic).insert(key.list, key.cidr, local);
                        self.state_changed_by_fleet();
                    }
                }
                FleetEvent::Put {
                    key,
                    record,
                    stored_at,
                } if !fleet.is_pending(&key) => {
                    fleet.observe(stored_at);
                    let live = record.expires_at.is_none_or(|at| at > now);
                    batch.insert(key, live.then(|| entry_of(record)));
                }
                FleetEvent::Delete { key, stored_at } if !fleet.is_pending(&key) => {
                    fleet.observe(stored_at);
                    batch.insert(key, None);
                }
                // This node's own word on the key is on its way.
                FleetEvent::Put { .. } | FleetEvent::Delete { .. } => {}
                FleetEvent::Snapshot {
                    entries,
                    unreadable,
                } => {
                    self.apply_changes(std::mem::take(&mut batch));
                    self.reconcile(entries, &unreadable, now);
                }
            }
        }
        self.apply_changes(batch);
        if settled {
            // The outbox saved with the state is smaller: saved soon, so that a restart does
            // not publish again what the bucket already holds.
            self.state_changed();
        }
    }

    /// Applies live changes (a put, or `None`: a delete), each logged.
    fn apply_changes(&mut self, batch: BTreeMap<FleetKey, Option<DynamicEntry>>) {
        for kind in ListKind::ALL {
            let mut puts = Vec::new();
            let mut deletes = Vec::new();
            for (key, entry) in batch.iter().filter(|(key, _)| key.list == kind) {
                match entry {
                    Some(entry) => puts.push((key.cidr, entry.clone())),
                    None => deletes.push(key.cidr),
                }
            }
            // A deleted entry that shared this node's own ban lifts the ban too.
            let node = self.fleet.as_ref().map(FleetSync::origin);
            let own_bans: Vec<Cidr> = deletes
                .iter()
                .filter(|cidr| {
                    kind == ListKind::Block
                        && self
                            .dynamic
                            .get(kind, cidr)
                            .and_then(|e| e.origin.as_deref())
                            == node.as_deref()
                })
                .copied()
                .collect();
            let (added, deleted) = self.apply_fleet(kind, puts, deletes);
            for cidr in deleted.iter().filter(|c| own_bans.contains(c)) {
                self.lift_ban_of(cidr);
            }
            for (cidr, entry) in &added {
                let origin = entry.origin.as_deref().unwrap_or_default();
                info!(list = kind.name(), cidr = %cidr, origin, cause = "fleet", "list entry added");
            }
            for cidr in &deleted {
                info!(list = kind.name(), cidr = %cidr, cause = "fleet", "list entry deleted");
            }
        }
    }

    /// Makes the fleet entries here what the bucket holds: those it no longer holds go (deleted
    /// while this node was away), the others are added or updated. Keys with changes of this
    /// node's still on their way, and keys whose value is not moat's, are left as they are.
    fn reconcile(
        &mut self,
        snapshot: Vec<(FleetKey, FleetRecord)>,
        unreadable: &[FleetKey],
        now: SystemTime,
    ) {
        let Some(fleet) = self.fleet.as_ref() else {
            return;
        };
        let mut keep: HashSet<FleetKey> = fleet.pending.keys().copied().collect();
        keep.extend(unreadable.iter().copied());
        let mut wanted: BTreeMap<FleetKey, DynamicEntry> = BTreeMap::new();
        for (key, record) in snapshot {
            if !keep.contains(&key) && record.expires_at.is_none_or(|at| at > now) {
                wanted.insert(key, entry_of(record));
            }
        }
        let (mut added, mut removed) = (0, 0);
        for kind in ListKind::ALL {
            let gone: Vec<Cidr> = self
                .dynamic
                .entries(kind)
                .filter(|(cidr, entry)| {
                    let key = FleetKey {
                        list: kind,
                        cidr: *cidr,
                    };
                    entry.origin.is_some() && !wanted.contains_key(&key) && !keep.contains(&key)
                })
                .map(|(cidr, _)| cidr)
                .collect();
            let new: Vec<(Cidr, DynamicEntry)> = wanted
                .iter()
                .filter(|(key, entry)| {
                    key.list == kind && self.dynamic.get(kind, &key.cidr) != Some(entry)
                })
                .map(|(key, entry)| (key.cidr, entry.clone()))
                .collect();
            let (put, deleted) = self.apply_fleet(kind, new, gone);
            added += put.len();
            removed += deleted.len();
        }
        info!(
            entries = wanted.len(),
            added, removed, "fleet reconciled with the bucket"
        );
    }

    /// Adds or updates `puts` and deletes the fleet entries among `deletes`, in the maps and
    /// the runtime entries, all at once. An entry added here and not shared (no origin) is this
    /// node's own: the fleet neither replaces nor deletes it. When the maps refuse the whole
    /// (full), the deletes go alone, then the longest run of puts that fits (found by halving);
    /// the rest are refused: logged once and counted. Returns what was put and what deleted.
    fn apply_fleet(
        &mut self,
        kind: ListKind,
        puts: Vec<(Cidr, DynamicEntry)>,
        deletes: Vec<Cidr>,
    ) -> (Vec<(Cidr, DynamicEntry)>, Vec<Cidr>) {
        let fleet_owned = |dynamic: &super::state::Dynamic, cidr: &Cidr| {
            dynamic.get(kind, cidr).is_none_or(|e| e.origin.is_some())
        };
        let puts: Vec<(Cidr, DynamicEntry)> = puts
            .into_iter()
            .filter(|(cidr, _)| fleet_owned(&self.dynamic, cidr))
            .collect();
        let deletes: Vec<Cidr> = deletes
            .into_iter()
            .filter(|cidr| {
                self.dynamic
                    .get(kind, cidr)
                    .is_some_and(|e| e.origin.is_some())
            })
            .collect();
        if puts.is_empty() && deletes.is_empty() {
            return (puts, deletes);
        }
        let Err(error) = self.try_apply_fleet(kind, &puts, &deletes) else {
            return (puts, deletes);
        };
        let (deleted, mut refused): (Vec<Cidr>, Vec<Cidr>) =
            if self.try_apply_fleet(kind, &[], &deletes).is_ok() {
                (deletes, Vec::new())
            } else {
                (Vec::new(), deletes)
            };
        let (mut applied, mut step) = (0, puts.len());
        while applied < puts.len() && step > 0 {
            let end = (applied + step).min(puts.len());
            if self.try_apply_fleet(kind, &puts[applied..end], &[]).is_ok() {
                applied = end;
            } else {
                step /= 2;
            }
        }
        let mut puts = puts;
        refused.extend(puts.split_off(applied).into_iter().map(|(cidr, _)| cidr));
        if let Some(first) = refused.first() {
            warn!(
                list = kind.name(),
                refused = refused.len(),
                first = %first,
                error = %crate::error_chain(&error),
                "fleet entries refused"
            );
            if let Some(fleet) = self.fleet.as_mut() {
                fleet.refused += refused.len() as u64;
            }
        }
        (puts, deleted)
    }

    fn try_apply_fleet(
        &mut self,
        kind: ListKind,
        puts: &[(Cidr, DynamicEntry)],
        deletes: &[Cidr],
    ) -> Result<(), crate::program::live::ChangeError> {
        if puts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let entries = self.live.entries(kind);
        let change = ListChange {
            upserts: puts
                .iter()
                .filter(|(cidr, _)| !entries.contains_key(cidr))
                .map(|(cidr, _)| (*cidr, SOURCE_CLI))
                .collect(),
            removals: deletes
                .iter()
                .filter(|cidr| entries.get(cidr) == Some(&SOURCE_CLI))
                .copied()
                .collect(),
        };
        self.live.apply(PolicyChange::of_list(kind, change))?;
        for (cidr, entry) in puts {
            Arc::make_mut(&mut self.dynamic).insert(kind, *cidr, entry.clone());
        }
        for cidr in deletes {
            Arc::make_mut(&mut self.dynamic).remove(kind, cidr);
        }
        self.state_changed_by_fleet();
        Ok(())
    }

    /// Shares a rate-limit ban as a blocklist entry that ends with it.
    pub(super) fn share_ban(&mut self, source: IpAddr, ttl: Duration) {
        let Some(fleet) = self
            .fleet
            .as_mut()
            .filter(|f| f.settings.shares(Share::Bans))
        else {
            return;
        };
        let rate = self.live.policy().rate_limit;
        let Ok(net) = IpNet::new(source, rate.prefix_of(source)) else {
            return;
        };
        let key = FleetKey {
            list: ListKind::Block,
            cidr: Cidr::from(net),
        };
        let record = FleetRecord {
            expires_at: Some(SystemTime::now() + ttl),
            comment: Some(format!("rate-limit ban on {}", fleet.settings.node)),
            origin: fleet.settings.node.clone(),
        };
        if let Err(why) = fleet.hand_over(vec![Change::Put(key, record)]) {
            warn!(source = %source, "{why}");
        }
    }
}
