//! A guest that misbehaves on purpose, for the sandbox tests. What it does
//! depends on the input's file name (its last path component):
//! `loop`, `alloc`, `recurse`, `trap` fail the task; `passwd`, `socket`,
//! `env`, `clock`, `sleep` report what the sandbox let them see as output pairs;
//! `dupes` emits 10 000 raw ("dup", "1") pairs, bypassing the SDK's combining
//! (`bigdupes` 200 000);
//! `rawwords` emits ("n:WORD", "1") for every word of its input, bypassing it
//! too (its combiner sums); `longvarints` the same with every length
//! written a byte longer than it needs (a varint the contract accepts);
//! `bigbatch` emits 20 MiB in one call; `badrecords` emits bytes that are
//! not well-formed records; `badkeys` emits keys and values the text output format cannot carry;
//! `escapes` panics with terminal control sequences, `chatty` after 3 MB
//! of stderr;
//! `slow` counts like `wc` but spins ~20 µs per word (so its map runs for
//! seconds on a MiB and reports its progress as it goes);
//! `hoard` holds 40 MiB in map while its combiner takes 40 MiB more;
//! `slowreduce` emits the key `slowreduce`, whose reduce spins for about
//! 10 s (so a test can kill a reduce attempt while it runs), besides
//! counting like `wc`;
//! anything else is counted like `wc`.
use std::io::Read;
use std::time::{Duration, SystemTime};

use mr_sdk::bindings::mr::app::host::emit;
use mr_sdk::{App, Emitter};

/// Appends a record in the contract's encoding (bypassing the SDK).
fn record(out: &mut Vec<u8>, key: &str, value: &str) {
    for len in [key.len(), value.len()] {
        let mut v = len as u32;
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value.as_bytes());
}

struct Hostile;

#[allow(unconditional_recursion)]
fn recurse(depth: u64, pad: &mut [u8; 64]) -> u64 {
    pad[(depth % 64) as usize] = depth as u8;
    let mut next = *pad;
    recurse(depth + 1, &mut next) + next[0] as u64
}

