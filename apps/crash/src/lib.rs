//! The lab's `crash`: on every map and reduce call, with probability 1/3
//! trap, with 1/3 sleep a random 0–10 s, else proceed; output otherwise
//! identical to `nocrash`. It needs randomness and a clock, so run it with
//! `--allow random --allow clock` (without them it sees a fixed "random"
//! sequence and behaves the same on every attempt).
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
        maybe_crash();
        out.emit("a", input);
        out.emit("b", &input.len().to_string());
        out.emit("c", &contents.len().to_string());
        out.emit("d", "xyzzy");
    }

    fn reduce(_key: &str, values: &[&str]) -> String {
        maybe_crash();
        let mut sorted = values.to_vec();
        sorted.sort();
        sorted.join(" ")
    }
}

mr_sdk::export_app!(Crash);
