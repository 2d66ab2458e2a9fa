//! The CLI's commands that talk to a running daemon (or, for `config check` and `down`, need
//! none): each sends one request and prints the reply for people or, with `--json`, for tools.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cli::{AllowCommand, BlockCommand, DownArgs, StatsArgs},
    config::{Config, Overrides, list_file},
    control::{
        client::call,
        protocol::{ChangeView, CounterView, EntryView, ListName, Reply, Request, StatusView},
    },
    pins::PinDir,
    policy,
};

fn unexpected(reply: Reply) -> anyhow::Error {
    anyhow::anyhow!("the daemon answered with an unexpected reply: {reply:?}")
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string(value).context("encoding JSON")?;
    println!("{text}");
    Ok(())
}

/// Reads a list file here, so that its errors name the file and line and the daemon never
/// reads a path a client chose.
fn read_list(file: &Path) -> anyhow::Result<Vec<String>> {
    let cidrs = list_file::read(file)?;
    if cidrs.is_empty() {
        bail!("{}: no entries", file.display());
    }
    Ok(cidrs.iter().map(ToString::to_string).collect())
}

fn add(
    socket: &Path,
    list: ListName,
    cidrs: Vec<String>,
    ttl: Option<Duration>,
    comment: Option<String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let count = cidrs.len();
    let reply = call(
        socket,
        &Request::ListAdd {
            list,
            cidrs,
            ttl_seconds: ttl.map(|t| t.as_secs()),
            comment,
        },
    )?;
    let Reply::Changed(view) = reply else {
        return Err(unexpected(reply));
    };
    print_change(&view, count, started.elapsed());
    Ok(())
}

fn print_change(view: &ChangeView, requested: usize, took: Duration) {
    let mut line = Vec::new();
    if view.added > 0 || view.updated > 0 || view.removed == 0 {
        line.push(format!("added {}", view.added));
        if view.updated > 0 {
            line.push(format!("updated {}", view.updated));
        }
    }
    if view.removed > 0 {
        line.push(format!("removed {}", view.removed));
    }
    println!(
        "{} ({requested} given, {:.1} ms)",
        line.join(", "),
        took.as_secs_f64() * 1e3
    );
    for note in &view.notes {
        println!("note: {note}");
    }
}

fn del(socket: &Path, list: ListName, cidrs: Vec<String>) -> anyhow::Result<()> {
    let started = Instant::now();
    let count = cidrs.len();
    let reply = call(socket, &Request::ListDel { list, cidrs })?;
    let Reply::Changed(view) = reply else {
        return Err(unexpected(reply));
    };
    print_change(&view, count, started.elapsed());
    Ok(())
}

fn show(socket: &Path, list: ListName, json: bool) -> anyhow::Result<()> {
    let reply = call(socket, &Request::ListShow { list })?;
    let Reply::Entries { entries } = reply else {
        return Err(unexpected(reply));
    };
    if json {
        return print_json(&entries);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(
        out,
        "{:<43} {:<10} {:<20} COMMENT",
        "CIDR", "SOURCE", "EXPIRES"
    )?;
    for EntryView {
        cidr,
        expires_at,
        comment,
        source,
    } in &entries
    {
        writeln!(
            out,
            "{cidr:<43} {source:<10} {:<20} {}",
            expires_at.as_deref().unwrap_or("-"),
            comment.as_deref().unwrap_or("")
        )?;
    }
    writeln!(out, "{} entries", entries.len())?;
    Ok(())
}

pub fn block(socket: &Path, command: BlockCommand) -> anyhow::Result<()> {
    let list = ListName::Blocklist;
    match command {
        BlockCommand::Add {
            cidrs,
            ttl,
            comment,
        } => add(socket, list, cidrs, ttl, comment),
        BlockCommand::Del { cidrs } => del(socket, list, cidrs),
        BlockCommand::List { json } => show(socket, list, json),
        BlockCommand::Import { file, ttl, comment } => {
            add(socket, list, read_list(&file)?, ttl, comment)
        }
    }
}

pub fn allow(socket: &Path, command: AllowCommand) -> anyhow::Result<()> {
    let list = ListName::Allowlist;
    match command {
        AllowCommand::Add { cidrs, comment } => add(socket, list, cidrs, None, comment),
        AllowCommand::Del { cidrs } => del(socket, list, cidrs),
        AllowCommand::List { json } => show(socket, list, json),
        AllowCommand::Import { file, comment } => {
            add(socket, list, read_list(&file)?, None, comment)
        }
    }
}

fn counters(socket: &Path) -> anyhow::Result<Vec<CounterView>> {
    match call(socket, &Request::Stats)? {
        Reply::Stats { counters } => Ok(counters),
        reply => Err(unexpected(reply)),
    }
}

/// A counter with its rates over the last interval, as `moat stats --watch --json` prints it.
#[derive(serde::Serialize)]
struct RatedCounter<'a> {
    #[serde(flatten)]
    counter: &'a CounterView,
    packets_per_second: f64,
    bytes_per_second: f64,
}

