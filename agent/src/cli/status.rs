//! `moat status` and `moat reload`.

use std::{path::Path, time::Duration};

use super::{print_json, unexpected};
use crate::control::{
    client::call,
    protocol::{FleetView, Reply, Request, StatusView},
};

pub fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let reply = call(socket, &Request::Status)?;
    let Reply::Status(status) = reply else {
        return Err(unexpected(reply));
    };
    if json {
        return print_json(&status);
    }
    let StatusView {
        version,
        pid,
        uptime_seconds,
        mode,
        program_id,
        program_tag,
        interfaces,
        maps,
        bpffs,
        state_dir,
        config,
        persistence_error,
        fleet,
    } = *status;
    println!(
        "moat {version}, pid {pid}, up {}",
        humantime::format_duration(Duration::from_secs(uptime_seconds))
    );
    println!("mode       {mode}");
    println!(
        "program    id {} tag {}",
        program_id.map_or("-".into(), |i| i.to_string()),
        program_tag.as_deref().unwrap_or("-")
    );
    println!(
        "config     {}",
        config.as_deref().unwrap_or("(embedded default)")
    );
    println!(
        "pinned at  {}",
        bpffs.as_deref().unwrap_or("(not pinned: --no-pin)")
    );
    println!("state in   {state_dir}");
    if let Some(why) = persistence_error {
        println!("NOT SAVED  changes in force are not saved (retrying): {why}");
    }
    for i in interfaces {
        println!(
            "interface  {} (index {}, {} frames): {} mode, {}, {}",
            i.name,
            i.if_index,
            i.framing,
            i.xdp_mode,
            if i.attached {
                "attached"
            } else {
                "NOT ATTACHED (the kernel's link holds another program or interface)"
            },
            match (i.pinned, bpffs.is_some()) {
                (true, _) => "pinned",
                (false, true) => "PIN MISSING: the program detaches when the daemon stops",
                (false, false) => "detached on exit",
            }
        );
    }
    for m in maps {
        if m.capacity >= u64::from(u32::MAX) {
            println!("map        {}: {}", m.map, m.entries);
        } else {
            println!("map        {}: {} of {}", m.map, m.entries, m.capacity);
        }
    }
    if let Some(fleet) = fleet {
        print_fleet(&fleet);
    }
    Ok(())
}

fn print_fleet(fleet: &FleetView) {
    let connection = match (fleet.connected, &fleet.server) {
        (true, Some(server)) => format!("connected to {server}"),
        (true, None) => "connected".to_string(),
        (false, _) => "DOWN: enforcing locally; changes made here are queued".to_string(),
    };
    println!(
        "fleet      node {} in bucket {}, sharing [{}]: {connection}",
        fleet.node,
        fleet.bucket,
        fleet.share.join(", ")
    );
    println!(
        "fleet      {} entries, revision {}, lag {}, {} queued, {} publish failures, {} rejected, {} refused{}",
        fleet.entries,
        fleet.last_revision,
        fleet.lag_ms.map_or("-".into(), |ms| format!("{ms} ms")),
        fleet.queued,
        fleet.publish_failures,
        fleet.rejected,
        fleet.refused,
        if fleet.per_key_ttl {
            ", per-key TTLs"
        } else {
            ""
        }
    );
    if let Some(error) = &fleet.error {
        println!("fleet      last error: {error}");
    }
}

pub fn reload(socket: &Path) -> anyhow::Result<()> {
    match call(socket, &Request::Reload)? {
        Reply::Reloaded { needs_restart } => {
            println!("reloaded");
            if !needs_restart.is_empty() {
                println!("not applied, needs a restart: {}", needs_restart.join(", "));
            }
            Ok(())
        }
        reply => Err(unexpected(reply)),
    }
}
