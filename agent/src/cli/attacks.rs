//! `moat attacks`: the protected destinations and the attacks on them.

use std::path::Path;

use super::{print_json, unexpected};
use crate::control::{
    client::call,
    protocol::{AttacksView, Reply, Request},
};

pub fn attacks(socket: &Path, json: bool) -> anyhow::Result<()> {
    let view = match call(socket, &Request::Attacks)? {
        Reply::Attacks(view) => view,
        reply => return Err(unexpected(reply)),
    };
    if json {
        return print_json(&view);
    }
    print!("{}", render(&view));
    Ok(())
}

fn limit(value: Option<u64>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

pub fn render(view: &AttacksView) -> String {
    let mut text = String::new();
    if view.protected.is_empty() {
        text.push_str("no protected destinations ([[protect]] in the configuration)\n");
        return text;
    }
    text.push_str(&format!(
        "{:<16} {:<24} {:<7} {:>10} {:>12} {:>10} {:>12} {:<6} {:>12} {:>12} {:>12}\n",
        "PROTECT",
        "DESTINATION",
        "PROTO",
        "PPS LIMIT",
        "BPS LIMIT",
        "PPS",
        "BPS",
        "ATTACK",
        "CONFORMING",
        "OVER",
        "FINGERPRINT"
    ));
    for p in &view.protected {
        text.push_str(&format!(
            "{:<16} {:<24} {:<7} {:>10} {:>12} {:>10} {:>12} {:<6} {:>12} {:>12} {:>12}\n",
            p.protect,
            p.destination,
            p.protocol,
            limit(p.pps_limit),
            limit(p.bps_limit),
            p.pps,
            p.bps,
            if p.under_attack { "yes" } else { "no" },
            p.conforming_packets,
            p.over_packets,
            p.fingerprint_packets
        ));
    }
    if view.attacks.is_empty() {
        text.push_str("\nno attacks since the daemon started\n");
        return text;
    }
    text.push_str("\nATTACKS (running first, then ended, newest first)\n");
    for a in &view.attacks {
        text.push_str(&format!(
            "{} {} ({} {}): {} → {}; peak {} pps, {} bit/s; dropped {}; sources: {} distinct of {} sampled\n",
            if a.ended.is_none() { "RUNNING" } else { "ended  " },
            a.protect,
            a.destination,
            a.protocol,
            a.started,
            a.ended.as_deref().unwrap_or("now"),
            a.peak_pps,
            a.peak_bps,
            a.dropped
                .iter()
                .map(|(reason, packets)| format!("{packets} as {reason}"))
                .collect::<Vec<_>>()
                .join(", "),
            a.distinct_sources,
            a.sources_sampled
        ));
        match (&a.fingerprint, &a.no_fingerprint) {
            (Some(print), _) => text.push_str(&format!(
                "        fingerprint: {print} (since {})\n",
                a.fingerprint_installed.as_deref().unwrap_or("?")
            )),
            (None, Some(why)) => text.push_str(&format!("        no fingerprint: {why}\n")),
            (None, None) => {}
        }
    }
    text
}
