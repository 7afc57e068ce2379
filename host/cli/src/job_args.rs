//! Flags shared by `mr run` and `mr submit`: what a job is and the limits
//! its sandboxes get. Checked in one place ([`JobArgs::check`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use mr_runtime::Grants;

#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Number of reduce tasks, and so of output files mr-out-N.
    #[arg(short = 'r', long, default_value_t = 10)]
    pub reduces: u32,

    /// Output directory; must be empty or absent (see --force).
    #[arg(short, long)]
    pub output: PathBuf,

    /// Replace the output of an earlier job in --output: removes its
    /// mr-out-*, _SUCCESS, _FAILED and _temporary (other files are kept).
    #[arg(long)]
    pub force: bool,

    /// Files larger than this are split into several map tasks.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub split_size: u64,

    /// Map output held in memory per task before a sorted spill to disk.
    /// With --memory-limit and --split-size it bounds memory; see README.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub sort_buffer: u64,

    /// Linear memory one task's guest may use; past it the task fails with
    /// "out of memory".
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    pub memory_limit: u64,

    /// Time one task attempt's guest may run (e.g. 30s, 10m); past it the
    /// guest is interrupted and the attempt fails.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub task_timeout: Duration,

    /// Attempts per task before the job fails. A guest with neither clock
    /// nor random grant is deterministic, so only its timeouts and host
    /// errors are retried.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// Grant the guest a capability: `clock` (real wall and monotonic
    /// clocks; otherwise they stand still at 1970) or `random` (real
    /// randomness; otherwise a fixed sequence per task). Repeatable, or
    /// comma-separated. Files, network and environment are never granted.
    #[arg(long = "allow", value_name = "CAP", value_delimiter = ',', value_parser = ["clock", "random"])]
    pub allow: Vec<String>,
}

impl JobArgs {
    /// Refuses values that cannot work, with the flag's name.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.reduces > 0,
            "--reduces must be at least 1 (it is the number of output files)"
        );
        anyhow::ensure!(self.split_size > 0, "--split-size must be positive");
        anyhow::ensure!(
            self.memory_limit >= 1 << 20,
            "--memory-limit must be at least 1MiB"
        );
        anyhow::ensure!(
            !self.task_timeout.is_zero(),
            "--task-timeout must be positive"
        );
        Ok(())
    }

    pub fn grants(&self) -> Grants {
        Grants::from_names(&self.allow)
    }
}

/// Where compiled apps are cached.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Where compiled apps are cached [default: $XDG_CACHE_HOME/mr or ~/.cache/mr].
    #[arg(long, env = "MR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Compile the app afresh and cache nothing.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
}

impl CacheArgs {
    /// The cache directory to use, if any.
    pub fn resolve(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        self.cache_dir.clone().or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(base.join("mr"))
        })
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| format!("`{s}` is not a size; write e.g. 64MiB, 1GiB or a number of bytes"))
}
