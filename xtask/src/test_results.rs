//! Reading cargo test's `test result:` lines.

/// In "ok. 5 passed; 0 failed; …", the number before `word`.
pub fn count_before(result: &str, word: &str) -> u64 {
    result
        .find(word)
        .and_then(|end| result[..end].rsplit([' ', '.']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// libtest's `failures:` report (each failed test's output, its panic, the list of names),
/// or the end of the log when there is none (a binary killed mid-test); at most `max_lines`,
/// the last ones.
pub fn failures_section(log: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .position(|line| *line == "failures:")
        .unwrap_or(0);
    let section = &lines[start..];
    section[section.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::{count_before, failures_section};

    #[test]
    fn the_failures_report_is_taken_from_a_log() {
        let log = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n---- b stdout ----\n\
                   panicked at x\n\nfailures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed";
        let report = failures_section(log, 100);
        assert!(report.starts_with("failures:\n\n---- b stdout"), "{report}");
        assert!(report.ends_with("1 failed"), "{report}");
        assert_eq!(
            failures_section(log, 2),
            "\ntest result: FAILED. 1 passed; 1 failed"
        );
        // Killed mid-test: the end of what it printed.
        assert_eq!(
            failures_section("running 1 test\nstill going", 1),
            "still going"
        );
    }

    #[test]
    fn counts_are_read_from_a_result_line() {
        let line =
            "FAILED. 20 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s";
        assert_eq!(count_before(line, " passed"), 20);
        assert_eq!(count_before(line, " failed"), 1);
        assert_eq!(count_before("ok. 0 passed; 0 failed", " passed"), 0);
    }
}
