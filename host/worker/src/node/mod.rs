//! A worker: takes tasks from a coordinator, runs them in the sandbox,
//! heart-beats, and serves its map output. The same code is `mr worker`
//! (over TCP, with a shuffle server) and `mr run`'s in-process worker
//! (in-memory RPC, no shuffle server: map output is read in place).
//!
//! ```text
//!  register ──▶ ┌ heartbeat loop: the running attempts and their progress; the
//!               │   coordinator holds the call until it has news (cancel, forget
//!               │   a finished job, shut down) or a heartbeat interval passes
//!               ├ request loop: long-polls for one task per free slot; each task runs
//!               │   on a thread of its own in the sandbox, then is reported
//!               └ shuffle server (a cluster's workers): serves map output to reducers
//! ```
//!
//! By concern: [`connection`] (reaching the coordinator, registering,
//! retrying), [`heartbeats`], [`attempts`] (running tasks), [`apps`] (the
//! app cache), [`fetch`] (gathering a reduce's input), [`data_dir`].
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

mod apps;
mod attempts;
mod connection;
mod data_dir;
mod fetch;
mod heartbeats;
mod metrics;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mr_core::roots::DataRoots;
use mr_core::rpc::{AttemptKey, Register, TaskLimits, Transport};
use mr_core::tls::{rustls, Token};
use mr_runtime::{LoadError, Sandbox, SandboxEngine, TaskControl};
use tokio::sync::Notify;

use crate::shuffle::{self, MapOutputs, ShuffleAuth};
use crate::WATCHDOG_GRACE;

pub use connection::WorkerError;

/// Where a worker's map output can be read from.
#[derive(Clone, Debug)]
pub enum Shuffle {
    /// Serve it to other workers on this address (`None`: the address this
    /// machine uses to reach the coordinator, any free port).
    Serve(Option<SocketAddr>),
    /// Serve nothing: only this worker's own reducers read its output, in
    /// place.
    InPlace,
    /// Serve nothing, and share map output with the other workers of this
    /// process that have the same pool (`mr run`'s workers): each reads
    /// any of theirs in place.
    Shared(Pool),
}

/// Map output shared by the workers of one process (see
/// [`Shuffle::Shared`]); it lives in the data directory of the first of
/// them to start.
#[derive(Clone, Default)]
pub struct Pool(Arc<std::sync::OnceLock<Arc<MapOutputs>>>);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

/// An app already loaded, handed to the worker so it need not fetch and
/// compile it (`mr run` loads the app to check it before anything runs).
#[derive(Clone)]
pub struct Preloaded {
    pub sha256: String,
    pub limits: TaskLimits,
    pub sandbox: Arc<Sandbox>,
}

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerOptions {
    /// How to reach the coordinator.
    pub coordinator: Transport,
    /// Tasks run at once.
    pub slots: u32,
    /// Where map output and fetched apps go (default: a temporary
    /// directory in `tmp_dir` or the system's, removed on exit).
    pub data_dir: Option<PathBuf>,
    /// Where the temporary data directory goes, without `data_dir`.
    pub tmp_dir: Option<PathBuf>,
    pub shuffle: Shuffle,
    /// How long to keep trying to reach the coordinator before giving up.
    pub give_up_after: Duration,
    /// Where the sandbox caches compiled apps.
    pub cache_dir: Option<PathBuf>,
    /// The protocol version announced (tests use another to be refused).
    pub protocol_version: u32,
    /// The sandbox engine to use (default: a new one).
    pub engine: Option<SandboxEngine>,
    /// Apps already loaded.
    pub preloaded: Vec<Preloaded>,
    /// How long stopping waits for running attempts to end.
    pub stop_grace: Duration,
    /// The worker token (`None`: the coordinator is in process or runs
    /// with `--insecure`). With it, `coordinator` must be TLS.
    pub token: Option<Token>,
    /// Trees this worker itself allows jobs to read and write (beside the
    /// coordinator's data roots; unlimited: only the coordinator's).
    pub data_roots: DataRoots,
    /// Where its token was read from: never a job's input.
    pub token_file: Option<PathBuf>,
    /// Serve `/metrics` here (`mr worker --metrics`).
    pub metrics: Option<SocketAddr>,
    /// When to fetch map output compressed (`--shuffle-compression`).
    pub shuffle_compression: crate::shuffle::Compression,
}

impl WorkerOptions {
    /// The options of `mr worker` with the coordinator at `addr`.
    pub fn new(coordinator: Transport, slots: u32) -> Self {
        WorkerOptions {
            coordinator,
            slots,
            data_dir: None,
            tmp_dir: None,
            shuffle: Shuffle::Serve(None),
            give_up_after: Duration::from_secs(120),
            cache_dir: None,
            protocol_version: mr_core::rpc::PROTOCOL_VERSION,
            engine: None,
            preloaded: Vec::new(),
            stop_grace: WATCHDOG_GRACE,
            token: None,
            data_roots: DataRoots::unlimited(),
            token_file: None,
            metrics: None,
            shuffle_compression: Default::default(),
        }
    }
}

/// An attempt this worker runs.
pub(crate) struct RunningTask {
    pub control: TaskControl,
    /// Set while the attempt waits on bounded host work (fetching and
    /// compiling the app, fetching map output): that counts as progress.
    pub preparing: Arc<AtomicBool>,
}

