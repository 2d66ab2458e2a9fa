//! `moat run`: the start-up phases (check and open everything, load and fill the program, start
//! reading its events, attach or take over the pinned links, announce), then the event loop
//! that serves the control socket, reloads, expiries and saves until a signal. The socket
//! server (accept, peer credentials, framing), the request handlers, the state that outlives
//! the daemon and the fleet's application live beside it.

mod attacks;
mod fleet_sync;
mod handlers;
mod interfaces;
mod journal;
mod program_events;
mod reports;
mod server;
mod service_manager;
pub mod state;

/// The journal's file name in `state_dir` (empty once the state file holds every change: the
/// benchmark waits for that).
pub use journal::{JOURNAL_FILE, SEALED_FILE};

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use agent_common::lists::SOURCE_CLI;
use anyhow::Context as _;
use aya::Ebpf;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use self::{
    fleet_sync::FleetSync,
    interfaces::{Attachment, Interface, Target, interface_name},
    program_events::EventSinks,
    server::ControlSocket,
    state::{Dynamic, StateError, StateStore},
};
use crate::{
    config::{
        Cidr, Config, Fleet, ListKind, Mode, Overrides, Paths, Policy, Resolved, XdpMode,
        syn_proxy::SynProxy,
    },
    fleet::FleetEvent,
    observe::{
        attacks::{AttackWatch, SampleInbox},
        capture::CaptureHub,
        metrics,
        top::{DropTally, TopHistory},
    },
    program::{
        capacities::Capacities,
        counters::{CounterMaps, Framing},
        events::EventRing,
        fingerprints::FingerprintMaps,
        limiter::{ActiveBan, LimiterMaps, LimiterScan},
        live::{self, LivePolicy},
        loader::{self, Loaded},
        map_source::MapHandles,
        maps::ProgramMaps,
        pins::PinDir,
        sampling::SamplingOverride,
    },
};

/// New bans waiting for the daemon; beyond this, they are saved by the periodic check.
const BAN_QUEUE: usize = 1024;
/// How often bans are read back from the program and saved when they changed.
const BAN_SAVE_INTERVAL: Duration = Duration::from_secs(10);
/// Expiries are checked at least this often, so that a wall-clock jump is noticed.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How long after a change the state is saved: the reply goes out first (a change is in force
/// once its maps are written, and in the journal), and a burst of changes is saved once.
const STATE_SAVE_DELAY: Duration = Duration::from_millis(50);
/// How soon a failed save is tried again.
const STATE_SAVE_RETRY: Duration = Duration::from_secs(5);
/// How long after a change the fleet made the state is saved: the bucket holds it meanwhile,
/// and a thousand changes a second are saved once a second, not twenty times.
const FLEET_SAVE_DELAY: Duration = Duration::from_secs(1);
/// Fleet events applied together, at most.
const FLEET_BATCH: usize = 4096;
/// How often the limiter's maps are walked (away from the loop), and how long a walk may take:
/// a million spoofed sources take about a second to walk, which the loop never waits for.
const LIMITER_SCAN_INTERVAL: Duration = Duration::from_secs(1);
const LIMITER_SCAN_BUDGET: Duration = Duration::from_millis(500);

/// How a save went, and the bans it saved.
pub struct SaveResult {
    result: Result<(), StateError>,
    bans: Vec<ActiveBan>,
    /// `Persistence::failures` when the save started.
    failures_before: u64,
}

/// Whether what is in force is also saved.
#[derive(Debug, Default)]
pub struct Persistence {
    /// Why the last save (or journal write) failed; `None` once a save succeeds.
    pub error: Option<String>,
    /// Saves and journal writes that failed since the daemon started.
    pub failures: u64,
}

impl Persistence {
    fn failed(&mut self, why: String) {
        self.error = Some(why);
        self.failures += 1;
    }
}

/// Where the configuration comes from, so that a reload reads it the same way.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    /// The file; `None`: the embedded default.
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

impl ConfigSource {
    pub fn load(&self) -> anyhow::Result<(Config, Resolved)> {
        let config = match &self.path {
            Some(path) => Config::from_file(path)?,
            None => Config::embedded(),
        };
        let resolved = config.resolve(&self.overrides)?;
        Ok((config, resolved))
    }
}

/// The policy in force: the configuration's, plus the entries added at run time that the
/// configuration does not hold.
pub fn effective_policy(mut policy: Policy, dynamic: &Dynamic) -> Policy {
    for kind in ListKind::ALL {
        let list = policy.list_mut(kind);
        // In order, so merged in one pass (a million entries after a restart).
        let added: Vec<(Cidr, u32)> = (dynamic.cidrs(kind))
            .filter(|cidr| !list.contains_key(cidr))
            .map(|cidr| (cidr, SOURCE_CLI))
            .collect();
        list.upsert_sorted(added.into_iter(), |_, _| {});
    }
    policy
}

