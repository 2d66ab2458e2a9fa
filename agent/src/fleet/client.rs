//! The fleet's connection: one task that owns the NATS client, publishes this node's changes in
//! order (holding them while the servers are away) and watches the bucket. It never touches the
//! program: what it reads goes to the daemon as [`FleetEvent`]s, applied there, so a fleet that
//! is slow or gone never delays local enforcement.
//!
//! Each time the client (re)connects, a session starts: a watch of the whole bucket delivers
//! its current state (the snapshot the daemon reconciles against: entries deleted while this
//! node was away go; keys with this node's changes still on their way stay) and then every
//! change, in the bucket's order (last writer wins by revision). This node's changes are
//! published after the snapshot, in windows, and retried with backoff when they fail.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow};
use async_nats::{
    ConnectOptions, Event, HeaderMap, HeaderValue, ServerAddr,
    connection::State,
    header::{NATS_MESSAGE_ID, NATS_MESSAGE_TTL},
    jetstream::{
        self,
        context::{PublishAckFuture, PublishError, PublishErrorKind},
        kv,
    },
};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::record::{FleetKey, FleetRecord, RecordError};
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
/// The header JetStream's key-value store marks a delete with.
const KV_OPERATION: &str = "KV-Operation";
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

/// A change on its way to the bucket, with the message id JetStream drops repeats of (a
/// publish retried after a lost acknowledgement, or one the client sent again on reconnect,
/// must not land twice: the second copy could overwrite a newer write of another node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub change: Change,
    pub id: String,
}

/// What the task tells the daemon.
#[derive(Debug)]
pub enum FleetEvent {
    /// Every entry in the bucket, at the start of a session; `unreadable`: keys whose value is
    /// not moat's (left as they are here).
    Snapshot {
        entries: Vec<(FleetKey, FleetRecord)>,
        unreadable: Vec<FleetKey>,
    },
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
    /// A change the daemon handed over is settled: in the bucket, or given up (logged).
    Settled(FleetKey),
    /// A put the servers refused for good: the entry stays this node's alone (the bucket never
    /// held it, and a reconcile must not take it away).
    Refused(FleetKey),
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
    pub changes: mpsc::Sender<Outgoing>,
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
        held: VecDeque::new(),
        read_up_to: 0,
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

/// A change whose publish failed, to be retried.
struct Held {
    outgoing: Outgoing,
    /// Failures other than timeouts (a permission, a limit, a stream the servers lost):
    /// after [`MAX_REFUSALS`] the change is given up, so that one change the servers never
    /// take is not retried for ever. Retries back off to [`MAX_RETRY_DELAY`].
    failures: u32,
}

/// Changes sent before their acknowledgements are awaited.
const PUBLISH_WINDOW: usize = 256;
/// Failures (not timeouts) of one change before it is given up: with the retries' backoff,
/// about five minutes of refusals.
const MAX_REFUSALS: u32 = 10;
/// The longest wait between retries of held changes.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

struct Task {
    fleet: Fleet,
    changes: mpsc::Receiver<Outgoing>,
    events: mpsc::Sender<FleetEvent>,
    status: SharedStatus,
    /// Changes whose publish failed, in order: retried with backoff, before any later change
    /// to the same key.
    held: VecDeque<Held>,
    /// The highest revision read: a value read again (in the next session's snapshot) is not
    /// logged or counted again.
    read_up_to: u64,
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
            let ended = self.session(&client, &mut connection).await;
            update(&self.status, |s| s.connected = false);
            match ended {
                Ok(Ended::Disconnected) => {}
                Ok(Ended::Stopped) => return,
                Err(e) => {
                    let why = format!("{e:#}");
                    warn!(error = %why, "fleet session failed; retrying");
                    update(&self.status, |s| s.error = Some(why));
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            }
        }
    }

