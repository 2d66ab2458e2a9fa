//! The fleet's connection: one task that owns the NATS client, publishes this node's changes in
//! order (holding them while the servers are away) and watches the bucket. It never touches the
//! program: what it reads goes to the daemon as [`FleetEvent`]s, applied there, so a fleet that
//! is slow or gone never delays local enforcement.
//!
//! Each time the client (re)connects, a session starts: first the changes held meanwhile are
//! published, then a watch of the whole bucket delivers its current state (the snapshot the
//! daemon reconciles against: entries deleted while this node was away go) and every change
//! after it, in the bucket's order (last writer wins by revision).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow};
use async_nats::{
    ConnectOptions, Event, HeaderMap, HeaderValue, ServerAddr,
    connection::State,
    header::NATS_MESSAGE_TTL,
    jetstream::{self, kv},
};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::record::{FleetKey, FleetRecord};
use crate::config::{Fleet, fleet::FleetAuth};

/// Local changes held while the fleet is unreachable; beyond this, a change is not shared.
pub const QUEUE_CAPACITY: usize = 100_000;
/// Events on their way to the daemon (it applies them as fast as they come).
const EVENT_CAPACITY: usize = 4096;
/// A snapshot that goes this long without an entry is given up, and the session retried.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(10);
/// After a session failed, before the next.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Reconnect attempts back off up to this: a restarted server is found again within it.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the server keeps the marker it leaves where a key's TTL ran out: a node away for
/// less hears of the expiry from the bucket (it also expires the entry by its own clock).
const EXPIRY_MARKER_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the connection's state is looked at while waiting for it.
const STATE_POLL: Duration = Duration::from_millis(200);

/// A change this node publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put(FleetKey, FleetRecord),
    Delete(FleetKey),
}

impl Change {
    pub fn key(&self) -> FleetKey {
        match self {
            Self::Put(key, _) | Self::Delete(key) => *key,
        }
    }
}

/// What the task tells the daemon.
#[derive(Debug)]
pub enum FleetEvent {
    /// Every entry in the bucket, at the start of a session.
    Snapshot(Vec<(FleetKey, FleetRecord)>),
    /// One change after the snapshot; `stored_at` by the server's clock.
    Put {
        key: FleetKey,
        record: FleetRecord,
        stored_at: SystemTime,
    },
    Delete {
        key: FleetKey,
        stored_at: SystemTime,
    },
    /// A change the daemon handed over is in the bucket.
    Published(FleetKey),
}

/// The connection as `moat status` and the metrics show it.
#[derive(Clone, Debug, Default)]
pub struct FleetStatus {
    pub connected: bool,
    /// The server connected to (name and address).
    pub server: Option<String>,
    /// The latest error (connection, authentication, publish); cleared by a session's start.
    pub error: Option<String>,
    /// The bucket's revision of the last change read.
    pub last_revision: u64,
    pub publish_failures: u64,
    /// Values in the bucket that are not moat's, skipped.
    pub rejected: u64,
    /// Whether the bucket takes per-key TTLs (created by moat on a server that has them).
    pub server_ttl: bool,
}

pub type SharedStatus = Arc<Mutex<FleetStatus>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut FleetStatus)) {
    f(&mut status.lock().unwrap_or_else(PoisonError::into_inner));
}

/// The daemon's ends of the task.
pub struct FleetHandle {
    pub changes: mpsc::Sender<Change>,
    pub events: mpsc::Receiver<FleetEvent>,
    pub status: SharedStatus,
}