pub async fn run(source: ConfigSource, pin: bool) -> anyhow::Result<()> {
    let mut prepared = prepare(source, pin).await?;
    let mut program = load_and_fill(&mut prepared)?;
    let observers = start_observers(
        &prepared,
        &program.limiter,
        program.events,
        program.sampling,
    )?;
    // Before the program answers a SYN, synproxy must be there to check the cookie it sent.
    let state_dir = prepared.config.paths.state_dir.clone();
    crate::netfilter::sync(netfilter_wanted(program.live.policy()), &state_dir)
        .context("setting up netfilter for [syn_proxy]")?;
    let attached =
        attach(&mut program.ebpf, &prepared, &program.map_handles).and_then(|interfaces| {
            let metrics = prepared.metrics.take();
            announce(
                &mut program.ebpf,
                &prepared,
                metrics,
                &program.live,
                &interfaces,
                observers.scrapes,
            )
            .map(|()| interfaces)
        });
    let interfaces = match attached {
        Ok(interfaces) => interfaces,
        Err(e) => {
            // A start that fails leaves the host as it found it.
            if let Err(undo) = crate::netfilter::remove(&state_dir) {
                warn!(error = %crate::error_chain(&undo), "could not remove netfilter's synproxy");
            }
            return Err(e);
        }
    };
    let protect = program.live.policy().protect.clone();
    // The fleet comes after the program enforces: nothing local waits on it.
    let (fleet, fleet_events) = match prepared.config.fleet.clone() {
        Some(settings) => {
            let handle = crate::fleet::client::start(settings.clone());
            (
                Some(FleetSync::new(
                    settings,
                    handle.changes,
                    handle.status,
                    std::mem::take(&mut prepared.dynamic.fleet_outbox),
                )),
                Some(handle.events),
            )
        }
        None => (None, None),
    };
    // One save in flight at a time.
    let (saves, saved) = mpsc::channel(1);
    let daemon = Daemon {
        ebpf: program.ebpf,
        live: program.live,
        limiter: program.limiter,
        counters: program.counters,
        dynamic: Arc::new(prepared.dynamic),
        store: prepared.store,
        source: prepared.source,
        settings: RunningSettings {
            interfaces: prepared.config.interfaces,
            xdp_mode: prepared.config.xdp_mode,
            metrics_listen: prepared.config.metrics_listen,
            paths: prepared.config.paths,
            runtime_entries: prepared.config.runtime_entries,
            fleet: prepared.config.fleet,
        },
        interfaces,
        pins: prepared.pins,
        started: Instant::now(),
        saved_bans: prepared.saved_bans,
        persistence: Persistence::default(),
        unrestored_bans: program.unrestored_bans,
        unsaved_since: None,
        saving: false,
        saves,
        drops: observers.drops,
        scans: observers.scans,
        lifted: Vec::new(),
        top: TopHistory::default(),
        ban_expiries: BinaryHeap::new(),
        attacks: AttackWatch::new(&protect),
        attack_samples: observers.attack_samples,
        fingerprints: program.fingerprints,
        fleet,
    };
    daemon
        .serve(
            prepared.socket,
            observers.captures,
            observers.new_bans,
            observers.scrape_requests,
            fleet_events,
            saved,
        )
        .await?;
    observers.reader.abort();
    info!("stopped");
    Ok(())
}

/// What the first phase checked and opened; nothing is loaded or attached yet.
struct Prepared {
    source: ConfigSource,
    /// The configuration, its policy with the saved run-time entries merged in.
    config: Resolved,
    /// Each interface's name, index and framing.
    interfaces: Vec<Target>,
    store: StateStore,
    dynamic: Dynamic,
    saved_bans: Vec<ActiveBan>,
    socket: ControlSocket,
    metrics: Option<TcpListener>,
    pins: Option<PinDir>,
}

/// Phase 1: everything that can be checked is checked, and everything that needs no program is
/// opened (state, socket, metrics listener, pin directory), before anything is loaded.
async fn prepare(source: ConfigSource, pin: bool) -> anyhow::Result<Prepared> {
    let (config, mut resolved) = source.load()?;
    let interfaces = interfaces::resolve(&config, &resolved.interfaces)?;
    let paths = &resolved.paths;
    let store = StateStore::open(&paths.state_dir).context("opening the state directory")?;
    let (dynamic, saved_bans) = store
        .load(SystemTime::now())
        .context("reading the saved state")?;
    resolved.policy = effective_policy(std::mem::take(&mut resolved.policy), &dynamic);
    live::check(&resolved.policy).context("checking the policy")?;
    let socket = ControlSocket::bind(&paths.socket, paths.socket_group.as_deref())
        .context("binding the control socket")?;
    let metrics = match resolved.metrics_listen {
        Some(address) => Some(metrics::bind(address).await?),
        None => None,
    };
    let pins = pin.then(|| PinDir::new(&paths.bpffs));
    if let Some(pins) = &pins {
        pins.prepare().context("preparing the pin directory")?;
    }
    Ok(Prepared {
        source,
        config: resolved,
        interfaces,
        store,
        dynamic,
        saved_bans,
        socket,
        metrics,
        pins,
    })
}

