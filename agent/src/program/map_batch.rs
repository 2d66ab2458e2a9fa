//! `BPF_MAP_UPDATE_BATCH` (Linux 5.6): a hash filled a few thousand entries per system call
//! instead of one. aya 0.14 has no batch operations, and a million prefixes inserted one by one
//! cost seconds of system calls at start-up and on import. Large fills go out from every CPU:
//! the kernel's hashes take concurrent inserts (a lock per bucket, per-CPU element caches).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};
use aya_obj::generated::{bpf_attr, bpf_cmd};
use rayon::{iter::ParallelIterator as _, prelude::ParallelSlice as _};

/// Entries per system call: large enough that the call's own cost vanishes, small enough that
/// the key and value copies stay in cache.
const BATCH: usize = 4096;
/// Entries per thread's share of a large fill; smaller fills (a `block add`) stay on the
/// calling thread.
const SHARE: usize = 4 * BATCH;

/// Inserts or replaces every `(key, value)` in `map` (a hash or an array), whose key and value
/// sizes must be those of `K` and `V` (the callers pass the types of their typed map, or check
/// the sizes). The keys must be distinct: the entries go in no particular order, and on an
/// error some of them are in the map.
pub fn update<K: Pod + Sync, V: Pod + Sync>(map: &MapData, entries: &[(K, V)]) -> io::Result<()> {
    let fd = u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(io::Error::other)?;
    if entries.len() <= SHARE {
        return update_in_turn(fd, entries);
    }
    entries
        .par_chunks(SHARE)
        .try_for_each(|share| update_in_turn(fd, share))
}

/// [`update`] from the calling thread, a batch after another.
fn update_in_turn<K: Pod, V: Pod>(fd: u32, entries: &[(K, V)]) -> io::Result<()> {
    let mut keys = Vec::with_capacity(BATCH.min(entries.len()));
    let mut values = Vec::with_capacity(BATCH.min(entries.len()));
    for chunk in entries.chunks(BATCH) {
        keys.clear();
        values.clear();
        keys.extend(chunk.iter().map(|(key, _)| *key));
        values.extend(chunk.iter().map(|(_, value)| *value));
        let mut done = 0;
        while done < chunk.len() {
            done += update_some(fd, &keys[done..], &values[done..])?;
        }
    }
    Ok(())
}

/// One `BPF_MAP_UPDATE_BATCH`; returns how many entries the kernel took (all, unless it
/// stopped early without an error).
fn update_some<K: Pod, V: Pod>(map_fd: u32, keys: &[K], values: &[V]) -> io::Result<usize> {
    // SAFETY: plain C data for which all zeroes is a valid value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.map_fd = map_fd;
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = u32::try_from(keys.len()).map_err(io::Error::other)?;
    // SAFETY: the attribute describes `keys.len()` keys and values in buffers this function
    // borrows for the call; `K` and `V` have the map's key and value sizes (see `update`), and
    // a Pod type has no padding.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
            std::ptr::from_mut(&mut attr),
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote back how many it processed into the field it read the count from.
    let count = unsafe { attr.batch.count } as usize;
    if count == 0 {
        return Err(io::Error::other("BPF_MAP_UPDATE_BATCH took no entry"));
    }
    Ok(count)
}
