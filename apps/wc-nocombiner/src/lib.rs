//! Word count with its combiner removed: the same output as `wc`, but every
//! `(word, "1")` pair the map emits is sorted, spilled, shuffled and merged
//! by the host. The benchmark's app for the host's own costs
//! (`bench/run.sh no-combiner`). Its reduce is a [`Fold`], a running sum
//! that takes a word's counts one at a time: a word that occurs a billion
//! times costs the guest no more memory than one that occurs once.
use mr_sdk::{App, Emitter, Fold};

struct WordCount;

/// The running sum of one word's counts.
struct Sum(u64);

impl Fold for Sum {
    fn add(&mut self, value: &str) {
        self.0 += value.parse::<u64>().expect("a count");
    }

    fn finish(&mut self) -> String {
        self.0.to_string()
    }
}

impl App for WordCount {
    fn map(_input: &str, contents: &str, out: &mut Emitter) {
        for word in mr_sdk::words(contents) {
            out.emit(word, "1");
        }
    }

    fn fold(_key: &str) -> Option<Box<dyn Fold>> {
        Some(Box::new(Sum(0)))
    }
}

mr_sdk::export_app!(WordCount);
