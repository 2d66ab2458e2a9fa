//! `cargo xtask lab`: build, then run the lab demo (`moat-tests`' `moat-lab` binary).

use anyhow::bail;

use crate::command::{cargo, is_root, run, workspace_root};

pub fn run_demo() -> anyhow::Result<()> {
    crate::setup::ensure_ready()?;
    if !is_root() {
        bail!(
            "the lab needs root (network namespaces, veth pairs, XDP): run `sudo -E cargo xtask lab`"
        );
    }
    run(cargo().args([
        "build",
        "--package",
        "moat",
        "--package",
        "moat-tests",
        "--bins",
    ]))?;
    let debug = workspace_root().join("target").join("debug");
    run(std::process::Command::new(debug.join("moat-lab")).env("MOAT_BIN", debug.join("moat")))
}
