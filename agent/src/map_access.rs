//! Reaching the program's maps by name, with errors that name the map.

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo},
};

use crate::mapped_array::MappedArray;

#[derive(Debug, thiserror::Error)]
pub enum MapAccessError {
    #[error("map {0} is missing from the XDP object")]
    Missing(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("mapping {map} into memory failed")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Wraps a map error with the map's name.
pub fn named(map: &'static str) -> impl Fn(MapError) -> MapAccessError {
    move |source| MapAccessError::Map { map, source }
}

fn data<'a>(ebpf: &'a mut Ebpf, map: &'static str) -> Result<&'a mut Map, MapAccessError> {
    ebpf.map_mut(map).ok_or(MapAccessError::Missing(map))
}

pub fn hash<'a, K: Pod, V: Pod>(
    ebpf: &'a mut Ebpf,
    map: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>, MapAccessError> {
    HashMap::try_from(data(ebpf, map)?).map_err(named(map))
}

pub fn array<'a, V: Pod>(
    ebpf: &'a mut Ebpf,
    map: &'static str,
) -> Result<Array<&'a mut MapData, V>, MapAccessError> {
    Array::try_from(data(ebpf, map)?).map_err(named(map))
}

/// The first `bytes` bytes of an mmapable array's values, mapped for writing.
pub fn mapped(
    ebpf: &mut Ebpf,
    map: &'static str,
    bytes: usize,
) -> Result<MappedArray, MapAccessError> {
    let Map::Array(array) = data(ebpf, map)? else {
        return Err(MapAccessError::Map {
            map,
            source: MapError::InvalidName {
                name: map.to_string(),
            },
        });
    };
    MappedArray::new(array, bytes).map_err(|source| MapAccessError::Mmap { map, source })
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramMapsError {
    #[error("no loaded program has id {0}")]
    NoProgram(u32),
    #[error("listing the maps of program {id} failed")]
    List {
        id: u32,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {id} has no map named {name}")]
    NoMap { id: u32, name: String },
    #[error("opening map {name} of program {id}")]
    Open {
        id: u32,
        name: String,
        #[source]
        source: MapError,
    },
}

/// The maps of a loaded program found by its kernel id (as `ip link` or `bpftool` show it),
/// without owning the program: for readers outside the process that loaded it.
pub struct ProgramMaps {
    program_id: u32,
    /// (map id, map name), each read once.
    maps: Vec<(u32, String)>,
}

impl ProgramMaps {
    pub fn of(program_id: u32) -> Result<Self, ProgramMapsError> {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == program_id)
            .ok_or(ProgramMapsError::NoProgram(program_id))?;
        let ids = info
            .map_ids()
            .map_err(|source| ProgramMapsError::List {
                id: program_id,
                source,
            })?
            .unwrap_or_default();
        let maps = ids
            .into_iter()
            .filter_map(|id| {
                let info = MapInfo::from_id(id).ok()?;
                Some((id, info.name_as_str()?.to_string()))
            })
            .collect();
        Ok(Self { program_id, maps })
    }

    /// The kernel id of the map called `name`.
    pub fn id(&self, name: &str) -> Result<u32, ProgramMapsError> {
        self.maps
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
            .ok_or_else(|| ProgramMapsError::NoMap {
                id: self.program_id,
                name: name.to_string(),
            })
    }

    /// The map called `name`, opened.
    pub fn open(&self, name: &str) -> Result<Map, ProgramMapsError> {
        let open_err = |source| ProgramMapsError::Open {
            id: self.program_id,
            name: name.to_string(),
            source,
        };
        let data = MapData::from_id(self.id(name)?).map_err(open_err)?;
        Map::from_map_data(data).map_err(open_err)
    }
}