/// The program loaded, its policy in place, not yet attached.
struct Filled {
    ebpf: Ebpf,
    live: LivePolicy,
    limiter: LimiterMaps,
    counters: CounterMaps,
    events: EventRing,
    fingerprints: FingerprintMaps,
    sampling: SamplingOverride,
    map_handles: MapHandles,
    /// Saved bans the program could not take back (kept in saves until they expire).
    unrestored_bans: Vec<ActiveBan>,
}

/// Phase 2: load the program with maps sized for the policy and fill them, so that the policy
/// is in place before the program sees its first packet; bring back the bans in force.
fn load_and_fill(prepared: &mut Prepared) -> anyhow::Result<Filled> {
    let policy = std::mem::take(&mut prepared.config.policy);
    let capacities = Capacities::for_policy(&policy, prepared.config.runtime_entries);
    let Loaded { mut ebpf, maps } =
        loader::create_maps(capacities).context("loading the XDP program")?;
    let ProgramMaps {
        policy: policy_maps,
        mut limiter,
        mut counters,
        events,
        fingerprints,
        sampling,
        clock: _,
        handles: map_handles,
    } = maps;
    // The verifier runs beside the fill: it does not read the maps, and the program sees no
    // packet before it is attached.
    let (verified, live) = std::thread::scope(|scope| {
        let verifier = std::thread::Builder::new()
            .name("moat-verifier".into())
            .spawn_scoped(scope, || loader::verify(&mut ebpf))
            .context("starting the verifier's thread")?;
        let live = LivePolicy::install(policy_maps, policy, capacities);
        let verified = verifier
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        anyhow::Ok((verified, live))
    })?;
    // A failed fill closes the maps the verifier was reading the program against: its error
    // then says nothing more.
    let live = live.context("writing the policy into the program's maps")?;
    verified.context("loading the XDP program")?;
    log_policy(live.policy());
    let unrestored_bans = if live.policy().rate_limit.bans() {
        restore_bans(&mut limiter, prepared.pins.as_ref(), &prepared.saved_bans)
    } else {
        Vec::new()
    };
    if !live.policy().rate_limit.bans() && !prepared.saved_bans.is_empty() {
        info!(
            bans = prepared.saved_bans.len(),
            "saved bans not restored: the configuration bans no more"
        );
        prepared.saved_bans.clear();
    }
    let registered: Vec<_> = prepared
        .interfaces
        .iter()
        .map(|t| (t.if_index, t.framing))
        .collect();
    counters
        .register_interfaces(&registered)
        .context("registering the interfaces' counters")?;
    Ok(Filled {
        ebpf,
        live,
        limiter,
        counters,
        events,
        fingerprints,
        sampling,
        map_handles,
        unrestored_bans,
    })
}

/// What watches the program: the event reader and those it feeds.
struct Observers {
    /// The latest walk of the limiter's maps.
    scans: watch::Receiver<Arc<LimiterScan>>,
    captures: Arc<CaptureHub>,
    drops: Arc<Mutex<DropTally>>,
    /// Samples of protected destinations' traffic, for the attack watch.
    attack_samples: Arc<Mutex<SampleInbox>>,
    new_bans: mpsc::Receiver<(IpAddr, Duration)>,
    reader: JoinHandle<()>,
    /// The metrics server's end of the scrape channel; the daemon's end is `scrape_requests`.
    scrapes: mpsc::Sender<metrics::Scrape>,
    scrape_requests: mpsc::Receiver<metrics::Scrape>,
}

/// Phase 3: read the program's events (bans, samples) and hand them to the log, `moat top`
/// and captures; walk the limiter's maps on a thread of their own.
fn start_observers(
    prepared: &Prepared,
    limiter: &LimiterMaps,
    events: EventRing,
    sampling: SamplingOverride,
) -> anyhow::Result<Observers> {
    let reader = limiter
        .reader()
        .context("opening the limiter's maps for walks")?;
    let (scanned, scans) = watch::channel(Arc::new(LimiterScan::default()));
    std::thread::Builder::new()
        .name("limiter-scans".into())
        .spawn(move || {
            // Ends when the daemon (the receiver) is gone.
            loop {
                let scan = reader.scan(Instant::now() + LIMITER_SCAN_BUDGET);
                if scanned.send(Arc::new(scan)).is_err() {
                    return;
                }
                std::thread::sleep(LIMITER_SCAN_INTERVAL);
            }
        })
        .context("starting the limiter's walks")?;
    let names = prepared
        .interfaces
        .iter()
        .map(|t| (t.if_index, t.name.clone()))
        .collect();
    let captures = Arc::new(CaptureHub::new(sampling, names)?);
    let drops = Arc::new(Mutex::new(DropTally::default()));
    let attack_samples = Arc::new(Mutex::new(SampleInbox::default()));
    let (bans, new_bans) = mpsc::channel(BAN_QUEUE);
    let ip_first = prepared
        .interfaces
        .iter()
        .filter(|t| t.framing == Framing::Ip)
        .map(|t| t.if_index)
        .collect();
    let reader = events
        .spawn_reader(EventSinks::new(
            captures.sender(),
            drops.clone(),
            bans,
            attack_samples.clone(),
            ip_first,
        ))
        .context("polling the program's events")?;
    let (scrapes, scrape_requests) = mpsc::channel(4);
    Ok(Observers {
        scans,
        captures,
        attack_samples,
        drops,
        new_bans,
        reader,
        scrapes,
        scrape_requests,
    })
}

