//! The contract between moat's XDP program and its agent: every map name, capacity, key, value
//! and counter index that both sides use. What the kernel writes is exactly what user space reads,
//! so every type here is `#[repr(C)]`, made of integers and byte arrays, with explicit padding.
#![no_std]

pub mod lists;
pub mod maps;
pub mod stats;
