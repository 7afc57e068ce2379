//! `mr worker`: a long-running worker of a coordinator.
//!
//! ```text
//!  register ──▶ ┌ heartbeat loop: every second, the running attempts and their progress;
//!               │   the reply cancels attempts, forgets finished jobs, or shuts down
//!               ├ request loop: long-polls for one task per free slot; each task runs
//!               │   on a thread of its own in the sandbox, then is reported
//!               └ shuffle server: serves this worker's map output to reducers
//! ```
//!
//! Map output stays under the data directory (`jobs/<job>/`) until the
//! coordinator says the job is over. Apps are fetched from the coordinator
//! once (`apps/<sha256>.wasm`) and compiled once per job configuration (the
//! compiled artifact is also cached on disk by the sandbox).
//!
//! When the coordinator cannot be reached the worker retries with backoff
//! and logs why; after `give_up_after` without success it stops with
//! [`WorkerError::Unreachable`]. A coordinator that forgot the worker (it
//! restarted) is joined again under the worker's old id.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use mr_core::ids::{JobId, TaskId, WorkerId};
use mr_core::job::AppRef;
use mr_core::report::Counters;
use mr_core::rpc::{
    context, Assignment, AttemptKey, AttemptResult, CoordinatorClient, HeartbeatReply, MapLocation,
    Outcome, Register, RpcError, RunningAttempt, TaskLimits, Work, LONG_POLL,
};
use mr_core::runfile::SegmentInfo;
use mr_runtime::{LoadError, Sandbox, SandboxConfig, SandboxEngine, TaskControl};
use tokio::sync::{oneshot, Notify, OnceCell};

use crate::map::MapTask;
use crate::reduce::ReduceTask;
use crate::shuffle::{self, FetchRequest};
use crate::{spawn_task, task_seed, TaskError, WATCHDOG_GRACE};

/// Segments a reduce attempt fetches at once.
const FETCH_PARALLEL: usize = 4;
/// Tries per segment before the reduce attempt reports a fetch failure.
const FETCH_TRIES: u32 = 3;
/// Loaded apps kept for later tasks; beyond this, idle ones are dropped.
const SANDBOXES_KEPT: usize = 8;
/// Longest wait between two tries to reach the coordinator.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The coordinator's address, `host:port`.
    pub coordinator: String,
    /// Tasks run at once.
    pub slots: u32,
    /// Where map output and fetched apps go (default: a temporary
    /// directory, removed on exit).
    pub data_dir: Option<PathBuf>,
    /// Where to serve map output (default: the address this machine uses
    /// to reach the coordinator, any free port).
    pub shuffle_listen: Option<SocketAddr>,
    /// How long to keep trying to reach the coordinator before giving up.
    pub give_up_after: Duration,
    /// Where the sandbox caches compiled apps.
    pub cache_dir: Option<PathBuf>,
    /// The protocol version announced (tests use another to be refused).
    pub protocol_version: u32,
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot reach the coordinator at {addr} (tried for {waited:?}): {last}\nis `mr coordinator` running there, and can this machine reach it?")]
    Unreachable {
        addr: String,
        waited: Duration,
        last: String,
    },
    #[error("the coordinator at {addr} refused this worker: {reason}")]
    Refused { addr: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sandbox(#[from] LoadError),
}

/// Runs a worker until `shutdown` completes, the coordinator tells it to
/// exit, or the coordinator stays unreachable for too long.
///
/// Fails if the coordinator refuses the worker or cannot be reached, or
/// the data directory cannot be used.
pub async fn run(
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let data = DataDir::open(options.data_dir.as_deref())?;
    let engine = SandboxEngine::new()?;
    let local_ip = probe(&options).await?;
    let listen = options
        .shuffle_listen
        .unwrap_or_else(|| SocketAddr::new(local_ip, 0));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| WorkerError::Io {
            what: format!("cannot listen for shuffle requests on {listen}"),
            source,
        })?;
    let shuffle_addr = listener.local_addr().map_err(|source| WorkerError::Io {
        what: "cannot read the shuffle address".into(),
        source,
    })?;
    let worker = Arc::new(Worker {
        register: Register {
            version: options.protocol_version,
            host: hostname(),
            pid: std::process::id(),
            slots: options.slots,
            shuffle_addr,
            previous: None,
        },
        link: tokio::sync::Mutex::new(Link {
            client: None,
            id: None,
            previous: None,
            heartbeat: Duration::from_secs(1),
        }),
        running: Mutex::new(HashMap::new()),
        free: Mutex::new((0..options.slots).collect()),
        freed: Notify::new(),
        stopping: AtomicBool::new(false),
        engine,
        sandboxes: Mutex::new(HashMap::new()),
        app_locks: Mutex::new(HashMap::new()),
        jobs_dir: data.jobs(),
        apps_dir: data.apps(),
        options,
    });
    worker.client().await?;
    let shuffle = tokio::spawn(shuffle::serve(listener, data.jobs()));
    let heartbeats = tokio::spawn(worker.clone().heartbeat_loop());
    let requests = tokio::spawn(worker.clone().request_loop());
    let (hb_abort, req_abort) = (heartbeats.abort_handle(), requests.abort_handle());
    let joined = |r: Result<Result<(), WorkerError>, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| {
            Err(WorkerError::Io {
                what: "a worker task failed".into(),
                source: std::io::Error::other(e),
            })
        })
    };
    let result = tokio::select! {
        _ = shutdown => {
            tracing::info!("interrupted: stopping");
            Ok(())
        }
        r = heartbeats => joined(r),
        r = requests => joined(r),
    };
    hb_abort.abort();
    req_abort.abort();
    worker.stop(result.is_ok()).await;
    shuffle.abort();
    drop(data);
    result
}

