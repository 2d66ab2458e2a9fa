use std::path::PathBuf;

/// The eBPF build runs `bpf-linker` from PATH, which cargo does not know about: rebuild when that
/// binary changes (for instance after `cargo xtask setup` rebuilt it for a new LLVM).
fn main() {
    if let Some(linker) = find_on_path("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}
