//! Flags shared by `mr run` and `mr submit`: what a job is and the limits
//! its sandboxes get, turned into a [`JobSpec`] by one `TryFrom`
//! ([`Job::try_from`]), which checks the inputs where the user is and then
//! makes the one check of every field ([`JobSpec::validate`]) that the
//! coordinator makes again when the spec reaches it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use mr_core::job::{AppRef, Grants, InputFile, JobSpec};
use mr_core::location::Location;
use mr_runtime::SandboxConfig;

#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Number of reduce tasks, and so of output files mr-out-N.
    #[arg(short = 'r', long, default_value_t = 10)]
    pub reduces: u32,

    /// Output directory, or prefix in object storage (s3://bucket/prefix/);
    /// must be empty or absent (see --force).
    #[arg(short, long)]
    pub output: String,

    /// Replace the output of an earlier job in --output: removes its
    /// mr-out-*, _SUCCESS, _FAILED and _temporary (other files are kept).
    #[arg(long)]
    pub force: bool,

    /// Files larger than this are split into several map tasks.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub split_size: u64,

    /// Pack small files (consecutive splits) into map tasks of up to SIZE
    /// bytes each (e.g. 64MiB), instead of one map task per file: fewer,
    /// longer tasks for many small inputs (Hadoop's
    /// CombineTextInputFormat). The guest's `map` is still called once per
    /// file, with that file's name [default: off, one map task per split].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub pack_inputs: Option<u64>,

    /// Map output held in memory per task before a sorted spill to disk.
    /// With --memory-limit and --split-size it bounds memory; see README.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub sort_buffer: u64,

    /// Linear memory one task's guest may use; past it the task fails with
    /// "out of memory".
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    pub memory_limit: u64,

    /// Wall time one attempt's guest may run (e.g. 30s, 10m), its budget
    /// however busy it is; past it the guest is interrupted and the
    /// attempt fails.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub attempt_timeout: Duration,

    /// The old name of --attempt-timeout (deprecated).
    #[arg(long, hide = true, value_parser = humantime::parse_duration, conflicts_with = "attempt_timeout")]
    pub task_timeout: Option<Duration>,

    /// An attempt whose progress stands still this long (its guest neither
    /// runs nor emits: e.g. it sleeps, or its worker hangs) is given up and
    /// run again [default: the coordinator's, 10s as in the lab].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub progress_timeout: Option<Duration>,

    /// Attempts per task before the job fails. A guest with neither clock
    /// nor random grant is deterministic, so only its timeouts and host
    /// errors are retried.
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,

    /// Grant the guest a capability: `clock` (real wall and monotonic
    /// clocks; otherwise they stand still at 1970) or `random` (real
    /// randomness; otherwise a fixed sequence per task). Repeatable, or
    /// comma-separated. Files, network and environment are never granted.
    #[arg(long = "allow", value_name = "CAP", value_delimiter = ',', value_parser = ["clock", "random"])]
    pub allow: Vec<String>,

    /// How mr-out-* lines are written: `text` (`key value`, as the lab;
    /// a key with white space or a line break fails its task, naming it)
    /// or `jsonl` (one `{"key":…,"value":…}` object per line: any key and
    /// value).
    #[arg(long, default_value = "text", value_parser = ["text", "jsonl"])]
    pub output_format: String,

    /// Backup attempts for stragglers: when a task runs well past its
    /// peers and a slot is free with nothing else waiting, a second
    /// attempt runs on another worker and the first to finish wins.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub speculation: String,

    /// Run every task on K distinct workers and accept its output only
    /// when K of them (a strict majority of those that answered) computed
    /// the same bytes; a worker that disagrees is named and given no more
    /// of the job's tasks. Refused with --allow clock or random.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(2..=16))]
    pub verify: Option<u32>,
}

impl JobArgs {
    pub fn grants(&self) -> Grants {
        Grants::from_names(&self.allow)
    }

    /// The guest's wall-time budget, from --attempt-timeout or its old
    /// name (with a note to use the new one).
    fn attempt_timeout(&self) -> Duration {
        match self.task_timeout {
            Some(t) => {
                eprintln!(
                    "warning: --task-timeout is deprecated: it is now --attempt-timeout (the guest's wall-time budget per attempt); --progress-timeout is the other limit (no progress for that long)"
                );
                t
            }
            None => self.attempt_timeout,
        }
    }
}

