//! `moat run`: load, fill, attach (or take over the pinned links of the daemon before), then
//! serve the control socket, reloads and expiries until a signal.

mod handlers;

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    ffi::CString,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use agent_common::lists::SOURCE_CLI;
use anyhow::{Context as _, anyhow};
use aya::Ebpf;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    bans,
    capture::CaptureHub,
    config::{Config, Mode, Overrides, Policy, Settings},
    control::server::ControlSocket,
    events::SampleSinks,
    live::{ListKind, LivePolicy},
    loader::{self, Capacities},
    metrics,
    pins::{self, LinkMode, PinDir},
    policy,
    state::{Dynamic, SavedBan, StateStore},
    stats::Snapshot,
    top::{DropTally, TopHistory},
};

/// New bans waiting for the daemon; beyond this, they are saved by the periodic check.
const BAN_QUEUE: usize = 1024;
/// How often bans are read back from the program and saved when they changed.
const BAN_SAVE_INTERVAL: Duration = Duration::from_secs(10);
/// Expiries are checked at least this often, so that a wall-clock jump is noticed.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How long after a change the state is saved: the reply goes out first (a change is in force
/// once its maps are written), and a burst of changes is saved once.
const STATE_SAVE_DELAY: Duration = Duration::from_millis(50);

/// An interface being protected.
pub struct Interface {
    pub name: String,
    pub if_index: u32,
    pub mode: LinkMode,
    /// `Some`: attached by this process and detached on exit (`--no-pin`); `None`: the link is
    /// pinned and outlives the daemon.
    link: Option<aya::programs::xdp::XdpLinkId>,
}

