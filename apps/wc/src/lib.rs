//! Word count: for every word (maximal run of Unicode letters, case kept),
//! the number of times it occurs. Same output as the MIT 6.5840 lab's `wc`.
use mr_sdk::{App, Combiner, Emitter};

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

    fn combine(key: &str, values: &[&str]) -> Option<String> {
        Some(Self::reduce(key, values))
    }

    // Counts: the SDK adds them up in place as they are emitted.
    const COMBINER: Combiner = Combiner::SumU64;
}

mr_sdk::export_app!(WordCount);
