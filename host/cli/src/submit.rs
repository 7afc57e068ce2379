//! `mr submit`: runs a job on a coordinator's workers and waits for it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use mr_core::ids::{JobId, TaskId};
use mr_core::job::{AppRef, InputFile, JobSpec};
use mr_core::rpc::{context, Chunk, CoordinatorClient, JobDetail, JobState, RpcError, APP_CHUNK};
use mr_runtime::{Sandbox, SandboxConfig, SandboxEngine};
use mr_worker::local::{Observer, Phase};

use crate::client::{answer, interrupted, runtime, CoordinatorArg, CALL};
use crate::job_args::{CacheArgs, JobArgs};
use crate::progress::{success_line, Bars};

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
        self.job.check()?;
        let output = std::path::absolute(&self.job.output)
            .with_context(|| format!("bad output directory {}", self.job.output.display()))?;
        let mut inputs = Vec::new();
        for name in &self.inputs {
            let bytes = mr_core::output::check_input(name, &output, self.job.force)?;
            let path = std::path::absolute(name).with_context(|| format!("bad input {name}"))?;
            inputs.push(InputFile {
                name: name.clone(),
                path,
                bytes,
            });
        }
        // Check the app here, where the user is: a file that is not a
        // component, or not of our world, is refused before anything runs.
        let engine = SandboxEngine::new()?;
        let config = SandboxConfig {
            grants: self.job.grants(),
            cache_dir: self.cache.resolve(),
            ..SandboxConfig::default()
        };
        let sandbox = Sandbox::load(&engine, &self.app, config)?;
        let bytes = std::fs::read(&self.app)
            .with_context(|| format!("cannot read app {}", self.app.display()))?;
        let app = AppRef {
            name: self.app.display().to_string(),
            sha256: sandbox.sha256().to_string(),
            size: bytes.len() as u64,
        };
        drop(sandbox);
        let j = &self.job;
        let spec = JobSpec {
            app,
            inputs,
            reduces: j.reduces,
            output: output.clone(),
            force: j.force,
            split_size: j.split_size,
            sort_buffer: j.sort_buffer,
            max_attempts: j.max_attempts,
            memory_limit: j.memory_limit,
            time_limit: j.task_timeout,
            grants: j.grants(),
        };
        runtime()?.block_on(self.submit(spec, bytes))
    }

    async fn submit(&self, spec: JobSpec, bytes: Vec<u8>) -> anyhow::Result<()> {
        let addr = &self.coordinator.coordinator;
        let client = self.coordinator.connect(Duration::from_secs(5)).await?;
        upload(&client, addr, &spec.app, &bytes).await?;
        let output = spec.output.clone();
        let job = answer(addr, client.submit(context(CALL), spec).await)
            .context("the coordinator refused the job")?;
        if self.detach {
            println!("{job}");
            return Ok(());
        }
        if !self.quiet {
            eprintln!("submitted {job} to {addr}; Ctrl-C cancels it");
        }
        let bars = Bars::new(self.quiet);
        let waited = tokio::select! {
            r = self.wait(client, &job, &bars) => r,
            _ = interrupted() => {
                bars.finish();
                let client = self.coordinator.connect(Duration::from_secs(2)).await?;
                let s = answer(addr, client.cancel(context(CALL), job.clone()).await)?;
                match s.state {
                    JobState::Cancelled => eprintln!(
                        "interrupted: job {job} was cancelled; no output was committed"
                    ),
                    JobState::Succeeded | JobState::Committing => eprintln!(
                        "interrupted too late to cancel: job {job} has committed (or is committing) its output in {}",
                        output.display()
                    ),
                    state => eprintln!("interrupted: job {job} had already {state}"),
                }
                std::process::exit(130);
            }
        };
        bars.finish();
        let detail = waited?;
        let report = detail.report()?;
        let s = &detail.summary;
        match s.state {
            JobState::Succeeded => {
                use std::io::Write;
                writeln!(std::io::stdout(), "{}", success_line(&report, &output))?;
                Ok(())
            }
            state => anyhow::bail!(
                "job {job} {state}: {}\nits report is in {}/_FAILED",
                s.error.as_deref().unwrap_or("(no reason given)"),
                output.display()
            ),
        }
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

    /// Polls the job until it is over, showing progress and failures.
    async fn wait(
        &self,
        mut client: CoordinatorClient,
        job: &JobId,
        bars: &Bars,
    ) -> anyhow::Result<JobDetail> {
        let addr = &self.coordinator.coordinator;
        let mut seen: HashSet<(TaskId, u32)> = HashSet::new();
        let (mut map_bar, mut reduce_bar) = (false, false);
        let mut last_line = String::new();
        let mut failures_shown = 0;
        loop {
            let lost = |e: RpcError| {
                match e {
                RpcError::UnknownJob(_) => anyhow::anyhow!(
                    "the coordinator at {addr} no longer knows job {job}: it restarted without --state-dir, so the job is lost; submit it again"
                ),
                e => e.into(),
            }
            };
            let s = match client.summary(context(CALL), job.clone()).await {
                Ok(r) => r.map_err(lost)?,
                Err(e) => {
                    client = self.reconnect(bars, e).await?;
                    continue;
                }
            };
            if !map_bar {
                bars.phase_started(Phase::Map, s.maps as usize);
                map_bar = true;
            }
            bars.task_done(Phase::Map, s.maps_done as usize, s.maps as usize);
            if s.maps_done == s.maps && !reduce_bar {
                bars.phase_started(Phase::Reduce, s.reduces as usize);
                reduce_bar = true;
            }
            if reduce_bar {
                bars.task_done(Phase::Reduce, s.reduces_done as usize, s.reduces as usize);
            }
            if bars.hidden() && !self.quiet {
                let line = format!(
                    "{job}: {}, map {}/{}, reduce {}/{}, {} failed attempts",
                    s.state, s.maps_done, s.maps, s.reduces_done, s.reduces, s.failed_attempts
                );
                if line != last_line {
                    eprintln!("{line}");
                    last_line = line;
                }
            }
            // The whole report only when there is news in it.
            if s.failed_attempts != failures_shown || s.state.is_final() {
                let detail = match client.job(context(CALL), job.clone()).await {
                    Ok(r) => r.map_err(lost)?,
                    Err(e) => {
                        client = self.reconnect(bars, e).await?;
                        continue;
                    }
                };
                failures_shown = detail.summary.failed_attempts;
                for t in &detail.report()?.tasks {
                    for a in &t.attempts {
                        if let Some(why) = a.outcome.strip_prefix("failed: ") {
                            if seen.insert((t.task, a.attempt)) {
                                let first = why.lines().next().unwrap_or("");
                                bars.line(format!(
                                    "{} attempt {} failed on worker {}: {first}",
                                    t.task, a.attempt, a.worker
                                ));
                            }
                        }
                    }
                }
                if detail.summary.state.is_final() {
                    return Ok(detail);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Uploads the app unless the coordinator has it already.
async fn upload(
    client: &CoordinatorClient,
    addr: &str,
    app: &AppRef,
    bytes: &[u8],
) -> anyhow::Result<()> {
    if answer(
        addr,
        client.has_app(context(CALL), app.sha256.clone()).await,
    )? {
        tracing::debug!("the coordinator has the app already");
        return Ok(());
    }
    let mut offset = 0;
    for chunk in bytes.chunks(APP_CHUNK) {
        let done = answer(
            addr,
            client
                .upload_app(context(CALL), app.clone(), offset, Chunk(chunk.to_vec()))
                .await,
        )
        .context("cannot upload the app")?;
        offset += chunk.len() as u64;
        if done {
            break;
        }
    }
    Ok(())
}
