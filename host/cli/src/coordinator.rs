//! `mr coordinator`: the long-running service that accepts jobs and hands
//! their tasks to workers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use mr_coordinator::state::Config;
use mr_coordinator::Options;

use crate::client::{interrupted, runtime, DEFAULT_ADDR};

/// Run the coordinator: accept jobs from `mr submit`, hand their tasks to
/// workers (`mr worker`), re-assign what stalls, commit the output.
///
/// Prints `mr coordinator listening on ADDR` on stdout once it listens.
/// Ctrl-C stops it; with --state-dir, unfinished jobs resume when it is
/// started again with the same directory, and workers rejoin by themselves.
/// `mr shutdown` stops it and every worker.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to listen on (port 0: any free port, printed on start).
    #[arg(long, default_value = DEFAULT_ADDR)]
    listen: String,

    /// Keep jobs and apps here, so that a restarted coordinator resumes
    /// unfinished jobs. Without it, a restart forgets every job.
    #[arg(long)]
    state_dir: Option<PathBuf>,

    /// An attempt that makes no progress for this long (its guest neither
    /// runs nor emits; e.g. it sleeps, or its worker hangs) is given up and
    /// handed to another worker; a job's own --progress-timeout wins.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    progress_timeout: Duration,

    /// The old name of --progress-timeout (deprecated).
    #[arg(long, hide = true, value_parser = humantime::parse_duration, conflicts_with = "progress_timeout")]
    task_timeout: Option<Duration>,

    /// A worker not heard from for this long is declared dead: its tasks
    /// are handed out again and its map output is recomputed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    worker_timeout: Duration,

    /// How often workers heartbeat.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, hide = true)]
    heartbeat: Duration,
}

impl CoordinatorArgs {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.heartbeat < self.worker_timeout,
            "--worker-timeout must be longer than the heartbeat interval ({:?})",
            self.heartbeat
        );
        let progress_timeout = match self.task_timeout {
            Some(t) => {
                eprintln!(
                    "warning: --task-timeout is deprecated: on `mr coordinator` it is now --progress-timeout (no progress for that long); --attempt-timeout of `mr submit` is the guest's wall-time budget"
                );
                t
            }
            None => self.progress_timeout,
        };
        anyhow::ensure!(
            progress_timeout >= self.heartbeat * 2,
            "--progress-timeout must be at least {:?}, twice the heartbeat interval ({:?}): progress arrives with heartbeats",
            self.heartbeat * 2,
            self.heartbeat
        );
        anyhow::ensure!(
            progress_timeout <= mr_core::job::limits::MAX_TIMEOUT
                && self.worker_timeout <= mr_core::job::limits::MAX_TIMEOUT,
            "--progress-timeout and --worker-timeout must be at most 7 days"
        );
        let options = Options {
            state_dir: self.state_dir,
            timing: Config {
                progress_timeout,
                worker_timeout: self.worker_timeout,
                heartbeat: self.heartbeat,
                ..Config::default()
            },
        };
        runtime()?.block_on(async {
            let listener = tokio::net::TcpListener::bind(&self.listen)
                .await
                .with_context(|| format!("cannot listen on {}", self.listen))?;
            let addr = listener.local_addr()?;
            {
                use std::io::Write;
                let mut out = std::io::stdout();
                writeln!(out, "mr coordinator listening on {addr}")?;
                out.flush()?;
            }
            mr_coordinator::serve(listener, options, interrupted()).await?;
            Ok(())
        })
    }
}
