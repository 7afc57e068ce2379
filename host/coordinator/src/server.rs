//! The RPC adapter around the [`Engine`]'s event loop, and its two
//! transports: TCP ([`serve`]) and in process ([`in_process`], for `mr
//! run`). Handlers hold no state of their own: they validate, do slow file
//! work (locking an output directory, storing an app) outside the loop, and
//! hand the loop a closure. Long polls (`request_tasks`, `heartbeat`,
//! `watch`) wait on the engine's notifications, not in the loop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mr_core::ids::{JobId, WorkerId};
use mr_core::job::{AppRef, JobSpec};
use mr_core::output::{OutputDir, OutputError};
use mr_core::rpc::{
    Assignment, AttemptResult, Chunk, Coordinator, CoordinatorClient, Heartbeat, HeartbeatReply,
    JobDetail, JobSummary, Postcard, Register, Registered, RpcError, LONG_POLL, MAX_FRAME,
    PROTOCOL_VERSION,
};
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;

use crate::engine::{Engine, Options, ServeError, Shared};

/// How long `watch` gathers a job's changes before it answers (unless the
/// job ends): at most this many answers a second per watcher.
const WATCH_GATHER: Duration = Duration::from_millis(50);
/// How long `watch` holds a job that is over while its `_FAILED` is being
/// written (clients call with a 30 s deadline).
const SETTLE_WAIT: Duration = Duration::from_secs(20);

/// Serves one connection's calls (a tarpc channel), each on a task of its
/// own. (A macro: tarpc's channel types are unwieldy as bounds.)
macro_rules! spawn_channel {
    ($channel:expr, $shared:expr) => {{
        let server = Server { shared: $shared };
        tokio::spawn($channel.execute(server.serve()).for_each(|call| async {
            tokio::spawn(call);
        }));
    }};
}

/// Runs a coordinator on `listener` until `shutdown` completes or a
/// client's `mr shutdown` has sent every worker away.
///
/// Fails if the state directory cannot be used.
pub async fn serve(
    listener: TcpListener,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let engine = Engine::start(options)?;
    engine.serve(listener, shutdown).await
}

impl Engine {
    /// Serves the RPC service on `listener` until `shutdown` completes or
    /// the event loop exits (`mr shutdown`); then stops.
    ///
    /// Fails if the event loop panicked (a bug).
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        tracing::info!(
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            recovered = self.recovered(),
            "coordinator listening"
        );
        let shared = self.shared.clone();
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
                tracing::debug!(%peer, "connection");
                spawn_channel!(BaseChannel::with_defaults(transport), shared.clone());
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = shutdown => tracing::info!("stopping"),
            ended = self.exited() => {
                ended?;
                tracing::info!("every worker has left; coordinator exits");
            }
        }
        self.stop().await
    }
}

/// A client connected to the engine in this process.
pub(crate) fn in_process(shared: Arc<Shared>) -> CoordinatorClient {
    let (client, server) = tarpc::transport::channel::unbounded();
    spawn_channel!(BaseChannel::with_defaults(server), shared);
    CoordinatorClient::new(tarpc::client::Config::default(), client).spawn()
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
        beat: Heartbeat,
    ) -> Result<HeartbeatReply, RpcError> {
        // Listen before looking, so news in between is not missed.
        let notified = self.shared.news.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let w = worker.clone();
        let reply = self
            .shared
            .state(move |s, now| s.heartbeat(now, &w, beat))
            .await??;
        if reply != HeartbeatReply::default() {
            return Ok(reply);
        }
        // Nothing to say: hold the call until there is, or the interval
        // passes (the worker calls again at once).
        let deadline = Instant::now() + self.shared.heartbeat;
        loop {
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => return Ok(reply),
            }
            notified.set(self.shared.news.notified());
            notified.as_mut().enable();
            let w = worker.clone();
            if let Some(news) = self.shared.state(move |s, _| s.news(&w)).await?? {
                return Ok(news);
            }
        }
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
        // Checked before the output directory is locked (and, with
        // --force, cleared): a job refused leaves it as it was.
        let check = spec.clone();
        self.shared
            .state(move |s, _| s.check_submit(&check))
            .await??;
        if self.shared.apps.size(&spec.app.sha256) != Some(spec.app.size) {
            return Err(RpcError::Invalid(format!(
                "the coordinator does not have the app {} ({}, {} bytes); upload it first",
                spec.app.name, spec.app.sha256, spec.app.size
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
                let made = out.work_dir(&job.0);
                lp.outputs.insert(job.clone(), out);
                match made {
                    Ok(_) => Ok(job),
                    Err(e) => {
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

    async fn watch(
        self,
        _: tarpc::context::Context,
        job: JobId,
        seen: u64,
    ) -> Result<JobSummary, RpcError> {
        // Changes are gathered for a little while (a job of many tiny
        // tasks changes thousands of times a second); its end is told at
        // once.
        let started = Instant::now();
        let (gather, deadline) = (started + WATCH_GATHER, started + LONG_POLL);
        // A job that is over but still writing its `_FAILED` is held past
        // the long poll, up to this.
        let settle_by = started + SETTLE_WAIT;
        loop {
            let notified = self.shared.jobs.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let j = job.clone();
            let (s, settling) = self
                .shared
                .call(move |lp, _| (lp.state.summary(&j), lp.settling.contains(&j)))
                .await?;
            let s = s?;
            let now = Instant::now();
            // A job is told over once its files are in place.
            let over = s.state.is_final() && !settling;
            let news = s.version > seen && !s.state.is_final() && now >= gather;
            let late = if settling {
                now >= settle_by
            } else {
                now >= deadline
            };
            if over || news || late {
                return Ok(s);
            }
            let until = if settling {
                settle_by
            } else if s.version > seen && !s.state.is_final() {
                gather
            } else {
                deadline
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    async fn job(self, _: tarpc::context::Context, job: JobId) -> Result<JobDetail, RpcError> {
        let (summary, report) = self.shared.state(move |s, _| s.detail(&job)).await??;
        Ok(JobDetail {
            summary,
            report_json: serde_json::to_string(&report).expect("a report serializes"),
        })
    }

    async fn cancel(
        self,
        _: tarpc::context::Context,
        job: JobId,
        quiet: bool,
    ) -> Result<JobSummary, RpcError> {
        self.shared
            .state(move |s, now| s.cancel(now, &job, quiet))
            .await?
    }

    async fn shutdown(self, _: tarpc::context::Context) -> Result<(), RpcError> {
        self.shared.state(|s, now| s.shutdown(now)).await?
    }
}
