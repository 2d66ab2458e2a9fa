//! Reading the per-CPU counters back: summed over CPUs, mapped from slots to interfaces.

use std::collections::BTreeMap;

use agent_common::{
    maps::{EVENTS_LOST, INTERFACE_SLOTS, LIST_HITS, RULE_HITS, STATS},
    stats::{Action, Counter, PER_INTERFACE, Reason, index},
};
use aya::{
    Ebpf,
    maps::{Array, Map, MapData, MapError, PerCpuArray},
};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("program {0} has no map named {1}")]
    MissingMap(u32, &'static str),
    #[error("reading map {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Program(#[from] crate::map_access::ProgramMapsError),
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

/// All counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub rows: Vec<Row>,
    /// Hits per rule, in config order.
    pub rule_hits: Vec<Counter>,
    /// Hits per (list, entry source), indexed by `agent_common::lists::hit_index`.
    pub list_hits: Vec<Counter>,
    /// Events (bans, samples) the ring buffer had no room for.
    pub events_lost: u64,
}

impl Snapshot {
    /// Reads the counters of a loaded program by its kernel id (as `ip link` or `bpftool`
    /// show it), without owning the program.
    pub fn of_program(program_id: u32) -> Result<Self, StatsError> {
        let maps = crate::map_access::ProgramMaps::of(program_id)?;
        Self::read(|name| Ok(maps.id(name)?))
    }

    /// Reads the counters of a program this process loaded.
    pub fn of_ebpf(ebpf: &Ebpf) -> Result<Self, StatsError> {
        Self::read(|name| {
            let map = ebpf.map(name).ok_or(StatsError::MissingMap(0, name))?;
            let data = match map {
                Map::PerCpuArray(data) | Map::Array(data) => data,
                _ => return Err(StatsError::MissingMap(0, name)),
            };
            data.info()
                .map(|info| info.id())
                .map_err(|source| StatsError::Map { map: name, source })
        })
    }

    /// Sums each counter over CPUs; `id_of` finds a map's kernel id by name.
    fn read(id_of: impl Fn(&'static str) -> Result<u32, StatsError>) -> Result<Self, StatsError> {
        let open = |name: &'static str| -> Result<Map, StatsError> {
            let map_err = |source| StatsError::Map { map: name, source };
            let data = MapData::from_id(id_of(name)?).map_err(map_err)?;
            Map::from_map_data(data).map_err(map_err)
        };
        let per_cpu = |name: &'static str| -> Result<PerCpuArray<MapData, Counter>, StatsError> {
            PerCpuArray::try_from(open(name)?)
                .map_err(|source| StatsError::Map { map: name, source })
        };
        let sums =
            |array: &PerCpuArray<MapData, Counter>, name| -> Result<Vec<Counter>, StatsError> {
                (0..array.len())
                    .map(|i| {
                        array
                            .get(&i, 0)
                            .map(|per_cpu| {
                                per_cpu
                                    .iter()
                                    .fold(Counter::default(), |sum, c| sum.plus(*c))
                            })
                            .map_err(|source| StatsError::Map { map: name, source })
                    })
                    .collect()
            };

        let slots: Array<MapData, u32> =
            Array::try_from(open(INTERFACE_SLOTS)?).map_err(|source| StatsError::Map {
                map: INTERFACE_SLOTS,
                source,
            })?;
        let mut interface_of_slot = BTreeMap::new();
        for (if_index, slot) in (0u32..).zip(slots.iter()) {
            let slot = slot.map_err(|source| StatsError::Map {
                map: INTERFACE_SLOTS,
                source,
            })?;
            if slot != 0 {
                interface_of_slot.insert(slot, if_index);
            }
        }

        let counters = sums(&per_cpu(STATS)?, STATS)?;
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
        let lost_err = |source| StatsError::Map {
            map: EVENTS_LOST,
            source,
        };
        let lost: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(open(EVENTS_LOST)?).map_err(lost_err)?;
        let events_lost = lost.get(&0, 0).map_err(lost_err)?.iter().sum();
        Ok(Self {
            rows,
            rule_hits: sums(&per_cpu(RULE_HITS)?, RULE_HITS)?,
            list_hits: sums(&per_cpu(LIST_HITS)?, LIST_HITS)?,
            events_lost,
        })
    }

    /// The counter for (interface, action, reason); zero when nothing was counted.
    pub fn get(&self, if_index: u32, action: Action, reason: Reason) -> Counter {
        self.rows
            .iter()
            .find(|r| r.if_index == Some(if_index) && r.action == action && r.reason == reason)
            .map(|r| r.counter)
            .unwrap_or_default()
    }

    /// The sum of every counter.
    pub fn total(&self) -> Counter {
        self.rows
            .iter()
            .fold(Counter::default(), |sum, r| sum.plus(r.counter))
    }
}
