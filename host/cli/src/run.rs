//! `mr run`: a whole job in this process, on the cluster's own engine
//! (Spark's local mode): the coordinator's state machine and event loop,
//! an in-process worker with `--parallelism` slots running tasks through
//! the same worker code as `mr worker` (in-memory RPC, map output read in
//! place), and the same waiting loop as `mr submit`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use mr_coordinator::state::Config;
use mr_coordinator::{Engine, Options};
use mr_core::rpc::{context, JobState, TaskLimits};
use mr_runtime::{Sandbox, SandboxEngine};
use mr_worker::{Pool, Preloaded, Shuffle, WorkerOptions};

use crate::client::{answer, runtime, Interrupts, CALL};
use crate::job_args::{sandbox_config, CacheArgs, Job, JobArgs, JobRequest};
use crate::progress::{Bars, Hidden};
use crate::watch::{conclude, upload, Waiter};

/// How long, once a job is over, its attempts still running (cancelled)
/// are waited for before the process exits anyway: a guest blocked in a
/// host call cannot be interrupted.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How the wait for a job ended.
enum End {
    Over(anyhow::Result<mr_core::rpc::JobDetail>),
    /// With the exit status to end with.
    Interrupted(anyhow::Result<mr_core::rpc::JobDetail>, i32),
    WorkerStopped(String),
}

/// Run a MapReduce job on this machine, with one sandbox per task.
///
/// One map task per input file, or per split of a file larger than
/// --split-size (splits end at line boundaries). Output goes to
/// DIR/mr-out-0 .. mr-out-<N-1>, one "key value" line per key in byte order
/// of keys; DIR/_SUCCESS (a JSON job report) appears last, only when every
/// output file is complete. A failed job leaves DIR/_FAILED instead. The
/// job runs on the same scheduler as a cluster (retries, timeouts, report),
/// in this process.
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
    parallelism: Option<u32>,

    /// Directory for intermediate (map output) files [default: system temp].
    #[arg(long)]
    tmp_dir: Option<PathBuf>,

    #[command(flatten)]
    cache: CacheArgs,

    /// No progress bars (they are drawn only on a terminal anyway).
    #[arg(short, long)]
    quiet: bool,
}