/// Starts the task on the current runtime.
pub fn start(fleet: Fleet) -> FleetHandle {
    let (changes_tx, changes) = mpsc::channel(QUEUE_CAPACITY);
    let (events, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let status = SharedStatus::default();
    let task = Task {
        fleet,
        changes,
        events,
        status: status.clone(),
        held: None,
    };
    tokio::spawn(task.run());
    FleetHandle {
        changes: changes_tx,
        events: events_rx,
        status,
    }
}

/// Why a session ended.
enum Ended {
    /// The connection dropped; the next session starts when it is back.
    Disconnected,
    /// The daemon is gone.
    Stopped,
}

struct Task {
    fleet: Fleet,
    changes: mpsc::Receiver<Change>,
    events: mpsc::Sender<FleetEvent>,
    status: SharedStatus,
    /// A change whose publish failed: published first in the next session.
    held: Option<Change>,
}

impl Task {
    async fn run(mut self) {
        let (connection_events, mut connection) = mpsc::unbounded_channel();
        let client = loop {
            match connect(&self.fleet, connection_events.clone(), self.status.clone()).await {
                Ok(client) => break client,
                Err(e) => {
                    let why = format!("{e:#}");
                    warn!(error = %why, "cannot set up the fleet's connection; retrying");
                    update(&self.status, |s| s.error = Some(why));
                    tokio::time::sleep(RETRY_DELAY * 5).await;
                }
            }
        };
        loop {
            if self.wait_connected(&client, &mut connection).await.is_err() {
                return;
            }
            match self.session(&client, &mut connection).await {
                Ok(Ended::Disconnected) => {}
                Ok(Ended::Stopped) => return,
                Err(e) => {
                    let why = format!("{e:#}");
                    warn!(error = %why, "fleet session failed; retrying");
                    update(&self.status, |s| {
                        s.error = Some(why);
                        s.connected = client.connection_state() == State::Connected;
                    });
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            }
        }
    }

    /// Waits for the client to be connected, noting the errors it reports meanwhile.
    async fn wait_connected(
        &self,
        client: &async_nats::Client,
        connection: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), ()> {
        loop {
            if client.connection_state() == State::Connected {
                return Ok(());
            }
            if self.events.is_closed() {
                return Err(());
            }
            tokio::select! {
                Some(_) = connection.recv() => {}
                () = tokio::time::sleep(STATE_POLL) => {}
            }
        }
    }

    async fn session(
        &mut self,
        client: &async_nats::Client,
        connection: &mut mpsc::UnboundedReceiver<Event>,
    ) -> anyhow::Result<Ended> {
        let server = client.server_info();
        let js = jetstream::new(client.clone());
        let store = open_bucket(&js, &self.fleet).await?;
        let info = &store
            .status()
            .await
            .context("reading the bucket's state")?
            .info;
        let server_ttl = info.config.allow_message_ttl;
        let stored = info.state.messages;
        update(&self.status, |s| {
            s.connected = true;
            s.server = Some(format!(
                "{} ({}:{})",
                server.server_name, server.host, server.port
            ));
            s.error = None;
            s.server_ttl = server_ttl;
        });
        info!(
            server = %server.server_name,
            bucket = %self.fleet.bucket,
            per_key_ttl = server_ttl,
            "fleet connected"
        );

        // What was held while away goes first, so that the snapshot already holds it.
        if let Some(change) = self.held.take() {
            self.publish(&js, &store, change, server_ttl).await?;
        }
        while let Ok(change) = self.changes.try_recv() {
            self.publish(&js, &store, change, server_ttl).await?;
        }

        // The last value of every key (deleted ones as markers), then every change.
        let mut watch = store
            .watch_with_history(">")
            .await
            .context("watching the bucket")?;
        let mut snapshot = Vec::new();
        let mut current = stored == 0;
        while !current {
            let entry = tokio::time::timeout(SNAPSHOT_IDLE, watch.next())
                .await
                .map_err(|_| anyhow!("the bucket's snapshot stalled for {SNAPSHOT_IDLE:?}"))?
                .ok_or_else(|| anyhow!("the bucket's watch ended"))?
                .context("reading the bucket's snapshot")?;
            current = entry.delta == 0;
            if let Some((key, record)) = self.read(&entry).and_then(|(key, r)| Some((key, r?))) {
                snapshot.push((key, record));
            }
        }
        info!(entries = snapshot.len(), "fleet snapshot read");
        if self
            .events
            .send(FleetEvent::Snapshot(snapshot))
            .await
            .is_err()
        {
            return Ok(Ended::Stopped);
        }

        loop {
            tokio::select! {
                entry = watch.next() => {
                    let entry = entry
                        .ok_or_else(|| anyhow!("the bucket's watch ended"))?
                        .context("watching the bucket")?;
                    let Some((key, record)) = self.read(&entry) else { continue };
                    let stored_at = system_time(entry.created.unix_timestamp_nanos());
                    let event = match record {
                        Some(record) => FleetEvent::Put { key, record, stored_at },
                        None => FleetEvent::Delete { key, stored_at },
                    };
                    if self.events.send(event).await.is_err() {
                        return Ok(Ended::Stopped);
                    }
                }
                change = self.changes.recv() => {
                    let Some(change) = change else { return Ok(Ended::Stopped) };
                    self.publish(&js, &store, change, server_ttl).await?;
                }
                Some(event) = connection.recv() => {
                    if matches!(event, Event::Disconnected | Event::Closed) {
                        warn!("fleet disconnected; local changes are held until it is back");
                        return Ok(Ended::Disconnected);
                    }
                }
            }
        }
    }

    /// The entry a watched message names and, for a put, its record; `None` for what is not
    /// moat's (logged and counted).
    fn read(&self, entry: &kv::Entry) -> Option<(FleetKey, Option<FleetRecord>)> {
        update(&self.status, |s| s.last_revision = entry.revision);
        let decoded = FleetKey::decode(&entry.key).and_then(|key| match entry.operation {
            kv::Operation::Put => {
                FleetRecord::decode(&key, &entry.value, SystemTime::now()).map(|r| (key, Some(r)))
            }
            kv::Operation::Delete | kv::Operation::Purge => Ok((key, None)),
        });
        match decoded {
            Ok(read) => Some(read),
            Err(e) => {
                warn!(key = %entry.key, revision = entry.revision, error = %e, "skipped a fleet value that is not moat's");
                update(&self.status, |s| s.rejected += 1);
                None
            }
        }
    }

    /// Publishes one change; on failure it is held for the next session, and the error ends
    /// this one.
    async fn publish(
        &mut self,
        js: &jetstream::Context,
        store: &kv::Store,
        change: Change,
        server_ttl: bool,
    ) -> anyhow::Result<()> {
        let key = change.key();
        let result = match &change {
            Change::Put(key, record) => {
                let value = record.encode(key).into();
                match record.expires_at.filter(|_| server_ttl) {
                    None => store
                        .put(key.encode(), value)
                        .await
                        .map(drop)
                        .map_err(anyhow::Error::from),
                    Some(at) => put_with_ttl(js, &self.fleet.bucket, key, value, at).await,
                }
            }
            Change::Delete(key) => store
                .delete(key.encode())
                .await
                .map_err(anyhow::Error::from),
        };
        match result {
            Ok(()) => {
                let _ = self.events.send(FleetEvent::Published(key)).await;
                Ok(())
            }
            Err(e) => {
                update(&self.status, |s| s.publish_failures += 1);
                self.held = Some(change);
                Err(e.context(format!("publishing {}", key.encode())))
            }
        }
    }
}

/// A put whose key the server drops at `expires_at` (leaving a marker watchers see).
async fn put_with_ttl(
    js: &jetstream::Context,
    bucket: &str,
    key: &FleetKey,
    value: bytes::Bytes,
    expires_at: SystemTime,
) -> anyhow::Result<()> {
    let ttl = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .as_secs()
        .max(1);
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_TTL, HeaderValue::from(ttl));
    js.publish_with_headers(format!("$KV.{bucket}.{}", key.encode()), headers, value)
        .await?
        .await?;
    Ok(())
}

/// The bucket, created (with per-key TTLs, where the server has them) if absent.
async fn open_bucket(js: &jetstream::Context, fleet: &Fleet) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&fleet.bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: fleet.bucket.clone(),
        description: "moat's fleet: blocklist and allowlist entries shared by its nodes".into(),
        history: 1,
        num_replicas: fleet.replicas,
        storage: jetstream::stream::StorageType::File,
        limit_markers: Some(EXPIRY_MARKER_TTL),
        ..Default::default()
    };
    match js.create_key_value(config.clone()).await {
        Ok(store) => Ok(store),
        // A server before 2.11 refuses the markers: a bucket without per-key TTLs (each node
        // still expires entries by their own time).
        Err(first) => js
            .create_key_value(kv::Config {
                limit_markers: None,
                ..config
            })
            .await
            .with_context(|| {
                format!(
                    "creating the bucket {:?} (with per-key TTLs: {first})",
                    fleet.bucket
                )
            }),
    }
}