impl Interface {
    /// Whether the link is pinned (it outlives the daemon).
    pub fn pinned(&self) -> bool {
        self.link.is_none()
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
    pub fn load(&self) -> anyhow::Result<(Config, Settings)> {
        let config = match &self.path {
            Some(path) => Config::from_file(path)?,
            None => Config::embedded(),
        };
        let settings = config.resolve(&self.overrides)?;
        Ok((config, settings))
    }
}

/// The running daemon's state; the control handlers work on it.
pub struct Daemon {
    ebpf: Ebpf,
    live: LivePolicy,
    dynamic: Dynamic,
    store: StateStore,
    source: ConfigSource,
    settings: RunningSettings,
    interfaces: Vec<Interface>,
    pins: Option<PinDir>,
    started: Instant,
    saved_bans: Vec<SavedBan>,
    /// When the first change not yet saved was made.
    unsaved_since: Option<tokio::time::Instant>,
    /// Dropped packets per source, from the samples.
    drops: Arc<Mutex<DropTally>>,
    top: TopHistory,
    /// Bans known to this daemon, soonest expiry first, so that each expiry is logged.
    ban_expiries: BinaryHeap<Reverse<(SystemTime, std::net::IpAddr)>>,
}

/// What a reload may not change.
struct RunningSettings {
    interfaces: Vec<String>,
    xdp_mode: crate::config::XdpMode,
    metrics_listen: Option<std::net::SocketAddr>,
}

/// The policy in force: the configuration's, plus the entries added at run time that the
/// configuration does not hold.
pub fn effective_policy(mut policy: Policy, dynamic: &Dynamic) -> Policy {
    for cidr in dynamic.list(ListKind::Allow).keys() {
        policy.allowlist.entry(*cidr).or_insert(SOURCE_CLI);
    }
    for cidr in dynamic.list(ListKind::Block).keys() {
        policy.blocklist.entry(*cidr).or_insert(SOURCE_CLI);
    }
    policy
}

pub async fn run(source: ConfigSource, pin: bool) -> anyhow::Result<()> {
    let (config, settings) = source.load()?;
    // Everything that can be checked is checked before anything is loaded or attached.
    let resolved = resolve_interfaces(&config, &settings)?;
    let paths = settings.paths.clone();
    let store = StateStore::open(&paths.state_dir).context("opening the state directory")?;
    let (dynamic, saved_bans) = store
        .load(SystemTime::now())
        .context("reading the saved state")?;
    let policy = effective_policy(settings.policy, &dynamic);
    policy::check(&policy).context("checking the policy")?;
    let socket = ControlSocket::bind(&paths.socket, paths.socket_group.as_deref())
        .context("binding the control socket")?;
    let metrics_listener = match settings.metrics_listen {
        Some(address) => Some(metrics::bind(address).await?),
        None => None,
    };
    let pins = pin.then(|| PinDir::new(&paths.bpffs));
    if let Some(pins) = &pins {
        pins.prepare().context("preparing the pin directory")?;
    }

    let capacities = Capacities::for_policy(&policy, settings.runtime_entries);
    let mut ebpf = loader::load(capacities).context("loading the XDP program")?;
    // The policy is in place before the program sees its first packet.
    let live = LivePolicy::install(&mut ebpf, policy, capacities)
        .context("writing the policy into the program's maps")?;
    log_policy(live.policy());
    restore_bans(&mut ebpf, pins.as_ref(), &saved_bans);
    let if_indexes: Vec<u32> = resolved.iter().map(|(_, i)| *i).collect();
    loader::register_interfaces(&mut ebpf, &if_indexes)?;
    let names = resolved.iter().map(|(n, i)| (*i, n.clone())).collect();
    let captures = Arc::new(CaptureHub::new(&mut ebpf, names)?);
    let drops = Arc::new(Mutex::new(DropTally::default()));
    let (bans_tx, mut new_bans) = mpsc::channel(BAN_QUEUE);
    let events = crate::events::spawn_reader(
        &mut ebpf,
        SampleSinks {
            captures: captures.sender(),
            drops: drops.clone(),
            bans: bans_tx,
        },
    )?;

    let interfaces = attach_all(&mut ebpf, &resolved, settings.xdp_mode, pins.as_ref())?;
    if let Some(pins) = &pins {
        pins.pin_maps(&ebpf).context("pinning the maps")?;
        // Links pinned for interfaces no longer configured are let go.
        for stale in pins.pinned_links() {
            if !interfaces.iter().any(|i| i.name == stale.interface) {
                info!(
                    interface = stale.interface,
                    "no longer configured; detaching"
                );
                let _ = std::fs::remove_file(&stale.path);
            }
        }
    }
    let program_id = loader::program(&mut ebpf)?.info().map(|i| i.id()).ok();
    let mode = match live.policy().mode {
        Mode::Enforce => "enforcing",
        Mode::Monitor => "monitoring (nothing is dropped; would-be drops are counted)",
    };
    let (scrapes_tx, mut scrapes) = mpsc::channel(4);
    let metrics_address = match metrics_listener {
        Some(listener) => {
            let address = listener.local_addr().ok();
            tokio::spawn(metrics::serve(listener, scrapes_tx));
            address
        }
        None => None,
    };
    info!(
        program_id,
        interfaces = interfaces.len(),
        socket = %socket.path().display(),
        metrics = %metrics_address.map_or("off".into(), |a| format!("http://{a}/metrics")),
        "moat is {mode}"
    );

    let mut daemon = Daemon {
        ebpf,
        live,
        dynamic,
        store,
        source,
        settings: RunningSettings {
            interfaces: settings.interfaces,
            xdp_mode: settings.xdp_mode,
            metrics_listen: settings.metrics_listen,
        },
        interfaces,
        pins,
        started: Instant::now(),
        saved_bans,
        unsaved_since: None,
        drops,
        top: TopHistory::default(),
        ban_expiries: BinaryHeap::new(),
    };
    for ban in daemon.saved_bans.clone() {
        daemon
            .ban_expiries
            .push(Reverse((ban.expires_at, ban.source)));
    }
    daemon.expire(SystemTime::now());
    daemon.save_state();

    let (jobs_tx, mut jobs) = mpsc::channel(16);
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let shutdown = wait_for_shutdown();
    tokio::pin!(shutdown);
    let serve = socket.serve(jobs_tx, captures);
    tokio::pin!(serve);
    let mut ban_save = tokio::time::interval(BAN_SAVE_INTERVAL);
    loop {
        let next_expiry = daemon.next_expiry_in();
        let save_at = daemon.unsaved_since.map(|t| t + STATE_SAVE_DELAY);
        tokio::select! {
            result = &mut shutdown => {
                result?;
                break;
            }
            () = &mut serve => break,
            _ = hangup.recv() => {
                if let Err(e) = daemon.reload("SIGHUP") {
                    warn!(cause = "SIGHUP", error = %format!("{e:#}"), "reload rejected; the running policy stays");
                }
            }
            Some((request, reply_to)) = jobs.recv() => {
                let response = daemon.handle(request);
                let _ = reply_to.send(response);
            }
            Some((source, ttl)) = new_bans.recv() => {
                daemon.ban_expiries.push(Reverse((SystemTime::now() + ttl, source)));
                daemon.state_changed();
            }
            Some(reply_to) = scrapes.recv() => {
                let _ = reply_to.send(daemon.metrics());
            }
            () = tokio::time::sleep(next_expiry) => daemon.expire(SystemTime::now()),
            _ = ban_save.tick() => daemon.save_bans_if_changed(),
            () = sleep_until(save_at), if save_at.is_some() => {
                daemon.save_state();
                // A big import leaves freed request buffers behind; give them back.
                // SAFETY: malloc_trim only walks the allocator's own free lists.
                unsafe { libc::malloc_trim(0) };
            }
        }
    }
    events.abort();
    daemon.stop();
    info!("stopped");
    Ok(())
}

impl Daemon {
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

