//! The program's counters (`STATS`, `RULE_HITS`, `LIST_HITS`, `PROT_HITS`, `EVENTS_LOST`) and the interface
//! registry (`INTERFACE_SLOTS`): each interface registered at start with its counter slot and
//! its framing, and every counter read back summed over CPUs, mapped from slots to interfaces.

use std::collections::BTreeMap;

use agent_common::{
    maps::{self, MAX_IF_INDEX, SLOT_INDEX_MASK, SLOT_NO_ETHERNET},
    protect::{ProtectHit, protect_hit_index},
    stats::{Action, Counter, PER_INTERFACE, Reason, index},
};
use aya::{
    maps::{Array, MapData, MapError, PerCpuArray, PerCpuValues},
    sys::SyscallError,
};
use tracing::warn;

use super::map_source::{MapAccessError, MapSource, Named, ResolveError, named};

/// How an interface's frames start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// With an Ethernet header (and perhaps VLAN tags).
    Ethernet,
    /// With the IP header: tun, WireGuard, PPP, IPIP, GRE devices.
    Ip,
}

/// The counters and the interface slots that index them; only this module reads or writes
/// them.
pub struct CounterMaps {
    stats: Named<PerCpuArray<MapData, Counter>>,
    rule_hits: Named<PerCpuArray<MapData, Counter>>,
    list_hits: Named<PerCpuArray<MapData, Counter>>,
    protect_hits: Named<PerCpuArray<MapData, Counter>>,
    events_lost: Named<PerCpuArray<MapData, u64>>,
    interface_slots: Named<Array<MapData, u32>>,
}

impl CounterMaps {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            stats: Named::resolve(source, maps::STATS)?,
            rule_hits: Named::resolve(source, maps::RULE_HITS)?,
            list_hits: Named::resolve(source, maps::LIST_HITS)?,
            protect_hits: Named::resolve(source, maps::PROTECT_HITS)?,
            events_lost: Named::resolve(source, maps::EVENTS_LOST)?,
            interface_slots: Named::resolve(source, maps::INTERFACE_SLOTS)?,
        })
    }

    /// Gives each interface its own counter slot, in order from 1 (slot 0 stays for packets
    /// from interfaces not listed), and tells the program how its frames start.
    pub fn register_interfaces(
        &mut self,
        interfaces: &[(u32, Framing)],
    ) -> Result<(), MapAccessError> {
        for (slot, &(if_index, framing)) in (1u32..).zip(interfaces) {
            if if_index >= MAX_IF_INDEX {
                warn!(
                    if_index,
                    "interface index beyond {MAX_IF_INDEX}: its packets are counted as unregistered"
                );
                continue;
            }
            let value = match framing {
                Framing::Ethernet => slot,
                Framing::Ip => slot | SLOT_NO_ETHERNET,
            };
            self.interface_slots
                .map
                .set(if_index, value, 0)
                .map_err(named(self.interface_slots.name))?;
        }
        Ok(())
    }

    /// The packets counted for (interface, action, reason), summed over CPUs: one counter,
    /// read cheaply enough to poll.
    pub fn packets(
        &self,
        if_index: u32,
        action: Action,
        reason: Reason,
    ) -> Result<u64, MapAccessError> {
        let slot = self
            .interface_slots
            .map
            .get(&if_index, 0)
            .map_err(named(self.interface_slots.name))?
            & SLOT_INDEX_MASK;
        let per_cpu = self
            .stats
            .map
            .get(&index(slot, action, reason), 0)
            .map_err(named(self.stats.name))?;
        Ok(per_cpu.iter().map(|c| c.packets).sum())
    }

    /// Zeroes the counters of protected entries whose definition a reload changed, so that an
    /// entry never inherits the counts of the one that had its place.
    pub fn reset_protected(
        &mut self,
        entries: impl IntoIterator<Item = u32>,
    ) -> Result<(), MapAccessError> {
        let name = self.protect_hits.name;
        let failed = |call: &'static str, io_error| MapAccessError::Map {
            map: name,
            source: MapError::SyscallError(SyscallError { call, io_error }),
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| failed("nr_cpus", e))?;
        let zeros = || {
            PerCpuValues::try_from(vec![Counter::default(); cpus])
                .map_err(|e| failed("PerCpuValues", e))
        };
        for entry in entries {
            for hit in [
                ProtectHit::Conforming,
                ProtectHit::Over,
                ProtectHit::Fingerprint,
            ] {
                self.protect_hits
                    .map
                    .set(protect_hit_index(entry, hit), zeros()?, 0)
                    .map_err(named(name))?;
            }
        }
        Ok(())
    }

    /// The counters of the first `entries` protected entries, summed over CPUs: read once a
    /// second for attack detection, so only those entries are read.
    pub fn protected(&self, entries: usize) -> Result<Vec<ProtectedCounts>, MapAccessError> {
        let len = (entries as u32 * ProtectHit::COUNT).min(self.protect_hits.map.len());
        let hits = sums_of(&self.protect_hits, len)?;
        Ok((0..entries as u32)
            .map(|entry| ProtectedCounts::from_hits(&hits, entry))
            .collect())
    }

    /// Every counter now, each summed over CPUs.
    pub fn snapshot(&self) -> Result<Snapshot, MapAccessError> {
        let mut interface_of_slot = BTreeMap::new();
        for (if_index, slot) in (0u32..).zip(self.interface_slots.map.iter()) {
            let slot = slot.map_err(named(self.interface_slots.name))? & SLOT_INDEX_MASK;
            if slot != 0 {
                interface_of_slot.insert(slot, if_index);
            }
        }
        let counters = sums(&self.stats)?;
        let mut rows = Vec::new();
        for slot in 0..counters.len() as u32 / PER_INTERFACE {
            let if_index = interface_of_slot.get(&slot).copied();
            if slot != 0 && if_index.is_none() {
                continue;
            }
            for action in Action::ALL {
                for reason in Reason::ALL {
                    let counter = counters[index(slot, action, reason) as usize];
                    if counter != Counter::default() {
                        rows.push(Row {
                            if_index,
                            action,
                            reason,
                            counter,
                        });
                    }
                }
            }
        }
        let events_lost = self
            .events_lost
            .map
            .get(&0, 0)
            .map_err(named(self.events_lost.name))?
            .iter()
            .sum();
        Ok(Snapshot {
            rows,
            rule_hits: sums(&self.rule_hits)?,
            list_hits: sums(&self.list_hits)?,
            protect_hits: sums(&self.protect_hits)?,
            events_lost,
        })
    }
}

