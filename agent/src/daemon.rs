//! `moat run`: load, fill, attach, serve until a signal, detach.

use std::{ffi::CString, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya::Ebpf;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::{Config, Mode, Overrides, Policy, Settings},
    live::LivePolicy,
    loader,
    policy::CompiledPolicy,
    stats::Snapshot,
};

/// An interface to protect, resolved to its index.
struct Interface {
    name: String,
    if_index: u32,
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

pub async fn run(source: ConfigSource) -> anyhow::Result<()> {
    let (config, settings) = source.load()?;
    // Everything that can be checked is checked before anything is loaded or attached.
    let interfaces = resolve_interfaces(&config, &settings)?;
    let policy = &settings.policy;
    let compiled = CompiledPolicy::compile(policy).context("compiling the policy")?;

    let mut ebpf = loader::load(compiled.capacities).context("loading the XDP program")?;
    // The policy is in place before the program sees its first packet.
    let mut live = LivePolicy::install(&mut ebpf, policy, &compiled)
        .context("writing the policy into the program's maps")?;
    drop(compiled);
    log_policy(policy);
    let if_indexes: Vec<u32> = interfaces.iter().map(|i| i.if_index).collect();
    loader::register_interfaces(&mut ebpf, &if_indexes)?;
    let events = crate::events::spawn_reader(&mut ebpf)?;

    let program = loader::program(&mut ebpf)?;
    let mut attachments = Vec::with_capacity(interfaces.len());
    for interface in &interfaces {
        // On error, `ebpf` is dropped on return and detaches what was attached so far.
        let attachment = loader::attach(
            program,
            &interface.name,
            interface.if_index,
            settings.xdp_mode,
        )?;
        info!(
            interface = attachment.interface,
            if_index = interface.if_index,
            mode = attachment.mode,
            "attached"
        );
        attachments.push(attachment);
    }
    let program_id = program.info().map(|i| i.id()).ok();
    let mode = match policy.mode {
        Mode::Enforce => "enforcing",
        Mode::Monitor => "monitoring (nothing is dropped; would-be drops are counted)",
    };
    info!(
        program_id,
        interfaces = interfaces.len(),
        "moat is {mode}; stop with SIGINT or SIGTERM"
    );

    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let shutdown = wait_for_shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            result = &mut shutdown => {
                result?;
                break;
            }
            _ = hangup.recv() => reload(&source, &settings, &mut live, &mut ebpf),
        }
    }
    events.abort();

    log_counters(&ebpf, &interfaces);
    let program = loader::program(&mut ebpf)?;
    for attachment in attachments {
        loader::detach(program, attachment);
    }
    info!("stopped");
    Ok(())
}

/// SIGHUP: re-reads the configuration and applies its policy; a configuration that cannot be
/// applied is rejected with its error and the running policy stays.
fn reload(source: &ConfigSource, running: &Settings, live: &mut LivePolicy, ebpf: &mut Ebpf) {
    let outcome = (|| -> anyhow::Result<Policy> {
        let (_, settings) = source.load()?;
        if settings.interfaces != running.interfaces || settings.xdp_mode != running.xdp_mode {
            anyhow::bail!(
                "interfaces and xdp_mode cannot change on reload; restart moat to change them"
            );
        }
        live.replace(ebpf, settings.policy.clone())?;
        Ok(settings.policy)
    })();
    match outcome {
        Ok(policy) => {
            info!(cause = "SIGHUP", "reloaded the configuration");
            log_policy(&policy);
        }
        Err(e) => {
            warn!(cause = "SIGHUP", error = %format!("{e:#}"), "reload rejected; the running policy stays")
        }
    }
}

fn resolve_interfaces(config: &Config, settings: &Settings) -> anyhow::Result<Vec<Interface>> {
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
            Ok(Interface {
                name: name.clone(),
                if_index,
            })
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
                let interface = row
                    .if_index
                    .and_then(|i| interfaces.iter().find(|f| f.if_index == i))
                    .map_or("(unregistered)", |f| f.name.as_str());
                info!(
                    interface,
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
