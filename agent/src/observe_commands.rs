//! `moat top` and `moat capture`: the CLI's views of who is sending what.

use std::{fs::File, io::Write, path::Path};

use anyhow::Context as _;

use crate::{
    capture::PcapOutput,
    cli::{CaptureArgs, TopArgs},
    control::{
        client::{call, stream},
        protocol::{Reply, Request, TopRow, TopView},
    },
};

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
    table(out, "DROPPED FROM", &view.dropped);
    let _ = writeln!(out);
    table(out, "PASSED FROM", &view.passed);
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

pub fn capture(socket: &Path, args: CaptureArgs) -> anyhow::Result<()> {
    let to_stdout = args.file.as_os_str() == "-";
    let output: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            File::create(&args.file)
                .with_context(|| format!("creating {}", args.file.display()))?,
        )
    };
    let mut pcap = PcapOutput::new(output)?;
    let request = Request::Capture {
        passed: args.passed,
        reason: args.reason.clone(),
        count: args.count,
        every: args.every,
    };
    let mut summary = None;
    let streamed = stream(socket, &request, |reply| match reply {
        Reply::Sample(frame) => {
            pcap.write(&frame)?;
            if to_stdout {
                std::io::stdout().flush()?;
            }
            Ok(true)
        }
        Reply::CaptureDone { captured, missed } => {
            summary = Some((captured, missed));
            Ok(false)
        }
        other => anyhow::bail!("the daemon answered with an unexpected reply: {other:?}"),
    });
    if let Err(e) = streamed {
        // A refused capture leaves no file behind.
        if !to_stdout && summary.is_none() {
            let _ = std::fs::remove_file(&args.file);
        }
        return Err(e);
    }
    let (captured, missed) = summary.unwrap_or_default();
    let mut output = pcap.into_inner();
    output.flush()?;
    eprintln!(
        "moat: captured {captured} frames to {}{}",
        if to_stdout {
            "standard output".to_string()
        } else {
            args.file.display().to_string()
        },
        if missed > 0 {
            format!(" ({missed} more matched but were missed: the capture fell behind)")
        } else {
            String::new()
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let mut screen = String::new();
        render(&view, &mut screen);
        assert!(screen.contains("dropped 120,000 pkt/s, passed 300 pkt/s"));
        assert!(screen.lines().any(|l| l.starts_with("198.51.100.7")
            && l.contains("blocklist")
            && l.contains("120,000")
            && l.contains("96.0")));
        assert!(screen.lines().any(|l| l.starts_with("192.0.2.1")));
    }
}
