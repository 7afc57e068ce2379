//! The event loop that owns the [`State`], and the RPC adapter around it.
//!
//! ```text
//!  tarpc handlers ──closure──▶ mpsc ──▶ event loop: run it on the State, carry out its
//!   (one task per call)                  Actions (journal, commits, wake-ups), then reply
//!        ▲                                    │ a tick every 250 ms: timeouts
//!        └────────────── reply ◀──────────────┘
//! ```
//!
//! Handlers hold no state of their own: they validate, do slow file work
//! (locking an output directory, storing an app) outside the loop, and send
//! the loop a closure. Slow actions (moving a job's output into place) run
//! on blocking threads and report back to the loop as closures too.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mr_core::ids::{JobId, WorkerId};
use mr_core::job::{AppRef, JobSpec};
use mr_core::output::{OutputDir, OutputError};
use mr_core::rpc::{
    Assignment, AttemptResult, Chunk, Coordinator, HeartbeatReply, JobDetail, JobSummary, Postcard,
    Register, Registered, RpcError, RunningAttempt, LONG_POLL, MAX_FRAME, PROTOCOL_VERSION,
};
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::apps::AppStore;
use crate::journal::{Journal, JournalError};
use crate::state::{Action, Config, Now, State};

/// How often time-based rules (timeouts, shutdown) are checked.
const TICK: Duration = Duration::from_millis(250);

/// How the coordinator runs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Where the journal and the apps are kept; `None`: in memory and a
    /// temporary directory (a restart forgets every job).
    pub state_dir: Option<PathBuf>,
    pub timing: Config,
}

/// Why the coordinator could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

type Reply = Box<dyn FnOnce() + Send>;
type Command = Box<dyn FnOnce(&mut Loop, Now) -> Reply + Send>;

/// What the handlers share.
struct Shared {
    tx: mpsc::UnboundedSender<Command>,
    /// Notified when there may be new work for long-polling workers.
    work: Notify,
    apps: AppStore,
}

impl Shared {
    /// Runs `f` on the event loop and returns its result once the loop
    /// has carried out the resulting actions (so journal lines are written
    /// before the caller hears back).
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Loop, Now) -> R + Send + 'static,
    ) -> Result<R, RpcError> {
        let (tx, rx) = oneshot::channel();
        let cmd: Command = Box::new(move |lp, now| {
            let r = f(lp, now);
            Box::new(move || {
                let _ = tx.send(r);
            })
        });
        let stopping = || RpcError::Internal("the coordinator is stopping".into());
        self.tx.send(cmd).map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }

    /// Like [`Shared::call`] on the state alone.
    async fn state<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State, Now) -> R + Send + 'static,
    ) -> Result<R, RpcError> {
        self.call(move |lp, now| f(&mut lp.state, now)).await
    }
}

/// The event loop's data.
struct Loop {
    state: State,
    journal: Journal,
    /// Locked output directories of unfinished jobs.
    outputs: HashMap<JobId, OutputDir>,
    shared: Arc<Shared>,
    exit: bool,
}

impl Loop {
    fn run_actions(&mut self, now: Now) {
        loop {
            let actions = self.state.drain_actions();
            if actions.is_empty() {
                return;
            }
            for a in actions {
                self.act(now, a);
            }
        }
    }

    fn act(&mut self, now: Now, action: Action) {
        match action {
            Action::Journal(r) => {
                if let Err(e) = self.journal.append(&r) {
                    tracing::error!(
                        "cannot write the journal {}: {e}; a restart would forget this change",
                        self.journal.path().display()
                    );
                }
            }
            Action::CommitTask { job, from, to } => {
                if let Err(e) = std::fs::rename(&from, &to) {
                    let msg = format!("cannot commit {} to {}: {e}", from.display(), to.display());
                    self.state.fail_job(now, &job, msg);
                }
            }
            Action::Discard(path) => {
                let _ = std::fs::remove_file(path);
            }
            Action::CommitJob {
                job,
                work,
                reduces,
                mut report,
            } => {
                let Some(out) = self.outputs.remove(&job) else {
                    let msg = "its output directory is not locked by this coordinator".to_string();
                    self.state.job_committed(now, &job, Err(msg));
                    return;
                };
                let tx = self.shared.tx.clone();
                tokio::task::spawn_blocking(move || {
                    let mut result = out.commit(&work, reduces, &mut report);
                    if let Err(e) = &result {
                        report.status = "failed".into();
                        report.error = Some(format!("cannot commit the output: {e}"));
                        if let Err(e2) = out.fail(&report) {
                            tracing::warn!("cannot write _FAILED: {e2}");
                        }
                    }
                    drop(out);
                    if result.is_ok() {
                        tracing::info!(%job, "output committed");
                    }
                    let result = std::mem::replace(&mut result, Ok(())).map_err(|e| e.to_string());
                    let _ = tx.send(Box::new(move |lp: &mut Loop, now| {
                        lp.state.job_committed(now, &job, result);
                        Box::new(|| {}) as Reply
                    }));
                });
            }
            Action::AbortJob { job, report } => {
                if let Some(out) = self.outputs.remove(&job) {
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = out.fail(&report) {
                            tracing::warn!(%job, "cannot write _FAILED: {e}");
                        }
                    });
                }
            }
            Action::WorkAvailable => self.shared.work.notify_waiters(),
            Action::Exit => self.exit = true,
        }
    }

    /// On the way out: jobs that will resume (with a journal) keep their
    /// `_temporary`; without a journal they are lost, and say so.
    fn stop(&mut self) {
        let resumable = self.journal.path() != std::path::Path::new("");
        for (job, out) in self.outputs.drain() {
            if resumable {
                tracing::info!(%job, "job left to resume when the coordinator restarts");
                out.keep();
            } else if let Ok((_, mut report)) = self.state.detail(&job) {
                report.status = "failed".into();
                report.error = Some(
                    "the coordinator stopped, and without --state-dir it cannot resume jobs".into(),
                );
                let _ = out.fail(&report);
            }
        }
    }
}

