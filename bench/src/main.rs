//! The word-count benchmark (run it with `bench/run.sh`).
//!
//! 1. Generates a text corpus (default 256 MiB in 4 files) whose words follow
//!    a Zipf law over a 300k-word vocabulary: a long tail, like real text.
//! 2. Runs, as separate processes and in the same run: a native Rust word
//!    count (single thread, the lab's semantics), `mr run` with the `wc`
//!    app, and the same job on a cluster on this machine (`mr coordinator`
//!    and `--workers` `mr worker`s, timed from `mr submit` to its exit);
//!    checks that their outputs agree.
//! 3. Prints wall time, MB/s and peak RSS (from `wait4`) of each, and ratios
//!    against native and `mr run`: the machines are shared and noisy, so
//!    only ratios measured in one run are comparable. With `--runs N` each
//!    is run N times, interleaved, and the fastest run of each counts.
//! 4. Scale: `--tiny-files N` (20,000) inputs of one line each through `mr
//!    run` and the cluster (the cost of a task end to end), and the
//!    coordinator's state machine alone with simulated workers at 1k, 10k
//!    and 100k map tasks × 1,000 reduces (its CPU per task; also
//!    `mr-bench state-machine`).
//! 5. With `--lang-app NAME=PATH` (bench/run.sh passes the C, Python and
//!    JavaScript word counts): runs the Rust `wc` app and each of those on a
//!    smaller corpus (`--lang-size-mib`, the slow languages take minutes on
//!    the big one), after a warm-up run that compiles and caches each app,
//!    checks their outputs equal the Rust app's, and prints each one's
//!    throughput as a ratio of the Rust app's (with `--runs N`, the fastest
//!    of N interleaved runs of each).

use std::io::BufRead;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod backups;
mod plain;
mod s3;
mod scale;
mod state_machine;

#[derive(Parser)]
#[command(about = "mr's word-count benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Count words natively: `word count` lines, sorted.
    NativeWc {
        /// Threads (each counts whole files into a table of its own; the
        /// tables are merged at the end).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        output: PathBuf,
        inputs: Vec<PathBuf>,
    },
    /// The inverted index natively: the `indexer` app's output lines.
    NativeIndexer {
        /// Threads (each indexes whole files into a table of its own; the
        /// tables are merged at the end).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        output: PathBuf,
        inputs: Vec<PathBuf>,
    },
    /// Apps without a combiner (wc with its combiner removed, the indexer)
    /// against their native equivalents.
    NoCombiner(plain::Args),
    /// The coordinator's state machine alone, with simulated workers.
    StateMachine {
        /// Map tasks per job (comma-separated: one job each).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        maps: Vec<u32>,
        #[arg(long, default_value_t = 1000)]
        reduces: u32,
        #[arg(long, default_value_t = 10)]
        workers: u32,
        #[arg(long, default_value_t = 4)]
        slots: u32,
    },
    /// Backup tasks with one slowed worker of three, and `--verify 2`,
    /// against the same cluster's plain run.
    Backups(backups::Args),
    /// Word count with its input (and output) in S3 against local disk,
    /// with the S3 server on this machine.
    S3(s3::Args),
    /// `mr run` (and a cluster) at growing input sizes: time and peak RSS.
    Scale(scale::Args),
}

/// Where a benchmark works and what it runs (shared by its commands).
#[derive(clap::Args)]
struct Tools {
    /// Where the corpus and outputs go.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// The mr binary.
    #[arg(long, default_value = "target/release/mr")]
    mr: PathBuf,
    /// The wc app.
    #[arg(long, default_value = "apps/target/wasm32-wasip2/release/wc.wasm")]
    app: PathBuf,
}

