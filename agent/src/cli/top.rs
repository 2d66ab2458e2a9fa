//! `moat top`: the top sources by dropped and by passed packets per second, live like `top`.

use std::{io::Write, path::Path, time::Duration};

use anyhow::Context as _;

use super::parse_ttl;
use crate::control::{
    client::call,
    protocol::{Reply, Request, TopRow, TopView},
};

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Print one reading as JSON and exit (the format is documented in README).
    #[arg(long)]
    pub json: bool,
    /// How often the screen is redrawn; rates span this long.
    #[arg(long, value_parser = parse_ttl, default_value = "1s", value_name = "DURATION")]
    pub interval: Duration,
    /// Sources shown per table.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rows: u32,
}

fn top_view(socket: &Path, request: &Request) -> anyhow::Result<TopView> {
    match call(socket, request)? {
        Reply::Top(view) => Ok(view),
        other => anyhow::bail!("the daemon answered with an unexpected reply: {other:?}"),
    }
}

pub fn top(socket: &Path, args: &TopArgs) -> anyhow::Result<()> {
    let request = Request::Top {
        interval_ms: args.interval.as_millis() as u64,
        limit: args.rows,
    };
    if args.json {
        // The first reading starts the interval the second one's rates span.
        top_view(socket, &request)?;
        std::thread::sleep(args.interval);
        let view = top_view(socket, &request)?;
        println!("{}", serde_json::to_string(&view).context("encoding JSON")?);
        return Ok(());
    }
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let view = top_view(socket, &request)?;
        let mut screen = String::new();
        if terminal {
            screen.push_str("\x1b[H\x1b[2J");
        }
        render(&view, &mut screen);
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(screen.as_bytes())?;
        stdout.flush()?;
        drop(stdout);
        std::thread::sleep(args.interval);
    }
}

/// Renders one screen of `moat top`.
pub fn render(view: &TopView, out: &mut String) {
    use std::fmt::Write as _;
    if view.interval_ms == 0 {
        let _ = writeln!(
            out,
            "moat top: first reading; rates follow at the next one\n"
        );
        return;
    }
    let _ = writeln!(
        out,
        "moat top - over {:.1} s: dropped {} pkt/s, passed {} pkt/s",
        view.interval_ms as f64 / 1000.0,
        group(view.dropped_packets_per_second),
        group(view.passed_packets_per_second),
    );
    let _ = writeln!(
        out,
        "(dropped by source: estimated from 1 in {} dropped packets; passed by source: {})\n",
        view.sample_every,
        if view.passed_by_source {
            "counted by the rate limiter"
        } else {
            "needs [rate_limit] in the config"
        }
    );
    if let Some(verified) = view.verified_sources {
        let _ = writeln!(out, "SYN proxy: {} verified sources\n", group(verified));
    }
    table(out, "DROPPED FROM", &view.dropped);
    let _ = writeln!(out);
    table(out, "PASSED FROM", &view.passed);
    if !view.protected.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<42} {:>13} {:>12} {:>13} ATTACK",
            "PROTECTED (last second)", "PKT/S", "MBIT/S", "DROPPED/S"
        );
        for entry in &view.protected {
            let _ = writeln!(
                out,
                "{:<42} {:>13} {:>12.1} {:>13} {}",
                entry.protect,
                group(entry.packets_per_second),
                entry.bits_per_second as f64 / 1e6,
                group(entry.dropped_packets_per_second),
                if entry.under_attack { "yes" } else { "no" }
            );
        }
    }
}

fn table(out: &mut String, title: &str, rows: &[TopRow]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "{title:<42} {:<11} {:>13} {:>12}",
        "REASON", "PKT/S", "MBIT/S"
    );
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for row in rows {
        let _ = writeln!(
            out,
            "{:<42} {:<11} {:>13} {:>12.1}",
            row.source,
            row.reason,
            group(row.packets_per_second),
            row.bits_per_second as f64 / 1e6
        );
    }
}

/// 1234567 → "1,234,567".
fn group(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::TopProtected;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn a_screen_shows_both_tables() {
        let row = |source: &str, reason: &str, pps| TopRow {
            source: source.into(),
            reason: reason.into(),
            packets_per_second: pps,
            bits_per_second: pps * 800,
        };
        let view = TopView {
            interval_ms: 1000,
            dropped_packets_per_second: 120_000,
            passed_packets_per_second: 300,
            dropped: vec![row("198.51.100.7", "blocklist", 120_000)],
            passed: vec![row("192.0.2.1", "no_match", 300)],
            passed_by_source: true,
            sample_every: 1000,
            verified_sources: Some(3),
            protected: vec![TopProtected {
                protect: "dns".into(),
                packets_per_second: 650_000,
                bits_per_second: 400_000_000,
                dropped_packets_per_second: 640_000,
                under_attack: true,
            }],
        };
        let mut screen = String::new();
        render(&view, &mut screen);
        assert!(screen.contains("dropped 120,000 pkt/s, passed 300 pkt/s"));
        assert!(
            screen.lines().any(|l| l.starts_with("dns")
                && l.contains("650,000")
                && l.contains("400.0")
                && l.contains("640,000")
                && l.ends_with("yes")),
            "{screen}"
        );
        assert!(screen.lines().any(|l| l.starts_with("198.51.100.7")
            && l.contains("blocklist")
            && l.contains("120,000")
            && l.contains("96.0")));
        assert!(screen.lines().any(|l| l.starts_with("192.0.2.1")));
    }
}
