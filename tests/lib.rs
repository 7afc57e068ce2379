//! Support for the end-to-end tests in `tests/all/`: paths of the guest apps
//! (built by `build.rs`), the bundled books, a runner for the `mr` binary,
//! and *independent* reference implementations of the MIT 6.5840 lab's
//! sequential semantics (plain Rust with the `regex` crate; none of the
//! engine's code), to compare `mr`'s output with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub const WC: &str = env!("MR_GUEST_WC");
pub const INDEXER: &str = env!("MR_GUEST_INDEXER");
pub const NOCRASH: &str = env!("MR_GUEST_NOCRASH");
pub const CRASH: &str = env!("MR_GUEST_CRASH");
pub const EARLY_EXIT: &str = env!("MR_GUEST_EARLY_EXIT");
pub const HOSTILE: &str = env!("MR_GUEST_HOSTILE");
pub const TIMING: &str = env!("MR_GUEST_TIMING");
/// Word count built against `mr:app@0.1.0` (ASCII words, no combiner).
pub const WC_WIT010: &str = env!("MR_GUEST_WC_WIT010");
/// `wc` without a combiner, its reduce a streaming `mr_sdk::Fold`.
pub const WC_NOCOMBINER: &str = env!("MR_GUEST_WC_NOCOMBINER");
pub const REPO_ROOT: &str = env!("MR_REPO_ROOT");

/// The eight books of the lab, as paths.
pub fn books() -> Vec<PathBuf> {
    let dir = data_dir();
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    v.sort();
    assert_eq!(
        v.len(),
        8,
        "expected the eight lab books in {}",
        dir.display()
    );
    v
}

/// The directory of the lab's books.
pub fn data_dir() -> PathBuf {
    Path::new(REPO_ROOT).join("data/gutenberg")
}

/// The books' file names (relative to [`data_dir`]), as the lab passes them.
pub fn book_names() -> Vec<String> {
    books()
        .iter()
        .map(|b| b.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Inputs as (name as given, contents), the way the lab's sequential
/// program reads them.
fn read(inputs: &[String]) -> Vec<(String, String)> {
    inputs
        .iter()
        .map(|n| {
            let bytes = std::fs::read(n).unwrap();
            (n.clone(), String::from_utf8_lossy(&bytes).into_owned())
        })
        .collect()
}

fn words(text: &str) -> Vec<&str> {
    // Go's unicode.IsLetter is general category L.
    let re = regex::Regex::new(r"\p{L}+").unwrap();
    re.find_iter(text).map(|m| m.as_str()).collect()
}

fn lines(map: BTreeMap<String, String>) -> Vec<String> {
    map.into_iter().map(|(k, v)| format!("{k} {v}")).collect()
}

/// The lab's `mrsequential` with `wc`: sorted `word count` lines.
pub fn reference_wc(inputs: &[String]) -> Vec<String> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (_, text) in read(inputs) {
        for w in words(&text) {
            *counts.entry(w.to_string()).or_default() += 1;
        }
    }
    lines(
        counts
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect(),
    )
}

/// The lab's `indexer`: `word N file1,file2,...`.
pub fn reference_indexer(inputs: &[String]) -> Vec<String> {
    let mut index: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, text) in read(inputs) {
        for w in words(&text) {
            index.entry(w.to_string()).or_default().insert(name.clone());
        }
    }
    lines(
        index
            .into_iter()
            .map(|(k, files)| {
                let v: Vec<String> = files.into_iter().collect();
                (k, format!("{} {}", v.len(), v.join(",")))
            })
            .collect(),
    )
}

/// The lab's `nocrash` (and `crash`, when it finally succeeds).
pub fn reference_nocrash(inputs: &[String]) -> Vec<String> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, text) in read(inputs) {
        m.entry("a".into()).or_default().push(name.clone());
        m.entry("b".into())
            .or_default()
            .push(name.len().to_string());
        m.entry("c".into())
            .or_default()
            .push(text.len().to_string());
        m.entry("d".into()).or_default().push("xyzzy".into());
    }
    lines(
        m.into_iter()
            .map(|(k, mut v)| {
                v.sort();
                (k, v.join(" "))
            })
            .collect(),
    )
}

/// The lab's `early_exit`: `input-name 1` per input.
pub fn reference_early_exit(inputs: &[String]) -> Vec<String> {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for name in inputs {
        *m.entry(name.clone()).or_default() += 1;
    }
    lines(m.into_iter().map(|(k, v)| (k, v.to_string())).collect())
}

/// All lines of `dir/mr-out-*`, sorted (the lab's `sort mr-out* | grep .`).
/// Also checks every file is sorted by key and the files don't share keys.
pub fn read_output(dir: &Path) -> Vec<String> {
    let mut all = Vec::new();
    let mut keys = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("mr-out-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut prev: Option<String> = None;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let key = line.split(' ').next().unwrap().to_string();
            if let Some(p) = &prev {
                assert!(
                    p.as_bytes() < key.as_bytes(),
                    "{name}: {p:?} before {key:?}"
                );
            }
            assert!(keys.insert(key.clone()), "key {key:?} in two output files");
            prev = Some(key);
            all.push(line.to_string());
        }
    }
    all.sort();
    all
}

/// The names of `paths` as strings.
pub fn names(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}
