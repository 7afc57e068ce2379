//! Word count with its combiner removed: the same output as `wc`, but every
//! `(word, "1")` pair the map emits is sorted, spilled, shuffled and merged
//! by the host. The benchmark's app for the host's own costs
//! (`bench/run.sh no-combiner`).
use mr_sdk::{App, Emitter};

struct WordCount;

impl App for WordCount {
    fn map(_input: &str, contents: &str, out: &mut Emitter) {
        for word in mr_sdk::words(contents) {
            out.emit(word, "1");
        }
    }

    fn reduce(_key: &str, values: &[&str]) -> String {
        let total: u64 = values
            .iter()
            .map(|v| v.parse::<u64>().expect("a count"))
            .sum();
        total.to_string()
    }
}

mr_sdk::export_app!(WordCount);