impl App for Hostile {
    fn map(input: &str, contents: &str, out: &mut Emitter) {
        let name = input.rsplit('/').next().unwrap_or(input);
        match name {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "recurse" => {
                let mut pad = [0u8; 64];
                out.emit("depth", &recurse(0, &mut pad).to_string());
            }
            "trap" => panic!("hostile guest traps on purpose"),
            "passwd" => {
                let seen = match std::fs::File::open("/etc/passwd") {
                    Ok(mut f) => {
                        let mut s = String::new();
                        let _ = f.read_to_string(&mut s);
                        format!("READ {} bytes", s.len())
                    }
                    Err(e) => format!("denied: {e}"),
                };
                out.emit("passwd", &seen);
            }
            "socket" => {
                let addr = contents.trim();
                let seen = match std::net::TcpStream::connect_timeout(
                    &addr.parse().expect("a socket address in the input"),
                    Duration::from_secs(2),
                ) {
                    Ok(_) => "CONNECTED".to_string(),
                    Err(e) => format!("denied: {e}"),
                };
                out.emit("socket", &seen);
            }
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                let seen = if vars.is_empty() {
                    "empty".to_string()
                } else {
                    format!("LEAKED {}", vars.join(","))
                };
                out.emit("env", &seen);
                let args = std::env::args().count();
                out.emit("args", &args.to_string());
            }
            "rawwords" | "longvarints" => {
                let mut batch = Vec::new();
                for word in mr_sdk::words(contents) {
                    if name == "longvarints" {
                        let key = format!("n:{word}");
                        for len in [key.len(), 1] {
                            // `len` in 7-bit groups, then an empty group.
                            let mut v = len as u32;
                            while v > 0 {
                                batch.push((v as u8 & 0x7f) | 0x80);
                                v >>= 7;
                            }
                            batch.push(0);
                        }
                        batch.extend_from_slice(key.as_bytes());
                        batch.push(b'1');
                    } else {
                        record(&mut batch, &format!("n:{word}"), "1");
                    }
                    if batch.len() >= 64 << 10 {
                        emit(&batch);
                        batch.clear();
                    }
                }
                emit(&batch);
            }
            "dupes" | "bigdupes" => {
                // Like a guest without in-guest combining (the host's
                // combiner then runs on its spills): 10 000 raw ("dup", "1"),
                // or 200 000 (more than the host hands the combiner in one
                // group).
                let mut batch = Vec::new();
                for _ in 0..1000 {
                    record(&mut batch, "dup", "1");
                }
                for _ in 0..if name == "dupes" { 10 } else { 200 } {
                    emit(&batch);
                }
            }
            "hoard" => {
                // Holds 40 MiB while the host combines its spills (the
                // combiner takes 40 MiB more): both instances of the task
                // share one memory limit.
                let hoard = vec![1u8; 40 << 20];
                let mut batch = Vec::new();
                for _ in 0..1000 {
                    record(&mut batch, "hoard", "1");
                }
                emit(&batch);
                emit(&batch);
                std::hint::black_box(&hoard);
            }
            "badkeys" => {
                // Records the `key value` text format cannot carry.
                out.emit("two words", "1");
                out.emit("line\nbreak", "1");
                out.emit("", "1");
                out.emit("fine", "multi\nline");
            }
            "bigbatch" => {
                // One `emit` of 20 MiB, over the host's 16 MiB per call.
                let mut batch = Vec::new();
                for i in 0..20 {
                    record(&mut batch, &format!("big{i}"), &"x".repeat(1 << 20));
                }
                emit(&batch);
            }
            "badrecords" => {
                // Records that are not well-formed: a key that is not
                // UTF-8, then lengths past the end.
                emit(&[1, 1, 0xff, b'v']);
                emit(&[9, 0, b'k']);
            }
            "escapes" => {
                // Terminal control sequences in its last words: clear the
                // screen, set the window title, a fake success line.
                panic!("\x1b[2J\x1b]0;pwned\x07\rjob job-1-1 succeeded");
            }
            "counters" => {
                // One name more than an attempt may use.
                for i in 0..33 {
                    mr_sdk::counter(&format!("c{i}"), 1);
                }
            }
            "countername" => {
                // Counts under a name that would forge a line of `mr
                // status` (and clear the screen): refused.
                mr_sdk::counter("\x1b[2Jx\nstate    succeeded", 7);
                out.emit("k", "v");
            }
            "chatty" => {
                // Writes far more than is kept, then dies: its last words
                // must survive.
                let line = "noise ".repeat(100);
                for _ in 0..5000 {
                    eprintln!("{line}");
                }
                panic!("the last words of a chatty guest");
            }
            "sleep" => {
                std::thread::sleep(Duration::from_secs(3600));
                out.emit("slept", "an hour");
            }
            "slow" => {
                for word in mr_sdk::words(contents) {
                    let mut x = 0u64;
                    for i in 0..20_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                    std::hint::black_box(x);
                    out.emit(word, "1");
                }
            }
            "slowreduce" => {
                out.emit("slowreduce", "1");
                for word in mr_sdk::words(contents) {
                    out.emit(word, "1");
                }
            }
            "clock" => {
                let secs = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                out.emit("wall-clock-secs", &secs.to_string());
            }
            _ => {
                for word in mr_sdk::words(contents) {
                    out.emit(word, "1");
                }
            }
        }
    }

    fn reduce(key: &str, values: &[&str]) -> String {
        if key == "slowreduce" {
            // About 10 s of work, whatever the clock (none is granted).
            let mut x = 0u64;
            for i in 0..5_000_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            std::hint::black_box(x);
            return values.len().to_string();
        }
        if key == "fine" || key.contains(' ') || key.contains('\n') || key.is_empty() {
            return values.join(",");
        }
        if key == "dup" || key == "hoard" || key.starts_with("n:") {
            return values
                .iter()
                .map(|v| v.parse::<u64>().unwrap())
                .sum::<u64>()
                .to_string();
        }
        let mut sorted = values.to_vec();
        sorted.sort();
        sorted.join(" ")
    }

    fn combine(key: &str, values: &[&str]) -> Option<String> {
        if key == "hoard" {
            std::hint::black_box(vec![1u8; 40 << 20]);
        }
        (key == "dup" || key == "hoard" || key.starts_with("n:")).then(|| Self::reduce(key, values))
    }
}

mr_sdk::export_app!(Hostile);
