//! `moat completions` and `moat manpages`: shell completions and manual pages generated from
//! the command line's own definition, so they never drift from `--help`.

use std::{io::Write as _, path::Path};

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    // Rendered into memory first: clap_complete panics when its writer fails (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "moat", &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("writing the completion script")
}

/// Writes `moat.1` and one page per visible subcommand (`moat-block-add.1`, …) into `dir`.
pub fn manpages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing manual pages into {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn an_unknown_shell_is_refused_by_name() {
        let e = Cli::try_parse_from(["moat", "completions", "tcsh"]).expect_err("no tcsh");
        assert!(e.to_string().contains("'tcsh'"), "{e}");
    }

    #[test]
    fn manual_pages_into_a_path_under_a_file_fail_naming_it() {
        let file = tempfile::NamedTempFile::new().expect("temporary file");
        let dir = file.path().join("man");
        let e = manpages(&dir).expect_err("a file is not a directory");
        assert!(
            format!("{e:#}").contains(&dir.display().to_string()),
            "{e:#}"
        );
    }

    #[test]
    fn the_manual_pages_cover_moat_and_its_commands() {
        let dir = tempfile::tempdir().expect("temporary directory");
        manpages(dir.path()).expect("pages written");
        for page in [
            "moat.1",
            "moat-run.1",
            "moat-block-add.1",
            "moat-completions.1",
        ] {
            assert!(dir.path().join(page).is_file(), "{page}");
        }
        assert!(
            !dir.path().join("moat-manpages.1").exists(),
            "hidden commands get no page"
        );
    }
}