    /// Waits for the client to be connected.
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
        // What the connection said before this session is about an earlier one.
        while connection.try_recv().is_ok() {}
        let server = client.server_info();
        let js = jetstream::new(client.clone());
        let store = open_bucket(&js, &self.fleet, &server.version).await?;
        let server_ttl = store
            .status()
            .await
            .context("reading the bucket's settings")?
            .info
            .config
            .allow_message_ttl;
        update(&self.status, |s| {
            s.server = Some(format!(
                "{} ({}:{})",
                server.server_name, server.host, server.port
            ));
            s.server_ttl = server_ttl;
        });

        // The last value of every key (deleted ones as markers), then every change. This
        // node's changes not yet published wait: the daemon keeps their keys out of the
        // reconcile, and they go out right after it.
        let stored = js
            .get_stream(format!("KV_{}", self.fleet.bucket))
            .await
            .context("reading the bucket's state")?
            .info()
            .await
            .context("reading the bucket's state")?
            .state
            .messages;
        let mut watch = store
            .watch_with_history(">")
            .await
            .context("watching the bucket")?;
        let (mut entries, mut unreadable) = (Vec::new(), Vec::new());
        let mut current = stored == 0;
        while !current {
            let entry = tokio::time::timeout(SNAPSHOT_IDLE, watch.next())
                .await
                .map_err(|_| anyhow!("the bucket's snapshot stalled for {SNAPSHOT_IDLE:?}"))?
                .ok_or_else(|| anyhow!("the bucket's watch ended"))?
                .context("reading the bucket's snapshot")?;
            current = entry.delta == 0;
            match self.read(&entry) {
                Read::Entry(key, Some(record)) => entries.push((key, record)),
                Read::Entry(_, None) => {}
                Read::Unreadable(Some(key)) => unreadable.push(key),
                Read::Unreadable(None) => {}
            }
        }
        info!(
            server = %server.server_name,
            bucket = %self.fleet.bucket,
            per_key_ttl = server_ttl,
            entries = entries.len(),
            "fleet connected; snapshot read"
        );
        let snapshot = FleetEvent::Snapshot {
            entries,
            unreadable,
        };
        if self.events.send(snapshot).await.is_err() {
            return Ok(Ended::Stopped);
        }
        update(&self.status, |s| {
            s.connected = true;
            s.error = None;
        });

        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut backoff = RETRY_DELAY;
        loop {
            // Held changes are retried when due, new ones go as they come; a change never
            // overtakes an older one to its key.
            let held_due = !self.held.is_empty()
                && retry_at.is_none_or(|at| at <= tokio::time::Instant::now());
            tokio::select! {
                entry = watch.next() => {
                    let entry = entry
                        .ok_or_else(|| anyhow!("the bucket's watch ended"))?
                        .context("watching the bucket")?;
                    let Read::Entry(key, record) = self.read(&entry) else { continue };
                    let stored_at = system_time(entry.created.unix_timestamp_nanos());
                    let event = match record {
                        Some(record) => FleetEvent::Put { key, record, stored_at },
                        None => FleetEvent::Delete { key, stored_at },
                    };
                    if self.events.send(event).await.is_err() {
                        return Ok(Ended::Stopped);
                    }
                }
                () = std::future::ready(()), if held_due => {
                    let mut batch: Vec<Held> = self.held.drain(..).collect();
                    self.take_queued(&mut batch);
                    if self.publish(&js, batch, server_ttl).await {
                        (retry_at, backoff) = (None, RETRY_DELAY);
                    } else {
                        retry_at = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(MAX_RETRY_DELAY);
                    }
                }
                () = crate::sleep_until(retry_at), if !self.held.is_empty() && !held_due => {}
                outgoing = self.changes.recv() => {
                    let Some(outgoing) = outgoing else { return Ok(Ended::Stopped) };
                    let mut batch = vec![Held { outgoing, failures: 0 }];
                    self.take_queued(&mut batch);
                    // A change to a key whose earlier change is held waits behind it; the
                    // others go (the order that matters is each key's).
                    let held: HashSet<FleetKey> =
                        self.held.iter().map(|h| h.outgoing.change.key()).collect();
                    let (wait, go): (Vec<Held>, Vec<Held>) = batch
                        .into_iter()
                        .partition(|h| held.contains(&h.outgoing.change.key()));
                    self.held.extend(wait);
                    if !go.is_empty() && !self.publish(&js, go, server_ttl).await && retry_at.is_none() {
                        retry_at = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(MAX_RETRY_DELAY);
                    }
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

    /// What a watched message says; what is not moat's is logged and counted once.
    fn read(&mut self, entry: &kv::Entry) -> Read {
        let first_read = entry.revision > self.read_up_to;
        self.read_up_to = self.read_up_to.max(entry.revision);
        update(&self.status, |s| s.last_revision = self.read_up_to);
        let key = match FleetKey::decode(&entry.key) {
            Ok(key) => key,
            Err(e) => {
                self.reject(entry, &e, first_read);
                return Read::Unreadable(None);
            }
        };
        match entry.operation {
            kv::Operation::Delete | kv::Operation::Purge => Read::Entry(key, None),
            kv::Operation::Put => {
                match FleetRecord::decode(&key, &entry.value, SystemTime::now()) {
                    Ok(record) => Read::Entry(key, Some(record)),
                    Err(e) => {
                        self.reject(entry, &e, first_read);
                        Read::Unreadable(Some(key))
                    }
                }
            }
        }
    }

    fn reject(&self, entry: &kv::Entry, error: &RecordError, first_read: bool) {
        if first_read {
            warn!(key = %entry.key, revision = entry.revision, error = %error, "skipped a fleet value that is not moat's");
            update(&self.status, |s| s.rejected += 1);
        }
    }

    /// Adds what is queued to `batch`, up to [`PUBLISH_WINDOW`] changes.
    fn take_queued(&mut self, batch: &mut Vec<Held>) {
        while batch.len() < PUBLISH_WINDOW {
            match self.changes.try_recv() {
                Ok(outgoing) => batch.push(Held {
                    outgoing,
                    failures: 0,
                }),
                Err(_) => break,
            }
        }
    }

    /// Publishes a batch: all sent, then their acknowledgements awaited together (one round
    /// trip, one timeout for the batch). Of several changes to one key only the last is sent
    /// (the others are settled: the bucket keeps the last anyway). A failed change is held, in
    /// order, for a retry; one the servers refused [`MAX_REFUSALS`] times (not timeouts: the
    /// servers may simply be away) is given up, logged and counted. Returns whether all went.
    async fn publish(
        &mut self,
        js: &jetstream::Context,
        batch: Vec<Held>,
        server_ttl: bool,
    ) -> bool {
        let last_of_key: HashMap<FleetKey, usize> = batch
            .iter()
            .enumerate()
            .map(|(i, held)| (held.outgoing.change.key(), i))
            .collect();
        let mut sent = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        for (i, held) in batch.into_iter().enumerate() {
            let key = held.outgoing.change.key();
            if last_of_key.get(&key) != Some(&i) {
                let _ = self.events.send(FleetEvent::Settled(key)).await;
                continue;
            }
            let bucket = self.fleet.bucket.clone();
            let outgoing = held.outgoing.clone();
            let js = js.clone();
            acks.push(async move { send(&js, &bucket, &outgoing, server_ttl).await?.await });
            sent.push(held);
        }
        let results = futures_util::future::join_all(acks).await;
        let mut all_went = true;
        for (mut held, result) in sent.into_iter().zip(results) {
            let key = held.outgoing.change.key();
            let error = match result {
                Ok(_) => {
                    let _ = self.events.send(FleetEvent::Settled(key)).await;
                    continue;
                }
                Err(e) => e,
            };
            all_went = false;
            update(&self.status, |s| {
                s.publish_failures += 1;
                s.error = Some(format!("publishing {}: {error}", key.encode()));
            });
            if !matches!(
                error.kind(),
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
            ) {
                held.failures += 1;
            }
            if held.failures >= MAX_REFUSALS {
                error!(key = %key.encode(), error = %error, "the fleet's servers refuse a change; it is not shared");
                if matches!(held.outgoing.change, Change::Put(..)) {
                    let _ = self.events.send(FleetEvent::Refused(key)).await;
                }
                let _ = self.events.send(FleetEvent::Settled(key)).await;
                continue;
            }
            warn!(key = %key.encode(), error = %error, "a fleet publish failed; it is retried");
            self.held.push_back(held);
        }
        all_went
    }
}

/// What one watched message says.
enum Read {
    /// An entry's record, or `None` when it was deleted.
    Entry(FleetKey, Option<FleetRecord>),
    /// Not moat's; the key, when it names an entry.
    Unreadable(Option<FleetKey>),
}

/// Sends a change as JetStream's key-value store writes one (the `KV-Operation` header marks
/// a delete), with its message id; a put that expires carries its TTL, and a delete's marker
/// expires after [`EXPIRY_MARKER_TTL`] (a node away longer finds the key gone), where the
/// bucket takes per-key TTLs. Returns the acknowledgement to await.
async fn send(
    js: &jetstream::Context,
    bucket: &str,
    outgoing: &Outgoing,
    server_ttl: bool,
) -> Result<PublishAckFuture, PublishError> {
    let key = outgoing.change.key();
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, outgoing.id.as_str());
    let (payload, ttl) = match &outgoing.change {
        Change::Put(key, record) => {
            let ttl = record.expires_at.map(|at| {
                // Rounded up: the bucket never drops an entry before its time.
                let left = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
            });
            (bytes::Bytes::from(record.encode(key)), ttl)
        }
        Change::Delete(_) => {
            headers.insert(KV_OPERATION, "DEL");
            (bytes::Bytes::new(), Some(EXPIRY_MARKER_TTL.as_secs()))
        }
    };
    if let Some(ttl) = ttl.filter(|_| server_ttl) {
        headers.insert(NATS_MESSAGE_TTL, HeaderValue::from(ttl));
    }
    js.publish_with_headers(format!("$KV.{bucket}.{}", key.encode()), headers, payload)
        .await
}

/// The bucket, created if absent: with per-key TTLs on a server that has them (2.11 and later).
async fn open_bucket(
    js: &jetstream::Context,
    fleet: &Fleet,
    server_version: &str,
) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&fleet.bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: fleet.bucket.clone(),
        description: "moat's fleet: blocklist and allowlist entries shared by its nodes".into(),
        history: 1,
        num_replicas: fleet.replicas,
        storage: jetstream::stream::StorageType::File,
        limit_markers: has_per_key_ttls(server_version).then_some(EXPIRY_MARKER_TTL),
        ..Default::default()
    };
    js.create_key_value(config)
        .await
        .with_context(|| format!("creating the bucket {:?}", fleet.bucket))
}

/// Whether a server of `version` ("2.15.1") takes per-key TTLs.
fn has_per_key_ttls(version: &str) -> bool {
    let mut numbers = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (2, 11)
}

/// Records what the connection reports, as it reports it (a session busy publishing does not
/// delay what `moat status` says).
fn note(status: &SharedStatus, event: &Event) {
    match event {
        // Connected is set once a session has read the bucket, not when the socket is up.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_ttls_come_with_server_2_11() {
        for (version, expected) in [
            ("2.15.1", true),
            ("2.11.0", true),
            ("v2.12.0-beta.1", true),
            ("2.10.22", false),
            ("2.9.15", false),
            ("garbage", false),
        ] {
            assert_eq!(has_per_key_ttls(version), expected, "{version}");
        }
    }

    #[test]
    fn server_timestamps_before_the_epoch_are_the_epoch() {
        assert_eq!(system_time(-5), UNIX_EPOCH);
        assert_eq!(system_time(1_500), UNIX_EPOCH + Duration::from_nanos(1_500));
    }
}
