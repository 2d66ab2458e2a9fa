//! Loading the embedded XDP program (maps sized for the policy, verifier included), resolving
//! its maps, and attaching it to interfaces.

use agent_common::maps::{self, CLOCK_PROGRAM, PROGRAM};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
};
use tracing::warn;

use super::{
    capacities::Capacities,
    map_source::{ResolveError, is_program_private},
    maps::ProgramMaps,
    pins::LinkMode,
};
use crate::config::XdpMode;

/// The XDP object built from `agent-ebpf` by `build.rs`.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat-xdp"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this moat binary was built without its XDP program (AYA_BUILD_SKIP); rebuild it with \
         `cargo build -p moat` after `cargo xtask setup`"
    )]
    NoObject,
    #[error("the embedded XDP object cannot be parsed")]
    Parse(#[source] aya_obj::ParseError),
    #[error("loading the XDP object into the kernel failed")]
    Object(#[source] aya::EbpfError),
    #[error(transparent)]
    Maps(#[from] ResolveError),
    #[error("setting up the rate limiter's table failed")]
    LimiterTable(#[source] super::map_source::MapAccessError),
    #[error("the object has no XDP program named {0:?}")]
    NoProgram(&'static str),
    #[error("the kernel rejected XDP program {PROGRAM:?}")]
    Verify(#[source] aya::programs::ProgramError),
    #[error("attaching to {interface} in {mode} mode failed")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// The names of the maps the embedded object declares (its private maps left out), read from
/// the object file itself.
pub fn object_map_names() -> Result<std::collections::BTreeSet<String>, LoadError> {
    if PROGRAM_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let object = aya_obj::Object::parse(PROGRAM_OBJECT).map_err(LoadError::Parse)?;
    Ok(object
        .maps
        .into_keys()
        .filter(|name| !is_program_private(name))
        .collect())
}

/// The program, not attached: the object that holds the XDP program (dropping it detaches what
/// it attached and did not pin), and its maps, resolved. The program is in the kernel once
/// [`verify`] has loaded it ([`load`] does both).
pub struct Loaded {
    pub ebpf: Ebpf,
    pub maps: ProgramMaps,
}

/// Loads the program into the kernel (verifier included) without attaching it.
pub fn load(capacities: Capacities) -> Result<Loaded, LoadError> {
    let mut loaded = create_maps(capacities)?;
    verify(&mut loaded.ebpf)?;
    Ok(loaded)
}

/// Creates the program's maps, sets the program's clock, and relocates the program to them
/// without loading it yet: the maps can be filled while [`verify`] runs.
pub fn create_maps(capacities: Capacities) -> Result<Loaded, LoadError> {
    if PROGRAM_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    raise_memlock_limit();
    let v4_long_buckets = capacities.v4_long_buckets();
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(maps::RATE_LIMITS, capacities.rate_slots())
        .map_max_entries(maps::BANS, capacities.rate_sources)
        .map_max_entries(maps::V4_LONG, capacities.v4_long_buckets())
        .map_max_entries(maps::V4_LONG_STASH, capacities.v4_long_stash())
        .override_global(maps::V4_LONG_BUCKETS, &v4_long_buckets, true)
        .map_max_entries(maps::V6_PREFIXES, capacities.v6);
    let mut ebpf = loader.load(PROGRAM_OBJECT).map_err(LoadError::Object)?;
    let mut maps = ProgramMaps::take(&mut ebpf)?;
    maps.limiter.init_table().map_err(LoadError::LimiterTable)?;
    let clock_program = ebpf
        .program_mut(CLOCK_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoadError::NoProgram(CLOCK_PROGRAM))?;
    // Without it the program reads the coarse clock's helper: slower, as right.
    if let Err(e) = maps.clock.set(clock_program) {
        warn!(
            error = %crate::error_chain(&e),
            "measuring the program's clock failed; it keeps the kernel's coarse clock"
        );
    }
    Ok(Loaded { ebpf, maps })
}

/// Loads the program made by [`create_maps`] into the kernel: the verifier's pass, about a
/// quarter of a second for this program whatever the maps hold.
pub fn verify(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    program(ebpf)?.load().map_err(LoadError::Verify)
}

pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    ebpf.program_mut(PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoadError::NoProgram(PROGRAM))
}

/// An attachment made by [`attach`]: detached when the `Ebpf` that owns it is dropped, or
/// explicitly with [`detach`], unless its link is taken out and pinned.
#[derive(Debug)]
pub struct Attachment {
    pub mode: LinkMode,
    pub link: XdpLinkId,
}

/// Attaches to `interface`; in `auto` mode, native first and generic if the driver refuses.
pub fn attach(
    program: &mut Xdp,
    interface: &str,
    if_index: u32,
    mode: XdpMode,
) -> Result<Attachment, LoadError> {
    let try_mode = |program: &mut Xdp, mode: LinkMode| {
        let aya_mode = match mode {
            LinkMode::Native => AyaXdpMode::Driver,
            LinkMode::Generic => AyaXdpMode::Skb,
        };
        program
            .attach_to_if_index(if_index, aya_mode)
            .map(|link| Attachment { mode, link })
            .map_err(|source| LoadError::Attach {
                interface: interface.to_string(),
                mode: mode.name(),
                source,
            })
    };
    match mode {
        XdpMode::Native => try_mode(program, LinkMode::Native),
        XdpMode::Generic => try_mode(program, LinkMode::Generic),
        XdpMode::Auto => match try_mode(program, LinkMode::Native) {
            Ok(attachment) => Ok(attachment),
            Err(native) => {
                warn!(
                    interface,
                    error = %crate::error_chain(&native),
                    "native XDP unavailable, falling back to generic mode (packets are dropped \
                     after the kernel allocates them)"
                );
                try_mode(program, LinkMode::Generic)
            }
        },
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones use memcg and ignore it.
fn raise_memlock_limit() {
    let accounted_by_memcg = aya::util::KernelVersion::current()
        .is_ok_and(|version| version >= aya::util::KernelVersion::new(5, 11, 0));
    if accounted_by_memcg {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; loading may fail on this kernel (before 5.11)"
        );
    }
}
