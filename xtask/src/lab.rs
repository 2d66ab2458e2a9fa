//! `cargo xtask lab`: build, then run the lab demo (`moat-tests`' `moat-lab` binary).

use anyhow::bail;

use crate::command::{build_binaries, is_root, run, workspace_root};

pub fn run_demo() -> anyhow::Result<()> {
    crate::setup::ensure_ready()?;
    if !is_root() {
        bail!(
            "the lab needs root (network namespaces, veth pairs, XDP): run `sudo -E cargo xtask lab`"
        );
    }
    build_binaries()?;
    let debug = workspace_root().join("target").join("debug");
    run(std::process::Command::new(debug.join("moat-lab")).env("MOAT_BIN", debug.join("moat")))
}