/// Finds the address this machine uses to reach the coordinator, retrying
/// until it answers or `give_up_after` passes.
async fn probe(options: &WorkerOptions) -> Result<IpAddr, WorkerError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut warned = None::<Instant>;
    loop {
        match tokio::net::TcpStream::connect(&options.coordinator).await {
            Ok(s) => {
                return s
                    .local_addr()
                    .map(|a| a.ip())
                    .map_err(|source| WorkerError::Io {
                        what: "cannot read the local address".into(),
                        source,
                    })
            }
            Err(e) => {
                retry_or_give_up(options, started, &mut backoff, &mut warned, e.to_string()).await?
            }
        }
    }
}

/// Waits before the next try to reach the coordinator (logging why, at
/// most every 10 s), or gives up.
async fn retry_or_give_up(
    options: &WorkerOptions,
    started: Instant,
    backoff: &mut Duration,
    warned: &mut Option<Instant>,
    why: String,
) -> Result<(), WorkerError> {
    if started.elapsed() >= options.give_up_after {
        return Err(WorkerError::Unreachable {
            addr: options.coordinator.clone(),
            waited: options.give_up_after,
            last: why,
        });
    }
    if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(10)) {
        tracing::warn!(
            "cannot reach the coordinator at {}: {why}; retrying (giving up after {:?})",
            options.coordinator,
            options.give_up_after
        );
        *warned = Some(Instant::now());
    }
    let left = options.give_up_after.saturating_sub(started.elapsed());
    tokio::time::sleep((*backoff).min(left)).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The connection to the coordinator and this worker's id there.
struct Link {
    client: Option<CoordinatorClient>,
    id: Option<WorkerId>,
    /// The last id, asked back after the coordinator restarts.
    previous: Option<WorkerId>,
    heartbeat: Duration,
}

struct RunningTask {
    control: TaskControl,
    /// Set while the app is fetched and compiled: that counts as progress.
    preparing: Arc<AtomicBool>,
}

struct Worker {
    options: WorkerOptions,
    register: Register,
    link: tokio::sync::Mutex<Link>,
    running: Mutex<HashMap<AttemptKey, RunningTask>>,
    free: Mutex<BTreeSet<u32>>,
    freed: Notify,
    stopping: AtomicBool,
    engine: SandboxEngine,
    /// Loaded apps, by app and limits.
    sandboxes: Mutex<HashMap<String, Arc<OnceCell<Arc<Sandbox>>>>>,
    /// One fetch of an app at a time.
    app_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    jobs_dir: PathBuf,
    apps_dir: PathBuf,
}

