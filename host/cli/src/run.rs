//! `mr run`: a whole job in this process.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use mr_core::ids::TaskId;
use mr_runtime::{Grants, SandboxConfig};
use mr_worker::local::{self, LocalJob, Observer, Phase};

/// Run a MapReduce job on this machine, with one sandbox per task.
///
/// One map task per input file, or per split of a file larger than
/// --split-size (splits end at line boundaries). Output goes to
/// DIR/mr-out-0 .. mr-out-<N-1>, one "key value" line per key in byte order
/// of keys; DIR/_SUCCESS (a JSON job report) appears last, only when every
/// output file is complete. A failed job leaves DIR/_FAILED instead.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The app: a WebAssembly component built for wasm32-wasip2.
    app: PathBuf,

    /// Input text files. Each name is passed to the app exactly as given.
    #[arg(required = true)]
    inputs: Vec<String>,

    /// Number of reduce tasks, and so of output files mr-out-N.
    #[arg(short = 'r', long, default_value_t = 10)]
    reduces: u32,

    /// Output directory; must be empty or absent (see --force).
    #[arg(short, long)]
    output: PathBuf,

    /// Replace the output of an earlier job in --output: removes its
    /// mr-out-*, _SUCCESS, _FAILED and _temporary (other files are kept).
    #[arg(long)]
    force: bool,

    /// Sandboxes running at once [default: number of cores].
    #[arg(short = 'p', long)]
    parallelism: Option<usize>,

    /// Files larger than this are split into several map tasks.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    split_size: u64,

    /// Map output held in memory per task before a sorted spill to disk.
    /// With --memory-limit and --split-size it bounds memory; see README.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    sort_buffer: u64,

    /// Linear memory one task's guest may use; past it the task fails with
    /// "out of memory".
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    memory_limit: u64,

    /// Time one task attempt may run (e.g. 30s, 10m); past it the guest is
    /// interrupted and the attempt fails.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    task_timeout: Duration,

    /// Attempts per task before the job fails. A guest with neither clock
    /// nor random grant is deterministic, so only its timeouts and host
    /// errors are retried.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,

    /// Grant the guest a capability: `clock` (real wall and monotonic
    /// clocks; otherwise they stand still at 1970) or `random` (real
    /// randomness; otherwise a fixed sequence per task). Repeatable, or
    /// comma-separated. Files, network and environment are never granted.
    #[arg(long = "allow", value_name = "CAP", value_delimiter = ',', value_parser = ["clock", "random"])]
    allow: Vec<String>,

    /// Directory for intermediate (map output) files [default: system temp].
    #[arg(long)]
    tmp_dir: Option<PathBuf>,

    /// Where compiled apps are cached [default: $XDG_CACHE_HOME/mr or ~/.cache/mr].
    #[arg(long, env = "MR_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Compile the app afresh and cache nothing.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,

    /// No progress bars (they are drawn only on a terminal anyway).
    #[arg(short, long)]
    quiet: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| format!("`{s}` is not a size; write e.g. 64MiB, 1GiB or a number of bytes"))
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("mr"))
}

impl TryFrom<RunArgs> for LocalJob {
    type Error = anyhow::Error;

    fn try_from(a: RunArgs) -> anyhow::Result<LocalJob> {
        let grants = Grants {
            clock: a.allow.iter().any(|c| c == "clock"),
            random: a.allow.iter().any(|c| c == "random"),
        };
        anyhow::ensure!(a.split_size > 0, "--split-size must be positive");
        anyhow::ensure!(
            a.memory_limit >= 1 << 20,
            "--memory-limit must be at least 1MiB"
        );
        anyhow::ensure!(!a.task_timeout.is_zero(), "--task-timeout must be positive");
        let parallelism = match a.parallelism {
            Some(0) => anyhow::bail!("--parallelism must be at least 1"),
            Some(p) => p,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        Ok(LocalJob {
            app: a.app,
            inputs: a.inputs,
            reduces: a.reduces,
            output: a.output,
            parallelism,
            split_size: a.split_size,
            sort_buffer: a.sort_buffer.min(usize::MAX as u64) as usize,
            max_attempts: a.max_attempts,
            force: a.force,
            tmp_dir: a.tmp_dir,
            sandbox: SandboxConfig {
                memory_limit: a.memory_limit.min(usize::MAX as u64) as usize,
                task_timeout: a.task_timeout,
                grants,
                cache_dir: if a.no_cache {
                    None
                } else {
                    a.cache_dir.or_else(default_cache_dir)
                },
                ..SandboxConfig::default()
            },
        })
    }
}

/// Progress bars on a terminal (one per phase, added when it starts);
/// plain lines about failed attempts everywhere.
struct Bars {
    multi: MultiProgress,
    map: OnceLock<ProgressBar>,
    reduce: OnceLock<ProgressBar>,
}

impl Bars {
    fn new(quiet: bool) -> Self {
        let multi = MultiProgress::new();
        if quiet {
            multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Bars {
            multi,
            map: OnceLock::new(),
            reduce: OnceLock::new(),
        }
    }

    fn slot(&self, phase: Phase) -> &OnceLock<ProgressBar> {
        match phase {
            Phase::Map => &self.map,
            Phase::Reduce => &self.reduce,
        }
    }

    fn finish(&self) {
        for b in [&self.map, &self.reduce]
            .into_iter()
            .filter_map(OnceLock::get)
        {
            b.finish();
        }
    }
}

impl Observer for Bars {
    fn phase_started(&self, phase: Phase, tasks: usize) {
        let style = ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("a valid template")
            .progress_chars("=> ");
        let bar = self.multi.add(ProgressBar::new(tasks as u64));
        bar.set_style(style);
        bar.set_prefix(match phase {
            Phase::Map => "map",
            Phase::Reduce => "reduce",
        });
        let _ = self.slot(phase).set(bar);
    }
    fn task_done(&self, phase: Phase, done: usize, _tasks: usize) {
        if let Some(b) = self.slot(phase).get() {
            b.set_position(done as u64);
        }
    }
    fn attempt_failed(&self, task: TaskId, attempt: u32, error: &str, will_retry: bool) {
        let first_line = error.lines().next().unwrap_or("");
        let what = if will_retry { "retrying" } else { "giving up" };
        let line = format!("{task} attempt {attempt} failed ({what}): {first_line}");
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

impl RunArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let quiet = self.quiet;
        let job = LocalJob::try_from(self)?;
        let bars = Bars::new(quiet);
        let result = local::run(&job, &bars);
        bars.finish();
        let report = result?;
        let secs = (report.finished_ms - report.started_ms) as f64 / 1000.0;
        let maps = report
            .tasks
            .iter()
            .filter(|t| matches!(t.task, TaskId::Map(_)))
            .count();
        use std::io::Write;
        writeln!(
            std::io::stdout(),
            "job {} succeeded in {secs:.1}s: {maps} map and {} reduce tasks, {} input bytes, {} output lines in {}/mr-out-* (report: {}/_SUCCESS)",
            report.job_id.as_ref().map(|j| j.0.as_str()).unwrap_or("?"),
            report.reduces,
            report.counters.map_input_bytes,
            report.counters.reduce_output_records,
            job.output.display(),
            job.output.display(),
        )?;
        Ok(())
    }
}
