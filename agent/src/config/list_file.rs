//! List files in the format of FireHOL and Spamhaus DROP lists: one CIDR or address per line;
//! `#` and `;` start comments; blank lines are ignored.

use std::path::{Path, PathBuf};

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

pub fn parse(text: &str, path: &Path) -> Result<Vec<Cidr>, ListFileError> {
    let mut cidrs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let content = line.split(['#', ';']).next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let cidr = content.parse().map_err(|message| ListFileError::Entry {
            path: path.to_path_buf(),
            line: number + 1,
            message,
        })?;
        cidrs.push(cidr);
    }
    Ok(cidrs)
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
    fn a_missing_file_is_named() {
        let e = read(Path::new("/nonexistent/drop.txt")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/drop.txt"), "{e}");
    }
}
