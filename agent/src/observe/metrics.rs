//! Prometheus metrics on `metrics_listen`: every scrape reads the program's maps afresh (per-CPU
//! counters summed at that moment), so no value is older than the scrape that returns it.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    process_collector::ProcessCollector,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::warn;

use crate::program::counters::{ProtectedCounts, Snapshot};

/// A scrape waiting for the daemon to render the metrics.
pub type Scrape = oneshot::Sender<String>;

/// What one scrape reports, read by the daemon.
pub struct Reading<'a> {
    pub counters: &'a Snapshot,
    /// The interface name of a counter row's ifindex.
    pub interface_name: &'a dyn Fn(Option<u32>) -> String,
    /// (list, family, entries).
    pub list_entries: Vec<(&'static str, &'static str, u64)>,
    pub bans_active: u64,
    pub rate_limited_sources: u64,
    /// Sources the SYN proxy verified (0 without `[syn_proxy]`).
    pub verified_sources: u64,
    pub program_tag: Option<String>,
    /// Whether everything in force is saved (the last save succeeded).
    pub state_saved: bool,
    pub state_save_failures: u64,
    /// The protected entries, each with whether it is under attack and its attacks so far.
    pub protected: Vec<ProtectedReading>,
    /// The fleet, when `[fleet]` is configured.
    pub fleet: Option<FleetReading>,
}

/// The fleet in a scrape.
pub struct FleetReading {
    pub connected: bool,
    pub entries: u64,
    pub publish_failures: u64,
    /// Values skipped (not moat's) and entries the lists had no room for.
    pub rejected: u64,
    /// Kept by the daemon across scrapes.
    pub apply_seconds: prometheus::Histogram,
}

/// One protected entry in a scrape.
pub struct ProtectedReading {
    pub name: String,
    pub counts: ProtectedCounts,
    pub under_attack: bool,
    pub attacks_total: u64,
}

/// The metrics in Prometheus' text exposition format.
pub fn render(reading: &Reading) -> Result<String, prometheus::Error> {
    let registry = Registry::new();
    let labels = ["interface", "action", "reason"];
    let packets = IntCounterVec::new(
        Opts::new(
            "moat_packets_total",
            "Packets seen by the XDP program, by interface, action and reason.",
        ),
        &labels,
    )?;
    let bytes = IntCounterVec::new(
        Opts::new(
            "moat_bytes_total",
            "Bytes of the frames seen by the XDP program, by interface, action and reason.",
        ),
        &labels,
    )?;
    for row in &reading.counters.rows {
        let interface = (reading.interface_name)(row.if_index);
        let values = [interface.as_str(), row.action.name(), row.reason.name()];
        packets
            .with_label_values(&values)
            .inc_by(row.counter.packets);
        bytes.with_label_values(&values).inc_by(row.counter.bytes);
    }
    let list_entries = IntGaugeVec::new(
        Opts::new(
            "moat_list_entries",
            "Entries in the allowlist and blocklist in force, by address family.",
        ),
        &["list", "family"],
    )?;
    for (list, family, entries) in &reading.list_entries {
        list_entries
            .with_label_values(&[list, family])
            .set(*entries as i64);
    }
    let bans = IntGauge::new(
        "moat_bans_active",
        "Sources banned by the rate limiter whose ban has not expired.",
    )?;
    bans.set(reading.bans_active as i64);
    let sources = IntGauge::new(
        "moat_rate_limited_sources",
        "Sources the rate limiter is tracking.",
    )?;
    sources.set(reading.rate_limited_sources as i64);
    let verified = IntGauge::new(
        "moat_verified_sources",
        "Sources that completed a handshake through the SYN proxy, still verified.",
    )?;
    verified.set(reading.verified_sources as i64);
    let events_lost = IntCounter::new(
        "moat_events_lost_total",
        "Bans and samples the program could not report because the ring buffer was full.",
    )?;
    events_lost.inc_by(reading.counters.events_lost);
    let saved = IntGauge::new(
        "moat_state_saved",
        "1 when everything in force is saved in state_dir; 0 while saves fail (they are retried).",
    )?;
    saved.set(i64::from(reading.state_saved));
    let save_failures = IntCounter::new(
        "moat_state_save_failures_total",
        "Saves of the state and journal writes that failed.",
    )?;
    save_failures.inc_by(reading.state_save_failures);
    let build = IntGaugeVec::new(
        Opts::new(
            "moat_build_info",
            "The agent's version and the program's tag.",
        ),
        &["version", "program_tag"],
    )?;
    build
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            reading.program_tag.as_deref().unwrap_or("unknown"),
        ])
        .set(1);

    let protect_labels = ["protect", "verdict"];
    let protect_packets = IntCounterVec::new(
        Opts::new(
            "moat_protect_packets_total",
            "Packets to each protected destination, by what its limit made of them: conforming, \
             over (dropped as dst_limit) or fingerprint (dropped as matching the attack's \
             fingerprint); in monitor mode the drops are would-be drops.",
        ),
        &protect_labels,
    )?;
    let protect_bytes = IntCounterVec::new(
        Opts::new(
            "moat_protect_bytes_total",
            "Bytes of the frames counted by moat_protect_packets_total.",
        ),
        &protect_labels,
    )?;
    let attack_active = IntGaugeVec::new(
        Opts::new(
            "moat_attack_active",
            "1 while the protected destination is under attack.",
        ),
        &["protect"],
    )?;
    let attacks_total = IntCounterVec::new(
        Opts::new(
            "moat_attacks_total",
            "Attacks on the protected destination since the daemon started.",
        ),
        &["protect"],
    )?;
    for entry in &reading.protected {
        for (verdict, counter) in [
            ("conforming", entry.counts.conforming),
            ("over", entry.counts.over),
            ("fingerprint", entry.counts.fingerprint),
        ] {
            let values = [entry.name.as_str(), verdict];
            protect_packets
                .with_label_values(&values)
                .inc_by(counter.packets);
            protect_bytes
                .with_label_values(&values)
                .inc_by(counter.bytes);
        }
        attack_active
            .with_label_values(&[entry.name.as_str()])
            .set(i64::from(entry.under_attack));
        attacks_total
            .with_label_values(&[entry.name.as_str()])
            .inc_by(entry.attacks_total);
    }

    registry.register(Box::new(packets))?;
    registry.register(Box::new(bytes))?;
    registry.register(Box::new(list_entries))?;
    registry.register(Box::new(bans))?;
    registry.register(Box::new(sources))?;
    registry.register(Box::new(verified))?;
    registry.register(Box::new(events_lost))?;
    registry.register(Box::new(saved))?;
    registry.register(Box::new(save_failures))?;
    registry.register(Box::new(build))?;
    registry.register(Box::new(protect_packets))?;
    registry.register(Box::new(protect_bytes))?;
    registry.register(Box::new(attack_active))?;
    registry.register(Box::new(attacks_total))?;
    registry.register(Box::new(ProcessCollector::for_self()))?;
    if let Some(fleet) = &reading.fleet {
        register_fleet(&registry, fleet)?;
    }

    let mut text = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut text)?;
    String::from_utf8(text).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// The fleet's metrics (present only with `[fleet]`).
