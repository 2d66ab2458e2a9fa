//! Every map of the XDP program, resolved once into typed handles (the idea of cilium/ebpf's
//! generated objects): a map that is missing, of the wrong type or of the wrong key or value
//! size is one error, at load, naming it, and so is a map of the object that no part of the
//! agent owns. Each handle is a private field of its owning module (lists, rule tables,
//! settings, limiter, counters, events, fingerprints, sampling); only that module reads or writes the map.

use aya::Ebpf;

use super::{
    clock::ProgramClock,
    counters::{CounterMaps, Snapshot},
    events::EventRing,
    fingerprints::FingerprintMaps,
    limiter::LimiterMaps,
    live::PolicyMaps,
    map_source::{MapAccessError, MapHandles, MapSource, ProgramMapIds, ResolveError},
    sampling::SamplingOverride,
};

/// Every map of the program, each held by the part of the agent that owns it.
pub struct ProgramMaps {
    /// Lists, rule tables and settings of both generations, and the switch between them.
    pub policy: PolicyMaps,
    /// Per-source rate limiter state and bans.
    pub limiter: LimiterMaps,
    /// Packet counters and the interface slots that index them.
    pub counters: CounterMaps,
    /// Ban events and packet samples.
    pub events: EventRing,
    /// The protected entries' attack fingerprints.
    pub fingerprints: FingerprintMaps,
    /// `moat capture`'s sampling override.
    pub sampling: SamplingOverride,
    /// The clock of bans, rate limits and protected destinations.
    pub clock: ProgramClock,
    /// A handle on every map, for pinning.
    pub handles: MapHandles,
}

impl ProgramMaps {
    /// Takes every map out of a program this process just loaded.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ResolveError> {
        Self::resolve(MapSource::object(ebpf))
    }

    /// Opens every map of a program already in the kernel, found by its id (as `ip link` or
    /// `bpftool` show it): for readers outside the process that loaded it.
    pub fn of_program(program_id: u32) -> Result<Self, ResolveError> {
        let ids = ProgramMapIds::of(program_id)?;
        Self::resolve(MapSource::program(&ids))
    }

    /// Each owner takes its maps; then nothing may be left over.
    fn resolve(mut source: MapSource) -> Result<Self, ResolveError> {
        let policy = PolicyMaps::resolve(&mut source)?;
        let limiter = LimiterMaps::resolve(&mut source)?;
        let counters = CounterMaps::resolve(&mut source)?;
        let events = EventRing::resolve(&mut source)?;
        let fingerprints = FingerprintMaps::resolve(&mut source)?;
        let sampling = SamplingOverride::resolve(&mut source)?;
        let clock = ProgramClock::resolve(&mut source)?;
        let left = source.left();
        if !left.is_empty() {
            return Err(ResolveError::Unclaimed(left.join(", ")));
        }
        Ok(Self {
            policy,
            limiter,
            counters,
            events,
            fingerprints,
            sampling,
            clock,
            handles: source.into_handles(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Read(#[from] MapAccessError),
}

impl Snapshot {
    /// Reads the counters of a loaded program by its kernel id (as `ip link` or `bpftool`
    /// show it), without owning the program. (Here rather than beside `Snapshot`: opening a
    /// program's maps by id resolves all of them.)
    pub fn of_program(program_id: u32) -> Result<Self, SnapshotError> {
        Ok(ProgramMaps::of_program(program_id)?.counters.snapshot()?)
    }
}