/// Records what the connection reports, as it reports it (a session busy publishing does not
/// delay what `moat status` says).
fn note(status: &SharedStatus, event: &Event) {
    match event {
        Event::Connected => update(status, |s| s.connected = true),
        Event::Disconnected | Event::Closed => update(status, |s| s.connected = false),
        Event::ServerError(e) => {
            let why = format!("server: {e}");
            warn!(error = %why, "fleet connection");
            update(status, |s| s.error = Some(why));
        }
        Event::ClientError(e) => {
            let why = format!("client: {e}");
            warn!(error = %why, "fleet connection");
            update(status, |s| s.error = Some(why));
        }
        _ => {}
    }
}

/// The client, connecting (and reconnecting, for ever) in the background.
async fn connect(
    fleet: &Fleet,
    events: mpsc::UnboundedSender<Event>,
    status: SharedStatus,
) -> anyhow::Result<async_nats::Client> {
    let mut options = match &fleet.auth {
        FleetAuth::None => ConnectOptions::new(),
        FleetAuth::Credentials(path) => ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| format!("reading the credentials {}", path.display()))?,
        FleetAuth::Token(token) => ConnectOptions::with_token(token.clone()),
        FleetAuth::NkeySeedFile(path) => {
            let seed = std::fs::read_to_string(path)
                .with_context(|| format!("reading the nkey seed {}", path.display()))?;
            ConnectOptions::with_nkey(seed.trim().to_string())
        }
    };
    if let Some(ca) = &fleet.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let servers: Vec<ServerAddr> = fleet
        .servers
        .iter()
        .map(|s| s.parse().with_context(|| format!("server {s:?}")))
        .collect::<anyhow::Result<_>>()?;
    options
        .name(format!("moat {}", fleet.node))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(CONNECT_TIMEOUT)
        .reconnect_delay_callback(|attempts| {
            (Duration::from_millis(100) * u32::try_from(attempts).unwrap_or(u32::MAX))
                .min(MAX_RECONNECT_DELAY)
        })
        .event_callback(move |event| {
            note(&status, &event);
            let events = events.clone();
            async move {
                let _ = events.send(event);
            }
        })
        .connect(servers)
        .await
        .context("connecting to the fleet's servers")
}

/// The server's timestamp (Unix nanoseconds) as a `SystemTime`.
fn system_time(unix_nanos: i128) -> SystemTime {
    u64::try_from(unix_nanos)
        .map(|n| UNIX_EPOCH + Duration::from_nanos(n))
        .unwrap_or(UNIX_EPOCH)
}