    /// Schedules a save of the state.
    fn state_changed(&mut self) {
        self.unsaved_since
            .get_or_insert_with(tokio::time::Instant::now);
    }

    /// Saves the dynamic entries and the bans in force; a failure is logged, not fatal: the
    /// program keeps enforcing whatever happens to the disk.
    fn save_state(&mut self) {
        self.unsaved_since = None;
        let bans = match bans::active(&mut self.ebpf) {
            Ok(bans) => bans,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "could not read the bans");
                self.saved_bans.clone()
            }
        };
        match self.store.save(&self.dynamic, &bans) {
            Ok(()) => self.saved_bans = bans,
            Err(e) => error!(error = %crate::error_chain(&e), "could not save the state"),
        }
    }

    fn save_bans_if_changed(&mut self) {
        match bans::active(&mut self.ebpf) {
            Ok(bans) if bans != self.saved_bans => self.save_state(),
            Ok(_) => {}
            Err(e) => warn!(error = %crate::error_chain(&e), "could not read the bans"),
        }
    }

    /// Re-reads the configuration and applies its policy; an error leaves the running one.
    fn reload(&mut self, cause: &str) -> anyhow::Result<()> {
        let (_, settings) = self.source.load()?;
        if settings.interfaces != self.settings.interfaces
            || settings.xdp_mode != self.settings.xdp_mode
            || settings.paths.state_dir != self.store.dir()
            || settings.metrics_listen != self.settings.metrics_listen
        {
            anyhow::bail!(
                "interfaces, xdp_mode, state_dir and metrics_listen cannot change on reload; \
                 restart moat to change them"
            );
        }
        let policy = effective_policy(settings.policy, &self.dynamic);
        self.live.replace(&mut self.ebpf, policy)?;
        info!(cause, "reloaded the configuration");
        log_policy(self.live.policy());
        Ok(())
    }

    /// Leaves the pinned program enforcing, or detaches what this process attached.
    fn stop(mut self) {
        self.save_state();
        log_counters(&self.ebpf, &self.interfaces);
        let Ok(program) = loader::program(&mut self.ebpf) else {
            return;
        };
        for interface in self.interfaces.drain(..) {
            match interface.link {
                Some(link) => loader::detach(program, &interface.name, link),
                None => info!(
                    interface = interface.name,
                    "the pinned program keeps enforcing; `moat down` detaches it"
                ),
            }
        }
    }
}

