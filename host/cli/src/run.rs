//! `mr run`: a whole job in this process.

use std::path::PathBuf;

use clap::Args;
use mr_runtime::SandboxConfig;
use mr_worker::local::{self, LocalJob};

use crate::job_args::{CacheArgs, JobArgs};
use crate::progress::Bars;

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

    #[command(flatten)]
    job: JobArgs,

    /// Sandboxes running at once [default: number of cores].
    #[arg(short = 'p', long)]
    parallelism: Option<usize>,

    /// Directory for intermediate (map output) files [default: system temp].
    #[arg(long)]
    tmp_dir: Option<PathBuf>,

    #[command(flatten)]
    cache: CacheArgs,

    /// No progress bars (they are drawn only on a terminal anyway).
    #[arg(short, long)]
    quiet: bool,
}

impl TryFrom<RunArgs> for LocalJob {
    type Error = anyhow::Error;

    fn try_from(a: RunArgs) -> anyhow::Result<LocalJob> {
        a.job.check()?;
        let parallelism = match a.parallelism {
            Some(0) => anyhow::bail!("--parallelism must be at least 1"),
            Some(p) => p,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        let j = a.job;
        Ok(LocalJob {
            app: a.app,
            inputs: a.inputs,
            reduces: j.reduces,
            output: j.output.clone(),
            parallelism,
            split_size: j.split_size,
            sort_buffer: j.sort_buffer.min(usize::MAX as u64) as usize,
            max_attempts: j.max_attempts,
            force: j.force,
            tmp_dir: a.tmp_dir,
            sandbox: SandboxConfig {
                memory_limit: j.memory_limit.min(usize::MAX as u64) as usize,
                task_timeout: j.task_timeout,
                grants: j.grants(),
                cache_dir: a.cache.resolve(),
                ..SandboxConfig::default()
            },
        })
    }
}

impl RunArgs {
    pub fn run(self) -> anyhow::Result<()> {
        // Ctrl-C (or SIGTERM): remove the running job's temporary files and
        // exit; nothing partial was committed, so nothing else needs undoing.
        let _ = ctrlc::set_handler(|| {
            if local::interrupt() {
                eprintln!("interrupted after the job had committed its output (see its _SUCCESS)");
            } else {
                eprintln!("interrupted: the job was stopped and its temporary files removed; no output was committed");
            }
            std::process::exit(130);
        });
        let quiet = self.quiet;
        let job = LocalJob::try_from(self)?;
        let bars = Bars::new(quiet);
        let result = local::run(&job, &bars);
        bars.finish();
        let report = result?;
        use std::io::Write;
        writeln!(
            std::io::stdout(),
            "{}",
            crate::progress::success_line(&report, &job.output)
        )?;
        Ok(())
    }
}
