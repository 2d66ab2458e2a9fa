//! List files in the format of FireHOL and Spamhaus DROP lists: one CIDR or address per line;
//! `#` and `;` start comments; blank lines are ignored.

use std::path::{Path, PathBuf};

use rayon::{iter::ParallelIterator as _, str::ParallelString as _};

use super::cidr::Cidr;

#[derive(Debug, thiserror::Error)]
pub enum ListFileError {
    #[error("cannot read list file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Entry {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Every CIDR in the file at `path`, in file order.
pub fn read(path: &Path) -> Result<Vec<Cidr>, ListFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ListFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Every CIDR of `text`, in file order. A long list is parsed on every CPU; a bad one is read
/// again in order, so that the error names the first bad line.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Cidr>, ListFileError> {
    if text.len() < PARALLEL_FROM {
        return parse_in_order(text, path);
    }
    let parsed: Result<Vec<Cidr>, String> =
        text.par_lines().filter_map(entry).map(str::parse).collect();
    parsed.or_else(|_| parse_in_order(text, path))
}

/// Bytes of list from which parsing is shared between threads (a feed, not a hand-kept list).
const PARALLEL_FROM: usize = 256 * 1024;

fn parse_in_order(text: &str, path: &Path) -> Result<Vec<Cidr>, ListFileError> {
    let mut cidrs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let Some(content) = entry(line) else {
            continue;
        };
        let cidr = content.parse().map_err(|message| ListFileError::Entry {
            path: path.to_path_buf(),
            line: number + 1,
            message,
        })?;
        cidrs.push(cidr);
    }
    Ok(cidrs)
}

/// The CIDR text of a line: none for a blank or comment-only line.
fn entry(line: &str) -> Option<&str> {
    let content = line.split(['#', ';']).next().unwrap_or_default().trim();
    (!content.is_empty()).then_some(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firehol_and_spamhaus_lines_parse() {
        let text = "\
# FireHOL level1
#
1.10.16.0/20
2.56.192.0/22 ; SBL459831
   5.134.128.0/19   # trailing comment

203.0.113.9
2001:db8:bad::/48
";
        let cidrs = parse(text, Path::new("drop.txt")).expect("valid list");
        let expected: Vec<Cidr> = [
            "1.10.16.0/20",
            "2.56.192.0/22",
            "5.134.128.0/19",
            "203.0.113.9/32",
            "2001:db8:bad::/48",
        ]
        .iter()
        .map(|c| c.parse().expect("test CIDR"))
        .collect();
        assert_eq!(cidrs, expected);
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = parse("10.0.0.0/8\n\n10.0.0.1/8\n", Path::new("drop.txt")).expect_err("host bits");
        assert_eq!(
            e.to_string(),
            "drop.txt:3: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"
        );
        let e = parse("hello\n", Path::new("x")).expect_err("garbage");
        assert!(e.to_string().starts_with("x:1: "), "{e}");
    }

    #[test]
    fn a_long_list_parses_in_file_order_and_names_its_first_bad_line() {
        let lines: Vec<String> = (0..40_000u32)
            .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i * 7).to_string())
            .collect();
        let text = lines.join("\n");
        assert!(
            text.len() >= PARALLEL_FROM,
            "the test must take the parallel path"
        );
        let cidrs = parse(&text, Path::new("feed.txt")).expect("valid list");
        let expected: Vec<Cidr> = lines
            .iter()
            .map(|l| l.parse().expect("test CIDR"))
            .collect();
        assert_eq!(cidrs, expected);

        let mut bad = lines;
        bad[30_000] = "10.0.0.1/8".into();
        bad[35_000] = "garbage".into();
        let e = parse(&bad.join("\n"), Path::new("feed.txt")).expect_err("bad lines");
        assert_eq!(
            e.to_string(),
            "feed.txt:30001: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = read(Path::new("/nonexistent/drop.txt")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/drop.txt"), "{e}");
    }
}