/// Each counter of a per-CPU array, summed over CPUs.
fn sums(array: &Named<PerCpuArray<MapData, Counter>>) -> Result<Vec<Counter>, MapAccessError> {
    sums_of(array, array.map.len())
}

/// The first `len` counters of a per-CPU array, summed over CPUs.
fn sums_of(
    array: &Named<PerCpuArray<MapData, Counter>>,
    len: u32,
) -> Result<Vec<Counter>, MapAccessError> {
    (0..len)
        .map(|i| {
            array
                .map
                .get(&i, 0)
                .map(|per_cpu| {
                    per_cpu
                        .iter()
                        .fold(Counter::default(), |sum, c| sum.plus(*c))
                })
                .map_err(named(array.name))
        })
        .collect()
}

/// One non-zero counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    /// `None` for packets from an interface the agent did not register.
    pub if_index: Option<u32>,
    pub action: Action,
    pub reason: Reason,
    pub counter: Counter,
}

/// The packets charged to one protected entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedCounts {
    /// Within the entry's limit.
    pub conforming: Counter,
    /// Over it: dropped as `dst_limit` (passed in monitor mode).
    pub over: Counter,
    /// Matching the attack's fingerprint: dropped as `fingerprint` (passed in monitor mode).
    pub fingerprint: Counter,
}

impl ProtectedCounts {
    /// An entry's counters in `PROTECT_HITS` sums.
    fn from_hits(hits: &[Counter], entry: u32) -> Self {
        let at = |hit| {
            hits.get(protect_hit_index(entry, hit) as usize)
                .copied()
                .unwrap_or_default()
        };
        Self {
            conforming: at(ProtectHit::Conforming),
            over: at(ProtectHit::Over),
            fingerprint: at(ProtectHit::Fingerprint),
        }
    }

    /// Every packet charged to the entry.
    pub fn arrived(&self) -> Counter {
        self.conforming.plus(self.over).plus(self.fingerprint)
    }
}

/// All counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub rows: Vec<Row>,
    /// Hits per rule, in config order.
    pub rule_hits: Vec<Counter>,
    /// Hits per (list, entry source), indexed by `agent_common::lists::hit_index`.
    pub list_hits: Vec<Counter>,
    /// Packets per protected entry and `agent_common::protect::ProtectHit`, indexed by
    /// `agent_common::protect::protect_hit_index`.
    pub protect_hits: Vec<Counter>,
    /// Events (bans, samples) the ring buffer had no room for.
    pub events_lost: u64,
}

impl Snapshot {
    /// The counter for (interface, action, reason); zero when nothing was counted.
    pub fn get(&self, if_index: u32, action: Action, reason: Reason) -> Counter {
        self.rows
            .iter()
            .find(|r| r.if_index == Some(if_index) && r.action == action && r.reason == reason)
            .map(|r| r.counter)
            .unwrap_or_default()
    }

    /// The packets charged to a protected entry, by what the entry made of them.
    pub fn protected(&self, entry: u32) -> ProtectedCounts {
        ProtectedCounts::from_hits(&self.protect_hits, entry)
    }

    /// The sum of every counter.
    pub fn total(&self) -> Counter {
        self.rows
            .iter()
            .fold(Counter::default(), |sum, r| sum.plus(r.counter))
    }
}