/// What `mr run` and `mr submit` were asked to run.
pub struct JobRequest<'a> {
    pub app: &'a std::path::Path,
    pub inputs: &'a [String],
    pub job: &'a JobArgs,
}

/// A job ready to go: its spec, checked, and the app's bytes.
pub struct Job {
    pub spec: JobSpec,
    pub app: Vec<u8>,
}

impl TryFrom<JobRequest<'_>> for Job {
    type Error = anyhow::Error;

    /// Fails, before anything runs, with a message that says what is wrong
    /// and what to do: a missing or unreadable app or input, a directory
    /// or a pipe as input, an input that `--force` would delete, or a flag
    /// out of its bounds.
    fn try_from(r: JobRequest<'_>) -> anyhow::Result<Job> {
        let a = r.job;
        let output = match mr_core::location::ObjectUrl::parse(&a.output) {
            Some(url) => Location::Object(url.map_err(anyhow::Error::msg)?.as_prefix()),
            None => Location::File(
                std::path::absolute(&a.output)
                    .with_context(|| format!("bad output directory {}", a.output))?,
            ),
        };
        let mut inputs = Vec::with_capacity(r.inputs.len());
        for name in r.inputs {
            if let Some(url) = mr_core::location::ObjectUrl::parse(name) {
                let url = url.map_err(anyhow::Error::msg)?;
                let objects = mr_storage::expand(&url)?;
                if let (true, Location::Object(prefix)) = (a.force, &output) {
                    if let Some(o) = objects
                        .iter()
                        .find(|o| mr_storage::output::would_be_removed(&o.url, prefix))
                    {
                        anyhow::bail!(
                            "input {} is part of the output in {prefix} that --force would remove; copy it elsewhere first",
                            o.url
                        );
                    }
                }
                // One object is named as the user wrote it; those of a
                // prefix or a glob by their own URLs.
                let one = objects.len() == 1 && objects[0].url == url;
                for o in objects {
                    inputs.push(InputFile {
                        name: if one { name.clone() } else { o.url.to_string() },
                        path: Location::Object(o.url),
                        bytes: o.size,
                    });
                }
                continue;
            }
            let force = a.force && output.file().is_some();
            let dir = output.file().unwrap_or(std::path::Path::new("/"));
            let bytes = mr_core::output::check_input(name, dir, force)?;
            let path = std::path::absolute(name).with_context(|| format!("bad input {name}"))?;
            inputs.push(InputFile {
                name: name.clone(),
                path: path.into(),
                bytes,
            });
        }
        let app =
            std::fs::read(r.app).with_context(|| format!("cannot read app {}", r.app.display()))?;
        let spec = JobSpec {
            app: AppRef {
                name: r.app.display().to_string(),
                sha256: mr_core::sha256_hex(&app),
                size: app.len() as u64,
            },
            inputs,
            reduces: a.reduces,
            output,
            force: a.force,
            split_size: a.split_size,
            sort_buffer: a.sort_buffer,
            max_attempts: a.max_attempts,
            memory_limit: a.memory_limit,
            attempt_timeout: a.attempt_timeout(),
            progress_timeout: a.progress_timeout,
            grants: a.grants(),
            output_format: match a.output_format.as_str() {
                "jsonl" => mr_core::job::OutputFormat::Jsonl,
                _ => mr_core::job::OutputFormat::Text,
            },
            speculation: a.speculation == "on",
            verify: a.verify.unwrap_or(1),
            pack_inputs: a.pack_inputs.unwrap_or(0),
        };
        spec.validate()?;
        match &spec.output {
            Location::File(d) => mr_core::output::precheck(d, spec.force)?,
            Location::Object(p) => mr_storage::output::precheck(p, spec.force)?,
        }
        Ok(Job { spec, app })
    }
}

/// The sandbox a job's tasks run in.
pub fn sandbox_config(spec: &JobSpec, cache_dir: Option<PathBuf>) -> SandboxConfig {
    SandboxConfig {
        memory_limit: spec.memory_limit.min(usize::MAX as u64) as usize,
        attempt_timeout: spec.attempt_timeout,
        grants: spec.grants,
        cache_dir,
        ..SandboxConfig::default()
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