/// Phase 4: attach to every interface (or take over its pinned link), pin the maps, and let go
/// of links pinned for interfaces no longer configured. On error, dropping `ebpf` detaches
/// what was attached.
fn attach(
    ebpf: &mut Ebpf,
    prepared: &Prepared,
    map_handles: &MapHandles,
) -> anyhow::Result<Vec<Interface>> {
    let pins = prepared.pins.as_ref();
    let interfaces =
        interfaces::attach_all(ebpf, &prepared.interfaces, prepared.config.xdp_mode, pins)?;
    if let Some(pins) = pins {
        map_handles.pin(pins).context("pinning the maps")?;
        pins.remove_other_layouts()
            .context("removing maps pinned with another layout")?;
        // Every link moat attaches is pinned at its interface's path; any other pin holds a
        // link of an interface no longer configured (or renamed away).
        for stale in pins.pinned_links() {
            let held = interfaces.iter().any(|i| match &i.link {
                Attachment::Pinned(held) => held.path == stale.path,
                Attachment::Owned(_) => false,
            });
            if !held {
                info!(
                    interface = stale.interface,
                    "no longer configured; detaching"
                );
                let _ = std::fs::remove_file(&stale.path);
            }
        }
    }
    Ok(interfaces)
}

/// Phase 5: serve the metrics, and say what runs where.
fn announce(
    ebpf: &mut Ebpf,
    prepared: &Prepared,
    metrics: Option<TcpListener>,
    live: &LivePolicy,
    interfaces: &[Interface],
    scrapes: mpsc::Sender<metrics::Scrape>,
) -> anyhow::Result<()> {
    let program_id = loader::program(ebpf)?.info().map(|i| i.id()).ok();
    let mode = match live.policy().mode {
        Mode::Enforce => "enforcing",
        Mode::Monitor => "monitoring (nothing is dropped; would-be drops are counted)",
    };
    let metrics_address = match metrics {
        Some(listener) => {
            let address = listener.local_addr().ok();
            tokio::spawn(metrics::serve(listener, scrapes));
            address
        }
        None => None,
    };
    info!(
        program_id,
        interfaces = interfaces.len(),
        socket = %prepared.socket.path().display(),
        metrics = %metrics_address.map_or("off".into(), |a| format!("http://{a}/metrics")),
        "moat is {mode}"
    );
    service_manager::ready(&service_status(live.policy().mode, interfaces.len()));
    Ok(())
}

/// The line `systemctl status moat` shows.
fn service_status(mode: Mode, interfaces: usize) -> String {
    let doing = match mode {
        Mode::Enforce => "enforcing",
        Mode::Monitor => "monitoring",
    };
    format!("{doing} on {interfaces} interface(s)")
}

/// The running daemon's state; the control handlers work on it.
pub struct Daemon {
    ebpf: Ebpf,
    live: LivePolicy,
    limiter: LimiterMaps,
    counters: CounterMaps,
    /// Shared with a save in progress, which writes it away from the control thread; a change
    /// meanwhile copies it (`Arc::make_mut`).
    dynamic: Arc<Dynamic>,
    store: StateStore,
    /// A save is being written; its result arrives on `serve`'s channel.
    saving: bool,
    saves: mpsc::Sender<SaveResult>,
    source: ConfigSource,
    settings: RunningSettings,
    interfaces: Vec<Interface>,
    pins: Option<PinDir>,
    started: Instant,
    saved_bans: Vec<ActiveBan>,
    persistence: Persistence,
    /// Saved bans the program could not take back: saved again until they expire.
    unrestored_bans: Vec<ActiveBan>,
    /// When the first change not yet saved was made.
    unsaved_since: Option<tokio::time::Instant>,
    /// Dropped packets per source, from the samples.
    drops: Arc<Mutex<DropTally>>,
    /// The latest walk of the limiter's maps (counts, bans, passed per source).
    scans: watch::Receiver<Arc<LimiterScan>>,
    /// Bans lifted here, with when: a walk that started before a lift still lists the ban.
    lifted: Vec<(Instant, IpAddr)>,
    top: TopHistory,
    /// Bans known to this daemon, soonest expiry first, so that each expiry is logged.
    ban_expiries: BinaryHeap<Reverse<(SystemTime, IpAddr)>>,
    /// Attacks on the protected destinations, and the samples they are judged by.
    attacks: AttackWatch,
    attack_samples: Arc<Mutex<SampleInbox>>,
    fingerprints: FingerprintMaps,
    /// The fleet, with `[fleet]`.
    fleet: Option<FleetSync>,
}

