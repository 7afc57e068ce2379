//! Inverted index: for every word, `N file1,file2,...` — the number of
//! inputs it occurs in and their names, sorted. Same output as the MIT
//! 6.5840 lab's `indexer` (whose map sees whole files; when a large file is
//! split, its name arrives once per split, so reduce drops duplicates).
use hashbrown::HashSet;
use mr_sdk::{App, Emitter};

struct Indexer;

impl App for Indexer {
    fn map(input: &str, contents: &str, out: &mut Emitter) {
        let unique: HashSet<&str> = mr_sdk::words(contents).collect();
        for word in unique {
            out.emit(word, input);
        }
    }

    fn reduce(_key: &str, values: &[&str]) -> String {
        let mut files: Vec<&str> = values.to_vec();
        files.sort_unstable();
        files.dedup();
        format!("{} {}", files.len(), files.join(","))
    }
}

mr_sdk::export_app!(Indexer);
