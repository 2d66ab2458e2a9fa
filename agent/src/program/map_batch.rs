//! `BPF_MAP_UPDATE_BATCH` (Linux 5.6): a hash filled a few thousand entries per system call
//! instead of one. aya 0.14 has no batch operations, and a million prefixes inserted one by one
//! cost seconds of system calls at start-up and on import. Large fills go out from several
//! threads: the kernel's hashes take concurrent inserts (a lock per bucket).

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
        let mut busy = 0;
        while done < chunk.len() {
            let (taken, result) = update_some(fd, &keys[done..], &values[done..]);
            done += taken;
            match result {
                Ok(()) if taken > 0 => {}
                Ok(()) => return Err(io::Error::other("BPF_MAP_UPDATE_BATCH took no entry")),
                // Kernels that let an update be preempted while it holds a bucket's per-CPU
                // lock count fail another thread's update on that CPU with EBUSY: what was
                // taken stays taken, the rest is sent again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && busy < BUSY_RETRIES => {
                    busy += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Times one batch is sent again after EBUSY before the error stands.
const BUSY_RETRIES: u32 = 8;

/// One `BPF_MAP_UPDATE_BATCH`: how many entries the kernel took (all of them, unless it
/// stopped early), and the error that stopped it.
fn update_some<K: Pod, V: Pod>(map_fd: u32, keys: &[K], values: &[V]) -> (usize, io::Result<()>) {
    let count = match u32::try_from(keys.len()) {
        Ok(count) => count,
        Err(e) => return (0, Err(io::Error::other(e))),
    };
    // SAFETY: plain C data for which all zeroes is a valid value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.map_fd = map_fd;
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = count;
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
    let result = if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: the kernel wrote back how many it took into the field it read the count from,
    // failed or not (never more than it was given).
    let taken = unsafe { attr.batch.count }.min(count) as usize;
    (taken, result)
}
