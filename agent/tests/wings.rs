//! The wings' direction (ARCHITECTURE.md), checked on the source: `program` never reaches
//! `daemon`, `cli` or `observe`; `control` never reaches `daemon`; `config` reaches no other
//! wing; `netfilter` and `fleet` reach only `config`; and `agent/src` holds only main.rs,
//! lib.rs and logging.rs beside the wing folders.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

const WINGS: [&str; 8] = [
    "cli",
    "config",
    "control",
    "daemon",
    "fleet",
    "netfilter",
    "observe",
    "program",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The first path segment of every `crate::…` reference, through `use crate::{a, b::c}` groups.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut heads = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        let group = match rest.strip_prefix('{') {
            Some(inner) => {
                let mut depth = 1;
                let end = inner
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '{' => 1,
                            '}' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map_or(inner.len(), |(i, _)| i);
                top_level_items(&inner[..end])
            }
            None => vec![rest.to_string()],
        };
        for item in group {
            let head: String = item
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !head.is_empty() {
                heads.insert(head);
            }
        }
    }
    heads
}

/// The items of a brace group, split on its own commas (not those of nested groups).
fn top_level_items(group: &str) -> Vec<String> {
    let (mut items, mut item, mut depth) = (Vec::new(), String::new(), 0);
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    items.push(item);
    items
}

fn reached_wings(wing: &str) -> BTreeSet<String> {
    rust_files(&src().join(wing))
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file).expect("a source file");
            crate_paths(&text)
        })
        .filter(|head| WINGS.contains(&head.as_str()) && head != wing)
        .collect()
}

#[test]
fn the_reader_of_crate_paths_sees_groups_and_plain_paths() {
    let text = "use crate::{\n    config::{A, B},\n    program::{x::Y, z},\n};\nlet e = crate::error_chain(&e);";
    let heads: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(heads, ["config", "error_chain", "program"]);
}

#[test]
fn each_wing_reaches_only_the_wings_below_it() {
    for (wing, forbidden) in [
        (
            "program",
            &["daemon", "cli", "observe", "control", "fleet"][..],
        ),
        (
            "control",
            &["daemon", "cli", "observe", "program", "fleet"][..],
        ),
        (
            "config",
            &["daemon", "cli", "observe", "control", "program", "fleet"][..],
        ),
        ("observe", &["daemon", "cli"][..]),
        (
            "netfilter",
            &["daemon", "cli", "observe", "control", "program", "fleet"][..],
        ),
        (
            "fleet",
            &[
                "daemon",
                "cli",
                "observe",
                "control",
                "program",
                "netfilter",
            ][..],
        ),
    ] {
        let reached = reached_wings(wing);
        for other in forbidden {
            assert!(
                !reached.contains(*other),
                "{wing}/ reaches {other}/ (it reaches {reached:?})"
            );
        }
    }
}

#[test]
fn agent_src_holds_only_the_entry_points_beside_the_wings() {
    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for entry in std::fs::read_dir(src()).expect("agent/src") {
        let path = entry.expect("an entry").path();
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            dirs.insert(name);
        } else {
            files.insert(name);
        }
    }
    assert_eq!(
        files,
        BTreeSet::from(["lib.rs", "logging.rs", "main.rs"].map(String::from))
    );
    assert_eq!(dirs, BTreeSet::from(WINGS.map(String::from)));
}
