//! Reaching the program's maps by name, with errors that name the map.

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, Map, MapData, MapError},
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