type Call<T> = Result<Result<T, RpcError>, tarpc::client::RpcError>;

impl Worker {
    /// The connection and id, connecting and registering as needed.
    async fn client(&self) -> Result<(CoordinatorClient, WorkerId), WorkerError> {
        let mut link = self.link.lock().await;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut warned = None;
        loop {
            if let (Some(c), Some(id)) = (&link.client, &link.id) {
                return Ok((c.clone(), id.clone()));
            }
            if link.client.is_none() {
                match mr_core::rpc::connect(&self.options.coordinator).await {
                    Ok(c) => link.client = Some(c),
                    Err(e) => {
                        let why = e.to_string();
                        retry_or_give_up(&self.options, started, &mut backoff, &mut warned, why)
                            .await?;
                        continue;
                    }
                }
            }
            let client = link.client.clone().expect("connected above");
            let req = Register {
                previous: link.previous.clone(),
                ..self.register.clone()
            };
            match client.register(context(Duration::from_secs(10)), req).await {
                Ok(Ok(r)) => {
                    tracing::info!(worker = %r.worker, coordinator = %self.options.coordinator, shuffle = %self.register.shuffle_addr, slots = self.options.slots, "registered");
                    link.previous = Some(r.worker.clone());
                    link.id = Some(r.worker);
                    link.heartbeat = r.heartbeat;
                }
                Ok(Err(e)) => {
                    return Err(WorkerError::Refused {
                        addr: self.options.coordinator.clone(),
                        reason: e.to_string(),
                    })
                }
                Err(e) => {
                    link.client = None;
                    let why = format!("registration failed: {e}");
                    retry_or_give_up(&self.options, started, &mut backoff, &mut warned, why)
                        .await?;
                }
            }
        }
    }

