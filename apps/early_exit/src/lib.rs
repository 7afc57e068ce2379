//! The lab's `early_exit`: map emits `(input name, "1")`; reduce sleeps 3 s
//! for keys containing "sherlock" or "tom" and returns the number of values.
//! Run it with `--allow clock` so the sleep is real.
use std::time::Duration;

use mr_sdk::{App, Emitter};

struct EarlyExit;

impl App for EarlyExit {
    fn map(input: &str, _contents: &str, out: &mut Emitter) {
        out.emit(input, "1");
    }

    fn reduce(key: &str, values: &[&str]) -> String {
        if key.contains("sherlock") || key.contains("tom") {
            std::thread::sleep(Duration::from_secs(3));
        }
        values.len().to_string()
    }
}

mr_sdk::export_app!(EarlyExit);
