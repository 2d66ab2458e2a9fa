//! Writing an mmapable BPF array (`BPF_F_MMAPABLE`) through a shared mapping: a whole table in
//! one copy instead of one syscall per element; a few elements by a batch update instead.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::AtomicU64,
};

use aya::{
    maps::{MapData, MapError},
    sys::SyscallError,
};

use super::{
    map_batch,
    map_source::{MapAccessError, MapSource, ResolveError},
};

/// An mmapable array, mapped only while it is written (a mapping kept open would count its
/// touched pages in the agent's memory for as long as it runs).
pub struct MmapArray {
    name: &'static str,
    data: MapData,
}

impl MmapArray {
    pub fn resolve(source: &mut MapSource, name: &'static str) -> Result<Self, ResolveError> {
        Ok(Self {
            name,
            data: source.array_data(name)?,
        })
    }

    /// Sets the elements at the given indexes, in one system call per few thousand: for a few
    /// elements of a large array, cheaper than mapping it.
    pub fn set(&mut self, elements: &[(u32, u64)]) -> Result<(), MapAccessError> {
        let value_size = self
            .data
            .info()
            .map_err(|source| MapAccessError::Map {
                map: self.name,
                source,
            })?
            .value_size();
        if value_size as usize != size_of::<u64>() {
            return Err(MapAccessError::Map {
                map: self.name,
                source: MapError::InvalidValueSize {
                    size: size_of::<u64>(),
                    expected: value_size as usize,
                },
            });
        }
        map_batch::update(&self.data, elements).map_err(|io_error| MapAccessError::Map {
            map: self.name,
            source: MapError::SyscallError(SyscallError {
                call: "BPF_MAP_UPDATE_BATCH",
                io_error,
            }),
        })
    }

    /// How many elements the array has.
    pub fn elements(&self) -> Result<u32, MapError> {
        Ok(self.data.info()?.max_entries())
    }

    /// Runs `f` on the first `bytes` bytes of the array's values (a multiple of 8), mapped for
    /// writing, as words that the program may read while they change: each store is whole.
    pub fn with_words<R>(
        &mut self,
        bytes: usize,
        f: impl FnOnce(&[AtomicU64]) -> R,
    ) -> Result<R, MapAccessError> {
        let mut mapping =
            Mapping::new(&self.data, bytes).map_err(|source| MapAccessError::Mmap {
                map: self.name,
                source,
            })?;
        let bytes = mapping.bytes_mut();
        // SAFETY: the mapping is page-aligned, so 8-aligned; the words cover whole bytes of it
        // and live as long as the mapping. Atomics make the program's concurrent reads sound.
        let words = unsafe {
            std::slice::from_raw_parts(
                bytes.as_mut_ptr().cast::<AtomicU64>(),
                bytes.len() / size_of::<u64>(),
            )
        };
        Ok(f(words))
    }

    /// Runs `f` on the first `bytes` bytes of the array's values, mapped for writing.
    pub fn write(&mut self, bytes: usize, f: impl FnOnce(&mut [u8])) -> Result<(), MapAccessError> {
        let mut mapping =
            Mapping::new(&self.data, bytes).map_err(|source| MapAccessError::Mmap {
                map: self.name,
                source,
            })?;
        f(mapping.bytes_mut());
        Ok(())
    }
}

/// Runs `f` on the first `bytes` bytes of `map`'s values (an mmapable array; a multiple of 8),
/// mapped read-only, as words the program may write while they are read.
pub fn read_words<R>(
    map: &MapData,
    bytes: usize,
    f: impl FnOnce(&[AtomicU64]) -> R,
) -> io::Result<R> {
    let mapping = Mapping::with_protection(map, bytes, libc::PROT_READ)?;
    // SAFETY: as in `MmapArray::with_words`; the words are only loaded.
    let words = unsafe {
        std::slice::from_raw_parts(
            mapping.ptr.as_ptr().cast::<AtomicU64>(),
            mapping.len / size_of::<u64>(),
        )
    };
    Ok(f(words))
}

/// A mapping of an array map's values.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps the first `bytes` bytes of the array's values (rounded up to pages) for writing.
    fn new(map: &MapData, bytes: usize) -> io::Result<Self> {
        Self::with_protection(map, bytes, libc::PROT_READ | libc::PROT_WRITE)
    }

    fn with_protection(map: &MapData, bytes: usize, protection: libc::c_int) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = bytes.next_multiple_of(page);
        // SAFETY: a fresh shared mapping of a valid map fd; the kernel checks the length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                protection,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len: bytes })
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is at least `len` bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped (munmap rounds the length up to pages).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
