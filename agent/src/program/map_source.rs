//! The parts every map owner is built from: where maps are taken from while the program's maps
//! are resolved (a program this process loaded, or one already in the kernel found by its id),
//! a typed map with its name, and the errors that name the map.

use std::{collections::BTreeSet, os::fd::AsFd as _};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, MapInfo},
};

use super::pins::PinDir;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("map {0} is missing from the XDP object")]
    Missing(&'static str),
    #[error("map {map} of the XDP object is not what moat expects")]
    WrongType {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "the XDP object has maps no part of the agent owns ({0}); the agent and the program are \
         out of step"
    )]
    Unclaimed(String),
    #[error("taking a handle on map {map}")]
    Handle {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Program(#[from] ProgramMapsError),
    #[error("pinning map {map}")]
    Pin {
        map: &'static str,
        #[source]
        source: Box<super::pins::PinError>,
    },
}

/// A map read or written at run time failed.
#[derive(Debug, thiserror::Error)]
pub enum MapAccessError {
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
    #[error("map {map} has {slots} slots, not a power of two")]
    NotPowerOfTwo { map: &'static str, slots: u32 },
    #[error("drawing the seed of {map} from the kernel's random pool failed")]
    Seed {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Wraps a map error with the map's name.
pub fn named(map: &'static str) -> impl Fn(MapError) -> MapAccessError {
    move |source| MapAccessError::Map { map, source }
}

/// A typed map and the name it has in the program, so that every error names it.
pub struct Named<M> {
    pub name: &'static str,
    pub map: M,
}

impl<M: TryFrom<Map, Error = MapError>> Named<M> {
    pub fn resolve(source: &mut MapSource, name: &'static str) -> Result<Self, ResolveError> {
        Ok(Self {
            name,
            map: source.take(name)?,
        })
    }
}

impl<K: aya::Pod, V: aya::Pod> Named<aya::maps::HashMap<MapData, K, V>> {
    /// Removes `key`; a key already gone (expired, evicted, never written) is not an error.
    /// aya reports a missing key on delete as the syscall's ENOENT.
    pub fn remove_if_present(&mut self, key: &K) -> Result<(), MapAccessError> {
        match self.map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(named(self.name)(e)),
        }
    }
}

/// Every map of the program, by name, with a handle of this process's own (see [`duplicate`]):
/// for pinning. Opening a map again by its kernel id would need CAP_SYS_ADMIN, which the service
/// does not have.
#[derive(Debug)]
pub struct MapHandles(Vec<(&'static str, MapData)>);

impl MapHandles {
    /// The name of every map, as the agent resolved them.
    pub fn names(&self) -> BTreeSet<&'static str> {
        self.0.iter().map(|(name, _)| *name).collect()
    }

    /// Pins every map under `pins`, replacing what an earlier program pinned.
    pub fn pin(&self, pins: &PinDir) -> Result<(), ResolveError> {
        for &(map, ref data) in &self.0 {
            pins.pin_map(map, data)
                .map_err(|source| ResolveError::Pin {
                    map,
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }
}

/// A second handle on the same map (for another thread, or for pinning), without the
/// CAP_SYS_ADMIN that reopening it by id needs.
pub fn duplicate(map: &MapData) -> Result<MapData, MapError> {
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(duplicate_error)?;
    MapData::from_fd(fd)
}

fn duplicate_error(io_error: std::io::Error) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError {
        call: "fcntl(F_DUPFD_CLOEXEC)",
        io_error,
    })
}

/// Maps that are the program's own working space, not moat's: the compiler's data sections
/// (`.rodata`, `.bss`) and the program's scratch maps. No part of the agent owns or pins them.
pub fn is_program_private(name: &str) -> bool {
    name.starts_with('.') || agent_common::maps::SCRATCH.contains(&name)
}

/// Where the owners take their maps from while the program's maps are resolved.
pub struct MapSource<'a> {
    from: Origin<'a>,
    taken: Vec<(&'static str, MapData)>,
}

impl<'a> MapSource<'a> {
    /// Maps taken out of a program this process just loaded.
    pub fn object(ebpf: &'a mut Ebpf) -> Self {
        Self {
            from: Origin::Object(ebpf),
            taken: Vec::new(),
        }
    }

    /// Maps of a program already in the kernel, opened by id.
    pub fn program(ids: &'a ProgramMapIds) -> Self {
        Self {
            from: Origin::Program(ids),
            taken: Vec::new(),
        }
    }

    /// The maps not taken yet: what is left in the object, or what the program has that was
    /// not opened. The program's private maps are not counted.
    pub fn left(&self) -> Vec<String> {
        let taken: BTreeSet<&str> = self.taken.iter().map(|(name, _)| *name).collect();
        match &self.from {
            Origin::Object(ebpf) => ebpf
                .maps()
                .map(|(name, _)| name.to_string())
                .filter(|name| !is_program_private(name))
                .collect(),
            Origin::Program(ids) => ids
                .maps
                .iter()
                .map(|(_, name)| name.clone())
                .filter(|name| !is_program_private(name) && !taken.contains(name.as_str()))
                .collect(),
        }
    }

    /// Every map taken, by name.
    pub fn into_handles(self) -> MapHandles {
        MapHandles(self.taken)
    }
}

enum Origin<'a> {
    Object(&'a mut Ebpf),
    Program(&'a ProgramMapIds),
}

impl MapSource<'_> {
    fn map(&mut self, name: &'static str) -> Result<Map, ResolveError> {
        let map = match &mut self.from {
            Origin::Object(ebpf) => ebpf.take_map(name).ok_or(ResolveError::Missing(name))?,
            Origin::Program(ids) => {
                ids.id(name).map_err(|_| ResolveError::Missing(name))?;
                ids.open(name)?
            }
        };
        let data = data_of(&map).ok_or_else(|| ResolveError::WrongType {
            map: name,
            source: MapError::InvalidName {
                name: name.to_string(),
            },
        })?;
        let handle =
            duplicate(data).map_err(|source| ResolveError::Handle { map: name, source })?;
        self.taken.push((name, handle));
        Ok(map)
    }

    /// The map called `name`, as the typed handle `M` (which checks its type and sizes).
    pub fn take<M>(&mut self, name: &'static str) -> Result<M, ResolveError>
    where
        M: TryFrom<Map, Error = MapError>,
    {
        M::try_from(self.map(name)?).map_err(|source| ResolveError::WrongType { map: name, source })
    }

    /// The array called `name`, untyped: for arrays written through a memory mapping.
    pub fn array_data(&mut self, name: &'static str) -> Result<MapData, ResolveError> {
        match self.map(name)? {
            Map::Array(data) => Ok(data),
            _ => Err(ResolveError::WrongType {
                map: name,
                source: MapError::InvalidName {
                    name: name.to_string(),
                },
            }),
        }
    }
}

/// The map data of the kinds of map moat's program declares.
fn data_of(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(data)
        | Map::PerCpuArray(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::LpmTrie(data)
        | Map::RingBuf(data) => Some(data),
        _ => None,
    }
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

/// The maps of any loaded program (moat's or a peer's), found by the program's kernel id:
/// their names and ids, each read once.
pub struct ProgramMapIds {
    program_id: u32,
    /// (map id, map name).
    maps: Vec<(u32, String)>,
}

impl ProgramMapIds {
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