pub fn stats(socket: &Path, args: StatsArgs) -> anyhow::Result<()> {
    if !args.watch {
        let counters = counters(socket)?;
        if args.json {
            return print_json(&counters);
        }
        print_counters(&counters, None);
        return Ok(());
    }
    let key = |c: &CounterView| (c.interface.clone(), c.action.clone(), c.reason.clone());
    let mut previous: Option<(Instant, BTreeMap<_, (u64, u64)>)> = None;
    loop {
        let counters = counters(socket)?;
        let now = Instant::now();
        let rates: Vec<(f64, f64)> = counters
            .iter()
            .map(|c| match &previous {
                Some((at, before)) => {
                    let seconds = now.duration_since(*at).as_secs_f64().max(1e-9);
                    let (packets, bytes) = before.get(&key(c)).copied().unwrap_or_default();
                    (
                        c.packets.saturating_sub(packets) as f64 / seconds,
                        c.bytes.saturating_sub(bytes) as f64 / seconds,
                    )
                }
                None => (0.0, 0.0),
            })
            .collect();
        if args.json {
            let rated: Vec<RatedCounter> = counters
                .iter()
                .zip(&rates)
                .map(|(counter, (pps, bps))| RatedCounter {
                    counter,
                    packets_per_second: *pps,
                    bytes_per_second: *bps,
                })
                .collect();
            print_json(&rated)?;
        } else {
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                print!("\x1b[H\x1b[2J");
            }
            print_counters(&counters, Some(&rates));
        }
        std::io::stdout().flush()?;
        previous = Some((
            now,
            counters
                .iter()
                .map(|c| (key(c), (c.packets, c.bytes)))
                .collect(),
        ));
        std::thread::sleep(args.interval);
    }
}

fn print_counters(counters: &[CounterView], rates: Option<&[(f64, f64)]>) {
    print!(
        "{:<16} {:<11} {:<11} {:>14} {:>16}",
        "INTERFACE", "ACTION", "REASON", "PACKETS", "BYTES"
    );
    if rates.is_some() {
        print!(" {:>12} {:>14}", "PACKETS/S", "BITS/S");
    }
    println!();
    for (i, c) in counters.iter().enumerate() {
        print!(
            "{:<16} {:<11} {:<11} {:>14} {:>16}",
            c.interface, c.action, c.reason, c.packets, c.bytes
        );
        if let Some((pps, bps)) = rates.and_then(|r| r.get(i)) {
            print!(" {pps:>12.0} {:>14.0}", bps * 8.0);
        }
        println!();
    }
}

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
    } = status;
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
    for i in interfaces {
        println!(
            "interface  {} (index {}): {} mode, {}",
            i.name,
            i.if_index,
            i.xdp_mode,
            if i.pinned {
                "pinned"
            } else {
                "detached on exit"
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
    Ok(())
}

pub fn reload(socket: &Path) -> anyhow::Result<()> {
    match call(socket, &Request::Reload)? {
        Reply::Reloaded => {
            println!("reloaded");
            Ok(())
        }
        reply => Err(unexpected(reply)),
    }
}

pub fn config_check(file: &Path) -> anyhow::Result<()> {
    let config = Config::from_file(file)?;
    let settings = config.resolve(&Overrides::default())?;
    policy::check(&settings.policy).with_context(|| file.display().to_string())?;
    let policy = &settings.policy;
    println!(
        "{}: OK ({} interfaces, {} allowlist and {} blocklist entries, {} rules, rate limit {})",
        file.display(),
        settings.interfaces.len(),
        policy.allowlist.len(),
        policy.blocklist.len(),
        policy.rules.len(),
        if policy.rate_limit.is_on() {
            "on"
        } else {
            "off"
        }
    );
    Ok(())
}

pub fn down(socket: Option<PathBuf>, args: DownArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::embedded(),
    };
    let paths = config.resolve_paths(&Overrides {
        socket,
        bpffs: args.bpffs.clone(),
        ..Overrides::default()
    })?;
    if std::os::unix::net::UnixStream::connect(&paths.socket).is_ok() {
        bail!(
            "a moat daemon is serving {}; stop it first (e.g. systemctl stop moat), then run \
             moat down again",
            paths.socket.display()
        );
    }
    let pins = PinDir::new(&paths.bpffs);
    let detached = pins.remove_all().context("removing the pins")?;
    if detached.is_empty() {
        println!("nothing pinned at {}", paths.bpffs.display());
    } else {
        println!(
            "detached from {} and removed {}",
            detached.join(", "),
            paths.bpffs.display()
        );
    }
    Ok(())
}
