//! `moat block …` and `moat allow …`: change or show a list of the running daemon.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Subcommand;

use super::{parse_ttl, print_json, unexpected};
use crate::{
    config::{ListKind, list_file},
    control::{
        client::call,
        protocol::{ChangeView, Cidrs, EntryView, Reply, Request},
    },
};

#[derive(Debug, Subcommand)]
pub enum BlockCommand {
    /// Drop packets from these sources, now.
    Add {
        #[arg(value_name = "CIDR", required = true)]
        cidrs: Vec<String>,
        /// Remove the entries after this long (e.g. 90s, 10m, 2h).
        #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
        ttl: Option<Duration>,
        /// A note kept with the entries.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Delete entries added at run time (or lift rate-limit bans).
    Del {
        #[arg(value_name = "CIDR", required = true)]
        cidrs: Vec<String>,
    },
    /// Every entry: configuration, run time and rate-limit bans.
    List {
        /// Print JSON (the format is documented in README).
        #[arg(long)]
        json: bool,
    },
    /// Add every entry of a list file (FireHOL/Spamhaus format), all or none.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
        ttl: Option<Duration>,
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AllowCommand {
    /// Always pass packets from these sources.
    Add {
        #[arg(value_name = "CIDR", required = true)]
        cidrs: Vec<String>,
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Delete entries added at run time.
    Del {
        #[arg(value_name = "CIDR", required = true)]
        cidrs: Vec<String>,
    },
    /// Every entry, from the configuration and from run time.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add every entry of a list file, all or none.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
}

/// The command line's CIDRs, parsed here: an error names the entry before anything is sent.
fn parse(texts: &[String]) -> anyhow::Result<Cidrs> {
    Cidrs::parse(texts).map_err(anyhow::Error::msg)
}

/// Reads a list file here, so that its errors name the file and line and the daemon never
/// reads a path a client chose.
fn read_list(file: &Path) -> anyhow::Result<Cidrs> {
    let cidrs = list_file::read(file)?;
    if cidrs.is_empty() {
        bail!("{}: no entries", file.display());
    }
    Ok(Cidrs(cidrs))
}

fn add(
    socket: &Path,
    list: ListKind,
    cidrs: Cidrs,
    ttl: Option<Duration>,
    comment: Option<String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let count = cidrs.0.len();
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
    print_change(&view, count, started.elapsed())
}

/// Prints what a change did; an error (after the line) when it is in force but not saved.
fn print_change(view: &ChangeView, requested: usize, took: Duration) -> anyhow::Result<()> {
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
    if let Some(why) = &view.not_persisted {
        bail!(
            "the change is in force but NOT saved ({why}); the daemon retries saving, and \
             `moat status` says when it succeeds"
        );
    }
    Ok(())
}

fn del(socket: &Path, list: ListKind, cidrs: Cidrs) -> anyhow::Result<()> {
    let started = Instant::now();
    let count = cidrs.0.len();
    let reply = call(socket, &Request::ListDel { list, cidrs })?;
    let Reply::Changed(view) = reply else {
        return Err(unexpected(reply));
    };
    print_change(&view, count, started.elapsed())
}

fn show(socket: &Path, list: ListKind, json: bool) -> anyhow::Result<()> {
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
        origin,
    } in &entries
    {
        // A fleet entry names the node that published it.
        let comment = match (origin, comment) {
            (Some(origin), Some(comment)) => format!("[{origin}] {comment}"),
            (Some(origin), None) => format!("[{origin}]"),
            (None, comment) => comment.clone().unwrap_or_default(),
        };
        writeln!(
            out,
            "{cidr:<43} {source:<10} {:<20} {comment}",
            expires_at.as_deref().unwrap_or("-"),
        )?;
    }
    writeln!(out, "{} entries", entries.len())?;
    Ok(())
}

pub fn block(socket: &Path, command: BlockCommand) -> anyhow::Result<()> {
    let list = ListKind::Block;
    match command {
        BlockCommand::Add {
            cidrs,
            ttl,
            comment,
        } => add(socket, list, parse(&cidrs)?, ttl, comment),
        BlockCommand::Del { cidrs } => del(socket, list, parse(&cidrs)?),
        BlockCommand::List { json } => show(socket, list, json),
        BlockCommand::Import { file, ttl, comment } => {
            add(socket, list, read_list(&file)?, ttl, comment)
        }
    }
}

pub fn allow(socket: &Path, command: AllowCommand) -> anyhow::Result<()> {
    let list = ListKind::Allow;
    match command {
        AllowCommand::Add { cidrs, comment } => add(socket, list, parse(&cidrs)?, None, comment),
        AllowCommand::Del { cidrs } => del(socket, list, parse(&cidrs)?),
        AllowCommand::List { json } => show(socket, list, json),
        AllowCommand::Import { file, comment } => {
            add(socket, list, read_list(&file)?, None, comment)
        }
    }
}
