//! The lab's `crash`: on every map and reduce call, with probability 1/3
//! trap, with 1/3 sleep a random 0–10 s, else proceed; output otherwise
//! identical to `nocrash`. It needs randomness and a clock, so run it with
//! `--allow random --allow clock` (without them it sees a fixed "random"
//! sequence and behaves the same on every attempt).
//!
//! It also counts, with `mr_sdk::counter`, before it may crash: `maps` and
//! `map_bytes` per map call, `keys` per reduce call. Failed and killed
//! attempts count too, so the job's report shows each counter summed over
//! committed attempts only exactly when it equals the inputs (files, bytes)
//! and the keys (4).
use std::time::Duration;

use mr_sdk::{App, Emitter};

fn random_below(n: u64) -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("randomness");
    u64::from_le_bytes(bytes) % n
}

fn maybe_crash() {
    let r = random_below(1000);
    if r < 330 {
        panic!("crash! (the crash app fails on purpose)");
    } else if r < 660 {
        std::thread::sleep(Duration::from_millis(random_below(10_000)));
    }
}

struct Crash;

impl App for Crash {
    fn map(input: &str, contents: &str, out: &mut Emitter) {
        mr_sdk::counter("maps", 1);
        mr_sdk::counter("map_bytes", contents.len() as i64);
        maybe_crash();
        out.emit("a", input);
        out.emit("b", &input.len().to_string());
        out.emit("c", &contents.len().to_string());
        out.emit("d", "xyzzy");
    }

    fn reduce(_key: &str, values: &[&str]) -> String {
        mr_sdk::counter("keys", 1);
        maybe_crash();
        let mut sorted = values.to_vec();
        sorted.sort();
        sorted.join(" ")
    }
}

mr_sdk::export_app!(Crash);
