//! The floor: the smallest XDP program that does the job at all. It checks that the frame holds
//! an Ethernet and an IPv4 header, reads the IPv4 source and looks it up in one hash map: found,
//! drop; else pass. No VLAN, no IPv6, no counters, no policy. Hand-assembled here so that it is
//! exactly this and nothing more; it lives in the benchmark and is never shipped.

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};

use moat_tests::bpf_syscall::{self, BPF_MAP_TYPE_HASH};

/// One eBPF instruction: opcode, registers (src << 4 | dst), offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((src << 4 | dst) as u64) << 8)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const STX_W: u8 = 0x63;
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const JGT_X: u8 = 0x2d;
const JNE_K: u8 = 0x55;
const JEQ_K: u8 = 0x15;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const PSEUDO_MAP_FD: u8 = 1;
const MAP_LOOKUP_ELEM: i32 = 1;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

/// The program, with `map` as its one map.
fn instructions(map: i32) -> Vec<u64> {
    // Jumps count instructions from the next one; PASS is instruction 17.
    vec![
        insn(LDX_W, 2, 1, 0, 0),                  // 0: r2 = ctx->data
        insn(LDX_W, 3, 1, 4, 0),                  // 1: r3 = ctx->data_end
        insn(MOV64_X, 4, 2, 0, 0),                // 2: r4 = r2
        insn(ADD64_K, 4, 0, 0, 34),               // 3: r4 += 14 (Ethernet) + 20 (IPv4)
        insn(JGT_X, 4, 3, 12, 0),                 // 4: if r4 > data_end: PASS
        insn(LDX_H, 5, 2, 12, 0),                 // 5: r5 = ether type (big endian)
        insn(JNE_K, 5, 0, 10, 0x0008),            // 6: if not IPv4: PASS
        insn(LDX_W, 6, 2, 26, 0),                 // 7: r6 = IPv4 source
        insn(STX_W, 10, 6, -4, 0),                // 8: *(fp - 4) = r6
        insn(MOV64_X, 2, 10, 0, 0),               // 9: r2 = fp
        insn(ADD64_K, 2, 0, 0, -4),               // 10: r2 = &key
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map), // 11: r1 = map
        0,                                        // 12: (second half of the 64-bit load)
        insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),     // 13: r0 = lookup(map, &key)
        insn(JEQ_K, 0, 0, 2, 0),                  // 14: if not found: PASS
        insn(MOV64_K, 0, 0, 0, XDP_DROP),         // 15
        insn(EXIT, 0, 0, 0, 0),                   // 16
        insn(MOV64_K, 0, 0, 0, XDP_PASS),         // 17: PASS
        insn(EXIT, 0, 0, 0, 0),                   // 18
    ]
}

/// The floor program and its map, holding `sources`.
pub struct Floor {
    pub program: OwnedFd,
    _map: OwnedFd,
}

impl Floor {
    pub fn load(sources: &[std::net::Ipv4Addr]) -> Self {
        let capacity = u32::try_from(sources.len().max(1)).expect("fits");
        let map = bpf_syscall::map_create(BPF_MAP_TYPE_HASH, 4, 4, capacity)
            .unwrap_or_else(|e| panic!("creating the floor's map: {e}"));
        for source in sources {
            bpf_syscall::map_update(map.as_fd(), &source.octets(), &1u32.to_ne_bytes())
                .unwrap_or_else(|e| panic!("filling the floor's map: {e}"));
        }
        let program = bpf_syscall::load_xdp(&instructions(map.as_raw_fd()))
            .unwrap_or_else(|e| panic!("loading the floor program: {e}"));
        Self { program, _map: map }
    }
}

/// A program that returns XDP_PASS and does nothing else: its cost per packet is what
/// `BPF_PROG_TEST_RUN` adds to every contender's.
pub fn empty_program() -> OwnedFd {
    bpf_syscall::load_xdp_pass()
}
