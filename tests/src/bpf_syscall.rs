//! The few bpf(2) commands the tests and benchmarks need for objects moat did not make: the
//! floor program (hand-assembled, loaded from here), xdp-filter's (found by id), and maps of a
//! foreign layout pinned where moat looks. One `BPF_PROG_TEST_RUN` wrapper times every
//! contender the same way.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_XDP: u32 = 37;

pub const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// Big enough for every command's attributes; the kernel wants the unused tail zeroed.
#[repr(C, align(8))]
struct Attr([u8; 160]);

impl Attr {
    fn new() -> Self {
        Self([0; 160])
    }

    fn put_u32(&mut self, offset: usize, value: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn put_u64(&mut self, offset: usize, value: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(command: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

pub fn map_create(
    map_type: u32,
    key: u32,
    value: u32,
    max_entries: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, map_type)
        .put_u32(4, key)
        .put_u32(8, value)
        .put_u32(12, max_entries);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// Pins `object` (a map or program fd) at `path` on bpffs.
pub fn obj_pin(object: BorrowedFd, path: &std::path::Path) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64)
        .put_u32(8, object.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

pub fn map_update(map: BorrowedFd, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32)
        .put_u64(8, key.as_ptr() as u64)
        .put_u64(16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

pub fn map_lookup(map: BorrowedFd, key: &[u8], value: &mut [u8]) -> std::io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32)
        .put_u64(8, key.as_ptr() as u64)
        .put_u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

pub fn program_by_id(id: u32) -> std::io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, id);
    bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned)
}

pub fn map_by_id(id: u32) -> std::io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, id);
    bpf(BPF_MAP_GET_FD_BY_ID, &mut attr).map(owned)
}

/// Loads an XDP program from raw instructions (8 bytes each); the verifier's log on refusal.
pub fn load_xdp(instructions: &[u64]) -> Result<OwnedFd, String> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = Attr::new();
    attr.put_u32(0, BPF_PROG_TYPE_XDP)
        .put_u32(4, instructions.len() as u32)
        .put_u64(8, instructions.as_ptr() as u64)
        .put_u64(16, license.as_ptr() as u64)
        .put_u32(24, 1)
        .put_u32(28, log.len() as u32)
        .put_u64(32, log.as_mut_ptr() as u64);
    bpf(BPF_PROG_LOAD, &mut attr).map(owned).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        format!("{e}: {}", String::from_utf8_lossy(&log[..end]))
    })
}

/// A program that returns XDP_PASS and does nothing else: `r0 = 2; exit`.
pub fn load_xdp_pass() -> OwnedFd {
    const MOV64_R0_PASS: u64 = 0xb7 | (2 << 32);
    const EXIT: u64 = 0x95;
    load_xdp(&[MOV64_R0_PASS, EXIT]).unwrap_or_else(|e| panic!("loading an XDP_PASS program: {e}"))
}

/// Attaches `program` to interface `if_index` of the calling thread's network namespace, as a
/// link that lasts as long as the returned fd.
pub fn link_xdp(program: BorrowedFd, if_index: u32) -> std::io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, program.as_raw_fd() as u32)
        .put_u32(4, if_index)
        .put_u32(8, BPF_XDP);
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Runs `program` on `frame` `repeat` times in the kernel; returns the last XDP action and the
/// mean time of one run in nanoseconds (the kernel's own clock around the loop).
pub fn test_run(program: BorrowedFd, frame: &[u8], repeat: u32) -> std::io::Result<(u32, u32)> {
    let mut attr = Attr::new();
    attr.put_u32(0, program.as_raw_fd() as u32)
        .put_u32(8, frame.len() as u32)
        .put_u64(16, frame.as_ptr() as u64)
        .put_u32(32, repeat);
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.u32_at(4), attr.u32_at(36)))
}