    /// Calls the coordinator, reconnecting (and registering again if the
    /// coordinator forgot this worker) as long as the give-up time allows.
    async fn rpc<T, Fut>(
        &self,
        timeout: Duration,
        call: impl Fn(CoordinatorClient, tarpc::context::Context, WorkerId) -> Fut,
    ) -> Result<Result<T, RpcError>, WorkerError>
    where
        Fut: Future<Output = Call<T>>,
    {
        loop {
            let (client, id) = self.client().await?;
            match call(client, context(timeout), id.clone()).await {
                Ok(Err(RpcError::UnknownWorker)) => {
                    tracing::warn!(worker = %id, "the coordinator no longer knows this worker (it restarted?); registering again");
                    let mut link = self.link.lock().await;
                    if link.id.as_ref() == Some(&id) {
                        link.id = None;
                    }
                }
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(
                        "lost the coordinator at {} ({e}); reconnecting",
                        self.options.coordinator
                    );
                    let mut link = self.link.lock().await;
                    link.client = None;
                }
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    async fn heartbeat_loop(self: Arc<Self>) -> Result<(), WorkerError> {
        loop {
            let interval = self.link.lock().await.heartbeat;
            tokio::time::sleep(interval).await;
            let running: Vec<RunningAttempt> = self
                .running
                .lock()
                .expect("running lock")
                .iter()
                .map(|(key, t)| {
                    if t.preparing.load(Ordering::SeqCst) {
                        t.control.bump();
                    }
                    RunningAttempt {
                        key: key.clone(),
                        progress: t.control.progress(),
                    }
                })
                .collect();
            let reply = self
                .rpc(Duration::from_secs(5), |c, ctx, id| {
                    let running = running.clone();
                    async move { c.heartbeat(ctx, id, running).await }
                })
                .await?;
            match reply {
                Ok(r) => {
                    if self.apply(r) {
                        tracing::info!("the coordinator asked this worker to shut down");
                        return Ok(());
                    }
                }
                Err(e) => tracing::warn!("heartbeat refused: {e}"),
            }
        }
    }

    /// Carries out a heartbeat reply; returns whether to shut down.
    fn apply(&self, reply: HeartbeatReply) -> bool {
        {
            let running = self.running.lock().expect("running lock");
            for key in &reply.cancel {
                if let Some(t) = running.get(key) {
                    tracing::info!(%key, "cancelling attempt (the coordinator no longer wants it)");
                    t.control.cancel();
                }
            }
        }
        for job in reply.forget_jobs {
            if !job.is_valid() {
                continue;
            }
            let dir = self.jobs_dir.join(&job.0);
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::debug!(%job, "removed the job's map output"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
            });
        }
        reply.shutdown
    }

    async fn request_loop(self: Arc<Self>) -> Result<(), WorkerError> {
        loop {
            if self.stopping() {
                return Ok(());
            }
            let free: Vec<u32> = self
                .free
                .lock()
                .expect("free lock")
                .iter()
                .copied()
                .collect();
            if free.is_empty() {
                let notified = self.freed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.free.lock().expect("free lock").is_empty() {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                continue;
            }
            let got = self
                .rpc(LONG_POLL + Duration::from_secs(30), |c, ctx, id| {
                    let free = free.clone();
                    async move { c.request_tasks(ctx, id, free).await }
                })
                .await?;
            match got {
                Ok(assignments) => {
                    for a in assignments {
                        self.free.lock().expect("free lock").remove(&a.slot);
                        tokio::spawn(self.clone().run_attempt(a));
                    }
                }
                Err(e) => {
                    tracing::warn!("the coordinator refused to hand out work: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn run_attempt(self: Arc<Self>, a: Assignment) {
        let control = TaskControl::default();
        let preparing = Arc::new(AtomicBool::new(true));
        self.running.lock().expect("running lock").insert(
            a.key.clone(),
            RunningTask {
                control: control.clone(),
                preparing: preparing.clone(),
            },
        );
        tracing::info!(key = %a.key, slot = a.slot, "attempt started");
        let started = Instant::now();
        let (outcome, counters) = if self.stopping() {
            (Outcome::Cancelled, Counters::default())
        } else {
            self.execute(&a, &control, &preparing).await
        };
        self.running.lock().expect("running lock").remove(&a.key);
        match &outcome {
            Outcome::Failed { message, .. } => {
                let first = message.lines().next().unwrap_or("");
                tracing::warn!(key = %a.key, "attempt failed: {first}")
            }
            Outcome::FetchFailed { map, message, .. } => {
                tracing::warn!(key = %a.key, "cannot fetch map-{map}'s output: {message}")
            }
            o => {
                tracing::info!(key = %a.key, ms = started.elapsed().as_millis() as u64, outcome = ?std::mem::discriminant(o), "attempt ended")
            }
        }
        let result = AttemptResult {
            key: a.key.clone(),
            outcome,
            counters,
        };
        let sent = self
            .rpc(Duration::from_secs(30), |c, ctx, id| {
                let result = result.clone();
                async move { c.report(ctx, id, result).await }
            })
            .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(key = %a.key, "the coordinator refused the report: {e}"),
            Err(e) => tracing::warn!(key = %a.key, "cannot report: {e}"),
        }
        self.free.lock().expect("free lock").insert(a.slot);
        self.freed.notify_waiters();
    }

    async fn execute(
        &self,
        a: &Assignment,
        control: &TaskControl,
        preparing: &AtomicBool,
    ) -> (Outcome, Counters) {
        let grants = a.limits.grants;
        let failed = |e: TaskError| {
            if control.is_cancelled() {
                Outcome::Cancelled
            } else {
                Outcome::Failed {
                    retryable: e.retryable(grants),
                    message: e.to_string(),
                }
            }
        };
        let sandbox = match self.sandbox(&a.app, &a.limits).await {
            Ok(s) => s,
            Err(message) => {
                return (
                    Outcome::Failed {
                        message,
                        retryable: true,
                    },
                    Counters::default(),
                )
            }
        };
        let job_dir = self.jobs_dir.join(&a.key.job.0);
        if let Err(e) = std::fs::create_dir_all(&job_dir) {
            let e = TaskError::Io {
                what: format!("cannot create {}", job_dir.display()),
                source: e,
            };
            return (failed(e), Counters::default());
        }
        let seed = task_seed(&a.key.task);
        let limit = a.limits.time_limit;
        let name = a.key.task.to_string();
        match (&a.work, a.key.task) {
            (Work::Map { split }, TaskId::Map(index)) => {
                let task = MapTask {
                    index,
                    split: split.clone(),
                    reduces: a.limits.reduces,
                    dir: job_dir,
                    sort_buffer: a.limits.sort_buffer.min(usize::MAX as u64) as usize,
                    seed,
                };
                preparing.store(false, Ordering::SeqCst);
                let (attempt, c) = (a.key.attempt, control.clone());
                let run = move || crate::map::run(&sandbox, &task, attempt, &c);
                match on_thread(name, limit, control, run).await {
                    Ok(out) => (
                        Outcome::MapDone {
                            segments: out.segments,
                        },
                        out.counters,
                    ),
                    Err(e) => (failed(e), Counters::default()),
                }
            }
            (
                Work::Reduce {
                    partition,
                    inputs,
                    output,
                },
                TaskId::Reduce(_),
            ) => {
                let dir = job_dir.join(format!("reduce-{partition}-a{}", a.key.attempt));
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    let e = TaskError::Io {
                        what: format!("cannot create {}", dir.display()),
                        source: e,
                    };
                    return (failed(e), Counters::default());
                }
                preparing.store(false, Ordering::SeqCst);
                let fetched = fetch_all(&a.key.job, *partition, inputs, &dir, control).await;
                let outcome = match fetched {
                    Err((map, attempt, message)) => (
                        if control.is_cancelled() {
                            Outcome::Cancelled
                        } else {
                            Outcome::FetchFailed {
                                map,
                                attempt,
                                message,
                            }
                        },
                        Counters::default(),
                    ),
                    Ok(inputs) => {
                        let task = ReduceTask {
                            partition: *partition,
                            inputs,
                            output: output.clone(),
                            seed,
                        };
                        let c = control.clone();
                        let run = move || crate::reduce::run(&sandbox, &task, &c);
                        match on_thread(name, limit, control, run).await {
                            Ok(out) => (Outcome::ReduceDone, out.counters),
                            Err(e) => (failed(e), Counters::default()),
                        }
                    }
                };
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                outcome
            }
            _ => (
                Outcome::Failed {
                    message: "the coordinator sent work that does not fit its task (a bug)".into(),
                    retryable: true,
                },
                Counters::default(),
            ),
        }
    }

    /// The app, loaded for these limits: fetched from the coordinator and
    /// compiled at most once.
    async fn sandbox(&self, app: &AppRef, limits: &TaskLimits) -> Result<Arc<Sandbox>, String> {
        let key = format!(
            "{}/{}/{}/{}",
            app.sha256,
            limits.memory_limit,
            limits.time_limit.as_millis(),
            limits.grants.names().join(",")
        );
        let cell = {
            let mut cache = self.sandboxes.lock().expect("sandboxes lock");
            if cache.len() >= SANDBOXES_KEPT && !cache.contains_key(&key) {
                // Keep apps being loaded or used by a running task.
                cache.retain(|_, cell| cell.get().is_none_or(|s| Arc::strong_count(s) > 1));
            }
            cache.entry(key).or_default().clone()
        };
        cell.get_or_try_init(|| async {
            let path = self.fetch_app(app).await?;
            let config = SandboxConfig {
                memory_limit: limits.memory_limit.min(usize::MAX as u64) as usize,
                task_timeout: limits.time_limit,
                grants: limits.grants,
                cache_dir: self.options.cache_dir.clone(),
                ..SandboxConfig::default()
            };
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || Sandbox::load(&engine, &path, config))
                .await
                .map_err(|e| format!("loading the app failed: {e}"))?
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .await
        .cloned()
    }

    /// The app's file, fetched from the coordinator unless already here.
    async fn fetch_app(&self, app: &AppRef) -> Result<PathBuf, String> {
        if app.sha256.len() != 64 || !app.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{}` is not a sha256", app.sha256));
        }
        let lock = self
            .app_locks
            .lock()
            .expect("app locks")
            .entry(app.sha256.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let path = self.apps_dir.join(format!("{}.wasm", app.sha256));
        if path.is_file() {
            return Ok(path);
        }
        let started = Instant::now();
        let mut bytes = Vec::with_capacity(app.size.min(1 << 30) as usize);
        while (bytes.len() as u64) < app.size {
            let offset = bytes.len() as u64;
            let sha = app.sha256.clone();
            let chunk = self
                .rpc(Duration::from_secs(60), |c, ctx, _| {
                    let sha = sha.clone();
                    async move { c.fetch_app(ctx, sha, offset).await }
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot fetch the app from the coordinator: {e}"))?;
            if chunk.0.is_empty() {
                return Err("the coordinator's copy of the app is shorter than its size".into());
            }
            bytes.extend_from_slice(&chunk.0);
        }
        if mr_core::sha256_hex(&bytes) != app.sha256 {
            return Err("the app fetched from the coordinator does not match its sha256".into());
        }
        let dir = self.apps_dir.clone();
        let p = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let tmp = tempfile::NamedTempFile::new_in(&dir)?;
            std::fs::write(tmp.path(), &bytes)?;
            tmp.persist(&p).map_err(|e| e.error)?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot store the app in {}: {e}", path.display()))?;
        tracing::info!(sha256 = %app.sha256, bytes = app.size, ms = started.elapsed().as_millis() as u64, "fetched app");
        Ok(path)
    }

    /// Stops: no new work, running attempts cancelled (and waited for a
    /// little), and the coordinator told at once if it can be reached.
    async fn stop(&self, say_goodbye: bool) {
        self.stopping.store(true, Ordering::SeqCst);
        for t in self.running.lock().expect("running lock").values() {
            t.control.cancel();
        }
        let deadline = Instant::now() + WATCHDOG_GRACE;
        while Instant::now() < deadline && !self.running.lock().expect("running lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !say_goodbye {
            return;
        }
        let link = self.link.lock().await;
        if let (Some(c), Some(id)) = (&link.client, &link.id) {
            match c.goodbye(context(Duration::from_secs(2)), id.clone()).await {
                Ok(Ok(())) => tracing::info!(worker = %id, "left the coordinator"),
                Ok(Err(e)) => tracing::debug!("goodbye refused: {e}"),
                Err(e) => tracing::debug!("cannot say goodbye: {e}"),
            }
        }
    }
}

/// Runs a task on a thread of its own and waits for it, giving up (the
/// thread is abandoned) past its time limit plus a grace, or a grace after
/// it was cancelled: a guest blocked in a host call cannot be interrupted.
async fn on_thread<T: Send + 'static>(
    name: String,
    limit: Duration,
    control: &TaskControl,
    f: impl FnOnce() -> Result<T, TaskError> + Send + 'static,
) -> Result<T, TaskError> {
    let (tx, mut rx) = oneshot::channel();
    spawn_task(name, f, move |r| {
        let _ = tx.send(r);
    })
    .map_err(|source| TaskError::Io {
        what: "cannot start a task thread".into(),
        source,
    })?;
    let deadline = Instant::now() + limit + WATCHDOG_GRACE;
    let mut cancelled_at: Option<Instant> = None;
    loop {
        tokio::select! {
            r = &mut rx => {
                return r.unwrap_or_else(|_| Err(TaskError::Panic("the task thread vanished".into())));
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(TaskError::Watchdog(limit + WATCHDOG_GRACE));
                }
                if control.is_cancelled() {
                    let at = *cancelled_at.get_or_insert(now);
                    if now.duration_since(at) >= WATCHDOG_GRACE {
                        return Err(TaskError::Watchdog(WATCHDOG_GRACE));
                    }
                }
            }
        }
    }
}

/// Fetches partition `partition` of every map output into `dir`, a few at
/// a time, each with a few tries; returns the local copies in map order
/// (so equal keys meet the reducer in the same order as with `mr run`).
///
/// Fails with the map task, its attempt and why, for the first output that
/// cannot be fetched.
async fn fetch_all(
    job: &JobId,
    partition: u32,
    inputs: &[MapLocation],
    dir: &Path,
    control: &TaskControl,
) -> Result<Vec<(PathBuf, SegmentInfo)>, (u32, u32, String)> {
    let fetches: Vec<_> = inputs
        .iter()
        .filter(|l| l.segment.records > 0)
        .map(|l| {
            let dest = dir.join(format!("m{}", l.map));
            fetch_one(job.clone(), partition, l.clone(), dest, control.clone())
        })
        .collect();
    let mut got: Vec<(u32, PathBuf, SegmentInfo)> = futures::stream::iter(fetches)
        .buffer_unordered(FETCH_PARALLEL)
        .try_collect()
        .await?;
    got.sort_by_key(|(map, _, _)| *map);
    Ok(got.into_iter().map(|(_, p, s)| (p, s)).collect())
}

/// Fetches one segment, with a few tries.
async fn fetch_one(
    job: JobId,
    partition: u32,
    l: MapLocation,
    dest: PathBuf,
    control: TaskControl,
) -> Result<(u32, PathBuf, SegmentInfo), (u32, u32, String)> {
    let req = FetchRequest {
        job,
        map: l.map,
        attempt: l.attempt,
        partition,
    };
    let mut last = String::new();
    for i in 0..FETCH_TRIES {
        if control.is_cancelled() {
            return Err((l.map, l.attempt, "cancelled".to_string()));
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(250 << (2 * (i - 1)))).await;
        }
        match shuffle::fetch(l.addr, &req, l.segment, &dest, &control).await {
            Ok(()) => {
                let local = SegmentInfo {
                    offset: 0,
                    ..l.segment
                };
                return Ok((l.map, dest, local));
            }
            Err(e) => {
                tracing::debug!(map = l.map, try_ = i + 1, "fetch failed: {e}");
                last = e;
            }
        }
    }
    Err((l.map, l.attempt, last))
}

/// The worker's data directory: `jobs/` (map output) and `apps/`.
struct DataDir {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    _lock: Option<std::fs::File>,
}

impl DataDir {
    fn open(dir: Option<&Path>) -> Result<DataDir, WorkerError> {
        let io = |what: String| move |source| WorkerError::Io { what, source };
        let data = match dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(io(format!("cannot create {}", d.display())))?;
                let lock =
                    std::fs::File::open(d).map_err(io(format!("cannot open {}", d.display())))?;
                if lock.try_lock().is_err() {
                    return Err(WorkerError::Io {
                        what: format!("another mr worker uses the data directory {}", d.display()),
                        source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
                    });
                }
                // Map output of an earlier run is of no use: its worker id is gone.
                let jobs = d.join("jobs");
                match std::fs::remove_dir_all(&jobs) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(format!("cannot clear {}", jobs.display()))(e))
                    }
                    _ => {}
                }
                DataDir {
                    root: d.to_path_buf(),
                    _tmp: None,
                    _lock: Some(lock),
                }
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("mr-worker-")
                    .tempdir()
                    .map_err(io("cannot create a temporary data directory".into()))?;
                DataDir {
                    root: t.path().to_path_buf(),
                    _tmp: Some(t),
                    _lock: None,
                }
            }
        };
        for sub in [data.jobs(), data.apps()] {
            std::fs::create_dir_all(&sub)
                .map_err(io(format!("cannot create {}", sub.display())))?;
        }
        Ok(data)
    }

    fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    fn apps(&self) -> PathBuf {
        self.root.join("apps")
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self._tmp.is_none() {
            let _ = std::fs::remove_dir_all(self.jobs());
        }
    }
}
