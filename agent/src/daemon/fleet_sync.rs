//! The daemon's half of the fleet (`fleet::client` is the other): this node's changes handed to
//! the fleet task, and the fleet's entries applied here as runtime entries of the lists, each
//! with the node that published it. A change made here is in force before it is handed over;
//! nothing the fleet does waits on the servers.

use std::{
    collections::{BTreeMap, HashMap},
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
        client::{QUEUE_CAPACITY, SharedStatus},
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
    changes: mpsc::Sender<Change>,
    status: SharedStatus,
    /// Changes handed over and not yet in the bucket, per key: until they are, what the bucket
    /// says of these keys is older than this node's word, and is not applied.
    pending: HashMap<FleetKey, u32>,
    /// From a change's arrival in the bucket to its application here.
    apply_seconds: Histogram,
    last_lag: Option<Duration>,
    /// Fleet entries the maps had no room for.
    refused: u64,
}

impl FleetSync {
    pub fn new(settings: Fleet, changes: mpsc::Sender<Change>, status: SharedStatus) -> Self {
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "moat_fleet_apply_seconds",
                "Time from a fleet change's arrival in the bucket to its application on this node.",
            )
            .buckets(APPLY_BUCKETS.to_vec()),
        )
        .expect("valid histogram options");
        Self {
            settings,
            changes,
            status,
            pending: HashMap::new(),
            apply_seconds,
            last_lag: None,
            refused: 0,
        }
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

    /// Hands changes over (there is room: see [`Self::has_room`]); the note for the CLI.
    pub fn hand_over(&mut self, changes: impl IntoIterator<Item = Change>) -> String {
        for change in changes {
            let key = change.key();
            if self.changes.try_send(change).is_ok() {
                *self.pending.entry(key).or_default() += 1;
            }
        }
        if self.status().connected {
            "fleet: published".into()
        } else {
            "fleet: queued, fleet unreachable (published once it is back)".into()
        }
    }

    /// The note for a request too large for the queue.
    pub fn no_room_note(&self, count: usize) -> String {
        format!(
            "fleet: not shared: {count} changes are more than the fleet's queue has room for \
             ({} of {QUEUE_CAPACITY})",
            self.changes.capacity()
        )
    }

    fn published(&mut self, key: FleetKey) {
        if let Some(count) = self.pending.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
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
            queued: (QUEUE_CAPACITY - self.changes.capacity()) as u64,
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

/// A fleet record as a runtime entry.
fn entry_of(record: FleetRecord) -> DynamicEntry {
    DynamicEntry {
        expires_at: record.expires_at,
        comment: record.comment.map(Arc::from),
        origin: Some(Arc::from(record.origin)),
    }
}

impl Daemon {
    /// Applies what the fleet task read.
    pub(super) fn on_fleet(&mut self, event: FleetEvent) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        let now = SystemTime::now();
        match event {
            FleetEvent::Published(key) => fleet.published(key),
            FleetEvent::Put {
                key,
                record,
                stored_at,
            } => {
                if fleet.is_pending(&key) {
                    return;
                }
                fleet.observe(stored_at);
                if record.expires_at.is_some_and(|at| at <= now) {
                    self.apply_fleet(key.list, Vec::new(), vec![key.cidr]);
                } else {
                    info!(list = key.list.name(), cidr = %key.cidr, origin = %record.origin, cause = "fleet", "list entry added");
                    self.apply_fleet(key.list, vec![(key.cidr, entry_of(record))], Vec::new());
                }
            }
            FleetEvent::Delete { key, stored_at } => {
                if fleet.is_pending(&key) {
                    return;
                }
                fleet.observe(stored_at);
                if self.apply_fleet(key.list, Vec::new(), vec![key.cidr]) > 0 {
                    info!(list = key.list.name(), cidr = %key.cidr, cause = "fleet", "list entry deleted");
                }
            }
            FleetEvent::Snapshot(entries) => self.reconcile(entries, now),
        }
    }

    /// Makes the fleet entries here what the bucket holds: those it no longer holds go (deleted
    /// while this node was away), the others are added or updated. Keys with changes of this
    /// node's still on their way are left as they are.
    fn reconcile(&mut self, snapshot: Vec<(FleetKey, FleetRecord)>, now: SystemTime) {
        let Some(fleet) = self.fleet.as_ref() else {
            return;
        };
        let pending = fleet.pending.clone();
        let mut wanted: BTreeMap<FleetKey, DynamicEntry> = BTreeMap::new();
        for (key, record) in snapshot {
            if !pending.contains_key(&key) && record.expires_at.is_none_or(|at| at > now) {
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
                        cidr: **cidr,
                    };
                    entry.origin.is_some()
                        && !wanted.contains_key(&key)
                        && !pending.contains_key(&key)
                })
                .map(|(cidr, _)| *cidr)
                .collect();
            let new: Vec<(Cidr, DynamicEntry)> = wanted
                .iter()
                .filter(|(key, entry)| {
                    key.list == kind && self.dynamic.get(kind, &key.cidr) != Some(entry)
                })
                .map(|(key, entry)| (key.cidr, entry.clone()))
                .collect();
            added += new.len();
            removed += self.apply_fleet(kind, new, gone);
        }
        info!(
            entries = wanted.len(),
            added, removed, "fleet reconciled with the bucket"
        );
    }

    /// Adds or updates `puts` and deletes the fleet entries among `deletes`, in the maps and in
    /// the runtime entries, all at once; when the maps refuse the whole (full), each entry is
    /// tried on its own, and those refused are counted and logged once. Returns how many
    /// entries were deleted.
    fn apply_fleet(
        &mut self,
        kind: ListKind,
        puts: Vec<(Cidr, DynamicEntry)>,
        deletes: Vec<Cidr>,
    ) -> usize {
        let deletes: Vec<Cidr> = deletes
            .into_iter()
            .filter(|cidr| {
                self.dynamic
                    .get(kind, cidr)
                    .is_some_and(|e| e.origin.is_some())
            })
            .collect();
        if puts.is_empty() && deletes.is_empty() {
            return 0;
        }
        let error = match self.try_apply_fleet(kind, &puts, &deletes) {
            Ok(()) => return deletes.len(),
            Err(e) => e,
        };
        let mut refused: Vec<Cidr> = Vec::new();
        if puts.len() + deletes.len() > 1 {
            for cidr in &deletes {
                if self.try_apply_fleet(kind, &[], &[*cidr]).is_err() {
                    refused.push(*cidr);
                }
            }
            for put in puts {
                if self
                    .try_apply_fleet(kind, std::slice::from_ref(&put), &[])
                    .is_err()
                {
                    refused.push(put.0);
                }
            }
        } else {
            refused.extend(puts.first().map(|(c, _)| *c).or(deletes.first().copied()));
        }
        if !refused.is_empty() {
            warn!(
                list = kind.name(),
                refused = refused.len(),
                first = %refused[0],
                error = %crate::error_chain(&error),
                "fleet entries refused"
            );
            if let Some(fleet) = self.fleet.as_mut() {
                fleet.refused += refused.len() as u64;
            }
        }
        deletes.iter().filter(|c| !refused.contains(c)).count()
    }

    fn try_apply_fleet(
        &mut self,
        kind: ListKind,
        puts: &[(Cidr, DynamicEntry)],
        deletes: &[Cidr],
    ) -> Result<(), crate::program::live::ChangeError> {
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
            self.dynamic.insert(kind, *cidr, entry.clone());
        }
        for cidr in deletes {
            self.dynamic.remove(kind, cidr);
        }
        self.state_changed();
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
        if !fleet.has_room(1) {
            warn!(source = %source, "{}", fleet.no_room_note(1));
            return;
        }
        let key = FleetKey {
            list: ListKind::Block,
            cidr: Cidr::from(net),
        };
        let record = FleetRecord {
            expires_at: Some(SystemTime::now() + ttl),
            comment: Some(format!("rate-limit ban on {}", fleet.settings.node)),
            origin: fleet.settings.node.clone(),
        };
        fleet.hand_over([Change::Put(key, record)]);
    }
}
