//! `cargo xtask bench`: moat measured beside its peers on this machine, written as Markdown to
//! the file given as the first argument (the xtask puts it into BENCHMARKS.md).
//!
//! `moat-bench OUTPUT.md [--quick] [--only per-packet|flood|protect|syn-flood|control-plane|fleet]`
//!
//! Every measure is repeated; tables give the median and the min–max, and ratios of medians.

mod control_plane;
mod fleet;
mod flood;
mod floor;
mod list;
mod per_packet;
mod protect;
mod syn_flood;

use std::{fmt::Write as _, path::PathBuf};

use moat_tests::Lab;

use crate::list::PrefixList;

/// Prefixes in the full run's list, and in `--quick`'s.
const FULL_PREFIXES: usize = 1_000_000;
const QUICK_PREFIXES: usize = 100_000;

pub struct Options {
    output: PathBuf,
    pub prefixes: usize,
    /// Repetitions of every measure.
    pub runs: usize,
    /// Packets per `BPF_PROG_TEST_RUN`.
    pub repeat: u32,
    /// Length of each flood.
    pub flood: std::time::Duration,
    only: Option<String>,
}

const SECTIONS: [&str; 6] = [
    "per-packet",
    "flood",
    "protect",
    "syn-flood",
    "control-plane",
    "fleet",
];

fn options() -> Options {
    let usage = "usage: moat-bench OUTPUT.md [--quick] [--only per-packet|flood|protect|syn-flood|control-plane|fleet]";
    let mut output = None;
    let mut quick = false;
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let section = args.next().expect(usage);
                assert!(SECTIONS.contains(&section.as_str()), "{usage}");
                only = Some(section);
            }
            _ if output.is_none() => output = Some(PathBuf::from(arg)),
            other => panic!("unexpected argument {other:?}; {usage}"),
        }
    }
    Options {
        output: output.expect(usage),
        prefixes: if quick { QUICK_PREFIXES } else { FULL_PREFIXES },
        runs: if quick { 1 } else { 5 },
        repeat: 1_000_000,
        flood: std::time::Duration::from_secs(if quick { 2 } else { 5 }),
        only,
    }
}

/// Repeated samples of one measure.
pub struct Measured {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

impl Measured {
    pub fn of(mut samples: Vec<f64>) -> Self {
        assert!(!samples.is_empty(), "a measure needs samples");
        samples.sort_by(f64::total_cmp);
        let mid = samples.len() / 2;
        let median = if samples.len().is_multiple_of(2) {
            (samples[mid - 1] + samples[mid]) / 2.0
        } else {
            samples[mid]
        };
        Self {
            median,
            min: samples[0],
            max: samples[samples.len() - 1],
            samples: samples.len(),
        }
    }

    /// "12.3 (11.9–13.0)", or just the value for a single sample.
    pub fn cell(&self) -> String {
        let digits = if self.median.abs() >= 100.0 { 0 } else { 1 };
        if self.samples == 1 {
            format!("{:.*}", digits, self.median)
        } else {
            format!(
                "{:.*} ({:.*}–{:.*})",
                digits, self.median, digits, self.min, digits, self.max
            )
        }
    }
}

/// A Markdown table.
pub struct Table {
    text: String,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        let mut text = format!("| {} |\n", headers.join(" | "));
        let _ = writeln!(text, "|{}", " --- |".repeat(headers.len()));
        Self { text }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        let _ = writeln!(self.text, "| {} |", cells.join(" | "));
    }

    pub fn markdown(&self) -> &str {
        &self.text
    }
}

fn main() {
    let options = options();
    let runs = |section: &str| options.only.as_deref().is_none_or(|only| only == section);
    let lab = Lab::new();
    let list = PrefixList::write(&lab.dir().join("list.txt"), options.prefixes);
    let mut text = String::new();
    if runs("per-packet") {
        let table = per_packet::run(&lab, &list, &options);
        let _ = write!(
            text,
            "### Per-packet cost\n\nns per packet from `BPF_PROG_TEST_RUN` ({} packets per run; \
             median and min–max of {} runs); ratios of medians.\n\n{}\n",
            options.repeat,
            options.runs,
            table.markdown()
        );
    }
    if runs("flood") {
        let _ = write!(text, "{}", flood::run(&lab, &list, &options));
    }
    if runs("protect") {
        let _ = write!(text, "{}", protect::run(&lab, &options));
    }
    if runs("syn-flood") {
        let _ = write!(text, "{}", syn_flood::run(&options));
    }
    if runs("control-plane") {
        let table = control_plane::run(&lab, &list, &options);
        let _ = write!(text, "### Control plane\n\n{}", table.markdown());
    }
    if runs("fleet") {
        let _ = write!(text, "{}", fleet::run(&options));
    }
    std::fs::write(&options.output, text).expect("write the results");
    println!("wrote {}", options.output.display());
}
