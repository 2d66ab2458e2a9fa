//! moat's test lab: two network namespaces joined by a veth pair, `moat` running on one side,
//! traffic sent from the other. Everything a lab creates is removed when it is dropped, even
//! after a panic, and labs left behind by a killed test run are swept on the next one.
//!
//! Every helper panics with a message that says what was expected and what happened: a failing
//! end-to-end test should read like a bug report.

pub mod bpf_syscall;
pub mod control_socket;
pub mod fleet_lab;
pub mod frames;
pub mod heavy;
pub mod lab;
pub mod metrics;
pub mod moat_process;
pub mod nats;
pub mod netns;
pub mod program;
pub mod spoofed_flood;
pub mod systemd_container;
pub mod tcp_service;
pub mod traffic;
pub mod trafgen;
pub mod udp_service;

pub use lab::{Lab, Side};
pub use moat_process::MoatProcess;
