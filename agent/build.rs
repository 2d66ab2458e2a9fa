//! Builds the XDP program (`agent-ebpf`, target bpfel-unknown-none, nightly + bpf-linker) and
//! leaves the object in OUT_DIR for `include_bytes_aligned!` (in `src/program/loader.rs`), as
//! aya's template does: the eBPF crate is found through cargo's metadata, not a guessed path.
//!
//! `AYA_BUILD_SKIP=1` skips that build (for `cargo check`/`clippy` on a machine without
//! bpf-linker); the agent then embeds an empty object and refuses to run with a clear error.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The eBPF crate and the binary it produces (`loader.rs` embeds the same name).
const EBPF_PACKAGE: &str = "agent-ebpf";
const EBPF_BINARY: &str = "moat-xdp";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace's metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("the workspace has no package {EBPF_PACKAGE}"))?;
    let ebpf_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;

    let object = out_dir.join(EBPF_BINARY);
    // A stale object from an earlier build must not survive a skipped build.
    let _ = fs::remove_file(&object);

    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context("building the XDP program failed; run `cargo xtask setup` first")?;

    if !object.exists() {
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}