/// Bans of the program before this one (same boot) or, after a reboot, from the state file.
fn restore_bans(ebpf: &mut Ebpf, pins: Option<&PinDir>, saved: &[SavedBan]) {
    let previous = pins.and_then(|p| p.open_map(agent_common::maps::BANS));
    let restored = match previous {
        Some(map) => bans::carry_over(ebpf, map),
        None => bans::restore(ebpf, saved),
    };
    match restored {
        Ok(0) => {}
        Ok(count) => info!(bans = count, "restored the bans in force"),
        Err(e) => warn!(error = %crate::error_chain(&e), "could not restore the bans"),
    }
}

fn attach_all(
    ebpf: &mut Ebpf,
    resolved: &[(String, u32)],
    mode: crate::config::XdpMode,
    pins: Option<&PinDir>,
) -> anyhow::Result<Vec<Interface>> {
    let program = loader::program(ebpf)?;
    let mut interfaces = Vec::with_capacity(resolved.len());
    for (name, if_index) in resolved {
        if let Some(pins) = pins
            && let Some(link_mode) = pins::adopt(pins, program, name, mode)?
        {
            info!(
                interface = name,
                mode = link_mode.name(),
                "took over the pinned link: the new program replaced the old in one step"
            );
            interfaces.push(Interface {
                name: name.clone(),
                if_index: *if_index,
                mode: link_mode,
                link: None,
            });
            continue;
        }
        // On error, `ebpf` is dropped on return and detaches what was attached so far.
        let attachment = loader::attach(program, name, *if_index, mode)?;
        let link = match pins {
            Some(pins) => {
                pins::pin_link(pins, program, attachment.link, name, attachment.mode)?;
                None
            }
            None => Some(attachment.link),
        };
        info!(
            interface = name,
            if_index,
            mode = attachment.mode.name(),
            pinned = link.is_none(),
            "attached"
        );
        interfaces.push(Interface {
            name: name.clone(),
            if_index: *if_index,
            mode: attachment.mode,
            link,
        });
    }
    Ok(interfaces)
}

fn resolve_interfaces(config: &Config, settings: &Settings) -> anyhow::Result<Vec<(String, u32)>> {
    settings
        .interfaces
        .iter()
        .map(|name| {
            let c_name = CString::new(name.as_str())
                .map_err(|_| anyhow!("interface name {name:?} contains NUL"))?;
            // SAFETY: c_name is a valid NUL-terminated string.
            let if_index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
            if if_index == 0 {
                let location = config
                    .locate_interface(name)
                    .map(|l| format!("{l}: "))
                    .unwrap_or_default();
                return Err(anyhow!("{location}interface {name:?} does not exist"));
            }
            Ok((name.clone(), if_index))
        })
        .collect()
}

fn log_policy(policy: &Policy) {
    let count = |list: &crate::config::ListEntries| {
        let v4 = list.keys().filter(|c| c.net().addr().is_ipv4()).count();
        (v4, list.len() - v4)
    };
    let (allow_v4, allow_v6) = count(&policy.allowlist);
    let (block_v4, block_v6) = count(&policy.blocklist);
    info!(ipv4 = allow_v4, ipv6 = allow_v6, "allowlist loaded");
    info!(ipv4 = block_v4, ipv6 = block_v6, "blocklist loaded");
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
    }
}

/// Sleeps until `at`; never returns when there is nothing to wait for.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
fn log_counters(ebpf: &Ebpf, interfaces: &[Interface]) {
    match Snapshot::of_ebpf(ebpf) {
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

fn interface_name(interfaces: &[Interface], if_index: Option<u32>) -> String {
    if_index
        .and_then(|i| interfaces.iter().find(|f| f.if_index == i))
        .map_or_else(|| "(unregistered)".to_string(), |f| f.name.clone())
}