/// What a reload does not change: refused (the first three), or applied at the next restart.
struct RunningSettings {
    interfaces: Vec<String>,
    xdp_mode: XdpMode,
    metrics_listen: Option<std::net::SocketAddr>,
    paths: Paths,
    runtime_entries: u32,
    fleet: Option<Fleet>,
}

impl RunningSettings {
    /// The keys `resolved` changes that take effect only at a restart.
    fn needing_restart(&self, resolved: &Resolved) -> Vec<String> {
        let paths = &resolved.paths;
        [
            ("socket", paths.socket != self.paths.socket),
            (
                "socket_group",
                paths.socket_group != self.paths.socket_group,
            ),
            ("bpffs", paths.bpffs != self.paths.bpffs),
            (
                "runtime_entries",
                resolved.runtime_entries != self.runtime_entries,
            ),
            ("fleet", resolved.fleet != self.fleet),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key.to_string())
        .collect()
    }
}

impl Daemon {
    /// Phase 6: the event loop, until a signal (or the socket server ends).
    async fn serve(
        mut self,
        socket: ControlSocket,
        captures: Arc<CaptureHub>,
        mut new_bans: mpsc::Receiver<(IpAddr, Duration)>,
        mut scrapes: mpsc::Receiver<metrics::Scrape>,
        mut fleet_events: Option<mpsc::Receiver<FleetEvent>>,
        mut saved: mpsc::Receiver<SaveResult>,
    ) -> anyhow::Result<()> {
        for ban in self.saved_bans.clone() {
            self.ban_expiries
                .push(Reverse((ban.expires_at, ban.source)));
        }
        self.expire(SystemTime::now());
        self.save_state();

        let (jobs_tx, mut jobs) = mpsc::channel(16);
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let shutdown = wait_for_shutdown();
        tokio::pin!(shutdown);
        let serve = socket.serve(jobs_tx, captures);
        tokio::pin!(serve);
        let mut ban_save = tokio::time::interval(BAN_SAVE_INTERVAL);
        let mut attack_watch = tokio::time::interval(attacks::TICK);
        loop {
            let next_expiry = self.next_expiry_in();
            let save_at = self
                .unsaved_since
                .filter(|_| !self.saving)
                .map(|t| t + STATE_SAVE_DELAY);
            // A change is answered once in force; the standby copy follows here.
            let catch_up_at = self.live.catch_up_due().map(tokio::time::Instant::from_std);
            tokio::select! {
                result = &mut shutdown => {
                    result?;
                    break;
                }
                () = &mut serve => break,
                _ = hangup.recv() => {
                    if let Err(e) = self.reload("SIGHUP") {
                        warn!(cause = "SIGHUP", error = %format!("{e:#}"), "reload rejected; the running policy stays");
                    }
                }
                Some((request, reply_to)) = jobs.recv() => {
                    // The client hung up while the request waited: withdrawn, not applied.
                    if !reply_to.is_closed() {
                        let response = self.handle(request);
                        let _ = reply_to.send(response);
                    }
                }
                Some((source, ttl)) = new_bans.recv() => {
                    self.track_ban(SystemTime::now() + ttl, source);
                    self.share_ban(source, ttl);
                    self.state_changed();
                }
                Some(events) = next_fleet_events(&mut fleet_events) => self.on_fleet(events),
                Some(reply_to) = scrapes.recv() => {
                    let _ = reply_to.send(self.metrics());
                }
                () = tokio::time::sleep(next_expiry) => self.expire(SystemTime::now()),
                _ = ban_save.tick() => self.save_bans_if_changed(),
                _ = attack_watch.tick() => self.watch_attacks(),
                () = crate::sleep_until(catch_up_at), if catch_up_at.is_some() => self.live.catch_up(),
                () = crate::sleep_until(save_at), if save_at.is_some() => self.save_state(),
                Some(result) = saved.recv() => self.saved(result),
            }
        }
        // The stop saves again, after the save in progress (never two writers at once).
        if self.saving
            && let Some(result) = saved.recv().await
        {
            self.saved(result);
        }
        service_manager::stopping();
        // What the fleet settled meanwhile leaves the outbox the stop saves (a change already
        // in the bucket must not be published again by the next start).
        if let Some(events) = fleet_events.as_mut() {
            let mut settled = Vec::new();
            while let Ok(event) = events.try_recv() {
                settled.push(event);
            }
            self.on_fleet(settled);
        }
        self.stop();
        Ok(())
    }

    /// Remembers a ban's expiry, to log it; no more than the ban map holds, so that a flood of
    /// bans costs bounded memory (beyond that, an expiry goes unlogged).
    fn track_ban(&mut self, expires_at: SystemTime, source: IpAddr) {
        if self.ban_expiries.len() < self.live.capacities().rate_sources as usize {
            self.ban_expiries.push(Reverse((expires_at, source)));
        }
    }

    /// How long until the next entry expires (at most [`EXPIRY_CHECK_INTERVAL`]).
    fn next_expiry_in(&self) -> Duration {
        let ban = self.ban_expiries.peek().map(|Reverse((at, _))| *at);
        let entry = self.dynamic.next_expiry();
        ban.into_iter()
            .chain(entry)
            .min()
            .map(|t| {
                t.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            })
            .unwrap_or(EXPIRY_CHECK_INTERVAL)
            .min(EXPIRY_CHECK_INTERVAL)
    }