impl Tools {
    /// Fails unless the mr binary and the app exist (`build`: the command
    /// that builds them, for the message).
    fn check(&self, build: &str) -> Result<()> {
        for (what, p) in [("mr binary", &self.mr), ("wc app", &self.app)] {
            if !p.exists() {
                bail!(
                    "{what} {} not found; run {build}, which builds it",
                    p.display()
                );
            }
        }
        Ok(())
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Corpus size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Number of corpus files.
    #[arg(long, default_value_t = 4)]
    files: u32,
    /// Distinct words the corpus is drawn from (Zipf, s = 1).
    #[arg(long, default_value_t = 1_000_000)]
    vocabulary: usize,
    #[command(flatten)]
    tools: Tools,
    /// Extra arguments for `mr run` (e.g. --parallelism 1).
    #[arg(long, allow_hyphen_values = true, num_args = 1..)]
    mr_args: Vec<String>,
    /// Workers in the cluster run (0: no cluster run).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Slots per worker [default: cores / workers, at least 1: on one
    /// machine the cluster runs as many tasks at once as `mr run`].
    #[arg(long)]
    slots: Option<u32>,
    /// Runs of each command; the fastest of each counts.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// An app in another language to compare with the Rust wc app, as
    /// NAME=PATH (repeatable).
    #[arg(long = "lang-app", value_parser = parse_lang_app)]
    lang_apps: Vec<(String, PathBuf)>,
    /// Corpus size in MiB for the comparison between languages.
    #[arg(long, default_value_t = 32)]
    lang_size_mib: u64,
    /// Tiny inputs (one line each) for the scale run (0: none).
    #[arg(long, default_value_t = 20_000)]
    tiny_files: u32,
    /// A Python with the `duckdb` package: DuckDB's word count runs in the
    /// same run, for comparison (bench/run.sh installs one in a venv).
    #[arg(long)]
    duckdb: Option<PathBuf>,
}

fn parse_lang_app(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("expected NAME=PATH, got {s:?}")),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::NativeWc {
            threads,
            output,
            inputs,
        }) => native_wc(&output, &inputs, threads),
        Some(Cmd::NativeIndexer {
            threads,
            output,
            inputs,
        }) => plain::native_indexer(&output, &inputs, threads),
        Some(Cmd::NoCombiner(a)) => plain::run(a),
        Some(Cmd::StateMachine {
            maps,
            reduces,
            workers,
            slots,
        }) => state_machines(&maps, reduces, workers, slots),
        Some(Cmd::Backups(a)) => backups::run(a),
        Some(Cmd::S3(a)) => s3::run(a),
        Some(Cmd::Scale(a)) => scale::run(a),
        None => bench(cli.run),
    }
}

/// xorshift64*: fast, deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Distinct words of the corpora of `backups` and `s3` (the main run's and
/// `scale`'s take `--vocabulary`, 1,000,000 by default: issue 11's corpus).
const VOCABULARY: usize = 300_000;

/// The corpus directory for `size` MiB in `files` files of a `vocabulary`
/// of words, under `dir`.
fn corpus_dir(dir: &Path, size_mib: u64, files: u32, vocabulary: usize) -> PathBuf {
    if vocabulary == VOCABULARY {
        dir.join(format!("corpus-{size_mib}m-{files}"))
    } else {
        dir.join(format!("corpus-{size_mib}m-{files}-v{vocabulary}"))
    }
}

fn generate(dir: &Path, size: u64, files: u32) -> Result<Vec<PathBuf>> {
    generate_with(dir, size, files, VOCABULARY)
}

fn generate_with(dir: &Path, size: u64, files: u32, vocabulary: usize) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = (0..files)
        .map(|i| dir.join(format!("corpus-{i}.txt")))
        .collect();
    let per_file = size / files as u64;
    if paths
        .iter()
        .all(|p| p.metadata().is_ok_and(|m| m.len() >= per_file))
    {
        return Ok(paths);
    }
    std::fs::create_dir_all(dir)?;
    eprintln!(
        "generating a {} MiB corpus in {} ...",
        size >> 20,
        dir.display()
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let letters = b"etaoinshrdlucmfwypvbgkqjxz";
    let vocab: Vec<String> = (0..vocabulary)
        .map(|i| {
            let len = 2 + rng.below(10) as usize;
            let mut w: String = (0..len)
                .map(|_| letters[rng.below(26) as usize] as char)
                .collect();
            if i % 7 == 0 {
                w[..1].make_ascii_uppercase();
            }
            if i % 101 == 0 {
                w.push('é');
            }
            w
        })
        .collect();
    // Zipf(s = 1) over ranks: cumulative weights, sampled by binary search.
    let mut cum = Vec::with_capacity(vocabulary);
    let mut total = 0f64;
    for r in 1..=vocabulary {
        total += 1.0 / r as f64;
        cum.push(total);
    }
    let seps = [" ", " ", " ", " ", ", ", ". ", "; ", " -- ", "'s "];
    for p in &paths {
        let mut out = BufWriter::new(std::fs::File::create(p)?);
        let mut written = 0u64;
        let mut on_line = 0;
        while written < per_file {
            let x = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
            let w = &vocab[cum.partition_point(|&c| c < x).min(vocabulary - 1)];
            let sep = if on_line == 11 {
                on_line = 0;
                "\n"
            } else {
                on_line += 1;
                seps[rng.below(seps.len() as u64) as usize]
            };
            out.write_all(w.as_bytes())?;
            out.write_all(sep.as_bytes())?;
            written += (w.len() + sep.len()) as u64;
        }
        out.write_all(b"\n")?;
        out.flush()?;
    }
    Ok(paths)
}

fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};
        c.general_category_group() == GeneralCategoryGroup::Letter
    }
}

/// The baseline: what a competent programmer writes in Rust, on
/// `threads` cores (files dealt out to threads, one table each, merged).
fn native_wc(output: &Path, inputs: &[PathBuf], threads: usize) -> Result<()> {
    type Counts = rustc_hash::FxHashMap<String, u64>;
    let count = |files: Vec<&PathBuf>| -> Result<Counts> {
        let mut counts = Counts::default();
        for p in files {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let text = String::from_utf8_lossy(&bytes);
            for w in text
                .split(|c: char| !is_letter(c))
                .filter(|w| !w.is_empty())
            {
                match counts.get_mut(w) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(w.to_string(), 1);
                    }
                }
            }
        }
        Ok(counts)
    };
    let threads = threads.max(1);
    let tables = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<&PathBuf> = inputs.iter().skip(t).step_by(threads).collect();
                s.spawn(move || count(mine))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a counting thread"))
            .collect::<Result<Vec<Counts>>>()
    })?;
    let mut tables = tables.into_iter();
    let mut counts = tables.next().unwrap_or_default();
    for t in tables {
        for (w, n) in t {
            *counts.entry(w).or_default() += n;
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_unstable();
    let mut out = BufWriter::new(std::fs::File::create(output)?);
    for (w, n) in v {
        writeln!(out, "{w} {n}")?;
    }
    out.flush()?;
    Ok(())
}

struct Measured {
    secs: f64,
    peak_rss_mib: f64,
}

/// Runs `cmd`, returning wall time and the child's peak RSS.
fn measure(cmd: &mut Command) -> Result<Measured> {
    let start = Instant::now();
    let child = cmd.spawn().context("starting a benchmark process")?;
    let peak_rss_mib = reap(child, &format!("{cmd:?}"))?;
    Ok(Measured {
        secs: start.elapsed().as_secs_f64(),
        peak_rss_mib,
    })
}

/// Waits for `child` to exit successfully; returns its peak RSS in MiB.
#[allow(unsafe_code)]
fn reap(child: Child, what: &str) -> Result<f64> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be filled in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet reaped; the pointers are valid.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{what} failed with status {status}");
    }
    Ok(usage.ru_maxrss as f64 / 1024.0)
}

/// A coordinator and workers on this machine.
struct Cluster {
    addr: String,
    coordinator: Child,
    workers: Vec<Child>,
    /// Where its CA and tokens are (`None`: `--insecure`).
    state: Option<PathBuf>,
}

