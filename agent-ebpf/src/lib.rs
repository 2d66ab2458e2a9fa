#![no_std]
// The XDP program is the `moat-xdp` binary; this library target exists so that the agent can
// declare a build-dependency on this crate and be rebuilt when it changes.
