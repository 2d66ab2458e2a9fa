//! `moat capture`'s sampling override (`CAPTURE`, one slot): while a capture runs, the program
//! samples dropped packets at the rate the capture asked for, and passed packets at all.

use agent_common::{events::CaptureSettings, maps};
use aya::maps::{Array, MapData};

use super::map_source::{MapAccessError, MapSource, Named, ResolveError, named};

/// The override; only this module reads or writes it.
pub struct SamplingOverride {
    capture: Named<Array<MapData, CaptureSettings>>,
}

impl SamplingOverride {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        Ok(Self {
            capture: Named::resolve(source, maps::CAPTURE)?,
        })
    }

    /// Samples one in `dropped_every` dropped and one in `passed_every` passed packets; 0 for
    /// either leaves it to the policy's `sample_every` (dropped) or to none (passed).
    pub fn set(&mut self, dropped_every: u32, passed_every: u32) -> Result<(), MapAccessError> {
        let settings = CaptureSettings {
            dropped_every,
            passed_every,
        };
        self.capture
            .map
            .set(0, settings, 0)
            .map_err(named(self.capture.name))
    }

    /// The override in force.
    pub fn get(&self) -> Result<CaptureSettings, MapAccessError> {
        self.capture
            .map
            .get(&0, 0)
            .map_err(named(self.capture.name))
    }
}
