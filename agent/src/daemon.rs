//! `moat run`: load, fill, attach, serve until a signal, detach.

use std::ffi::CString;

use agent_common::maps::INTERFACE_SLOTS;
use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, PerCpuArray},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::{Config, Settings},
    lists, loader,
    stats::Snapshot,
};

/// An interface to protect, resolved to its index.
struct Interface {
    name: String,
    if_index: u32,
}

pub async fn run(config: &Config, settings: &Settings) -> anyhow::Result<()> {
    // Everything that can be checked is checked before anything is loaded or attached.
    let interfaces = resolve_interfaces(config, settings)?;
    let families = lists::count_families(&settings.blocklist);
    let capacities = loader::Capacities::for_entries(families.v4, families.v6);

    let mut ebpf = loader::load(capacities).context("loading the XDP program")?;
    // Lists are filled before the program sees its first packet.
    let counts =
        lists::fill_blocklist(&mut ebpf, &settings.blocklist).context("filling the blocklist")?;
    info!(ipv4 = counts.v4, ipv6 = counts.v6, "blocklist loaded");
    register_interfaces(&mut ebpf, &interfaces)?;

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
    info!(
        program_id,
        interfaces = interfaces.len(),
        "moat is enforcing; stop with SIGINT or SIGTERM"
    );

    wait_for_shutdown().await?;

    log_counters(&ebpf, &interfaces);
    let program = loader::program(&mut ebpf)?;
    for attachment in attachments {
        loader::detach(program, attachment);
    }
    info!("stopped");
    Ok(())
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

/// Gives each interface its own counter slot; slot 0 stays for unregistered interfaces.
fn register_interfaces(ebpf: &mut Ebpf, interfaces: &[Interface]) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(INTERFACE_SLOTS)
        .ok_or_else(|| anyhow!("map {INTERFACE_SLOTS} is missing from the XDP object"))?;
    let mut slots: HashMap<_, u32, u32> = HashMap::try_from(map)?;
    for (slot, interface) in (1u32..).zip(interfaces) {
        slots
            .insert(interface.if_index, slot, 0)
            .with_context(|| format!("registering {} in {INTERFACE_SLOTS}", interface.name))?;
    }
    Ok(())
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
    let read = || -> anyhow::Result<Snapshot> {
        let stats = PerCpuArray::try_from(
            ebpf.map(agent_common::maps::STATS)
                .ok_or_else(|| anyhow!("no STATS map"))?,
        )?;
        let slots = HashMap::try_from(
            ebpf.map(INTERFACE_SLOTS)
                .ok_or_else(|| anyhow!("no {INTERFACE_SLOTS} map"))?,
        )?;
        Ok(Snapshot::read(&stats, &slots)?)
    };
    match read() {
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
        Err(e) => warn!(error = %crate::error_chain(e.as_ref()), "could not read the counters"),
    }
}
