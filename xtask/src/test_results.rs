//! Reading cargo test's `test result:` lines.

/// In "ok. 5 passed; 0 failed; …", the number before `word`.
pub fn count_before(result: &str, word: &str) -> u64 {
    result
        .find(word)
        .and_then(|end| result[..end].rsplit([' ', '.']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn counts_are_read_from_a_result_line() {
        let line =
            "FAILED. 20 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s";
        assert_eq!(count_before(line, " passed"), 20);
        assert_eq!(count_before(line, " failed"), 1);
        assert_eq!(count_before("ok. 0 passed; 0 failed", " passed"), 0);
    }
}