/// Runs the coordinator on `listener` until `shutdown` completes or a
/// client's `mr shutdown` has sent every worker away.
///
/// Fails if the state directory cannot be used.
pub async fn serve(
    listener: TcpListener,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let now = Now::real();
    let (journal, records) = match &options.state_dir {
        Some(dir) => Journal::open(dir)?,
        None => (Journal::none(), Vec::new()),
    };
    let recovered = !records.is_empty();
    let mut state = if recovered {
        State::recover(options.timing.clone(), records, now)
    } else {
        State::new(options.timing.clone())
    };
    let apps = AppStore::open(options.state_dir.as_deref()).map_err(|source| ServeError::Io {
        what: "cannot create the app store".into(),
        source,
    })?;
    let mut outputs = HashMap::new();
    for (job, output) in state.unfinished_jobs() {
        match OutputDir::reclaim(&output).and_then(|o| o.work_dir(&job.0).map(|_| o)) {
            Ok(o) => {
                tracing::info!(%job, "resuming job");
                outputs.insert(job, o);
            }
            Err(e) => state.fail_job(
                now,
                &job,
                format!("after the coordinator restarted, its output directory could not be reclaimed: {e}"),
            ),
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
    let shared = Arc::new(Shared {
        tx,
        work: Notify::new(),
        apps,
    });
    let mut lp = Loop {
        state,
        journal,
        outputs,
        shared: shared.clone(),
        exit: false,
    };
    lp.run_actions(now);
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        recovered,
        "coordinator listening"
    );

    let event_loop = async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now;
            let mut reply: Option<Reply> = None;
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    now = Now::real();
                    reply = Some(cmd(&mut lp, now));
                }
                _ = tick.tick() => {
                    now = Now::real();
                    lp.state.tick(now);
                }
            }
            lp.run_actions(now);
            if let Some(r) = reply {
                r();
            }
            if lp.exit {
                break;
            }
        }
        lp
    };
    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let framed = tarpc::tokio_util::codec::LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_framed(stream);
            let transport = tarpc::serde_transport::new(framed, Postcard::default());
            let server = Server {
                shared: shared.clone(),
            };
            tracing::debug!(%peer, "connection");
            tokio::spawn(
                BaseChannel::with_defaults(transport)
                    .execute(server.serve())
                    .for_each(|call| async {
                        tokio::spawn(call);
                    }),
            );
        }
    };
    let event_loop = tokio::spawn(event_loop);
    let abort = event_loop.abort_handle();
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {
            tracing::info!("stopping");
        }
        lp = event_loop => {
            if let Ok(mut lp) = lp {
                lp.stop();
            }
            tracing::info!("every worker has left; coordinator exits");
            return Ok(());
        }
    }
    // Stopped from outside: take the loop back, let it release the jobs.
    let _ = shared
        .call(|lp, _| {
            lp.stop();
        })
        .await;
    abort.abort();
    Ok(())
}

/// The RPC adapter: one per connection, cheap to clone.
#[derive(Clone)]
struct Server {
    shared: Arc<Shared>,
}

fn blocking_failed(e: tokio::task::JoinError) -> RpcError {
    RpcError::Internal(format!("a coordinator task failed: {e}"))
}

impl Coordinator for Server {
    async fn register(
        self,
        _: tarpc::context::Context,
        req: Register,
    ) -> Result<Registered, RpcError> {
        self.shared
            .state(move |s, now| s.register(now, req))
            .await?
    }

