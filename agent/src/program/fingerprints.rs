//! The attack fingerprints of the protected entries (`PROT_PRINTS`), installed for an attack's
//! lifetime, and the program's per-CPU pacing of their samples (`PROT_SAMPLE_AT`, which only
//! the program writes).

use agent_common::{
    maps,
    protect::{Fingerprint, MAX_PROTECTED, SamplePacing},
};
use aya::maps::{Array, MapData, PerCpuArray};

use super::map_source::{MapAccessError, MapSource, Named, ResolveError, named};

/// Only this module writes the fingerprints.
pub struct FingerprintMaps {
    prints: Named<Array<MapData, Fingerprint>>,
    /// Held so that the map has an owner; the program alone writes it.
    _sample_at: Named<PerCpuArray<MapData, SamplePacing>>,
}

impl FingerprintMaps {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            prints: Named::resolve(source, maps::PROTECT_FINGERPRINTS)?,
            _sample_at: Named::resolve(source, maps::PROTECT_SAMPLE_AT)?,
        })
    }

    /// Puts `print` in force for protected entry `entry` (replacing any).
    pub fn install(&mut self, entry: u32, print: &Fingerprint) -> Result<(), MapAccessError> {
        self.prints
            .map
            .set(entry, print, 0)
            .map_err(named(self.prints.name))
    }

    /// Removes the fingerprint of `entry`, if any.
    pub fn remove(&mut self, entry: u32) -> Result<(), MapAccessError> {
        self.install(entry, &Fingerprint::default())
    }

    /// Removes every fingerprint.
    pub fn clear(&mut self) -> Result<(), MapAccessError> {
        (0..MAX_PROTECTED).try_for_each(|entry| self.remove(entry))
    }
}
