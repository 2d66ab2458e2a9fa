//! The contract between moat's XDP program and its agent: every map name, capacity, key, value,
//! setting and counter index that both sides use. What the kernel writes is exactly what user
//! space reads, so every type here is `#[repr(C)]`, made of integers and byte arrays, with
//! explicit padding.
#![no_std]

pub mod bitset;
pub mod clock;
pub mod events;
pub mod hash;
pub mod lists;
pub mod maps;
pub mod protect;
pub mod rate_limit;
pub mod rules;
pub mod settings;
pub mod stats;
pub mod syn_proxy;
pub mod tcp;

/// Implements `aya::Pod` for types user space reads from or writes to maps.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: #[repr(C)], integers and byte arrays only, no implicit padding.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;