    async fn heartbeat(
        self,
        _: tarpc::context::Context,
        worker: WorkerId,
        running: Vec<RunningAttempt>,
    ) -> Result<HeartbeatReply, RpcError> {
        self.shared
            .state(move |s, now| s.heartbeat(now, &worker, running))
            .await?
    }

    async fn request_tasks(
        self,
        _: tarpc::context::Context,
        worker: WorkerId,
        free_slots: Vec<u32>,
    ) -> Result<Vec<Assignment>, RpcError> {
        let deadline = Instant::now() + LONG_POLL;
        loop {
            // Listen before looking, so a wake-up in between is not missed.
            let notified = self.shared.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (w, slots) = (worker.clone(), free_slots.clone());
            let got = self
                .shared
                .state(move |s, now| s.request_tasks(now, &w, slots))
                .await??;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    async fn report(
        self,
        _: tarpc::context::Context,
        worker: WorkerId,
        result: AttemptResult,
    ) -> Result<(), RpcError> {
        self.shared
            .state(move |s, now| s.report(now, &worker, result))
            .await?
    }

    async fn goodbye(self, _: tarpc::context::Context, worker: WorkerId) -> Result<(), RpcError> {
        self.shared
            .state(move |s, now| s.goodbye(now, &worker))
            .await
    }

    async fn fetch_app(
        self,
        _: tarpc::context::Context,
        sha256: String,
        offset: u64,
    ) -> Result<Chunk, RpcError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.apps.read(&sha256, offset))
            .await
            .map_err(blocking_failed)?
    }

    async fn hello(self, _: tarpc::context::Context, version: u32) -> Result<String, RpcError> {
        if version != PROTOCOL_VERSION {
            return Err(RpcError::Refused(format!(
                "this coordinator speaks mr protocol version {PROTOCOL_VERSION}, this client version {version}; use the same mr release for both"
            )));
        }
        let (workers, jobs) = self
            .shared
            .state(|s, _| (s.workers().len(), s.summaries().len()))
            .await?;
        Ok(format!(
            "mr coordinator {} (protocol {PROTOCOL_VERSION}): {workers} workers, {jobs} jobs",
            env!("CARGO_PKG_VERSION")
        ))
    }

    async fn upload_app(
        self,
        _: tarpc::context::Context,
        app: AppRef,
        offset: u64,
        chunk: Chunk,
    ) -> Result<bool, RpcError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.apps.upload(&app, offset, &chunk.0))
            .await
            .map_err(blocking_failed)?
    }

    async fn has_app(self, _: tarpc::context::Context, sha256: String) -> Result<bool, RpcError> {
        Ok(self.shared.apps.has(&sha256))
    }

    async fn submit(self, _: tarpc::context::Context, spec: JobSpec) -> Result<JobId, RpcError> {
        if !self.shared.apps.has(&spec.app.sha256) {
            return Err(RpcError::Invalid(format!(
                "the coordinator does not have the app {} ({}); upload it first",
                spec.app.name, spec.app.sha256
            )));
        }
        let (output, force) = (spec.output.clone(), spec.force);
        let out = tokio::task::spawn_blocking(move || OutputDir::acquire(&output, force))
            .await
            .map_err(blocking_failed)?
            .map_err(|e| match e {
                OutputError::Invalid(m) => RpcError::Invalid(m),
                e @ OutputError::Io { .. } => RpcError::Invalid(format!("{e}")),
            })?;
        self.shared
            .call(move |lp, now| {
                let job = lp.state.submit(now, spec)?;
                match out.work_dir(&job.0) {
                    Ok(_) => {
                        lp.outputs.insert(job.clone(), out);
                        Ok(job)
                    }
                    Err(e) => {
                        lp.outputs.insert(job.clone(), out);
                        lp.state.fail_job(now, &job, e.to_string());
                        Err(RpcError::Invalid(e.to_string()))
                    }
                }
            })
            .await?
    }

    async fn jobs(self, _: tarpc::context::Context) -> Result<Vec<JobSummary>, RpcError> {
        self.shared.state(|s, _| s.summaries()).await
    }

    async fn summary(self, _: tarpc::context::Context, job: JobId) -> Result<JobSummary, RpcError> {
        self.shared.state(move |s, _| s.summary(&job)).await?
    }

    async fn job(self, _: tarpc::context::Context, job: JobId) -> Result<JobDetail, RpcError> {
        let (summary, report) = self.shared.state(move |s, _| s.detail(&job)).await??;
        Ok(JobDetail {
            summary,
            report_json: serde_json::to_string(&report).expect("a report serializes"),
        })
    }

    async fn cancel(self, _: tarpc::context::Context, job: JobId) -> Result<JobSummary, RpcError> {
        self.shared.state(move |s, now| s.cancel(now, &job)).await?
    }

    async fn shutdown(self, _: tarpc::context::Context) -> Result<(), RpcError> {
        self.shared.state(|s, now| s.shutdown(now)).await?
    }
}