impl Cluster {
    /// A coordinator with its state in `dir` (TLS and tokens, or
    /// `--insecure`), jobs allowed under `dir`, and its workers.
    fn start(
        mr: &Path,
        dir: &Path,
        workers: u32,
        slots: Option<u32>,
        insecure: bool,
    ) -> Result<Cluster> {
        let dir = std::path::absolute(dir)?;
        let state = dir.join(if insecure {
            "state-insecure"
        } else {
            "state-tls"
        });
        let mut coordinator = Command::new(mr)
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .arg("--data-root")
            .arg(&dir)
            .args(insecure.then_some("--insecure"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mr coordinator")?;
        let mut line = String::new();
        std::io::BufReader::new(coordinator.stdout.take().expect("piped")).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("mr coordinator listening on ")
            .context("mr coordinator did not start")?
            .to_string();
        let state = (!insecure).then_some(state);
        let credentials = |kind: &str| match &state {
            Some(s) => vec![
                "--token-file".to_string(),
                s.join(format!("{kind}.token")).display().to_string(),
            ],
            None => vec!["--insecure".to_string()],
        };
        let workers = (0..workers)
            .map(|_| {
                let mut c = Command::new(mr);
                c.args(["worker", "--coordinator", &addr]);
                c.args(credentials("worker"));
                if let Some(k) = slots {
                    c.args(["--slots", &k.to_string()]);
                }
                c.stderr(Stdio::null())
                    .spawn()
                    .context("starting mr worker")
            })
            .collect::<Result<_>>()?;
        Ok(Cluster {
            addr,
            coordinator,
            workers,
            state,
        })
    }

    /// `mr submit` (or another client command) to this cluster.
    fn client(&self, mr: &Path, sub: &str) -> Command {
        let mut c = Command::new(mr);
        c.args([sub, "--coordinator", &self.addr]);
        match &self.state {
            Some(s) => c.arg("--token-file").arg(s.join("client.token")),
            None => c.arg("--insecure"),
        };
        c
    }

    /// Shuts the cluster down; returns the largest peak RSS of a worker.
    fn stop(self, mr: &Path) -> Result<f64> {
        let status = self.client(mr, "shutdown").stdout(Stdio::null()).status()?;
        if !status.success() {
            bail!("mr shutdown failed");
        }
        let mut peak = 0f64;
        for w in self.workers {
            peak = peak.max(reap(w, "mr worker")?);
        }
        reap(self.coordinator, "mr coordinator")?;
        Ok(peak)
    }
}

fn sorted_lines(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut all = Vec::new();
    for p in paths {
        all.extend(std::fs::read_to_string(p)?.lines().map(str::to_string));
    }
    all.sort_unstable();
    Ok(all)
}

fn bench(a: RunArgs) -> Result<()> {
    a.tools.check("bench/run.sh")?;
    let size = a.size_mib << 20;
    let corpus = generate_with(
        &corpus_dir(&a.tools.dir, a.size_mib, a.files, a.vocabulary),
        size,
        a.files,
        a.vocabulary,
    )?;
    let bytes: u64 = corpus
        .iter()
        .map(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let mb = bytes as f64 / 1e6;

    let native_out = a.tools.dir.join("native-wc.txt");
    let me = std::env::current_exe()?;
    let mr_out = a.tools.dir.join("mr-wc");
    let cluster_out = a.tools.dir.join("mr-cluster-wc");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    let slots = a.slots.unwrap_or((cores / a.workers.max(1)).max(1));
    let cluster = if a.workers > 0 {
        Some(Cluster::start(
            &a.tools.mr,
            &a.tools.dir,
            a.workers,
            Some(slots),
            false,
        )?)
    } else {
        None
    };
    // The same cluster without TLS, tokens or grants, for the cost of them.
    let insecure = if a.workers > 0 {
        Some(Cluster::start(
            &a.tools.mr,
            &a.tools.dir,
            a.workers,
            Some(slots),
            true,
        )?)
    } else {
        None
    };
    let insecure_out = a.tools.dir.join("mr-cluster-insecure-wc");
    let mut open = None;
    let best = |acc: Option<Measured>, m: Measured| match acc {
        Some(b) if b.secs <= m.secs => Some(b),
        _ => Some(m),
    };
    let (mut native, mut mr, mut dist) = (None, None, None);
    let (mut native2, mut duck) = (None, None);
    let native2_out = a.tools.dir.join("native-wc-2.txt");
    let duck_out = a.tools.dir.join("duckdb-wc.txt");
    let threads = cores.to_string();
    for run in 0..a.runs.max(1) {
        eprint!("run {} of {}: ", run + 1, a.runs.max(1));
        let n = measure(
            Command::new(&me)
                .arg("native-wc")
                .arg(&native_out)
                .args(&corpus),
        )?;
        eprint!("native {:.2} s", n.secs);
        native = best(native, n);
        let n = measure(
            Command::new(&me)
                .args(["native-wc", "--threads", &threads])
                .arg(&native2_out)
                .args(&corpus),
        )?;
        eprint!(", native {threads} threads {:.2} s", n.secs);
        native2 = best(native2, n);
        if let Some(py) = &a.duckdb {
            let d = measure(
                Command::new(py)
                    .arg("bench/duckdb/wc.py")
                    .arg(&threads)
                    .arg(&duck_out)
                    .args(&corpus),
            )?;
            eprint!(", DuckDB {:.2} s", d.secs);
            duck = best(duck, d);
        }
        let m = measure(
            Command::new(&a.tools.mr)
                .arg("run")
                .arg(&a.tools.app)
                .args(&corpus)
                .args(["--reduces", "8", "--force", "--quiet", "--output"])
                .arg(&mr_out)
                .args(&a.mr_args)
                .stdout(Stdio::null()),
        )?;
        eprint!(", mr run {:.2} s", m.secs);
        mr = best(mr, m);
        if let Some(c) = &insecure {
            let d = measure(
                c.client(&a.tools.mr, "submit")
                    .arg(&a.tools.app)
                    .args(&corpus)
                    .args(["--reduces", "8", "--force", "--quiet", "--output"])
                    .arg(&insecure_out)
                    .stdout(Stdio::null()),
            )?;
            eprint!(", cluster --insecure {:.2} s", d.secs);
            open = best(open, d);
        }
        if let Some(c) = &cluster {
            let d = measure(
                c.client(&a.tools.mr, "submit")
                    .arg(&a.tools.app)
                    .args(&corpus)
                    .args(["--reduces", "8", "--force", "--quiet", "--output"])
                    .arg(&cluster_out)
                    .stdout(Stdio::null()),
            )?;
            eprint!(", cluster {:.2} s", d.secs);
            dist = best(dist, d);
        }
        eprintln!();
    }
    let (native, mr) = (native.expect("one run"), mr.expect("one run"));
    let tiny = if a.tiny_files > 0 {
        Some(tiny_files(&a, cluster.as_ref())?)
    } else {
        None
    };
    let worker_rss = match cluster {
        Some(c) => Some(c.stop(&a.tools.mr)?),
        None => None,
    };
    if let Some(c) = insecure {
        c.stop(&a.tools.mr)?;
    }
    if let (Some(tls), Some(open)) = (&dist, &open) {
        println!(
            "cluster with TLS, tokens and grants (the default) against --insecure: best time {:.2} s vs {:.2} s, ratio {:.3}x",
            tls.secs,
            open.secs,
            tls.secs / open.secs
        );
    }

    let want = sorted_lines(&[native_out])?;
    if sorted_lines(&[native2_out])? != want {
        bail!("the native word count on several threads differs from one thread's");
    }
    if duck.is_some() && sorted_lines(&[duck_out])? != want {
        bail!("DuckDB's word count differs from the native one's");
    }
    for (what, dir) in [("mr run", &mr_out), ("the cluster", &cluster_out)] {
        if what == "the cluster" && dist.is_none() {
            continue;
        }
        let outs: Vec<PathBuf> = (0..8).map(|r| dir.join(format!("mr-out-{r}"))).collect();
        let got = sorted_lines(&outs)?;
        if want != got {
            bail!(
                "{what}'s output differs from native ({} vs {} lines)",
                got.len(),
                want.len()
            );
        }
    }

    println!(
        "corpus: {} files, {:.0} MB, {} distinct words",
        corpus.len(),
        mb,
        want.len()
    );
    println!(
        "{:<26} {:>9} {:>9} {:>14}",
        "", "wall s", "MB/s", "peak RSS MiB"
    );
    let native2 = native2.expect("one run");
    let mut rows = vec![
        ("native Rust, 1 thread".to_string(), &native),
        (format!("native Rust, {threads} threads"), &native2),
    ];
    let duck_name = format!("DuckDB, {threads} threads");
    if let Some(d) = &duck {
        rows.push((duck_name, d));
    }
    rows.push(("mr run wc".to_string(), &mr));
    let dist_name = format!("mr submit, {}x{} slots", a.workers, slots);
    if let Some(d) = &dist {
        rows.push((dist_name, d));
    }
    for (name, m) in rows {
        println!(
            "{name:<26} {:>9.2} {:>9.1} {:>14.0}",
            m.secs,
            mb / m.secs,
            m.peak_rss_mib
        );
    }
    println!(
        "ratio mr/native: throughput {:.2}x, peak RSS {:.2}x",
        native.secs / mr.secs,
        mr.peak_rss_mib / native.peak_rss_mib
    );
    println!(
        "ratio mr/native {threads} threads: throughput {:.2}x (goal >= 0.7x)",
        native2.secs / mr.secs
    );
    if let Some(d) = &duck {
        println!(
            "ratio mr/DuckDB: throughput {:.2}x (goal >= 1.5x)",
            d.secs / mr.secs
        );
    }
    if let (Some(d), Some(rss)) = (&dist, worker_rss) {
        println!("(mr submit's own RSS is the client's; largest worker peak RSS {rss:.0} MiB)");
        println!(
            "ratio cluster/mr run: throughput {:.2}x; cluster/native: {:.2}x",
            mr.secs / d.secs,
            native.secs / d.secs
        );
    }
    if let Some(t) = tiny {
        t.print();
    }
    state_machines(&[1000, 10_000, 100_000], 1000, 10, 4)?;
    if !a.lang_apps.is_empty() {
        languages(&a)?;
    }
    Ok(())
}

/// What the scale run measured.
struct Tiny {
    files: u32,
    mr: Measured,
    cluster: Option<(String, Measured)>,
}

impl Tiny {
    fn print(&self) {
        println!(
            "\nscale: {} tiny inputs (one line each), 8 reduces",
            self.files
        );
        println!("{:<26} {:>9} {:>16}", "", "wall s", "ms per map task");
        let per = |m: &Measured| m.secs * 1000.0 / self.files as f64;
        println!(
            "{:<26} {:>9.2} {:>16.3}",
            "mr run",
            self.mr.secs,
            per(&self.mr)
        );
        if let Some((name, c)) = &self.cluster {
            println!("{name:<26} {:>9.2} {:>16.3}", c.secs, per(c));
        }
    }
}

/// `--tiny-files` inputs of one line each through `mr run` and the
/// cluster; checks both counted every word.
fn tiny_files(a: &RunArgs, cluster: Option<&Cluster>) -> Result<Tiny> {
    let dir = a.tools.dir.join(format!("tiny-{}", a.tiny_files));
    let names: Vec<String> = (0..a.tiny_files).map(|i| format!("t{i:06}.txt")).collect();
    if !dir.join(names.last().expect("tiny files")).exists() {
        std::fs::create_dir_all(&dir)?;
        eprintln!(
            "writing {} tiny files in {} ...",
            a.tiny_files,
            dir.display()
        );
        for (i, n) in names.iter().enumerate() {
            let line = if i % 2 == 0 {
                "alpha beta\n"
            } else {
                "alpha gamma\n"
            };
            std::fs::write(dir.join(n), line)?;
        }
    }
    let n = a.tiny_files as u64;
    let want = vec![
        format!("alpha {n}"),
        format!("beta {}", n.div_ceil(2)),
        format!("gamma {}", n / 2),
    ];
    let job = |sub: &str, out: &Path| {
        let mut c = Command::new(std::path::absolute(&a.tools.mr).expect("a path"));
        c.arg(sub)
            .arg(std::path::absolute(&a.tools.app).expect("a path"))
            .args(&names)
            .args(["--reduces", "8", "--force", "--quiet", "--output"])
            .arg(out)
            .current_dir(&dir)
            .stdout(Stdio::null());
        c
    };
    let check = |out: &Path| -> Result<()> {
        let got = sorted_lines(&outputs(out))?;
        if got != want {
            bail!("the tiny-files job counted {got:?}, not {want:?}");
        }
        Ok(())
    };
    eprintln!("scale: {} tiny inputs ...", a.tiny_files);
    let out = std::path::absolute(a.tools.dir.join("tiny-mr"))?;
    let mut cmd = job("run", &out);
    let mr = measure(cmd.args(&a.mr_args))?;
    check(&out)?;
    let cluster = match cluster {
        Some(c) => {
            let out = std::path::absolute(a.tools.dir.join("tiny-cluster"))?;
            let mut cmd = job("submit", &out);
            let m = measure(cmd.args(c.client(&a.tools.mr, "submit").get_args().skip(1)))?;
            check(&out)?;
            Some((format!("mr submit, {} workers", c.workers.len()), m))
        }
        None => None,
    };
    Ok(Tiny {
        files: a.tiny_files,
        mr,
        cluster,
    })
}

/// The state machine alone at each of `maps`, and whether its CPU per
/// task stays flat.
fn state_machines(maps: &[u32], reduces: u32, workers: u32, slots: u32) -> Result<()> {
    println!(
        "\ncoordinator state machine alone: {reduces} reduces, {workers} simulated workers x {slots} slots"
    );
    println!(
        "{:>10} {:>10} {:>12} {:>14}",
        "maps", "calls", "CPU ms", "us per task"
    );
    let mut costs = Vec::new();
    for &m in maps {
        let c = state_machine::simulate(m, reduces, workers, slots)?;
        println!(
            "{:>10} {:>10} {:>12.1} {:>14.2}",
            c.maps,
            c.calls,
            c.cpu.as_secs_f64() * 1000.0,
            c.per_task_us()
        );
        costs.push(c);
    }
    if let (Some(first), Some(last)) = (costs.first(), costs.last()) {
        println!(
            "per-task cost at {} maps / at {} maps: {:.2}x",
            last.maps,
            first.maps,
            last.per_task_us() / first.per_task_us()
        );
    }
    Ok(())
}

/// Reduce tasks of every benchmark job.
const REDUCES: u32 = 8;

/// Runs `mr run app corpus` into `out` and measures it.
fn run_mr(a: &RunArgs, app: &Path, corpus: &[PathBuf], out: &Path) -> Result<Measured> {
    measure(
        Command::new(&a.tools.mr)
            .arg("run")
            .arg(app)
            .args(corpus)
            .args([
                "--reduces",
                &REDUCES.to_string(),
                "--force",
                "--quiet",
                "--output",
            ])
            .arg(out)
            .args(&a.mr_args)
            .stdout(std::process::Stdio::null()),
    )
}

fn outputs(dir: &Path) -> Vec<PathBuf> {
    outputs_of(dir, REDUCES)
}

/// A job's output files, given its number of reduces.
fn outputs_of(dir: &Path, reduces: u32) -> Vec<PathBuf> {
    (0..reduces)
        .map(|r| dir.join(format!("mr-out-{r}")))
        .collect()
}

/// The Rust wc app and the other languages' on a smaller corpus.
fn languages(a: &RunArgs) -> Result<()> {
    let corpus = generate(
        &a.tools
            .dir
            .join(format!("corpus-{}m-{}", a.lang_size_mib, a.files)),
        a.lang_size_mib << 20,
        a.files,
    )?;
    let mb = corpus
        .iter()
        .map(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .sum::<u64>() as f64
        / 1e6;
    let warm_up = a.tools.dir.join("warm-up.txt");
    std::fs::write(&warm_up, "warm up\n")?;
    let mut apps = vec![("Rust".to_string(), a.tools.app.clone())];
    apps.extend(a.lang_apps.iter().cloned());
    let out_of = |name: &str| a.tools.dir.join(format!("lang-{name}"));
    for (name, app) in &apps {
        if !app.exists() {
            bail!("{name} app {} not found", app.display());
        }
        // Compiles the app into mr's cache, so the timed runs measure the
        // job, not the compiler (a Python app takes seconds to compile).
        run_mr(a, app, std::slice::from_ref(&warm_up), &out_of(name))?;
    }
    // With --runs N: N rounds, the apps interleaved in each; the fastest
    // run of each app counts.
    let mut results: Vec<(&String, Measured)> = Vec::new();
    let mut want = None;
    for run in 0..a.runs.max(1) {
        for (i, (name, app)) in apps.iter().enumerate() {
            let out = out_of(name);
            eprintln!(
                "running {name} wc on {mb:.0} MB (run {} of {}) ...",
                run + 1,
                a.runs.max(1)
            );
            let m = run_mr(a, app, &corpus, &out)?;
            let got = sorted_lines(&outputs(&out))?;
            match &want {
                None => want = Some(got),
                Some(w) if *w == got => {}
                Some(w) => bail!(
                    "the {name} app's output differs from the Rust app's ({} vs {} lines)",
                    got.len(),
                    w.len()
                ),
            }
            match results.get_mut(i) {
                None => results.push((name, m)),
                Some((_, best)) if m.secs < best.secs => *best = m,
                Some(_) => {}
            }
        }
    }
    println!(
        "\nlanguages (same outputs; {} files, {mb:.0} MB, mr run after a warm-up that compiles each app):",
        corpus.len()
    );
    println!(
        "{:<26} {:>9} {:>9} {:>14} {:>12}",
        "", "wall s", "MB/s", "peak RSS MiB", "vs Rust app"
    );
    let rust_secs = results[0].1.secs;
    for (name, m) in &results {
        println!(
            "{:<26} {:>9.2} {:>9.2} {:>14.0} {:>11.3}x",
            format!("mr run wc ({name})"),
            m.secs,
            mb / m.secs,
            m.peak_rss_mib,
            rust_secs / m.secs
        );
    }
    Ok(())
}