    /// Schedules a save of the state (sooner, if one is scheduled later).
    fn state_changed(&mut self) {
        let now = tokio::time::Instant::now();
        self.unsaved_since = Some(self.unsaved_since.map_or(now, |at| at.min(now)));
    }

    /// Schedules a save of the state after a change from the fleet (see [`FLEET_SAVE_DELAY`]).
    fn state_changed_by_fleet(&mut self) {
        self.unsaved_since.get_or_insert_with(|| {
            tokio::time::Instant::now() + FLEET_SAVE_DELAY - STATE_SAVE_DELAY
        });
    }

    /// Starts a save of the dynamic entries and the bans in force, written away from the control
    /// thread (a million entries take a few hundred milliseconds to write); the result comes
    /// back to [`Self::saved`]. A failure is logged, not fatal: the program keeps enforcing
    /// whatever happens to the disk.
    fn save_state(&mut self) {
        if self.saving {
            // Saved again once the save in progress is done.
            self.state_changed();
            return;
        }
        let bans = self.prepare_save();
        let writer = match self.store.begin_save() {
            Ok(writer) => writer,
            Err(e) => return self.save_failed(&e),
        };
        self.saving = true;
        let snapshot = Arc::clone(&self.dynamic);
        let saves = self.saves.clone();
        let failures_before = self.persistence.failures;
        tokio::task::spawn_blocking(move || {
            // A panic must still end the save, or no save would ever start again.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                writer.write(&snapshot, &bans)
            }))
            .unwrap_or_else(|_| Err(writer.failed("the state writer panicked")));
            // A copy the daemon no longer shares is freed here, not on the control thread.
            drop(snapshot);
            // Room is always there: one save in flight at a time.
            let _ = saves.try_send(SaveResult {
                result,
                bans,
                failures_before,
            });
        });
    }

    /// Saves now, on this thread (the stop).
    fn save_state_now(&mut self) {
        let bans = self.prepare_save();
        let result = self.store.save(&self.dynamic, &bans);
        let failures_before = self.persistence.failures;
        self.saved(SaveResult {
            result,
            bans,
            failures_before,
        });
    }

    /// What a save needs besides the entries: the bans to save, and the fleet's outbox in the
    /// entries' record.
    fn prepare_save(&mut self) -> Vec<ActiveBan> {
        self.unsaved_since = None;
        // Without a fleet there is nothing to publish (a node that left it keeps no outbox).
        Arc::make_mut(&mut self.dynamic).fleet_outbox = self
            .fleet
            .as_ref()
            .map(FleetSync::outbox)
            .unwrap_or_default();
        self.bans_to_save()
    }

    /// A save is done.
    fn saved(
        &mut self,
        SaveResult {
            result,
            bans,
            failures_before,
        }: SaveResult,
    ) {
        self.saving = false;
        match result {
            Ok(()) => {
                self.saved_bans = bans;
                if self.persistence.failures != failures_before {
                    // A journal write failed while this save was written: that change is in
                    // neither. The next save holds it.
                    self.state_changed();
                } else if self.persistence.error.take().is_some() {
                    info!("saved the state again: everything in force is saved");
                }
                // A big import leaves freed request buffers behind; give them back.
                // SAFETY: malloc_trim only walks the allocator's own free lists.
                unsafe { libc::malloc_trim(0) };
            }
            Err(e) => self.save_failed(&e),
        }
    }

    fn save_failed(&mut self, e: &StateError) {
        let why = crate::error_chain(e);
        error!(
            error = %why,
            retry_in = %humantime::format_duration(STATE_SAVE_RETRY),
            "could not save the state; what is in force stays, and the save is retried"
        );
        self.persistence.failed(why);
        self.unsaved_since =
            Some(tokio::time::Instant::now() + STATE_SAVE_RETRY - STATE_SAVE_DELAY);
    }

    /// The latest walk of the limiter's maps.
    fn limiter_scan(&self) -> Arc<LimiterScan> {
        self.scans.borrow().clone()
    }

    /// The bans in force as the latest walk found them, less those lifted since it started.
    fn bans_in_force_now(&mut self) -> Vec<ActiveBan> {
        let scan = self.limiter_scan();
        let started = scan.started;
        self.lifted
            .retain(|(at, _)| started.is_none_or(|started| *at >= started));
        if self.lifted.is_empty() {
            return scan.bans.clone();
        }
        let lifted: std::collections::HashSet<IpAddr> =
            self.lifted.iter().map(|(_, source)| *source).collect();
        scan.bans
            .iter()
            .filter(|ban| !lifted.contains(&ban.source))
            .cloned()
            .collect()
    }

    /// The bans in force, and those saved before that the program could not take back. When
    /// the latest walk did not finish, the bans saved before (still unexpired) are kept too:
    /// never saved with less than is in force.
    fn bans_to_save(&mut self) -> Vec<ActiveBan> {
        let mut bans = self.bans_in_force_now();
        let now = SystemTime::now();
        // Sets, not scans: under a flood these lists hold every banned source.
        let mut listed: std::collections::HashSet<IpAddr> =
            bans.iter().map(|ban| ban.source).collect();
        let lifted: std::collections::HashSet<IpAddr> =
            self.lifted.iter().map(|(_, source)| *source).collect();
        if !self.limiter_scan().complete {
            for ban in &self.saved_bans {
                if ban.expires_at > now
                    && !lifted.contains(&ban.source)
                    && listed.insert(ban.source)
                {
                    bans.push(ban.clone());
                }
            }
        }
        self.unrestored_bans.retain(|ban| ban.expires_at > now);
        for ban in &self.unrestored_bans {
            if listed.insert(ban.source) {
                bans.push(ban.clone());
            }
        }
        bans.sort_by_key(|b| b.expires_at);
        bans
    }

    fn save_bans_if_changed(&mut self) {
        if self.bans_to_save() != self.saved_bans {
            self.save_state();
        }
    }

    /// Re-reads the configuration and applies its policy; an error leaves the running one.
    /// Returns the keys that changed but take effect only at a restart.
    fn reload(&mut self, cause: &str) -> anyhow::Result<Vec<String>> {
        service_manager::reloading();
        let result = self.apply_config(cause);
        service_manager::ready(&service_status(
            self.live.policy().mode,
            self.interfaces.len(),
        ));
        result
    }

    fn apply_config(&mut self, cause: &str) -> anyhow::Result<Vec<String>> {
        let (_, resolved) = self.source.load()?;
        if resolved.interfaces != self.settings.interfaces
            || resolved.xdp_mode != self.settings.xdp_mode
            || resolved.paths.state_dir != self.store.dir()
            || resolved.metrics_listen != self.settings.metrics_listen
        {
            anyhow::bail!(
                "interfaces, xdp_mode, state_dir and metrics_listen cannot change on reload; \
                 restart moat to change them"
            );
        }
        let needs_restart = self.settings.needing_restart(&resolved);
        let policy = effective_policy(resolved.policy, &self.dynamic);
        let protect = policy.protect.clone();
        self.forget_changed_entries(&protect);
        // synproxy goes in before the program answers SYNs, and out after it stopped.
        let wanted = netfilter_wanted(&policy).cloned();
        let had = netfilter_wanted(self.live.policy()).cloned();
        if let Some(new) = &wanted {
            // Until the switch, the old program still answers the old ports.
            let bridge = had
                .as_ref()
                .map_or_else(|| new.clone(), |old| new.covering(old));
            crate::netfilter::sync(Some(&bridge), self.store.dir())
                .context("setting up netfilter for [syn_proxy]")?;
        }
        if let Err(e) = self.live.replace(policy) {
            // The running policy stays: so does the netfilter set-up it had.
            if let Err(undo) = crate::netfilter::sync(had.as_ref(), self.store.dir()) {
                warn!(error = %crate::error_chain(&undo), "could not put netfilter back as it was");
            }
            return Err(e.into());
        }
        // The new policy is in force whatever happens here: a failure is the log's.
        if (wanted.is_none() || had.is_some())
            && let Err(e) = crate::netfilter::sync(wanted.as_ref(), self.store.dir())
        {
            warn!(error = %crate::error_chain(&e), "could not bring netfilter to the new [syn_proxy]");
        }
        self.reconfigure_attacks(&protect);
        if needs_restart.is_empty() {
            info!(cause, "reloaded the configuration");
        } else {
            warn!(
                cause,
                not_applied = needs_restart.join(", "),
                "reloaded the configuration; not applied: needs restart"
            );
        }
        log_policy(self.live.policy());
        if !self.live.policy().rate_limit.bans() {
            self.lift_bans(cause);
        }
        Ok(needs_restart)
    }

    /// Lifts every ban, logging each: the policy bans no more, and a ban the program no longer
    /// checks must not be listed as in force.
    fn lift_bans(&mut self, cause: &str) {
        match self.limiter.lift_all() {
            Ok(lifted) => {
                let now = Instant::now();
                for source in &lifted {
                    info!(source = %source, cause, "unbanned: the policy no longer bans");
                    self.lifted.push((now, *source));
                }
                if !lifted.is_empty() {
                    self.ban_expiries.clear();
                    self.state_changed();
                }
            }
            Err(e) => warn!(error = %crate::error_chain(&e), "could not lift the bans"),
        }
    }

    /// Leaves the pinned program enforcing, or detaches what this process attached.
    fn stop(mut self) {
        self.live.catch_up();
        self.save_state_now();
        self.remove_all_fingerprints();
        log_counters(&self.counters, &self.interfaces);
        let pinned = self
            .interfaces
            .iter()
            .any(|i| matches!(i.link, Attachment::Pinned(_)));
        for interface in self.interfaces.drain(..) {
            match interface.link {
                // Closing the only fd of an unpinned link detaches it.
                Attachment::Owned(link) => {
                    drop(link);
                    info!(interface = interface.name, "detached");
                }
                Attachment::Pinned(held) => {
                    match held.restore_pin(&interface.name) {
                        Ok(true) => warn!(
                            interface = interface.name,
                            "the link's pin had been removed; pinned it again"
                        ),
                        Ok(false) => {}
                        Err(e) => error!(
                            interface = interface.name,
                            error = %crate::error_chain(&e),
                            "the link's pin is gone and cannot be restored: the program detaches now"
                        ),
                    }
                    info!(
                        interface = interface.name,
                        "the pinned program keeps enforcing; `moat down` detaches it"
                    );
                }
            }
        }
        // After the program is detached: no SYN-ACK of its is left for synproxy to check.
        if !pinned && let Err(e) = crate::netfilter::remove(self.store.dir()) {
            warn!(error = %crate::error_chain(&e), "could not remove netfilter's synproxy");
        }
    }
}

