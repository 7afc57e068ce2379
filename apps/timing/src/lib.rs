//! Word count that takes its time, for tests of parallelism and faults
//! (the lab's `mtiming` and `rtiming`, minus their side effects: overlap is
//! read from the job report). Run it with `--allow clock`.
//!
//! - map: if the input's first line is `sleep <ms>`, sleeps that long and
//!   skips the line; otherwise sleeps 1 s. Then counts words like `wc`.
//! - reduce: each reduce task sleeps 1 s before its first key (a fresh
//!   instance per task); then sums like `wc`.
use std::cell::Cell;
use std::time::Duration;

use mr_sdk::{App, Emitter};

thread_local! {
    static REDUCED: Cell<bool> = const { Cell::new(false) };
}

struct Timing;

impl App for Timing {
    fn map(_input: &str, contents: &str, out: &mut Emitter) {
        let (ms, text) = match contents.split_once('\n') {
            Some((first, rest)) if first.starts_with("sleep ") => {
                (first[6..].trim().parse().expect("sleep <ms>"), rest)
            }
            _ => (1000, contents),
        };
        std::thread::sleep(Duration::from_millis(ms));
        for word in mr_sdk::words(text) {
            out.emit(word, "1");
        }
    }

    fn reduce(_key: &str, values: &[&str]) -> String {
        if !REDUCED.with(|r| r.replace(true)) {
            std::thread::sleep(Duration::from_secs(1));
        }
        let total: u64 = values
            .iter()
            .map(|v| v.parse::<u64>().expect("a count"))
            .sum();
        total.to_string()
    }
}

mr_sdk::export_app!(Timing);
