//! `mr-bench backups`: backup tasks and `--verify` on a cluster of three
//! one-slot workers on this machine.
//!
//! 1. The same word count three ways, interleaved, fastest of `--runs`
//!    each: no slow worker; one worker slowed to ~10 % of its speed (it is
//!    stopped for 900 ms and let go for 100 ms, over and over, so it keeps
//!    heart-beating and looks alive) with `--speculation off`; and the same
//!    slow worker with backups (the default). Prints each time as a ratio
//!    of the first (the goal: backups within 1.3x).
//! 2. `--verify 2` against none, no slow worker (the goal: at most 2.2x).
//!
//! Every output is checked against the first run's.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{generate, measure, outputs_of, sorted_lines, Cluster, Measured, Tools};

#[derive(clap::Args)]
pub struct Args {
    /// Corpus size in MiB.
    #[arg(long, default_value_t = 384)]
    size_mib: u64,
    /// Number of corpus files (one map task each).
    #[arg(long, default_value_t = 24)]
    files: u32,
    /// Reduce tasks.
    #[arg(long, default_value_t = 6)]
    reduces: u32,
    #[command(flatten)]
    tools: Tools,
    /// Runs of each command; the fastest of each counts.
    #[arg(long, default_value_t = 1)]
    runs: u32,
}

/// Stops and continues a process (900 ms / 100 ms) until dropped.
struct Slowdown {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Slowdown {
    fn start(pid: u32) -> Slowdown {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let signal = |s| {
                // SAFETY: signals to our own child process.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(pid as libc::pid_t, s)
                };
            };
            while !flag.load(Ordering::Relaxed) {
                signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(900));
                signal(libc::SIGCONT);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Slowdown {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Slowdown {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Backup attempts a job started, and how many of them won.
fn backups_of(out: &Path) -> Result<(usize, usize)> {
    let text = std::fs::read_to_string(out.join("_SUCCESS"))
        .with_context(|| format!("reading {}/_SUCCESS", out.display()))?;
    let report: serde_json::Value = serde_json::from_str(&text)?;
    let (mut started, mut won) = (0, 0);
    for t in report["tasks"].as_array().into_iter().flatten() {
        for a in t["attempts"].as_array().into_iter().flatten() {
            if a["reason"] == "backup" {
                started += 1;
                won += usize::from(a["outcome"] == "succeeded");
            }
        }
    }
    Ok((started, won))
}

pub fn run(a: Args) -> Result<()> {
    a.tools.check("bench/run.sh backups")?;
    let corpus = generate(
        &a.tools
            .dir
            .join(format!("corpus-{}m-{}", a.size_mib, a.files)),
        a.size_mib << 20,
        a.files,
    )?;
    let cluster = Cluster::start(&a.tools.mr, &a.tools.dir, 3, Some(1), false)?;
    let slow_pid = cluster.workers[0].id();
    let reduces = a.reduces.to_string();
    let job = |name: &str, extra: &[&str]| -> Result<Measured> {
        let out = std::path::absolute(a.tools.dir.join(name))?;
        measure(
            cluster
                .client(&a.tools.mr, "submit")
                .arg(&a.tools.app)
                .args(&corpus)
                .args(["--reduces", &reduces, "--force", "--quiet", "--output"])
                .arg(&out)
                .args(extra)
                .stdout(Stdio::null()),
        )
    };
    let runs = [
        ("no slow worker", "bk-fast", &[][..], false),
        (
            "one slow worker, --speculation off",
            "bk-slow-off",
            &["--speculation", "off"][..],
            true,
        ),
        ("one slow worker, backups", "bk-slow-on", &[][..], true),
        (
            "no slow worker, --verify 2",
            "bk-verify",
            &["--verify", "2"][..],
            false,
        ),
    ];
    let mut best: Vec<Option<Measured>> = runs.iter().map(|_| None).collect();
    let mut all: Vec<Vec<f64>> = runs.iter().map(|_| Vec::new()).collect();
    let mut backups = vec![(0, 0); runs.len()];
    for run in 0..a.runs.max(1) {
        eprint!("run {} of {}:", run + 1, a.runs.max(1));
        for (i, (what, dir, extra, slow)) in runs.iter().enumerate() {
            let slowdown = slow.then(|| Slowdown::start(slow_pid));
            let m = job(dir, extra)?;
            drop(slowdown);
            eprint!(" {what} {:.2} s;", m.secs);
            all[i].push(m.secs);
            if best[i].as_ref().is_none_or(|b| m.secs < b.secs) {
                backups[i] = backups_of(&a.tools.dir.join(dir))?;
                best[i] = Some(m);
            }
        }
        eprintln!();
    }
    cluster.stop(&a.tools.mr)?;
    let want = sorted_lines(&outputs_of(&a.tools.dir.join(runs[0].1), a.reduces))?;
    for (what, dir, _, _) in &runs[1..] {
        if sorted_lines(&outputs_of(&a.tools.dir.join(dir), a.reduces))? != want {
            bail!("{what}: the output differs from the run without a slow worker");
        }
    }
    let best: Vec<Measured> = best.into_iter().map(|m| m.expect("one run")).collect();
    let mib = corpus
        .iter()
        .map(|p| p.metadata().map_or(0, |m| m.len()))
        .sum::<u64>() as f64
        / f64::from(1 << 20);
    println!(
        "backups and --verify: wc on {mib:.0} MiB in {} files, {} reduces; 3 workers x 1 slot on this machine; the slow one is stopped 900 ms, continued 100 ms",
        a.files, a.reduces
    );
    // Best and median of each: the machines are shared and noisy.
    let median: Vec<f64> = all
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    println!(
        "{:<38} {:>8} {:>9} {:>10} {:>9} {:>14}",
        "", "best s", "vs first", "median s", "vs first", "backups (won)"
    );
    for (i, (what, ..)) in runs.iter().enumerate() {
        println!(
            "{what:<38} {:>8.2} {:>8.2}x {:>10.2} {:>8.2}x {:>8} ({})",
            best[i].secs,
            best[i].secs / best[0].secs,
            median[i],
            median[i] / median[0],
            backups[i].0,
            backups[i].1
        );
    }
    println!(
        "backups: slow worker with backups / no slow worker {:.2}x best, {:.2}x median (goal <= 1.3x); without backups {:.2}x, {:.2}x",
        best[2].secs / best[0].secs,
        median[2] / median[0],
        best[1].secs / best[0].secs,
        median[1] / median[0]
    );
    println!(
        "verify: --verify 2 / none {:.2}x best, {:.2}x median (goal <= 2.2x)",
        best[3].secs / best[0].secs,
        median[3] / median[0]
    );
    Ok(())
}