/// What netfilter must hold for `policy`: synproxy behind the program's SYN cookies, in enforce
/// mode only (in monitor mode the SYNs go on to the stack untouched, and moat changes nothing
/// of it).
fn netfilter_wanted(policy: &Policy) -> Option<&SynProxy> {
    policy
        .syn_proxy
        .as_ref()
        .filter(|_| policy.mode == Mode::Enforce)
}

/// Bans of the program before this one (same boot, same layout) or else from the state file.
/// Returns the saved bans that could not be written back: they stay in the state file until
/// they expire, so that a failed restore never saves the state with less.
fn restore_bans(
    limiter: &mut LimiterMaps,
    pins: Option<&PinDir>,
    saved: &[ActiveBan],
) -> Vec<ActiveBan> {
    if let Some(pins) = pins {
        match pins.open_map(agent_common::maps::BANS) {
            Some(previous) => match limiter.carry_over(previous) {
                Ok(count) => {
                    if count > 0 {
                        info!(bans = count, "carried over the bans of the program before");
                    }
                    return Vec::new();
                }
                Err(e) => warn!(
                    error = %crate::error_chain(&e),
                    "the pinned ban map does not fit this moat's layout; restoring from the state file"
                ),
            },
            None => {
                let others = pins.other_layouts();
                if !others.is_empty() {
                    warn!(
                        layouts = others.join(", "),
                        "the pinned maps have another layout; restoring the bans from the state file"
                    );
                }
            }
        }
    }
    match limiter.restore(saved) {
        Ok(0) => Vec::new(),
        Ok(count) => {
            info!(
                bans = count,
                "restored the bans in force from the state file"
            );
            Vec::new()
        }
        Err(e) => {
            error!(
                error = %crate::error_chain(&e),
                "could not restore the bans; they stay in the state file until they expire"
            );
            saved.to_vec()
        }
    }
}

