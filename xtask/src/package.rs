//! `cargo xtask package`: moat as a Debian package, staged file by file and built with
//! `dpkg-deb`, so that every file, mode and maintainer script in it is one the project wrote.
//!
//! The package's own texts live in `packaging/debian/` (control fields, changelog, copyright,
//! maintainer scripts, lintian overrides); the unit and the example config are the same files
//! a by-hand install uses (`packaging/moat.service`, `packaging/moat.toml`). The manual pages
//! and shell completions come from the built binary (`moat manpages`, `moat completions`), so
//! they always match its command line.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    command::{cargo, output, run, workspace_root},
    setup,
};

/// `cargo xtask package`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Where to write the .deb [default: target/debian].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Files dpkg must not overwrite once the operator has edited them.
const CONFFILES: &[&str] = &["/etc/moat/moat.toml"];
/// Files installed as they are in `packaging/` (mode 0644): (source there, path in the package).
const FROM_PACKAGING: &[(&str, &str)] = &[
    ("moat.service", "usr/lib/systemd/system/moat.service"),
    ("moat.toml", "etc/moat/moat.toml"),
    ("debian/copyright", "usr/share/doc/moat/copyright"),
    (
        "grafana-dashboard.json",
        "usr/share/doc/moat/examples/grafana-dashboard.json",
    ),
    (
        "debian/lintian-overrides",
        "usr/share/lintian/overrides/moat",
    ),
];
/// Where each shell looks for the completions of a command named `moat`.
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "usr/share/bash-completion/completions/moat"),
    ("zsh", "usr/share/zsh/vendor-completions/_moat"),
    ("fish", "usr/share/fish/vendor_completions.d/moat.fish"),
];
/// Maintainer scripts, from `packaging/debian/`.
const SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];
/// Fields `packaging/debian/control` must not set: this task computes them.
const COMPUTED_FIELDS: &[&str] = &["Version", "Architecture", "Installed-Size", "Depends"];
/// What the maintainer scripts run beyond the binary's shared libraries (dpkg-shlibdeps finds
/// those): `addgroup`.
const SCRIPT_DEPENDS: &str = "adduser";

pub fn run_package(options: Options) -> anyhow::Result<()> {
    let out = options
        .out
        .unwrap_or_else(|| workspace_root().join("target").join("debian"));
    setup::ensure_ready()?;
    let deb = build(&out)?;
    println!("{}", deb.display());
    Ok(())
}

