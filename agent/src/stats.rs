//! Reading the per-CPU counters back: summed over CPUs, mapped from slots to interfaces.

use std::collections::BTreeMap;

use agent_common::{
    maps::{INTERFACE_SLOTS, STATS},
    stats::{Action, Counter, PER_INTERFACE, Reason, index},
};
use aya::maps::{HashMap, Map, MapData, MapError, MapInfo, PerCpuArray};

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
    #[error("listing the maps of program {id} failed")]
    Program {
        id: u32,
        #[source]
        source: aya::programs::ProgramError,
    },
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
}

impl Snapshot {
    /// Sums each counter over CPUs; `slots` maps interface index → counter slot.
    pub fn read<S, T>(
        stats: &PerCpuArray<S, Counter>,
        slots: &HashMap<T, u32, u32>,
    ) -> Result<Self, StatsError>
    where
        S: std::borrow::Borrow<MapData>,
        T: std::borrow::Borrow<MapData>,
    {
        let map_err = |map| move |source| StatsError::Map { map, source };
        let mut interface_of_slot = BTreeMap::new();
        for entry in slots.iter() {
            let (if_index, slot) = entry.map_err(map_err(INTERFACE_SLOTS))?;
            interface_of_slot.insert(slot, if_index);
        }
        let slot_count = stats.len() / PER_INTERFACE;
        let mut rows = Vec::new();
        for slot in 0..slot_count {
            let if_index = interface_of_slot.get(&slot).copied();
            if slot != 0 && if_index.is_none() {
                continue;
            }
            for action in Action::ALL {
                for reason in Reason::ALL {
                    let per_cpu = stats
                        .get(&index(slot, action, reason), 0)
                        .map_err(map_err(STATS))?;
                    let counter = per_cpu.iter().fold(Counter::default(), |sum, c| Counter {
                        packets: sum.packets + c.packets,
                        bytes: sum.bytes + c.bytes,
                    });
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
        Ok(Self { rows })
    }

    /// Reads the counters of a loaded program by its kernel id (as `ip link` or `bpftool`
    /// show it), without owning the program.
    pub fn of_program(program_id: u32) -> Result<Self, StatsError> {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == program_id)
            .ok_or(StatsError::MissingMap(program_id, STATS))?;
        let map_ids = info
            .map_ids()
            .map_err(|source| StatsError::Program {
                id: program_id,
                source,
            })?
            .unwrap_or_default();
        let open = |name: &'static str| -> Result<Map, StatsError> {
            let id = map_ids
                .iter()
                .copied()
                .find(|id| MapInfo::from_id(*id).is_ok_and(|m| m.name_as_str() == Some(name)))
                .ok_or(StatsError::MissingMap(program_id, name))?;
            let data =
                MapData::from_id(id).map_err(|source| StatsError::Map { map: name, source })?;
            Map::from_map_data(data).map_err(|source| StatsError::Map { map: name, source })
        };
        let stats = PerCpuArray::try_from(open(STATS)?)
            .map_err(|source| StatsError::Map { map: STATS, source })?;
        let slots =
            HashMap::try_from(open(INTERFACE_SLOTS)?).map_err(|source| StatsError::Map {
                map: INTERFACE_SLOTS,
                source,
            })?;
        Self::read(&stats, &slots)
    }

    /// The counter for (interface, action, reason); zero when nothing was counted.
    pub fn get(&self, if_index: u32, action: Action, reason: Reason) -> Counter {
        self.rows
            .iter()
            .find(|r| r.if_index == Some(if_index) && r.action == action && r.reason == reason)
            .map(|r| r.counter)
            .unwrap_or_default()
    }
}