/// The worker's shared state.
pub(crate) struct Worker {
    pub options: WorkerOptions,
    pub register: Register,
    pub link: tokio::sync::Mutex<connection::Link>,
    pub running: Mutex<HashMap<AttemptKey, RunningTask>>,
    pub free: Mutex<BTreeSet<u32>>,
    pub freed: Notify,
    /// The highest assignment number received since registering.
    pub received: AtomicU64,
    pub stopping: AtomicBool,
    pub engine: SandboxEngine,
    pub apps: apps::AppCache,
    pub outputs: Arc<MapOutputs>,
    /// This worker's private key (with a token).
    pub key: Option<rustls::pki_types::PrivateKeyDer<'static>>,
    /// Its certificate's TLS settings for the shuffle, once registered.
    pub shuffle_auth: RwLock<Option<Arc<ShuffleAuth>>>,
    /// The coordinator's data roots.
    pub roots: Mutex<DataRoots>,
    /// This worker's own directories (map output, apps, compiled apps):
    /// never a job's to read or write.
    pub private_dirs: Vec<PathBuf>,
    /// What its `/metrics` counts.
    pub stats: metrics::Stats,
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
    let data = data_dir::DataDir::open(options.data_dir.as_deref(), options.tmp_dir.as_deref())?;
    let engine = match &options.engine {
        Some(e) => e.clone(),
        None => SandboxEngine::new().map_err(WorkerError::Sandbox)?,
    };
    let listener = match &options.shuffle {
        Shuffle::InPlace | Shuffle::Shared(_) => None,
        Shuffle::Serve(listen) => {
            let listen = match listen {
                Some(a) => *a,
                None => SocketAddr::new(connection::probe(&options).await?, 0),
            };
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|source| WorkerError::Io {
                    what: format!("cannot listen for shuffle requests on {listen}"),
                    source,
                })?;
            Some(l)
        }
    };
    // Bound before registering: a busy port is an error before anything
    // else starts.
    let metrics_listener = match options.metrics {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Io {
                    what: format!("cannot listen for /metrics on {addr} (--metrics)"),
                    source,
                })?;
            let at = l.local_addr().map_err(|source| WorkerError::Io {
                what: "cannot read the /metrics address".into(),
                source,
            })?;
            match options.token {
                Some(_) => tracing::info!(
                    "/metrics at https://{at}/metrics (certificate name {}, send the metrics token)",
                    mr_core::tls::METRICS_NAME
                ),
                None => tracing::info!("/metrics at http://{at}/metrics"),
            }
            Some(l)
        }
    };
    let shuffle_addr = match &listener {
        Some(l) => Some(l.local_addr().map_err(|source| WorkerError::Io {
            what: "cannot read the shuffle address".into(),
            source,
        })?),
        None => None,
    };
    let outputs = match &options.shuffle {
        Shuffle::Shared(pool) => pool
            .0
            .get_or_init(|| Arc::new(MapOutputs::new(data.jobs())))
            .clone(),
        _ => Arc::new(MapOutputs::new(data.jobs())),
    };
    let (key, public_key) = match &options.token {
        Some(_) => {
            let (k, p) = mr_core::tls::new_key();
            (Some(k), p)
        }
        None => (None, Vec::new()),
    };
    let worker = Arc::new(Worker {
        register: Register {
            version: options.protocol_version,
            host: hostname(),
            pid: std::process::id(),
            slots: options.slots,
            shuffle_addr,
            previous: None,
            token: options
                .token
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_default(),
            public_key,
        },
        key,
        shuffle_auth: RwLock::new(None),
        roots: Mutex::new(DataRoots::unlimited()),
        private_dirs: [
            Some(data.jobs()),
            Some(data.apps()),
            options.cache_dir.clone(),
            options.token_file.clone(),
        ]
        .into_iter()
        .flatten()
        .collect(),
        link: tokio::sync::Mutex::new(connection::Link::default()),
        running: Mutex::new(HashMap::new()),
        free: Mutex::new((0..options.slots).collect()),
        freed: Notify::new(),
        received: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        apps: apps::AppCache::new(data.apps(), &options.preloaded),
        engine,
        outputs: outputs.clone(),
        stats: metrics::Stats::default(),
        options,
    });
    worker.client().await?;
    let shuffle = listener.map(|l| {
        let guard = if worker.options.token.is_some() {
            let w = Arc::downgrade(&worker);
            shuffle::Guard::Tls(Box::new(move || {
                w.upgrade()?
                    .shuffle_auth
                    .read()
                    .expect("shuffle auth lock")
                    .clone()
            }))
        } else {
            shuffle::Guard::Insecure
        };
        tokio::spawn(shuffle::serve(l, outputs, guard))
    });
    let metrics =
        metrics_listener.map(|l| tokio::spawn(metrics::serve(Arc::downgrade(&worker), l)));
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
    if let Some(s) = shuffle {
        s.abort();
    }
    if let Some(m) = metrics {
        m.abort();
    }
    drop(data);
    result
}

fn hostname() -> String {
    mr_core::hostname().unwrap_or_else(|| "unknown".into())
}

impl Worker {
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Stops: no new work, running attempts cancelled (and waited for a
    /// little), and the coordinator told at once if it can be reached.
    async fn stop(&self, say_goodbye: bool) {
        self.stopping.store(true, Ordering::SeqCst);
        for t in self.running.lock().expect("running lock").values() {
            t.control.cancel();
        }
        let deadline = Instant::now() + self.options.stop_grace;
        while Instant::now() < deadline && !self.running.lock().expect("running lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if say_goodbye {
            self.goodbye().await;
        }
    }
}

/// Loads an app outside the async runtime's threads.
pub(crate) async fn load_blocking(
    engine: SandboxEngine,
    path: PathBuf,
    config: mr_runtime::SandboxConfig,
) -> Result<Sandbox, String> {
    tokio::task::spawn_blocking(move || Sandbox::load(&engine, &path, config))
        .await
        .map_err(|e| format!("loading the app failed: {e}"))?
        .map_err(|e: LoadError| e.to_string())
}
