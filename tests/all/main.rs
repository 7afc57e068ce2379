//! End-to-end tests: the real `mr` binary, real wasm guests, real files.
//! One integration binary with modules, so there is one link step.

mod apps;
mod cluster;
mod engine;
mod errors;
mod kill;
mod languages;
mod s3;
mod sandbox;
mod security;
mod splits;
mod verify;
mod web;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `mr` binary, with the compiled-app cache in the test target dir.
pub fn mr() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mr"));
    c.env(
        "MR_CACHE_DIR",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("mr-cache"),
    );
    c.env_remove("RUST_LOG");
    // Never the user's own state directory or tokens.
    c.env(
        "XDG_STATE_HOME",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("state-home"),
    );
    c.env_remove("MR_TOKEN");
    c.env_remove("MR_WORKER_TOKEN");
    // Nor the user's object storage: S3 tests set their own.
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("AWS_")) {
            c.env_remove(k);
        }
    }
    c
}

/// Runs `mr run` with `args` and returns its output, whatever the status.
pub fn mr_run(args: &[&str]) -> Output {
    let out = mr()
        .arg("run")
        .args(args)
        .output()
        .expect("cannot start mr");
    eprintln!(
        "mr run {}\n-- status {:?}\n-- stdout\n{}-- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `mr run` and asserts it succeeded.
pub fn mr_run_ok(args: &[&str]) -> Output {
    let out = mr_run(args);
    assert!(
        out.status.success(),
        "mr run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stderr of a finished run, for assertions.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The job report a run left in `dir/name`.
pub fn report(dir: &Path, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("no {name} in {}: {e}", dir.display()));
    serde_json::from_str(&text).expect("a JSON report")
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Runs `cmd` to completion with its output captured, failing the test if
/// it takes longer than `limit` (it is killed then).
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start a command");
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")));
    let err = read(Box::new(child.stderr.take().expect("piped")));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("cannot wait") {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("reader"),
        stderr: err.join().expect("reader"),
    }
}
