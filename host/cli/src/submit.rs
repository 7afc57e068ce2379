//! `mr submit`: runs a job on a coordinator's workers and waits for it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use mr_core::rpc::{context, CoordinatorClient, JobState};
use mr_runtime::{Sandbox, SandboxEngine};

use crate::client::{answer, runtime, CoordinatorArg, Interrupts, CALL};
use crate::job_args::{sandbox_config, CacheArgs, Job, JobArgs, JobRequest};
use crate::progress::{Bars, Observer};
use crate::watch::{conclude, upload, Waiter};

/// Run a MapReduce job on a coordinator's workers and wait for it.
///
/// Inputs and the output directory must be paths that every worker (and
/// the coordinator) can read and write: one machine, or a shared mount.
/// The app is checked here, uploaded once (workers fetch it once, by its
/// sha256), and the job queued; progress is shown until the output is
/// final (DIR/_SUCCESS), and the exit status is 0 only then. Ctrl-C
/// cancels the job; --detach leaves it running instead.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The app: a WebAssembly component built for wasm32-wasip2.
    app: PathBuf,

    /// Input text files. Each name is passed to the app exactly as given.
    #[arg(required = true)]
    inputs: Vec<String>,

    #[command(flatten)]
    job: JobArgs,

    #[command(flatten)]
    coordinator: CoordinatorArg,

    /// Print the job id and return at once (see `mr status JOB`).
    #[arg(long)]
    detach: bool,

    /// If the coordinator goes away while the job runs (e.g. it restarts),
    /// keep trying to reach it this long.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    reconnect_for: Duration,

    #[command(flatten)]
    cache: CacheArgs,

    /// No progress bars or progress lines.
    #[arg(short, long)]
    quiet: bool,
}

impl SubmitArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let job = Job::try_from(JobRequest {
            app: &self.app,
            inputs: &self.inputs,
            job: &self.job,
        })?;
        // Check the app here, where the user is: a file that is not a
        // component, or not of our world, is refused before anything runs.
        let engine = SandboxEngine::new()?;
        Sandbox::load(
            &engine,
            &self.app,
            sandbox_config(&job.spec, self.cache.resolve()),
        )?;
        let rt = runtime()?;
        let interrupts = {
            let _in = rt.enter();
            Interrupts::new()?
        };
        rt.block_on(self.submit(job, interrupts))
    }

    async fn submit(&self, job: Job, mut interrupts: Interrupts) -> anyhow::Result<()> {
        let addr = &self.coordinator.coordinator;
        let client = self.coordinator.connect(Duration::from_secs(5)).await?;
        upload(&client, addr, &job.spec.app, &job.app).await?;
        let output = job.spec.output.to_string();
        let id = answer(addr, client.submit(context(CALL), job.spec).await)
            .context("the coordinator refused the job")?;
        if self.detach {
            println!("{id}");
            return Ok(());
        }
        if !self.quiet {
            eprintln!("submitted {id} to {addr}; Ctrl-C cancels it");
        }
        let bars = Bars::new(self.quiet);
        let waiter = Waiter {
            addr,
            status_lines: bars.hidden() && !self.quiet,
        };
        let reconnect = |e| self.reconnect(&bars, e);
        let waited = tokio::select! {
            r = waiter.wait(client, &id, &bars, reconnect) => r,
            code = interrupts.recv() => {
                bars.finish();
                let client = self.coordinator.connect(Duration::from_secs(2)).await?;
                let s = answer(addr, client.cancel(context(CALL), id.clone(), false).await)?;
                match s.state {
                    JobState::Cancelled => eprintln!(
                        "interrupted: job {id} was cancelled; no output was committed"
                    ),
                    JobState::Succeeded | JobState::Committing => eprintln!(
                        "interrupted too late to cancel: job {id} has committed (or is committing) its output in {}",
                        output
                    ),
                    state => eprintln!("interrupted: job {id} had already {state}"),
                }
                std::process::exit(code);
            }
        };
        bars.finish();
        conclude(&waited?, &output)
    }

    /// Connects again after losing the coordinator (it may be restarting).
    async fn reconnect(
        &self,
        bars: &Bars,
        e: tarpc::client::RpcError,
    ) -> anyhow::Result<CoordinatorClient> {
        bars.line(format!(
            "lost the coordinator at {} ({e}); waiting up to {:?} for it to come back",
            self.coordinator.coordinator, self.reconnect_for
        ));
        self.coordinator.connect(self.reconnect_for).await
    }
}