/// Builds the release binary and the package (on a machine `cargo xtask setup` made ready);
/// returns the .deb's path.
pub fn build(out: &Path) -> anyhow::Result<PathBuf> {
    run(cargo().args(["build", "--release", "--package", "moat"]))?;
    let binary = workspace_root().join("target/release/moat");
    let version = workspace_version()?;
    check_changelog(&version)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();

    // dpkg-shlibdeps wants the tree at debian/<package> under a directory holding
    // debian/control; that directory is also where the staged tree lives.
    let work = out.join("build");
    let stage = work.join("debian/moat");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    Stage::new(&stage).fill(&binary)?;

    let depends = format!("{}, {SCRIPT_DEPENDS}", shlib_depends(&work)?);
    let control = control_file(&version, &arch, installed_size_kib(&stage)?, &depends)?;
    let meta = stage.join("DEBIAN");
    fs::create_dir(&meta).with_context(|| format!("creating {}", meta.display()))?;
    // dpkg-deb refuses a control directory or root that others may write, whatever the umask.
    set_mode(&meta, 0o755)?;
    set_mode(&stage, 0o755)?;
    write(&meta.join("control"), &control, 0o644)?;
    let conffiles: String = CONFFILES.iter().map(|c| format!("{c}\n")).collect();
    write(&meta.join("conffiles"), &conffiles, 0o644)?;
    for script in SCRIPTS {
        copy(
            &packaging().join("debian").join(script),
            &meta.join(script),
            0o755,
        )?;
    }
    write(&meta.join("md5sums"), &md5sums(&stage)?, 0o644)?;

    let deb = out.join(format!("moat_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(deb)
}

fn packaging() -> PathBuf {
    workspace_root().join("packaging")
}

/// The staged tree: every file the package installs, with its mode.
struct Stage<'a> {
    root: &'a Path,
}

impl<'a> Stage<'a> {
    fn new(root: &'a Path) -> Self {
        Self { root }
    }

    fn fill(&self, binary: &Path) -> anyhow::Result<()> {
        let bin = self.path("usr/bin/moat")?;
        // As dh_strip does: no debug sections or notes in what ships (the XDP object the
        // binary embeds is data and keeps its BTF).
        run(Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg("-o")
            .arg(&bin)
            .arg(binary))?;
        set_mode(&bin, 0o755)?;

        let packaging = packaging();
        for (from, to) in FROM_PACKAGING {
            copy(&packaging.join(from), &self.path(to)?, 0o644)?;
        }
        // A native package's changelog is changelog.gz.
        gzip(
            &packaging.join("debian/changelog"),
            &self.path("usr/share/doc/moat/changelog.gz")?,
        )?;
        gzip(
            &workspace_root().join("README.md"),
            &self.path("usr/share/doc/moat/README.md.gz")?,
        )?;

        for (shell, path) in COMPLETIONS {
            let script = output(Command::new(binary).args(["completions", shell]))?;
            write(&self.path(path)?, &script, 0o644)?;
        }
        self.manpages(binary)
    }

    /// `moat manpages` into a scratch directory, each page gzipped into man1.
    fn manpages(&self, binary: &Path) -> anyhow::Result<()> {
        let scratch = self.root.with_file_name("manpages");
        run(Command::new(binary).arg("manpages").arg(&scratch))?;
        let mut pages: Vec<PathBuf> = fs::read_dir(&scratch)
            .with_context(|| format!("reading {}", scratch.display()))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        pages.sort();
        if !pages.iter().any(|p| p.ends_with("moat.1")) {
            bail!("`moat manpages` wrote no moat.1 into {}", scratch.display());
        }
        for page in pages {
            let name = page
                .file_name()
                .and_then(|n| n.to_str())
                .context("a manual page with a non-UTF-8 name")?;
            gzip(&page, &self.path(&format!("usr/share/man/man1/{name}.gz"))?)?;
        }
        Ok(())
    }

    /// `relative` inside the tree, its parent directories created (mode 0755).
    fn path(&self, relative: &str) -> anyhow::Result<PathBuf> {
        let path = self.root.join(relative);
        let mut dir = path.parent();
        let mut missing = Vec::new();
        while let Some(d) = dir.filter(|d| !d.exists()) {
            missing.push(d.to_path_buf());
            dir = d.parent();
        }
        for d in missing.iter().rev() {
            fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
            set_mode(d, 0o755)?;
        }
        Ok(path)
    }
}

/// The workspace's version (`[workspace.package]` in Cargo.toml), which every crate inherits.
fn workspace_version() -> anyhow::Result<String> {
    let manifest = fs::read_to_string(workspace_root().join("Cargo.toml"))
        .context("reading the workspace's Cargo.toml")?;
    manifest
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("no version in [workspace.package] of Cargo.toml")
}

/// The changelog's newest entry must be the version being packaged.
fn check_changelog(version: &str) -> anyhow::Result<()> {
    let path = packaging().join("debian/changelog");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let first = text.lines().next().unwrap_or_default();
    if !first.starts_with(&format!("moat ({version}) ")) {
        bail!(
            "{}: the newest entry is {first:?}, but the workspace's version is {version}; add an entry for it",
            path.display()
        );
    }
    Ok(())
}

/// `packaging/debian/control` with the computed fields inserted after `Priority`.
fn control_file(
    version: &str,
    arch: &str,
    installed_size: u64,
    depends: &str,
) -> anyhow::Result<String> {
    let path = packaging().join("debian/control");
    let template =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if let Some(field) = COMPUTED_FIELDS
        .iter()
        .find(|f| template.lines().any(|l| l.starts_with(&format!("{f}:"))))
    {
        bail!("{}: {field} is computed; remove it", path.display());
    }
    let computed = format!(
        "Version: {version}\nArchitecture: {arch}\nInstalled-Size: {installed_size}\nDepends: {depends}\n"
    );
    let Some(at) = template.find("Maintainer:") else {
        bail!("{}: no Maintainer field", path.display());
    };
    Ok(format!("{}{computed}{}", &template[..at], &template[at..]))
}

/// The binary's shared-library dependencies, as dpkg-shlibdeps finds them.
fn shlib_depends(work: &Path) -> anyhow::Result<String> {
    write(
        &work.join("debian/control"),
        "Source: moat\n\nPackage: moat\nArchitecture: any\n",
        0o644,
    )?;
    let text = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(work)
            .args(["-O", "debian/moat/usr/bin/moat"]),
    )?;
    text.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

/// What dpkg reports as Installed-Size: KiB per file (rounded up), one per directory.
fn installed_size_kib(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            1 + installed_size_kib(&entry.path())?
        } else {
            meta.len().div_ceil(1024)
        };
    }
    Ok(total)
}

/// `md5sum` of every installed file but the conffiles (dpkg tracks those itself).
fn md5sums(stage: &Path) -> anyhow::Result<String> {
    let mut files = Vec::new();
    collect_files(stage, stage, &mut files)?;
    files.retain(|f| !f.starts_with("DEBIAN/") && !CONFFILES.contains(&format!("/{f}").as_str()));
    files.sort();
    output(Command::new("md5sum").current_dir(stage).args(&files))
}

fn collect_files(root: &Path, dir: &Path, files: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, files)?;
        } else {
            let relative = path
                .strip_prefix(root)?
                .to_str()
                .context("non-UTF-8 path")?;
            files.push(relative.to_string());
        }
    }
    Ok(())
}

fn gzip(from: &Path, to: &Path) -> anyhow::Result<()> {
    // -n: no name or time stamp in the header, so the package builds reproducibly.
    let file = fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let status = Command::new("gzip")
        .args(["-9n", "-c"])
        .arg(from)
        .stdout(file)
        .status()
        .context("cannot run gzip")?;
    if !status.success() {
        bail!("gzip {} failed ({status})", from.display());
    }
    set_mode(to, 0o644)
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}