fn register_fleet(registry: &Registry, fleet: &FleetReading) -> Result<(), prometheus::Error> {
    let connected = IntGauge::new(
        "moat_fleet_connected",
        "1 while the fleet's NATS connection is up and its bucket open.",
    )?;
    connected.set(i64::from(fleet.connected));
    let entries = IntGauge::new(
        "moat_fleet_entries",
        "List entries from the fleet in force on this node.",
    )?;
    entries.set(fleet.entries as i64);
    let failures = IntCounter::new(
        "moat_fleet_publish_failures_total",
        "Publishes of this node's changes that failed (each is retried until it succeeds).",
    )?;
    failures.inc_by(fleet.publish_failures);
    let rejected = IntCounter::new(
        "moat_fleet_rejected_total",
        "Fleet values skipped as not moat's, and fleet entries the lists had no room for.",
    )?;
    rejected.inc_by(fleet.rejected);
    registry.register(Box::new(connected))?;
    registry.register(Box::new(entries))?;
    registry.register(Box::new(failures))?;
    registry.register(Box::new(rejected))?;
    registry.register(Box::new(fleet.apply_seconds.clone()))
}

/// Binds the metrics address (before anything is loaded, so that a taken port stops the start).
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("metrics_listen {address}"))
}

/// Serves `/metrics`, asking the daemon for each scrape.
pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .with_state(scrapes);
    if let Err(e) = axum::serve(listener, router).await {
        warn!(error = %e, "the metrics server stopped");
    }
}

async fn scrape(State(scrapes): State<mpsc::Sender<Scrape>>) -> impl IntoResponse {
    let (reply_to, reply) = oneshot::channel();
    let body = match scrapes.send(reply_to).await {
        Ok(()) => reply.await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body)
}

#[cfg(test)]
mod tests {
    use agent_common::stats::{Action, Counter, Reason};

    use super::*;
    use crate::program::counters::Row;

    #[test]
    fn counters_and_gauges_are_rendered_with_their_labels() {
        let counters = Snapshot {
            rows: vec![Row {
                if_index: Some(7),
                action: Action::Drop,
                reason: Reason::Blocklist,
                counter: Counter {
                    packets: 1500,
                    bytes: 96_000,
                },
            }],
            events_lost: 3,
            ..Snapshot::default()
        };
        let name = |i: Option<u32>| i.map_or("(unregistered)".into(), |i| format!("veth{i}"));
        let text = render(&Reading {
            counters: &counters,
            interface_name: &name,
            list_entries: vec![("blocklist", "ipv4", 12), ("blocklist", "ipv6", 2)],
            fleet: None,
            bans_active: 4,
            rate_limited_sources: 9,
            verified_sources: 4,
            program_tag: Some("0123456789abcdef".into()),
            state_saved: false,
            state_save_failures: 2,
            protected: vec![ProtectedReading {
                name: "dns".into(),
                counts: ProtectedCounts {
                    over: Counter {
                        packets: 70,
                        bytes: 4480,
                    },
                    ..ProtectedCounts::default()
                },
                under_attack: true,
                attacks_total: 1,
            }],
        })
        .expect("render");
        for line in [
            "moat_packets_total{action=\"drop\",interface=\"veth7\",reason=\"blocklist\"} 1500",
            "moat_bytes_total{action=\"drop\",interface=\"veth7\",reason=\"blocklist\"} 96000",
            "moat_list_entries{family=\"ipv6\",list=\"blocklist\"} 2",
            "moat_bans_active 4",
            "moat_rate_limited_sources 9",
            "moat_verified_sources 4",
            "moat_events_lost_total 3",
            "moat_state_saved 0",
            "moat_state_save_failures_total 2",
            "moat_protect_packets_total{protect=\"dns\",verdict=\"over\"} 70",
            "moat_protect_bytes_total{protect=\"dns\",verdict=\"over\"} 4480",
            "moat_protect_packets_total{protect=\"dns\",verdict=\"conforming\"} 0",
            "moat_attack_active{protect=\"dns\"} 1",
            "moat_attacks_total{protect=\"dns\"} 1",
            "# TYPE moat_packets_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
        assert!(text.contains("moat_build_info{program_tag=\"0123456789abcdef\",version=\""));
    }
}