impl RunArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let parallelism = match self.parallelism {
            Some(0) => anyhow::bail!("--parallelism must be at least 1"),
            Some(p) if p > mr_coordinator::state::MAX_SLOTS => anyhow::bail!(
                "--parallelism must be at most {}",
                mr_coordinator::state::MAX_SLOTS
            ),
            Some(p) => p,
            None => std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
        };
        if let Some(d) = &self.tmp_dir {
            anyhow::ensure!(
                d.is_dir(),
                "--tmp-dir {} is not a directory; create it, or leave the flag out to use the system's",
                d.display()
            );
        }
        let job = Job::try_from(JobRequest {
            app: &self.app,
            inputs: &self.inputs,
            job: &self.job,
        })?;
        let rt = runtime()?;
        // From here on Ctrl-C is ours: it stops the job and cleans up.
        let interrupts = {
            let _in = rt.enter();
            Interrupts::new()?
        };
        let ended = rt.block_on(self.local(job, parallelism, interrupts));
        // Everything the job made in temporary directories goes with the
        // runtime's tasks, before the process ends.
        drop(rt);
        match ended? {
            Some(code) => std::process::exit(code),
            None => Ok(()),
        }
    }

    /// Runs the job; returns the exit status if it was interrupted.
    async fn local(
        &self,
        job: Job,
        parallelism: u32,
        mut interrupts: Interrupts,
    ) -> anyhow::Result<Option<i32>> {
        // Load (and check) the app before anything runs; the worker uses
        // it as it is.
        let sandboxes = SandboxEngine::new()?;
        let config = sandbox_config(&job.spec, self.cache.resolve());
        let (e, app) = (sandboxes.clone(), self.app.clone());
        let loading = tokio::task::spawn_blocking(move || Sandbox::load(&e, &app, config));
        let sandbox = tokio::select! {
            loaded = loading => Arc::new(loaded.context("loading the app failed")??),
            code = interrupts.recv() => {
                eprintln!("interrupted before the job started; nothing was written");
                return Ok(Some(code));
            }
        };
        let engine = Engine::start(Options::in_process(Config::in_process()))?;
        // One in-process worker per sandbox (at least --verify K of them),
        // sharing their map output, so that backups and verification run
        // on distinct workers as in a cluster.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let options = WorkerOptions {
            tmp_dir: self.tmp_dir.clone(),
            shuffle: Shuffle::Shared(Pool::default()),
            cache_dir: self.cache.resolve(),
            engine: Some(sandboxes),
            preloaded: vec![Preloaded {
                sha256: job.spec.app.sha256.clone(),
                limits: TaskLimits::of(&job.spec),
                sandbox,
            }],
            stop_grace: STOP_GRACE,
            ..WorkerOptions::new(engine.connector(), 1)
        };
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..parallelism.max(job.spec.verify) {
            let mut stopped = stopped.clone();
            workers.spawn(mr_worker::run(options.clone(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            }));
        }
        // Over when every worker is, or at the first that fails.
        let mut worker = tokio::spawn(async move {
            while let Some(r) = workers.join_next().await {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(e) => return Err(format!("the worker failed: {e}")),
                }
            }
            Ok(())
        });
        let here = "this process";
        let client = engine.client();
        let output = self.job.output.clone();
        let submitted = match upload(&client, here, &job.spec.app, &job.app).await {
            Ok(()) => answer(here, client.submit(context(CALL), job.spec).await),
            Err(e) => Err(e),
        };
        let id = match submitted {
            Ok(id) => id,
            Err(e) => {
                drop(client);
                let _ = stop.send(true);
                let _ = worker.await;
                engine.stop().await?;
                return Err(e);
            }
        };
        let bars = Bars::new(self.quiet);
        let waiter = Waiter {
            addr: here,
            status_lines: false,
        };
        let never = |e: tarpc::client::RpcError| async move {
            Err(anyhow::anyhow!(
                "lost the in-process coordinator: {e} (a bug)"
            ))
        };
        let end = tokio::select! {
            r = waiter.wait(client.clone(), &id, &bars, never) => End::Over(r),
            code = interrupts.recv() => End::Interrupted(Err(anyhow::anyhow!("interrupted")), code),
            // The worker cannot stop before the job unless it failed (its
            // data directory cannot be made, say): then the job cannot run.
            w = &mut worker => End::WorkerStopped(match w {
                Ok(Err(e)) => e,
                Ok(Ok(())) => "the worker stopped".into(),
                Err(e) => format!("the worker failed: {e}"),
            }),
        };
        bars.finish();
        // From here on, a (further) Ctrl-C does not wait for the clean-up.
        tokio::spawn(async move {
            let code = interrupts.recv().await;
            eprintln!("interrupted: exiting at once, without waiting for the clean-up");
            std::process::exit(code);
        });
        let end = match end {
            End::Interrupted(_, code) => {
                // Stop it now, quietly: nothing is left behind. A job
                // already committing finishes.
                let _ = client.cancel(context(CALL), id.clone(), true).await;
                End::Interrupted(waiter.wait(client.clone(), &id, &Hidden, never).await, code)
            }
            End::WorkerStopped(why) => {
                let _ = client.cancel(context(CALL), id.clone(), true).await;
                let _ = waiter.wait(client.clone(), &id, &Hidden, never).await;
                End::WorkerStopped(why)
            }
            over => over,
        };
        drop(client);
        // The job is over: its attempts still running were cancelled; wait
        // for them a little, then for the engine's last file work.
        let _ = stop.send(true);
        if !matches!(end, End::WorkerStopped(_))
            && tokio::time::timeout(STOP_GRACE * 2, worker).await.is_err()
        {
            tracing::warn!("the worker did not stop in time");
        }
        engine.stop().await?;
        match end {
            End::WorkerStopped(why) => anyhow::bail!("the job cannot run: {why}"),
            End::Interrupted(waited, code) => {
                if waited.is_ok_and(|d| d.summary.state == JobState::Succeeded) {
                    eprintln!(
                        "interrupted after the job had committed its output (see its _SUCCESS)"
                    );
                } else {
                    eprintln!("interrupted: the job was stopped and its temporary files removed; no output was committed");
                }
                Ok(Some(code))
            }
            End::Over(waited) => {
                conclude(&waited?, &output)?;
                Ok(None)
            }
        }
    }
}