fn log_policy(policy: &Policy) {
    for kind in ListKind::ALL {
        let list = policy.list(kind);
        let v4 = list.keys().filter(|c| c.net().addr().is_ipv4()).count();
        info!(ipv4 = v4, ipv6 = list.len() - v4, "{} loaded", kind.name());
    }
    info!(rules = policy.rules.len(), "rules loaded");
    let rate = &policy.rate_limit;
    if rate.is_on() {
        info!(
            pps = rate.pps,
            bps = rate.bps,
            burst_packets = rate.burst_packets,
            ban_after = %humantime::format_duration(rate.ban_after),
            ban_ttl = %rate.ban_ttl.map_or("never".to_string(), |t| humantime::format_duration(t).to_string()),
            "rate limit on"
        );
        if let Some(written) = rate.burst_raised_from {
            warn!(
                burst_packets = written,
                raised_to = rate.burst_packets,
                "rate_limit: burst_packets is under one tick of the program's clock (10 ms of pps); raised"
            );
        }
    }
}

/// Sleeps until `at`; never returns when there is nothing to wait for.
/// The fleet task's next events, as many as have come (up to [`FLEET_BATCH`]); never,
/// without a fleet.
async fn next_fleet_events(
    events: &mut Option<mpsc::Receiver<FleetEvent>>,
) -> Option<Vec<FleetEvent>> {
    let Some(events) = events else {
        return std::future::pending().await;
    };
    let mut batch = vec![events.recv().await?];
    while batch.len() < FLEET_BATCH {
        match events.try_recv() {
            Ok(event) => batch.push(event),
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => info!(signal = "SIGTERM", "shutting down"),
        _ = interrupt.recv() => info!(signal = "SIGINT", "shutting down"),
    }
    Ok(())
}

/// The final counters, so that a run leaves a record of what it did.
fn log_counters(counters: &CounterMaps, interfaces: &[Interface]) {
    match counters.snapshot() {
        Ok(snapshot) => {
            for row in snapshot.rows {
                info!(
                    interface = interface_name(interfaces, row.if_index),
                    action = row.action.name(),
                    reason = row.reason.name(),
                    packets = row.counter.packets,
                    bytes = row.counter.bytes,
                    "counter"
                );
            }
        }
        Err(e) => warn!(error = %crate::error_chain(&e), "could not read the counters"),
    }
}
