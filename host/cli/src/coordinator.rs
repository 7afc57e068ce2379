//! `mr coordinator`: the long-running service that accepts jobs and hands
//! their tasks to workers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use mr_coordinator::state::Config;
use mr_coordinator::Options;
use mr_core::tls::TokenKind;

use crate::client::{interrupted, runtime, DEFAULT_ADDR};

/// Run the coordinator: accept jobs from `mr submit`, hand their tasks to
/// workers (`mr worker`), re-assign what stalls, commit the output.
///
/// Prints `mr coordinator listening on ADDR` on stdout once it listens.
/// Ctrl-C stops it; unfinished jobs resume when it is started again with
/// the same state directory, and workers rejoin by themselves. `mr
/// shutdown` stops it and every worker.
///
/// Secure by default: on first start it makes a cluster CA and two tokens
/// in its state directory, `worker.token` (for `mr worker`) and
/// `client.token` (for `mr submit/status/cancel/shutdown`); every
/// connection is TLS, and workers get certificates bound to their ids.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to listen on (port 0: any free port, printed on start).
    #[arg(long, default_value = DEFAULT_ADDR)]
    listen: String,

    /// Keep the cluster CA, the tokens, the journal of jobs and the apps
    /// here (private to this user), so that a restarted coordinator
    /// resumes unfinished jobs [default: $XDG_STATE_HOME/mr, else
    /// ~/.local/state/mr].
    #[arg(long)]
    state_dir: Option<PathBuf>,

    /// Jobs may read inputs and write outputs only under this directory,
    /// or object prefix (s3://bucket/prefix/) (repeatable); any other
    /// path, after `..` and symlinks are resolved, or object is refused at
    /// submit. Without it every job is refused.
    #[arg(long = "data-root", value_name = "DIR|s3://BUCKET/PREFIX/")]
    data_roots: Vec<String>,

    /// No TLS, no tokens, no certificates: anyone who reaches the port can
    /// submit jobs, join as a worker, and read map output. Only for a
    /// trusted lab network.
    #[arg(long)]
    insecure: bool,

    /// Write new tokens at start: the old ones stop working (workers and
    /// clients need the new files).
    #[arg(long, conflicts_with = "insecure")]
    rotate_tokens: bool,

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

    /// Serve a web page of the cluster (jobs, each job's pipeline and
    /// timeline, workers) and Prometheus metrics (/metrics) here, e.g.
    /// 127.0.0.1:8080 (port 0: any free port). Over TLS with a
    /// certificate of the cluster CA (ca.crt in the state directory)
    /// and behind the client token: the page's URL, with the token, is
    /// logged once at start; scripts and Prometheus send
    /// `Authorization: Bearer <client token>`.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,

    /// A host name or address browsers use to reach --http, for its
    /// certificate (repeatable; this machine's host name, localhost and
    /// the loopback addresses are always in it).
    #[arg(long = "http-name", value_name = "NAME", requires = "http")]
    http_names: Vec<String>,

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
        let state_dir = match self.state_dir {
            Some(d) => d,
            None => mr_core::tls::default_state_dir().context(
                "there is no default state directory (neither XDG_STATE_HOME nor HOME is set); pass --state-dir",
            )?,
        };
        // The first thing said: where the state (and the tokens) are.
        if self.insecure {
            tracing::info!("state directory {}", state_dir.display());
        } else {
            tracing::info!(
                "state directory {} (its worker.token and client.token let workers and clients in)",
                state_dir.display()
            );
        }
        let lock = mr_coordinator::security::lock_state_dir(&state_dir)?;
        let authority = if self.insecure {
            None
        } else {
            Some(Arc::new(mr_coordinator::security::Authority::open(
                &state_dir,
                lock.try_clone()
                    .context("cannot hold the state directory's lock")?,
                self.rotate_tokens,
            )?))
        };
        match &authority {
            Some(_) => tracing::info!(
                "workers join with {}, clients use {}, /metrics takes {} too",
                TokenKind::Worker.file_in(&state_dir).display(),
                TokenKind::Client.file_in(&state_dir).display(),
                TokenKind::Metrics.file_in(&state_dir).display()
            ),
            None => tracing::warn!(
                "INSECURE (--insecure): no TLS, no tokens; anyone who can reach this port can run jobs, join as a worker and read job data"
            ),
        }
        // The state directory holds the CA key and tokens: never a job's,
        // even under a data root.
        let data_roots = mr_core::roots::DataRoots::resolve(&self.data_roots)
            .map_err(anyhow::Error::msg)?
            .excluding(std::slice::from_ref(&state_dir));
        if data_roots.is_empty() {
            tracing::warn!("no --data-root: every job will be refused; name the directories jobs may read and write with --data-root DIR");
        } else {
            let roots: Vec<String> = data_roots
                .dirs()
                .into_iter()
                .flatten()
                .map(|d| d.display().to_string())
                .chain(data_roots.object_roots().iter().map(|o| o.to_string()))
                .collect();
            tracing::info!("jobs may read and write under {}", roots.join(", "));
        }
        let options = Options {
            state_dir: Some(state_dir),
            timing: Config {
                progress_timeout,
                worker_timeout: self.worker_timeout,
                heartbeat: self.heartbeat,
                ..Config::default()
            },
            authority,
            insecure: self.insecure,
            data_roots: data_roots.clone(),
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
            let mut engine = mr_coordinator::Engine::start(options)?;
            if let Some(http) = &self.http {
                let web = tokio::net::TcpListener::bind(http)
                    .await
                    .with_context(|| format!("cannot listen on {http} (--http)"))?;
                let mut names = self.http_names.clone();
                names.extend(mr_core::hostname());
                names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
                let url = engine.serve_web(web, &names)?;
                // Once, as Jupyter does: the URL holds the client token
                // (the log, not stdout, which scripts read).
                tracing::info!("web page and /metrics at {url}");
                use std::io::Write;
                let bare = url.split('?').next().unwrap_or(&url);
                let mut out = std::io::stdout();
                writeln!(out, "mr coordinator web page at {bare}")?;
                out.flush()?;
            }
            engine.serve(listener, interrupted()).await?;
            drop(lock);
            Ok(())
        })
    }
}
